# ViT-B Vol-JEPA, the paper's run: batch 768, ~510K steps, bf16, activation checkpointing
model_size = "vitb"
global_batch = 768
max_steps = 510_000
grad_checkpointing = True
num_workers = 8
ckpt_interval = 2000
out_dir = "out/jepa_vitb"
