"""Can the connector carry an image-only signal to the LM? A synthetic read-the-images check.

    python bench/bench_llava_read.py --lr=3e-4,1e-3,3e-3 --image_dropout=0,0.5 --iters=240
    python bench/bench_llava_read.py --task=side --pos_freqs=0,4 --hemispheres=0,1   # left from right?

Every study has the same indication ("Headache.") and one of three answers; the answer is planted
only in the images: one T1 series of n_tok random tokens (enc dim 32), of which 10% are shifted by
sqrt(dim) along a fixed direction per answer. Chance is 1/3; reading the images gives 1. The model
is a config's recipe (default config/llava_tiny.py: connector size, LM, LM rate, batch size), trained
with AdamW as train_llava.py does (no warm-up), for each connector rate and image-dropout rate.
For each run it prints exact-answer accuracy on 60 new studies, and how separable the three classes
are in the connector's output (nearest-centroid accuracy and between/within-class variance ratio
of the projected visual embeddings: a connector that keeps the signal but an LM that does not read
it shows high separability at chance accuracy). tests/test_llava.py runs a small version of this
with the config's rates, through run().

--task=side: the answer is where the signal lies. Each study's tokens sit on an 8 x 8 x 8 grid
stored as "IPR" (grid axis 2 runs toward the right); a left or a right lesion is 10% of the tokens,
all in that half, shifted along one direction shared by both sides; the third answer has no
lesion. A connector that sees a bag of tokens can tell lesion from none but not its side (at most
2/3). --hemispheres=1 gives each side its own latents and can reach 1; additive position features
(--pos_freqs > 0) did not in 600 iterations (BENCHMARKS.md, Report generator, "Side").
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from nvfm import llava  # noqa: E402
from nvfm.configurator import read_config_file  # noqa: E402
from nvfm.llm import load_llm, resolve_llm  # noqa: E402

ANSWERS = {"class": [["Left subdural hematoma."], ["Generalized volume loss."], []],
           "side": [["Left subdural hematoma."], ["Right subdural hematoma."], []]}
GRID = 8  # side task: tokens on a GRID^3 grid


def planted(n, u, n_tok, g, task="class"):
    out = []
    for i in range(n):
        c = i % 3
        x = torch.randn(n_tok, u.shape[1], generator=g)
        e = {"family": "T1", "modality": "MR", "emb": x}
        if task == "class":
            x[torch.randperm(n_tok, generator=g)[:n_tok // 10]] += u.shape[1] ** 0.5 * u[c]
        else:
            cells = torch.randperm(GRID ** 3, generator=g)[:n_tok].sort().values
            coords = torch.stack([cells // GRID ** 2, cells // GRID % GRID, cells % GRID], 1)
            if c < 2:  # left: low W index (the W axis runs toward the right), right: high
                half = torch.nonzero((coords[:, 2] < GRID // 2) == (c == 0)).flatten()
                x[half[torch.randperm(len(half), generator=g)[:n_tok // 10]]] += u.shape[1] ** 0.5 * u[0]
            e.update(coords=coords.numpy(), orientation="IPR")
        out.append(([e], c))
    return out


def separability(gen, train, new):
    """Nearest-centroid accuracy on `new` and between/within variance ratio of the visual embeddings."""
    with torch.no_grad():
        f = lambda data: torch.stack([gen._visual([s])[0].flatten() for s, _ in data])
        a, b = f(train), f(new)
    ya, yb = torch.tensor([c for _, c in train]), torch.tensor([c for _, c in new])
    mu = a.mean(0)
    cent = torch.stack([(a - mu)[ya == c].mean(0) for c in range(3)])
    acc = (torch.cdist(b - mu, cent).argmin(1) == yb).float().mean().item()
    within = torch.cat([(a - mu)[ya == c] - cent[c] for c in range(3)]).pow(2).sum(-1).mean().item()
    return acc, cent.pow(2).sum(-1).mean().item() / within


def run(cfg, lr, dropout, iters, seed, n_tok, dim=32, n_new=60, task="class", pos_freqs=None, hemispheres=None):
    """Train the config's recipe on planted studies -> (accuracy on n_new new studies, NC acc, B/W, seconds).
    pos_freqs, hemispheres: None = the config's."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=1)
    train, new = planted(200, u, n_tok, g, task), planted(n_new, u, n_tok, g, task)
    answers = ANSWERS[task]
    lm, tok = load_llm(resolve_llm(cfg.get("llm", "")))
    torch.manual_seed(seed)
    gen = llava.ReportGenerator(lm, tok, dim, cfg["perceiver_dim"], cfg["perceiver_depth"], cfg["perceiver_heads"],
                                cfg["n_latents"], pos_freqs=cfg.get("pos_freqs", 0) if pos_freqs is None else pos_freqs,
                                hemispheres=cfg.get("hemispheres", False) if hemispheres is None else hemispheres)
    opt = torch.optim.AdamW([{"params": gen.connector.parameters(), "lr": lr},
                             {"params": lm.parameters(), "lr": cfg["llm_lr"]}], weight_decay=0.01, betas=(0.9, 0.95))
    t0 = time.time()
    for _ in range(iters):
        batch = [train[j] for j in torch.randint(0, len(train), (cfg["batch_size"],), generator=g).tolist()]
        studies = [[] if torch.rand(1, generator=g).item() < dropout else s for s, _ in batch]
        loss = gen(studies, ["Headache."] * len(batch), [answers[c] for _, c in batch])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
    gen.eval()
    out = gen.generate([s for s, _ in new], ["Headache."] * len(new), max_new_tokens=32)
    acc = sum(llava.parse_findings(o)[0] == answers[c] for o, (_, c) in zip(out, new)) / len(new)
    return acc, *separability(gen, train, new), time.time() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "config", "llava_tiny.py"))
    ap.add_argument("--lr", default="3e-4,3e-3", help="connector learning rates, comma-separated")
    ap.add_argument("--image_dropout", default="0", help="comma-separated")
    ap.add_argument("--iters", type=int, default=240)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n_tok", type=int, default=200)
    ap.add_argument("--task", default="class", choices=["class", "side"])
    ap.add_argument("--pos_freqs", default=None, help="comma-separated; default the config's")
    ap.add_argument("--hemispheres", default=None, help="comma-separated 0/1; default the config's")
    ap.add_argument("--llm", default=None, help="override the config's LM (e.g. smollm2)")
    ap.add_argument("--batch_size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--llm_lr", type=float, default=None, help="override the config's LM rate")
    a = ap.parse_args()
    cfg = read_config_file(a.config)[1]
    for k in ("llm", "batch_size", "llm_lr"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    print(f"LM {cfg.get('llm') or 'tiny random Qwen3'}, LM rate {cfg['llm_lr']}, batch {cfg['batch_size']}, "
          f"{a.iters} iterations, {a.n_tok} tokens per study")
    torch.set_num_threads(1)
    print(f"task {a.task}")
    print(f"{'conn lr':>8}{'dropout':>8}{'pos':>4}{'hemi':>5}{'seed':>5}{'accuracy':>9}{'NC acc':>7}{'B/W':>8}{'s':>6}")
    pos = [cfg.get("pos_freqs", 0)] if a.pos_freqs is None else list(map(int, a.pos_freqs.split(",")))
    hemi = [bool(cfg.get("hemispheres", False))] if a.hemispheres is None else [h == "1" for h in a.hemispheres.split(",")]
    for lr in map(float, a.lr.split(",")):
        for d in map(float, a.image_dropout.split(",")):
            for p in pos:
                for h in hemi:
                    for s in map(int, a.seeds.split(",")):
                        acc, nc, bw, t = run(cfg, lr, d, a.iters, s, a.n_tok, task=a.task, pos_freqs=p, hemispheres=h)
                        print(f"{lr:8.0e}{d:8.2f}{p:4d}{h:5d}{s:5d}{acc:9.3f}{nc:7.2f}{bw:8.2f}{t:6.0f}", flush=True)


if __name__ == "__main__":
    main()
