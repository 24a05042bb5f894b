# ViT-L Vol-JEPA (larger than the paper's released model)
model_size = "vitl"
predictor_dim = 768
predictor_depth = 12
predictor_heads = 12
global_batch = 768
max_steps = 510_000
grad_checkpointing = True
num_workers = 8
ckpt_interval = 2000
out_dir = "out/jepa_vitl"
