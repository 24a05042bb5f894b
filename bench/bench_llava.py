"""Report generation cost per study on this machine: encode + connector + generate.

    python bench/bench_llava.py [--studies=4] [--new_tokens=64] [--series=4] [--tokens=800]

A synthetic MR study of `series` volumes with `tokens` foreground tokens each (about a demo-cohort
head at 4 x 16 x 16 mm patches) goes through the tiny random encoder (model size "tiny"), the
connector, and the tiny random Qwen3 (the demo configuration, config/llava_tiny.py), generating
exactly `new_tokens` tokens (min_new_tokens = max_new_tokens, so the count does not depend on the
random weights). Reference measured in the same run: the same LM generating the same number of
tokens from the text prompt alone (the text-only baseline); the ratio is the price of the images.
Also times the SPEC-size connector (dim 768, 6 layers, 64 latents) on the same tokens.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

studies = 4
new_tokens = 64
series = 4
tokens = 800
threads = 0  # 0 = torch default
from nvfm.configurator import configure  # noqa: E402
configure(globals())
if threads:
    torch.set_num_threads(threads)

from nvfm import llava  # noqa: E402
from nvfm.llm import load_llm, tiny_qwen3_cached  # noqa: E402
from nvfm.model import Encoder, EncoderConfig  # noqa: E402


def timed(fn, reps):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - t) / reps, out


torch.manual_seed(0)
enc = Encoder(EncoderConfig.preset("tiny")).eval()
lm, tok = load_llm(tiny_qwen3_cached())
gen = llava.ReportGenerator(lm, tok, enc.config.dim, dim=64, depth=2, heads=4, n_latents=16).eval()
big = llava.Connector(enc.config.dim, lm.config.hidden_size, 768, 6, 8, 64).eval()

x = torch.rand(series * tokens, enc.config.patch_dim) * 255
coords = torch.stack(torch.meshgrid(torch.arange(10), torch.arange(10), torch.arange(8), indexing="ij"), -1).reshape(-1, 3)
coords = coords[:tokens].repeat(series, 1).to(torch.int32)
cu = torch.arange(series + 1, dtype=torch.int32) * tokens
with torch.no_grad():
    t_enc, emb = timed(lambda: enc(x, coords, cu, tokens), studies)
study = [{"family": f, "modality": "MR", "emb": emb[i * tokens:(i + 1) * tokens]}
         for i, f in enumerate(["T1", "T2", "FLAIR", "DWI", "ADC", "SWI", "T1C", "OTHER"][:series])]
types = torch.arange(series)
with torch.no_grad():
    t_conn, _ = timed(lambda: gen.connector(emb, cu, tokens, types), studies)
    t_big, _ = timed(lambda: big(emb, cu, tokens, types), max(1, studies // 2))
kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
t_gen, out = timed(lambda: gen.generate([study], ["Headache."], **kw), studies)
t_txt, _ = timed(lambda: gen.generate([[]], ["Headache."], **kw), studies)
total = t_enc + t_gen
print(f"machine: {os.cpu_count()} CPU threads={torch.get_num_threads()}, torch {torch.__version__}")
print(f"study: {series} series x {tokens} tokens; LM tiny Qwen3 ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M), "
      f"{new_tokens} new tokens")
print(f"encode (tiny encoder)           {t_enc * 1e3:8.1f} ms/study")
print(f"connector (demo: 64d, 2 layers) {t_conn * 1e3:8.1f} ms/study")
print(f"connector (SPEC: 768d, 6 layers){t_big * 1e3:8.1f} ms/study")
print(f"generate (incl. connector)      {t_gen * 1e3:8.1f} ms/study  ({new_tokens / t_gen:.0f} tokens/s)")
print(f"text-only generate (reference)  {t_txt * 1e3:8.1f} ms/study")
print(f"encode + generate               {total * 1e3:8.1f} ms/study; images cost x{t_gen / t_txt:.2f} "
      f"of text-only generation")
