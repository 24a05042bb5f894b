# Report generator on the demo cohort, CPU, a few minutes: tiny random-init Qwen3 (the real Qwen
# tokenizer), a small perceiver, short run. For a real model: --llm=/path/to/Qwen3-8B and the
# SPEC connector (perceiver_dim=768, perceiver_depth=6, perceiver_heads=8, n_latents=64).
llm = ""                 # "" = nvfm.llm.tiny_qwen3_cached(): 2 layers, hidden 64
perceiver_dim = 64
perceiver_depth = 2
perceiver_heads = 4
n_latents = 16
batch_size = 8
max_iters = 150        # ~3-5 min on 2 idle cores
lr = 1e-3
llm_lr = 1e-3            # a random-init LM needs a large rate; use ~2e-5 for a pretrained one
warmup_frac = 0.05
grad_ckpt = False        # nothing to save at this size
log_interval = 25
ckpt_interval = 100
max_new_tokens = 160
gen_batch_size = 16
