"""Vol-JEPA learning curve: frozen-feature probe quality against pretraining steps.

    python bench/bench_jepa_curve.py --cohort=DIR [--studies=200 --steps=0,250,1000,3000 --seeds=0,1,2]

For each seed, one train_jepa.py run with a config (default config/jepa_tiny.py) and
max_steps = the largest budget; the run is stopped at every budget of --steps (stop_at_step,
then --init_from=resume, which is bit-for-bit), and the student and the EMA teacher written
there are scored with nvfm.monitor.ProbeSet on every study of the cohort:
  - lesion-token AUROC (fit on train studies, AUROC on val + test, study-bootstrap 95% CI), from
    the features alone, with each token's position given to the probe as well, and per diagnosis
    (macro over the lesion kinds with >= 20 scored tokens, nvfm.monitor.lesion_kind_auroc);
  - study-level macro AUROC (5-fold CV, classes with >= 5 positives and negatives);
  - effective rank of the token features.
Step 0 is the random init (the same seed's init). Two supervised bounds (--supervised=True)
train the same encoder end to end on the train studies for the training FLOPs of the longest
pretraining run of seed 0 (summed from its log.jsonl, so machine load and probe or checkpoint
pauses do not enter), and are scored the same way:
  - on the study labels (mean-pooled tokens, a linear head, binary cross-entropy over the
    classes with a positive; its study CV includes the studies it was trained on: optimistic);
  - on the lesion-token labels themselves (a linear head on every token): how far any encoder
    of this size and compute lifts the lesion-token probe on this cohort.
Two encoder-free references score each token's seven intensity statistics (mean, std, five
percentiles; nvfm.monitor.TokenStatistics) in place of features, with the linear token probe and
with gradient-boosted trees: how much of a token's label its own intensities carry, and how much
of it a linear readout gets without features that make it linear.

--control=True: the positive control instead of the demo phantom (nvfm.loader.write_control_shards:
a volume-level latent, a faint grating's orientation, that a token's context shows and its position
does not). It scores the token AUROC of that latent (every token labelled with its volume's), the
study AUROC and the rank, and only the study-label bound. It shows whether the pretext task learns
what the context predicts, and what the rank does meanwhile.

The table of pretext losses (each budget's last log record) gives the loss against the
position-only control's, in full and beyond brightness (train_jepa.py's `loss_content`).

DIR gets the cohort (nvfm.phantom, created when missing), its shards, the runs, results.json
and curve.png (--plot). Every stage resumes: a rerun skips what is done.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("NVFM_QUIET", "1")

# config (nanoGPT style: module globals, overridable with --key=value)
cohort = "/tmp/nvfm_jepa_curve"
studies = 200
steps = (0, 250, 1000, 3000)
seeds = (0, 1, 2)
config = "config/jepa_tiny.py"
extra = ""                 # more train_jepa.py flags, space separated (an ablation)
supervised = True
n_boot = 1000
plot = True
control = False            # the positive control cohort instead of the demo phantom (above)
from nvfm.configurator import configure  # noqa: E402
configure(globals())

import torch  # noqa: E402

from nvfm.checkpoint import load_checkpoint  # noqa: E402
from nvfm.data import write_atomic  # noqa: E402
from nvfm.loader import write_control_shards  # noqa: E402
from nvfm.model import Encoder, EncoderConfig, load_encoder  # noqa: E402
from nvfm.monitor import ProbeSet, TokenStatistics  # noqa: E402


def sh(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def make_cohort():
    c, s = os.path.join(cohort, "cohort"), os.path.join(cohort, "shards")
    if control:
        if not os.path.exists(os.path.join(s, "manifest.json")):
            write_control_shards(s, n=studies)
        return None, s
    if not os.path.exists(os.path.join(c, "labels.csv")):
        sh([sys.executable, "-m", "nvfm.phantom", c, "--studies", str(studies), "--seed", "0", "--quiet"])
    if not os.path.exists(os.path.join(s, "manifest.json")):
        sh([sys.executable, "preprocess.py", f"--input={c}/dicom", f"--output={s}", f"--labels={c}/labels.csv",
            f"--findings={c}/findings.jsonl", "--workers=2"])
    return c, s


def pretrain(shards, seed, budgets):
    """One run per seed; copies of both encoders at every budget > 0 -> ({step: snapshot dir}, run dir)."""
    run = os.path.join(cohort, "runs", f"seed{seed}" + (f"-{zlib.crc32(extra.encode()):08x}" if extra else ""))
    out = {}
    for b in sorted(x for x in budgets if x > 0):
        snap = os.path.join(run, f"step{b}")
        done = os.path.join(snap, "done.json")
        if not os.path.exists(done):
            ck = os.path.join(run, "ckpt.pt")
            at = load_checkpoint(ck)["step"] if os.path.exists(ck) else 0
            if at > b:  # the run is past this budget: its encoders are those of a later step
                raise SystemExit(f"{ck}: at step {at}, past the budget {b}, of which no snapshot was kept "
                                 f"({done} missing): leave {b} out of --steps, or remove {run} to retrain")
            resume = ["--init_from=resume"] if at else []
            if at < b:
                sh([sys.executable, "train_jepa.py", config, f"--shards={shards}", f"--out_dir={run}", f"--seed={seed}",
                    f"--max_steps={max(budgets)}", f"--stop_at_step={b}", "--eval_interval=0"] + extra.split() + resume)
            os.makedirs(snap, exist_ok=True)
            for name in ("student", "teacher"):  # encoder.safetensors is the one --export chose
                src = os.path.join(run, f"{name}.safetensors")
                shutil.copy(src if os.path.exists(src) else os.path.join(run, "encoder.safetensors"),
                            os.path.join(snap, f"{name}.safetensors"))
            write_atomic(done, json.dumps({"step": b}))
        out[b] = snap
    return out, run


def pretrain_flops(run, upto):
    """Training FLOPs of a train_jepa.py run up to step `upto`, from its log.jsonl: each log record
    holds the TFLOP/s and volumes/s of the steps since the one before (the last record of a step
    wins when a resumed run logged it twice)."""
    recs = {}
    for line in open(os.path.join(run, "log.jsonl")):
        r = json.loads(line)
        if "tflops" in r:
            recs[r["step"]] = r
    batch = load_checkpoint(os.path.join(run, "ckpt.pt"))["config"]["global_batch"]
    total, prev = 0.0, 0
    for st in sorted(k for k in recs if k <= upto):
        r = recs[st]
        total += r["tflops"] * 1e12 * (st - prev) * batch / r["volumes_per_s"]  # FLOP/s x seconds
        prev = st
    return total


def pretext_losses(run, upto):
    """The pretext-loss fields of a run's last log record at or before step `upto`."""
    last = {}
    for line in open(os.path.join(run, "log.jsonl")):
        r = json.loads(line)
        if "loss" in r and r["step"] <= upto:
            last = r
    return {k: last[k] for k in LOSSES if k in last} | {"step": last.get("step")}


def random_init(like, seed):
    """The encoder a run of this seed starts from (train_jepa seeds torch, then builds the student)."""
    torch.manual_seed(seed)
    return Encoder(EncoderConfig(**vars(like.config))).eval()


def supervised_bound(shards, like, flops, seed=0, lr=1e-3, batch=8, labels="study", probes=None):
    """The same encoder trained end to end for `flops` training FLOPs (forward + backward = 3x the
    forward of nvfm.model.encoder_flops, train_jepa.py's count). Each
    step draws `batch` train volumes (CT: a random window) and encodes every foreground token;
    a linear head is fit with binary cross-entropy on
      labels "study": the study's labels, from the mean-pooled tokens (classes with a positive);
      labels "lesion": every token's lesion label, the very labels the lesion-token probe scores
        (probes.lesion_labels; partial tokens left out, positives weighted by the train set's
        negative/positive ratio): the probe's own ceiling at this compute."""
    from nvfm.data import ShardReader
    from nvfm.model import WINDOWS, encoder_flops, normalize_tokens, volume_windows
    from nvfm.probe import load_labels
    from nvfm.tokenize import patchify
    reader = ShardReader(shards)
    enc = random_init(like, seed).train()
    if labels == "study":
        rows, classes = load_labels(os.path.join(shards, "labels.csv"))  # diagnosis columns only (not sex, subject)
        rows = {r["study_key"]: r for r in rows}
        vols = [i for i, v in enumerate(reader.volumes) if v["split"] == "train" and v["study_key"] in rows]
        Y = torch.tensor([[float(rows[reader.volumes[i]["study_key"]]["y"][c]) for c in classes] for i in vols])
        Y = Y[:, Y.sum(0) > 0]
        head, pos_weight = torch.nn.Linear(enc.dim, Y.shape[1]), None
    elif labels == "lesion":
        # computed once per ProbeSet (token coords do not depend on the encoder): embed only when not yet done
        tok = probes.token_labels if probes.token_labels is not None else probes.lesion_labels(probes.embed(enc))
        vols = [i for i, v in enumerate(reader.volumes)
                if v["split"] == "train" and (v["study_key"], v["volume_id"]) in tok]
        Y = [torch.from_numpy(tok[reader.volumes[i]["study_key"], reader.volumes[i]["volume_id"]].astype(np.int64))
             for i in vols]
        n_pos = sum(int((y == 1).sum()) for y in Y)
        head = torch.nn.Linear(enc.dim, 1)
        pos_weight = torch.tensor(sum(int((y == 0).sum()) for y in Y) / max(n_pos, 1))
    else:
        raise ValueError(f"labels {labels!r}: choose 'study' or 'lesion'")
    opt = torch.optim.AdamW(list(enc.parameters()) + list(head.parameters()), lr=lr, weight_decay=0.05)
    cfg = enc.config
    rng, t0, n, spent = np.random.default_rng(seed), time.time(), 0, 0.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    while spent < flops:
        pick = rng.choice(len(vols), batch)
        xs, cs, lens = [], [], []
        for j in pick:
            i = vols[j]
            w = rng.choice(volume_windows(reader.volumes[i]))
            _, mask = reader.volume(i)
            t, c, _ = patchify([torch.from_numpy(np.array(reader.window(i, w)))],  # a writable copy of the memmap
                               [torch.from_numpy(np.array(mask))])
            xs.append(normalize_tokens(t, WINDOWS.index(w)))
            cs.append(c)
            lens.append(len(t))
        cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
        h = enc(torch.cat(xs), torch.cat(cs), cu, max(lens))
        if labels == "study":
            pooled = torch.stack([h[cu[k]:cu[k + 1]].mean(0) for k in range(batch)])
            loss = bce(head(pooled), Y[torch.from_numpy(pick)])
        else:
            y = torch.cat([Y[j] for j in pick])
            keep = y >= 0
            loss = bce(head(h[keep]).squeeze(1), y[keep].float(), pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
        spent += 3 * encoder_flops(cfg, lens)
    print(f"supervised bound ({labels} labels): {n} steps, {spent / 1e12:.1f} TFLOP in {time.time() - t0:.0f} s, "
          f"last loss {loss.item():.4f}", flush=True)
    return enc.eval()


def main():
    budgets, seed_list = sorted(int(s) for s in steps), [int(s) for s in seeds]
    cdir, shards = make_cohort()
    probes = ProbeSet(shards, cohort=cdir, token_task="grating_y" if control else None)
    keys = [k for k in TITLES if k in probes.figures()]
    path = os.path.join(cohort, "results.json" if not extra else f"results-{zlib.crc32(extra.encode()):08x}.json")
    res = json.load(open(path)) if os.path.exists(path) else {}
    res["meta"] = dict(config=config, extra=extra, studies=studies, steps=budgets, seeds=seed_list)

    def done(tag):  # scored with every figure this probe set gives (results from before a figure was added are not)
        return tag in res and all(k in res[tag] for k in probes.figures())

    def score(tag, enc, classifier="linear", entries=None):  # entries: enc's embedding, when already made
        if not done(tag):
            t0 = time.time()
            entries = probes.embed(enc) if entries is None else entries
            res[tag] = probes.score(entries, n_boot=n_boot, classifier=classifier)
            write_atomic(path, json.dumps(res, indent=1))
            print(f"{tag}: " + " ".join(f"{k} {v:.3f}" for k, v in res[tag].items()
                                         if isinstance(v, float)) + f" ({time.time() - t0:.0f} s)", flush=True)

    like = None
    for seed in seed_list:
        snaps, run = pretrain(shards, seed, budgets)
        for b, snap in snaps.items():
            for name in ("student", "teacher"):
                enc = load_encoder(os.path.join(snap, f"{name}.safetensors"))
                like = enc
                score(f"seed{seed}/{name}/{b}", enc)
            res[f"seed{seed}/flops/{b}"] = pretrain_flops(run, b)
            res[f"seed{seed}/losses/{b}"] = pretext_losses(run, b)
        if 0 in budgets and like is not None:
            score(f"seed{seed}/random/0", random_init(like, seed))
    if supervised and like is not None:
        flops = res[f"seed{seed_list[0]}/flops/{max(budgets)}"]
        for tag, (labels, _) in BOUNDS.items():
            if not done(tag) and (labels == "study" or probes.cohort):
                score(tag, supervised_bound(shards, like, flops, labels=labels, probes=probes))
    stats = None  # the references share one embedding
    for tag, (classifier, _) in REFERENCES.items():
        if not done(tag):
            stats = probes.embed(TokenStatistics()) if stats is None else stats
            score(tag, None, classifier, entries=stats)
    write_atomic(path, json.dumps(res, indent=1))
    table(res, budgets, seed_list, keys)
    if plot:
        draw(res, budgets, seed_list, keys, os.path.splitext(path)[0] + ".png")


# the supervised bounds: result tag -> (the labels they are trained on, their table and plot row)
BOUNDS = {"supervised/0": ("study", "supervised on study labels, same training FLOPs"),
          "supervised-lesion/0": ("lesion", "supervised on lesion-token labels, same training FLOPs")}


# the encoder-free references: result tag -> (the token probes' classifier, their table and plot row);
# each token's 7 intensity statistics (nvfm.monitor.TokenStatistics) in place of an encoder's features
REFERENCES = {"tokenstats-linear/0": ("linear", "no encoder: each token's intensity statistics, linear probe"),
              "tokenstats-tree/0": ("tree", "no encoder: each token's intensity statistics, gradient-boosted trees")}
ROWS = {**{t: label for t, (_, label) in BOUNDS.items()}, **{t: label for t, (_, label) in REFERENCES.items()}}


# the figures of the table and the plot, in their order (those the probe set gives)
TITLES = {"token_auroc": "token AUROC of the volume's latent", "lesion_auroc": "lesion-token AUROC",
          "lesion_auroc_pos": "lesion-token AUROC, position given",
          "lesion_auroc_dx": "lesion-token AUROC per diagnosis (macro)", "study_auroc": "study macro AUROC (CV)",
          "rank": "effective rank"}
LOSSES = ("loss", "loss_position_only", "loss_content", "loss_content_position_only")


def summary(res, name, b, seed_list, key):
    v = [res[f"seed{s}/{name}/{b}"].get(key, np.nan) for s in seed_list if f"seed{s}/{name}/{b}" in res]
    return (float(np.mean(v)), float(np.max(v) - np.min(v)) / 2, len(v)) if v else (np.nan, np.nan, 0)


def table(res, budgets, seed_list, keys):
    print("| encoder | steps | " + " | ".join(TITLES[k] for k in keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    rows = [("random init", "random", 0)] if 0 in budgets else []
    rows += [(n, n, b) for b in budgets if b > 0 for n in ("student", "teacher")]
    for label, name, b in rows:
        cells = [f"{m:.3f} +- {h:.3f}" for m, h, _ in (summary(res, name, b, seed_list, k) for k in keys)]
        print(f"| {label} | {b} | " + " | ".join(cells) + " |")
    for tag in (t for t in ROWS if t in res):
        r = res[tag]
        cells = ["-" if tag in REFERENCES and k == "rank" else f"{r.get(k, np.nan):.3f}" for k in keys]
        print(f"| {ROWS[tag]} | - | " + " | ".join(cells) + " |")
    print("(mean over seeds +- half the range)\n")
    print("| steps (last log record) | loss | position-only control | beyond brightness "
          "| position-only, beyond brightness |")
    print("|---|---|---|---|---|")
    for b in (b for b in budgets if b > 0):
        cells = [f"{m:.4f} +- {h:.4f}" for m, h, _ in (summary(res, "losses", b, seed_list, k) for k in LOSSES)]
        print(f"| {b} | " + " | ".join(cells) + " |")


def draw(res, budgets, seed_list, keys, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.25 * len(keys), 4.8))
    for ax, key in zip(axes, keys):
        for name, color in (("student", "C0"), ("teacher", "C1")):
            xs = [b for b in budgets if b > 0]
            pts = [summary(res, name, b, seed_list, key) for b in xs]
            if 0 in budgets:
                xs, pts = [0] + xs, [summary(res, "random", 0, seed_list, key)] + pts
            m = np.array([p[0] for p in pts])
            h = np.array([p[1] for p in pts])
            ax.errorbar(xs, m, yerr=h, marker="o", color=color, label=name, capsize=3)
        for tag, color, style in zip(ROWS, ("C2", "C2", "C7", "C7"), ("--", ":", "--", ":")):
            # the study probe is linear for both references: drawn once
            same = tag in REFERENCES and REFERENCES[tag][0] != "linear" and key == "study_auroc"
            if tag in res and key in res[tag] and key != "rank" and not same:
                ax.axhline(res[tag][key], color=color, ls=style, label=ROWS[tag])
        ax.set_title(TITLES[key])
        ax.set_xlabel("pretraining steps (0 = random init)")
        ax.set_xscale("symlog", linthresh=max(1, min(b for b in budgets if b > 0)))
    labelled = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, h)
    fig.legend(labelled.values(), labelled.keys(), fontsize=8, ncol=3, loc="lower center")
    fig.tight_layout(rect=(0, 0.07 * -(-len(labelled) // 3), 1, 1))
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
