# ViT-M Vol-JEPA (paper ablation size)
model_size = "vitm"
global_batch = 768
max_steps = 100_000
num_workers = 8
ckpt_interval = 2000
out_dir = "out/jepa_vitm"
