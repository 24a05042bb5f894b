# tiny Vol-JEPA for CPU demos: a few minutes on 2 cores on the demo-cohort shards
model_size = "tiny"
predictor_dim = 64
predictor_depth = 2
predictor_heads = 2
global_batch = 8
max_steps = 60
lr_start, lr_peak, lr_final = 2e-4, 1e-3, 1e-5
ckpt_interval = 30
log_interval = 10
num_workers = 1
out_dir = "out/jepa_tiny"
