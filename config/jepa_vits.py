# ViT-S Vol-JEPA (paper ablation size); per-GPU batch = global_batch / ranks
model_size = "vits"
global_batch = 768
max_steps = 100_000
num_workers = 8
ckpt_interval = 2000
out_dir = "out/jepa_vits"
