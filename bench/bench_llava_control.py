"""Positive control for the report generator: can the connector + LM read findings out of the
images at all, when the features carry them? Writes a copy of a feature cache with a planted
lesion signal, for train_llava.py to be trained on beside the real features:

    python bench/bench_llava_control.py DEMO_OUT features --amp=1.0      # -> DEMO_OUT/features_planted_1.0
    python train_llava.py config/llava_tiny.py --features=DEMO_OUT/features_planted_1.0 \
        --findings=DEMO_OUT/shards/findings.jsonl --out_dir=... (same recipe as the real-feature run)

DEMO_OUT is a demo.sh output folder (cohort/ with the lesion masks, shards/, the feature cache).
Every token that lies (partly) inside a lesion of the ground truth gets
    emb += amp * frac * sigma * u[diagnosis]
frac = share of the token's 4x16x16 box inside the lesion (nvfm.grounding.lesion_token_cover),
u[d] a fixed random unit direction per diagnosis (seeded by its name), sigma = the root of the
cache's total per-dimension token variance (amp = 1 moves a lesion token by one typical token
spread). Only the diagnosis is planted, at the lesion's own tokens: side and size are left to what
the tokens' positions and the encoder already carry. The text-only baseline reads no features,
so one baseline run serves both caches. amp = 0 copies the cache unchanged (a check of the copy).
If the image model trained on the planted cache beats the baseline and the one on the real cache
does not, the report generator can use image evidence and the encoder's features are what is
missing; if neither does, the connector or its training is at fault.
"""
import argparse
import json
import os
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm.data import ShardReader  # noqa: E402
from nvfm.features import FeatureCache, FeatureWriter  # noqa: E402
from nvfm.grounding import lesion_token_cover  # noqa: E402


def direction(name, dim):
    u = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(dim)
    return u / np.linalg.norm(u)


def token_sigma(cache, max_rows=200_000):
    """sqrt(sum over dims of the token variance), from an evenly strided sample of rows."""
    emb, _ = cache._maps()
    step = max(1, len(emb) // max_rows)
    return float(np.sqrt(np.asarray(emb[::step], np.float64).var(0).sum()))


def plant(d, src, amp, out):
    cache = FeatureCache(src)
    rows = [json.loads(line) for line in open(os.path.join(d, "shards", "findings.jsonl")) if line.strip()]
    lesions = {r["study_key"]: r.get("lesions", []) for r in rows}
    cover = lesion_token_cover(os.path.join(d, "cohort"), ShardReader(os.path.join(d, "shards")), rows, cache)
    sigma = token_sigma(cache)
    dirs = {}
    n_tok = 0
    from tqdm import tqdm
    with FeatureWriter(out, f"planted:{amp:g}:{cache.encoder_hash}", cache.dim, "planted lesion signal",
                       overwrite=True) as w:
        for key in tqdm(cache.study_keys(), desc="plant"):
            entries = []
            for e in cache.study(key):
                emb = e["emb"].astype(np.float32)
                frac, which = cover.get((key, e["volume_id"]), (np.zeros(len(emb)), np.full(len(emb), -1)))
                for t in np.nonzero(which >= 0)[0]:
                    name = lesions[key][which[t]]["diagnosis"]
                    u = dirs.setdefault(name, direction(name, cache.dim))
                    emb[t] += amp * frac[t] * sigma * u
                    n_tok += 1
                entries.append(dict(e, emb=emb))
            w.add(key, entries)
    print(f"{out}: amp {amp:g}, sigma {sigma:.3f}, {n_tok} lesion tokens changed, "
          f"{len(dirs)} diagnoses: {', '.join(sorted(dirs))}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_out")
    ap.add_argument("features", help="feature cache folder inside demo_out (or an absolute path)")
    ap.add_argument("--amp", type=float, default=1.0)
    ap.add_argument("--out", default="", help="default: DEMO_OUT/features_planted_<amp>")
    a = ap.parse_args()
    src = a.features if os.path.isabs(a.features) else os.path.join(a.demo_out, a.features)
    plant(a.demo_out, src, a.amp, a.out or os.path.join(a.demo_out, f"features_planted_{a.amp:g}"))
