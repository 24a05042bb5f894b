# Report generator on the demo cohort, CPU, a few minutes: tiny random-init Qwen3 (the real Qwen
# tokenizer), a small perceiver, short run. For a real model: --llm=/path/to/Qwen3-8B and the
# the paper's connector (perceiver_dim=768, perceiver_depth=6, perceiver_heads=8, n_latents=64).
llm = ""                 # "" = nvfm.llm.tiny_qwen3_cached(): 2 layers, hidden 64; "smollm2": config/llava_smollm2.py
perceiver_dim = 64
perceiver_depth = 2
perceiver_heads = 4
n_latents = 4            # per series; 16 (up to 96 visual tokens per MR study) slowed the 2-layer LM (val 3.81 vs 3.42)
batch_size = 8
# A random-init LM with the full 151,936-row Qwen vocabulary needs a large rate: at 1e-3 it was
# still at loss ~5 after 150 iterations (greedy output "with with with ..."); at 1e-2 it fits the
# training reports in ~50 iterations; the val loss is flat from ~60 (both chosen on the val split).
max_iters = 60
# On a 400-study cohort (279 training studies) use 600 (demo.sh does for 200+ studies): the image
# model learns the text more slowly than the text-only baseline and loses to it at 240 iterations,
# but beats it at 600 in every seed (BENCHMARKS.md, "Report generator"); the text-only model overfits by then.
# Half of the training examples lose their images (text-only prompt): on the 96-study cohort the
# image model otherwise memorises studies through their visual tokens (val answer loss 0.78 vs 0.63
# with it; BLEU-2 0.282 -> 0.329, ROUGE-L 0.424 -> 0.501 on val+test; BENCHMARKS.md, "Why the tiny
# recipe is what it is").
image_dropout = 0.5
# Studies are drawn at their natural frequencies, not by the paper's inverse prevalence of the rarest
# label: that leaves unremarkable studies 5% of the draws on the 400-study phantom cohort (35% of
# its studies), and the model then reports a finding for every study (0 of 41 normal val+test
# studies reported as normal). Text-only triage / ROUGE-L: 0.587 / 0.372 with it, 0.826 / 0.685
# without; the image model with --resample_power=0.5: 0.603 / 0.400 (BENCHMARKS.md, "Why the tiny
# recipe is what it is").
resample = False
lr = 3e-4                # connector; 3e-3 left the images unread (tests/test_llava.py; BENCHMARKS.md, connector read check)
llm_lr = 1e-2            # use ~2e-5..2e-4 for a pretrained LM
warmup_frac = 0.05
grad_ckpt = False        # nothing to save at this size
log_interval = 10
ckpt_interval = 1000     # only at the end (the run is short)
eval_interval = 20       # val-split answer loss -> OUT/log.jsonl (model selection; never the test split)
eval_split = "val,test"  # 24 demo studies: 4 test studies alone say nothing; score val+test (7)
max_new_tokens = 160
gen_batch_size = 16
