r"""One public benchmark from your local copy of the dataset to the paper's table rows.

    python bench/bench_public.py --dataset=openbhb --root=/data/openBHB \
        --encoders=out/jepa/encoder.safetensors,random:vitb
    python bench/bench_public.py --dataset=cq500 --root=/data/cq500 --encoders=neurovfm-encoder/,random:vitb
    python bench/bench_public.py --dataset=oasis1 --root=/data/oasis1 --encoders=E --external_from=bench/adni
    python bench/bench_public.py --dataset=aibl --root=/data/aibl --encoders=E --external_from=bench/adni

Runs the documented chain as subprocesses of the stage scripts, for one dataset:
  1. python -m nvfm.benchmarks (the adapter): OUT/labels_<task>.csv, OUT/images/, adapter_report.json;
  2. preprocess.py on the adapter's preprocess input (the adapter's images/ folder; RSNA:
     ROOT/stage_2_train; CQ500: ROOT) -> OUT/shards (nvfm preset) and, for the authors' released
     encoder, OUT/shards_neurovfm (--preset=neurovfm, their token and intensity rules);
  3. encode.py per encoder of --encoders -> OUT/features/<name>;
  4. train_probe.py --protocol=paper per labels_<task>.csv and encoder (task age for the age
     file, else classify; --modality from the file's modality column) -> OUT/probes/<name>/<task>;
  5. evaluate.py per task and encoder -> OUT/eval/<task>/<name>/ (metrics.json, paper_table.md,
     ROC/PR curves or the brain-age scatter), then evaluate.py --merge -> OUT/paper_table.md:
     one row per task and figure, one column per encoder.
--encoders: comma-separated; each an nvfm .safetensors file, the authors' released directory
(config.json + pytorch_model.bin, or a .bin/.pt state dict) or random:<size> (a random-init
baseline, e.g. random:vitb), optionally followed by encode.py settings for that encoder only
(@key=value, e.g. random:vitb@seed=1,random:vitb@seed=2: two random-init baselines). Column
names: --names, else the file's name without extension, the directory's name, or
random_<size>, each with its settings appended (random_vitb_seed1).
External transfer (--external_from=OTHER_OUT, another run's OUT): no probe is trained here; the
probes OTHER_OUT/probes/<name>/<external_task or this task>/probe.pt (same encoder names) are
applied unchanged to this dataset (evaluate.py --external=True), e.g. ADNI -> OASIS-1 or AIBL dementia;
their rows read "<dataset> <- <OTHER_OUT's folder name>: ... (external)". A dataset that shares a
study key or a subject with the studies a probe was fitted, tuned or tested on (as its probe.pt's
seen_keys / seen_subjects / test_keys record them, evaluate.py's rule; a probe without them: the
labels file it was trained on, else OTHER_OUT's labels file of that task) is the probe's own, not an
external one: an error before evaluate.py (seen only when both runs used one --salt: keys and
subjects are salted hashes).
Grounding sets (brats21, atlas2, msseg16) are scored this way too (the pointing game against their
masks), with a probe of the class trained elsewhere (--external_task names its task folder).
Resuming: each stage records what it ran in OUT/stages/<stage>.json after it succeeded (the
record is removed when it starts again, so a killed stage reruns) and is skipped when that
record matches (same arguments, salt, encoder file, the same copy of the dataset (dataset_stamp:
its folders and label tables as the adapter last read them), and the same finished runs of the
stages it depends on, in this invocation or an earlier one) and its output is there; a stage that runs
resumes by itself (preprocess, encode).
Settings for the stage scripts pass through *_args (e.g. --probe_args="--steps=300 --threads=2").
The salt (--salt, else $NVFM_SALT, else the public default) is given to the adapter and
preprocess alike (as $NVFM_SALT, so that no command line, log or record holds it; OUT/stages/
keeps only its sha256): the label keys are preprocess.py's study keys.
"""
import glob
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nvfm import dicom  # noqa: E402
from nvfm.configurator import configure, fail  # noqa: E402

# -----------------------------------------------------------------------------
dataset = ""             # openbhb | adni | aibl | oasis1 | abide | rsna | cq500 | brats21 | atlas2 | msseg16
root = ""                # your copy of the dataset, as distributed
out = ""                 # output folder ("" = bench/<dataset>)
encoders = "random:vitb"  # comma-separated: .safetensors | released dir | random:<size>, each [@key=value] (@seed=1)
names = ""               # comma-separated column names, one per encoder ("" = from the encoders)
salt = ""                # "" -> $NVFM_SALT -> the public default (nvfm/dicom.py); adapter and preprocess share it
external_from = ""       # another dataset's OUT: apply its probes here unchanged, no training (external transfer)
external_task = ""       # task folder of those probes ("" = each labels file's task here)
adapter_args = ""        # extra arguments for python -m nvfm.benchmarks (e.g. "--labels_file=... --workers=8")
preprocess_args = ""     # extra arguments for preprocess.py (e.g. "--workers=8")
encode_args = ""         # extra arguments for encode.py, every encoder (e.g. "--device=cuda")
probe_args = ""          # extra arguments for train_probe.py (e.g. "--cv_grid=lr=1e-3,3e-4")
evaluate_args = ""       # extra arguments for evaluate.py (e.g. "--n_boot=10000")
python = sys.executable  # the interpreter that runs the stage scripts
dry_run = False          # print the commands (and which stages would be skipped), run nothing
# -----------------------------------------------------------------------------

ADAPTED = ("openbhb", "adni", "aibl", "oasis1", "abide", "rsna", "cq500", "brats21", "atlas2", "msseg16")
GROUNDING = ("brats21", "atlas2", "msseg16")


def split_encoder(spec):
    """'random:tiny@seed=1' -> ('random:tiny', ['--seed=1']): encode.py arguments for this encoder
    only (after --encode_args, so they win). A path that exists is never split."""
    if os.path.exists(spec) or "@" not in spec:
        return spec, []
    base, *opts = spec.split("@")
    bad = [o for o in opts if not re.fullmatch(r"[A-Za-z_]\w*=\S*", o)]
    if bad or not base:
        fail(f"--encoders: {spec!r}: per-encoder settings are @key=value (e.g. random:tiny@seed=1), got {bad or spec}")
    return base, [f"--{o}" for o in opts]


def encoder_name(spec):
    enc, opts = split_encoder(spec)
    suffix = "".join("_" + re.sub(r"[^A-Za-z0-9.]+", "", o.lstrip("-")) for o in opts)   # --seed=1 -> _seed1
    if enc.startswith("random:"):
        return "random_" + enc.split(":", 1)[1] + suffix
    base = os.path.basename(os.path.normpath(enc))
    for ext in (".safetensors", ".bin", ".pt"):
        base = base.removesuffix(ext)
    return base + suffix


def encoder_preset(enc):
    """nvfm's rules for ours and random init; the authors' rules for their released weights."""
    if enc.startswith("random:") or enc.endswith(".safetensors"):
        return "nvfm"
    return "neurovfm"


def encoder_stamp(enc):
    """What identifies the encoder's weights on disk (size and mtime of its files)."""
    if enc.startswith("random:"):
        return enc
    files = sorted(glob.glob(os.path.join(enc, "*"))) if os.path.isdir(enc) else [enc]
    return [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]


def dataset_stamp(root_dir, out_dir, adapter_argv=()):
    """What the adapter reads of the dataset, cheaply, so that a changed copy reruns it (a new label
    release, a corrected label file, images added or removed) rather than leave the labels of the
    earlier copy: a sha256 of the mtime of every folder under root_dir (a file added, removed or
    renamed changes its folder's), and the size and mtime of every label table (.csv, .tsv, .txt)
    under it and of a --labels_file in adapter_argv. out_dir, when it is inside root_dir, is not
    walked (the run's own outputs are no input; it must exist: its creation changes its parent).
    An image rewritten in place, under the same name, is not seen. No path reaches the record."""
    h = hashlib.sha256()
    try:
        st = os.stat(out_dir)
        skip = (st.st_dev, st.st_ino)
    except OSError:
        skip = None
    for d, dirs, files in os.walk(root_dir, followlinks=True):
        dirs.sort()
        keep = []
        for x in dirs:
            try:
                st = os.stat(os.path.join(d, x))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != skip:
                keep.append(x)
        dirs[:] = keep
        rel = os.path.relpath(d, root_dir)
        try:
            h.update(f"d\0{rel}\0{os.stat(d).st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            continue
        for f in sorted(files):
            if f.lower().endswith((".csv", ".tsv", ".txt")):
                try:
                    st = os.stat(os.path.join(d, f))
                except OSError:
                    continue
                h.update(f"f\0{rel}/{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    for a in adapter_argv:
        if a.startswith("--labels_file="):
            p = a.split("=", 1)[1]
            st = os.stat(p) if os.path.isfile(p) else None
            h.update(f"l\0{os.path.abspath(p)}\0{st and (st.st_size, st.st_mtime_ns)}\n".encode(
                "utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def label_files(out_dir):
    """{task: labels path} the adapter wrote."""
    got = {}
    for p in sorted(glob.glob(os.path.join(out_dir, "labels_*.csv"))):
        got[os.path.basename(p)[len("labels_"):-len(".csv")]] = p
    return got


def _label_rows(path):
    import csv
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def file_modality(path):
    """The probe's --modality: the labels file's one modality, or all."""
    mods = {r.get("modality", "") for r in _label_rows(path)}
    return mods.pop() if len(mods) == 1 and "" not in mods else "all"


def training_overlap(probe, lab, fallback):
    """Studies of the labels file `lab` that are the probe's own: nvfm.probe.seen_studies' rule
    (evaluate.py's), on the study keys and subjects probe.pt records (seen_keys, seen_subjects,
    test_keys). A probe from before those fields: every row of the labels file it was trained on
    (train_probe.py records its --labels in probe.pt's config; `fallback`, the other run's labels
    file of the task, where that path is gone), its held-out test rows too. -> (n shared, n studies
    of lab, what was compared: probe.pt's record or the training labels path), or None when a probe
    without the record has no training labels file to compare."""
    import pickle
    from nvfm import probe as P
    from nvfm.checkpoint import load_checkpoint
    try:
        ck = load_checkpoint(probe)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
        fail(f"--external_from: {probe} is not a readable probe.pt ({type(e).__name__})")
    seen = P.seen_studies(ck) if isinstance(ck, dict) and "seen_keys" in ck else None
    source = "the studies and subjects it records as fitting, tuning or testing it"
    if seen is None:   # its record of what it saw is missing: the labels file it was trained on
        trained = ((ck.get("config") if isinstance(ck, dict) else None) or {}).get("labels") or ""
        source = trained if os.path.isfile(trained) else fallback
        if not os.path.isfile(source):
            return None
        rows = _label_rows(source)
        seen = {r["study_key"] for r in rows}, {r.get("subject") or "" for r in rows}
    rows = _label_rows(lab)
    return len(P.own_studies([r["study_key"] for r in rows], [r.get("subject") for r in rows], *seen)), len(rows), source


class Stages:
    """Run stage commands, or skip them when their record in OUT/stages/ matches."""

    def __init__(self, out_dir, env=None):
        self.dir = os.path.join(out_dir, "stages")
        self.env = env or {}
        self.ran = set()
        self.n_run = self.n_skipped = 0

    def _read(self, name):
        path = os.path.join(self.dir, name.replace("/", "__") + ".json")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def __call__(self, name, cmd, outputs, deps=(), extra=None):
        """cmd: argv after the interpreter; outputs: paths that must exist for a skip; deps: names
        of stages whose rerun forces this one (in this or an earlier invocation: the record holds
        the run id of each dep it was made from). Returns True when it ran."""
        rec = {"cmd": cmd, "extra": extra, "deps": {d: (self._read(d) or {}).get("run_id") for d in deps}}
        path = os.path.join(self.dir, name.replace("/", "__") + ".json")
        old = self._read(name) or {}
        old.pop("run_id", None)
        if old == rec and all(os.path.exists(p) for p in outputs) and not (set(deps) & self.ran):
            print(f"[{name}] done earlier, skipped")
            self.n_skipped += 1
            return False
        line = " ".join(shlex.quote(c) for c in [os.path.basename(python)] + cmd)
        print(f"[{name}] {line}", flush=True)
        if dry_run:
            self.ran.add(name)
            return True
        t0 = time.time()
        if os.path.exists(path):   # a run killed midway must not leave the old record vouching for partial output
            os.remove(path)
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **self.env)
        r = subprocess.run([python] + cmd, cwd=REPO, env=env)
        if r.returncode != 0:
            fail(f"stage {name} failed (exit status {r.returncode}); fix the cause and rerun the same command "
                 "(finished stages are skipped)")
        os.makedirs(self.dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(dict(rec, run_id=f"{time.time_ns()}-{os.getpid()}"), f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"[{name}] finished in {time.time() - t0:.0f} s", flush=True)
        self.ran.add(name)
        self.n_run += 1
        return True


def main():
    configure(globals())
    if dataset not in ADAPTED:
        fail(f"--dataset={dataset!r}: one of {', '.join(ADAPTED)}")
    if not root or not os.path.isdir(root):
        fail(f"--root={root!r}: not a folder (your copy of the dataset, as distributed)")
    specs = [e.strip() for e in encoders.split(",") if e.strip()]
    if not specs:
        fail("--encoders: at least one encoder")
    encs, enc_opts = zip(*[split_encoder(e) for e in specs])
    for e in encs:
        if not e.startswith("random:") and not os.path.exists(e):
            fail(f"--encoders: {e} not found")
    enc_names = [n.strip() for n in names.split(",")] if names else [encoder_name(e) for e in specs]
    if len(enc_names) != len(encs) or len(set(enc_names)) != len(enc_names) or not all(enc_names):
        fail(f"--names: one distinct name per encoder (got {enc_names} for {len(encs)} encoders)")
    if dataset in GROUNDING and not external_from:
        fail(f"{dataset} is a grounding set: --external_from=OUT of a run whose probes know its lesion class "
             "(and --external_task=that task)")
    o = os.path.abspath(out or os.path.join("bench", dataset))
    src = os.path.abspath(external_from) if external_from else ""
    salt_id = hashlib.sha256(dicom.resolve_salt(salt).encode()).hexdigest()[:16]
    # the salt reaches the stages by environment: never in their argv, config lines or OUT/stages/ records
    run = Stages(o, env={"NVFM_SALT": salt} if salt else None)

    # 1. adapter: reruns when the dataset's copy changed (dataset_stamp), not only its arguments
    if not dry_run:
        os.makedirs(o, exist_ok=True)   # before the stamp: creating OUT inside ROOT changes its parent
    run("adapter", ["-m", "nvfm.benchmarks", f"--dataset={dataset}", f"--root={os.path.abspath(root)}",
                    f"--out={o}", *shlex.split(adapter_args)],
        [os.path.join(o, "adapter_report.json")],
        extra={"salt_id": salt_id, "dataset": dataset_stamp(root, o, shlex.split(adapter_args))})
    if dry_run and not os.path.exists(os.path.join(o, "adapter_report.json")):
        print("(dry run: the later stages need the adapter's outputs)")
        return
    with open(os.path.join(o, "adapter_report.json")) as f:
        rep = json.load(f)
    tasks = label_files(o)
    if not tasks:
        fail(f"{o}: the adapter wrote no labels_<task>.csv")

    # 2. preprocess, once per preset the encoders need
    shards = {}
    for preset in sorted({encoder_preset(e) for e in encs}):
        sd = os.path.join(o, "shards" if preset == "nvfm" else f"shards_{preset}")
        shards[preset] = sd
        run(f"preprocess_{preset}", ["preprocess.py", f"--input={os.path.abspath(rep['preprocess_input'])}",
                                     f"--output={sd}", f"--preset={preset}", *shlex.split(preprocess_args)],
            [os.path.join(sd, "manifest.json")], deps=["adapter"], extra={"salt_id": salt_id})

    # 3. encode, 4. probes, 5. evaluate per encoder
    metrics = []
    for enc, opts, name in zip(encs, enc_opts, enc_names):
        preset = encoder_preset(enc)
        feat = os.path.join(o, "features", name)
        enc_arg = enc if enc.startswith("random:") else os.path.abspath(enc)
        run(f"encode/{name}", ["encode.py", f"--shards={shards[preset]}", f"--encoder={enc_arg}", f"--out={feat}",
                               *shlex.split(encode_args), *opts],
            [feat], deps=[f"preprocess_{preset}"], extra={"encoder": encoder_stamp(enc)})
        for task, lab in tasks.items():
            if src:
                probe = os.path.join(src, "probes", name, external_task or task, "probe.pt")
                if not os.path.exists(probe):
                    fail(f"--external_from: no probe {probe} (run that dataset with the encoder named {name} first)")
                seen = training_overlap(probe, lab, os.path.join(src, f"labels_{external_task or task}.csv"))
                if seen is None:
                    print(f"warning: {probe}: the labels it was trained on are not found: its overlap with {lab} "
                          "is not checked", file=sys.stderr)
                elif seen[0]:
                    msg = (f"--external_from: {seen[0]} of the {seen[1]} studies in {lab} share a study or subject "
                           f"with the probe {probe} ({seen[2]}): the probe's own dataset, not an external one "
                           "(in-sample figures)")
                    if not dry_run:
                        fail(msg)
                    print(f"(dry run; a run stops here) {msg}")
                pdeps = []
            else:
                probe = os.path.join(o, "probes", name, task, "probe.pt")
                run(f"probe/{name}/{task}", ["train_probe.py", "--protocol=paper",
                                             f"--task={'age' if task == 'age' else 'classify'}",
                                             f"--modality={file_modality(lab)}", f"--features={feat}",
                                             f"--labels={lab}", f"--out={os.path.dirname(probe)}",
                                             *shlex.split(probe_args)],
                    [probe], deps=[f"encode/{name}"])
                pdeps = [f"probe/{name}/{task}"]
            ev = os.path.join(o, "eval", task, name)
            row = f"{dataset} <- {os.path.basename(src)}" if src else dataset   # the rows' task label
            cmd = ["evaluate.py", f"--probes={probe}", f"--names={name}", f"--labels={lab}", f"--out={ev}",
                   f"--task_name={row}"]
            if src:
                cmd += ["--external=True", f"--features={feat}"]
            if os.path.exists(os.path.join(o, "findings.jsonl")):   # grounding: the pointing game on its masks
                cmd += [f"--findings={os.path.join(o, 'findings.jsonl')}", f"--shards={shards[preset]}",
                        f"--cohort={o}"]
            run(f"evaluate/{task}/{name}", cmd + shlex.split(evaluate_args), [os.path.join(ev, "metrics.json")],
                deps=[f"encode/{name}", *pdeps],
                extra={"probe": [os.path.getsize(probe), int(os.path.getmtime(probe))] if os.path.exists(probe)
                       else None})
            metrics.append(os.path.join(ev, "metrics.json"))

    # the table: every task and encoder of this dataset
    run("table", ["evaluate.py", f"--merge={','.join(metrics)}", f"--out={o}"], [os.path.join(o, "paper_table.md")],
        deps=[f"evaluate/{t}/{n}" for t in tasks for n in enc_names])
    if dry_run:
        return
    print(f"\n{dataset}: {run.n_run} stages run, {run.n_skipped} skipped")
    print(f"table: {os.path.join(o, 'paper_table.md')}")
    with open(os.path.join(o, "paper_table.md")) as f:
        print(f.read().rstrip())
    plots = sorted(glob.glob(os.path.join(o, "eval", "*", "*", "*.png")))
    print(f"plots ({len(plots)}): {os.path.join(o, 'eval', '<task>', '<encoder>')}/*.png")
    for p in plots:
        print(f"  {p}")


if __name__ == "__main__":
    main()
