"""A newcomer's command lines (issue 24): every stage script answers --help and -h with its
docstring and each setting's default and comment, and the usual wrong invocations end in one
line on stderr and exit status 1, with nothing written to the output folder; an uncaught exception
that is not a user error (a bug) exits with status 2 after its traceback."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# script -> (first words of its docstring, a setting's help line: --key=default, then its comment)
HELP = {
    "preprocess.py": ("DICOM/NIfTI export -> memory-mapped", r"--workers=2 +worker processes \(0 or 1"),
    "train_jepa.py": ("Vol-JEPA pretraining", r"--global_batch=768 +volumes per step over all ranks"),
    "encode.py": ("Folder of studies -> embeddings", r"--preset='' +token rules: \"nvfm\" \(ours\)"),
    "train_probe.py": ("Train a study-level diagnostic probe", r"--probe=attentive_mil +attentive_mil \| abmil"),
    "train_llava.py": ("Train the report generator", r"--lr=0.0001 +connector learning rate"),
    "evaluate.py": ("Evaluate trained probes", r"--probes='' +comma-separated probe.pt paths"),
}


def run(script, *args, cwd=None):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    env.pop("NVFM_TRACEBACK", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", sorted(HELP))
def test_help(script, flag, tmp_path):
    r = run(script, flag, "--not_a_setting=1", cwd=tmp_path)  # help wins over a bad flag
    assert r.returncode == 0, r.stderr
    doc, setting = HELP[script]
    assert f"usage: python {script}" in r.stdout and doc in r.stdout
    assert re.search(setting, r.stdout), r.stdout
    assert not os.listdir(tmp_path)  # --help writes nothing


def test_help_lists_the_scripts_config_files_and_groups():
    r = run("train_llava.py", "--help")
    assert "config/llava_tiny.py" in r.stdout and "config/jepa_tiny.py" not in r.stdout
    assert "\nconnector (the paper: dim 768" in r.stdout and "\noptimisation:" in r.stdout
    # a comment continued on indented lines below the setting is part of its help
    assert re.search(r"--llm='' +local HF causal LM dir or .gguf; \"\" = the cached tiny random\s+Qwen3; "
                     r"\"smollm2\"", r.stdout), r.stdout
    assert r.stdout.count("--stage1_iters=") == 1


def _labels(path, header):
    path.write_text(",".join(header) + "\n" + ",".join(["k1", "CT", "train"] + ["0"] * (len(header) - 3)) + "\n")
    return path


def _bad_invocations(t):
    """(script, args, words the one-line error must hold, output folder that must not appear)."""
    (t / "empty_dir").mkdir()
    (t / "empty.pt").write_bytes(b"")
    (t / "junk.pt").write_bytes(b"not a checkpoint")
    (t / "cache").mkdir()
    (t / "cache" / "index.json").write_text("{}")
    from nvfm.features import FeatureWriter
    with FeatureWriter(str(t / "cut"), "sha256:x", 4) as w:   # a cache whose data file was cut short
        w.add("k1", [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=np.zeros((3, 3)),
                          emb=np.ones((3, 4)))])
    with open(t / "cut" / "emb.f16", "r+b") as f:
        f.truncate(8)
    good = _labels(t / "labels.csv", ["study_key", "modality", "split", "intraparenchymal_hemorrhage"])
    nokey = _labels(t / "nokey.csv", ["study_uid", "modality", "split", "intraparenchymal_hemorrhage"])
    out = t / "result"  # not out/: train_jepa.py's default out_dir is out/jepa
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(t / "shards"), n=2, shape=(8, 32, 32))
    return [
        ("train_jepa.py", ["--batch_size=8"], ["unknown config key 'batch_size'", "did you mean", "--global_batch"], None),
        ("encode.py", ["--encodr=random:tiny"], ["'encodr'", "--encoder?"], None),
        ("train_probe.py", ["--stesp=10"], ["'stesp'", "--steps"], None),
        ("train_jepa.py", ["--max_steps=ten"], ["--max_steps", "expected int"], None),
        ("train_probe.py", ["--side_classes=maybe"], ["--side_classes", "expected a bool"], None),
        ("train_jepa.py", ["config/no_such_config.py"], ["config file not found", "no_such_config"], None),
        ("evaluate.py", ["probes.pt"], ["config file not found: probes.pt"], None),
        ("train_jepa.py", [f"--shards={t / 'empty_dir'}"], ["manifest.json", str(t / "empty_dir")], None),
        ("train_probe.py", [f"--features={t / 'missing'}", f"--labels={good}", f"--out={out}"],
         ["--features", "not found", "encode.py"], out),
        ("train_probe.py", [f"--features={t / 'cache'}", f"--labels={t / 'missing.csv'}", f"--out={out}"],
         ["--labels", "missing.csv", "not found"], out),
        ("train_probe.py", [f"--features={t / 'cache'}", f"--labels={nokey}", f"--out={out}"],
         ["nokey.csv", "no study_key column"], out),
        ("train_probe.py", [f"--features={t / 'cut'}", f"--labels={good}", f"--out={out}"],
         ["emb.f16 is 8 bytes", "encode.py"], out),
        ("train_probe.py", [f"--features={t / 'cache'}", f"--labels={good}", "--probe=svm", f"--out={out}"],
         ["--probe=svm", "choose one of"], out),
        ("evaluate.py", [f"--probes={t / 'empty.pt'}", f"--labels={good}", f"--out={out}"],
         ["--probes", "empty.pt is empty"], out),
        ("evaluate.py", [f"--probes={t / 'missing.pt'}", f"--labels={good}", f"--out={out}"],
         ["--probes", "missing.pt not found"], out),
        ("evaluate.py", [f"--probes={t / 'junk.pt'}", f"--labels={good}", f"--out={t / 'out_junk'}"],
         ["junk.pt is not a readable probe.pt"], None),
        ("evaluate.py", [f"--probes={t / 'junk.pt'}", f"--labels={nokey}", f"--out={out}"],
         ["no study_key column"], out),
        ("train_llava.py", [f"--findings={t / 'missing.jsonl'}", f"--out_dir={out}"],
         ["--findings", "missing.jsonl not found"], out),
        ("train_llava.py", [f"--findings={good}", f"--features={t / 'missing'}", f"--out_dir={out}"],
         ["--features", "not found"], out),
        ("evaluate.py", [f"--probes={t / 'junk.pt'}", f"--labels={good}", f"--out={out}", "--split=val,test"],
         ["--split=val,test", "one split"], out),
        ("encode.py", [f"--shards={shards}", "--encoder=random:base", f"--out={out}"],
         ["--encoder=random:base", "unknown model size", "vitb"], out),
        ("encode.py", [f"--shards={t / 'missing'}", "--encoder=random:tiny", f"--out={out}"],
         ["--shards", "not found"], out),
        ("encode.py", [f"--shards={t / 'empty_dir'}", "--encoder=random:tiny", f"--out={out}"],
         ["--shards", "empty"], out),
        ("preprocess.py", [f"--input={t / 'empty_dir'}", f"--output={out}", f"--labels={t / 'missing.csv'}"],
         ["--labels", "missing.csv not found"], out),
    ]


def test_wrong_invocations_are_one_line_errors(tmp_path):
    failures = []
    for script, args, words, out in _bad_invocations(tmp_path):
        r = run(script, *args, cwd=tmp_path)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        ok = (r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr
              and all(w in lines[0] for w in words) and (out is None or not out.exists()))
        if not ok:
            failures.append(f"{script} {' '.join(args)}: rc {r.returncode}, out exists "
                            f"{out is not None and out.exists()}, stderr:\n{r.stderr}")
    assert not failures, "\n\n".join(failures)


def test_train_probe_warns_when_labels_cover_few_classes(tmp_path):
    import numpy as np
    from nvfm import features
    with features.FeatureWriter(str(tmp_path / "cache"), "sha256:synthetic", 8) as w:
        for i in range(8):
            w.add(f"k{i}", [dict(volume_id=f"v{i}", family="CT", window="brain", modality="CT",
                                 coords=np.zeros((4, 3)), emb=np.random.default_rng(i).normal(size=(4, 8)))])
    rows = [f"k{i},CT,{'train' if i < 6 else 'val'},{i % 2}" for i in range(8)]
    (tmp_path / "labels.csv").write_text("study_key,modality,split,intraparenchymal_hemorrhage\n" + "\n".join(rows) + "\n")
    args = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", "--side_classes=False",
            "--steps=2", "--eval_interval=1", "--hidden=8", "--threads=1"]
    r = run("train_probe.py", *args, f"--out={tmp_path / 'p'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert re.search(r"warning: .*labels.csv has only 1 of the \d+ CT ontology classes", r.stdout), r.stdout
    r = run("train_probe.py", *args, "--label_names=intraparenchymal_hemorrhage", f"--out={tmp_path / 'q'}", cwd=tmp_path)
    assert r.returncode == 0 and "warning: " not in r.stdout, r.stdout + r.stderr


EXIT_SCRIPT = '''"""A script that ends as --end says."""
end = "ok"  # ok | fail | missing | bug | exit3
from nvfm.configurator import configure, fail
configure(globals())
print("work done so far", end="")  # unflushed: must still reach stdout before the exit
if end == "fail":
    fail("a user error")
elif end == "missing":
    open("no_such_input.csv")
elif end == "bug":
    {}["no such key"]
elif end == "exit3":
    raise SystemExit(3)
'''


@pytest.mark.parametrize("args, env, status, stderr_words", [
    ([], {}, 0, []),
    (["--end=fail"], {}, 1, ["exit_script.py: error: a user error"]),
    (["--edn=fail"], {}, 1, ["unknown config key 'edn'", "--end?"]),
    (["--end=missing"], {}, 1, ["exit_script.py: error:", "no_such_input.csv"]),
    (["--end=missing"], {"NVFM_TRACEBACK": "1"}, 1, ["Traceback", "FileNotFoundError", "no_such_input.csv"]),
    (["--end=bug"], {}, 2, ["Traceback", "KeyError: 'no such key'"]),
    (["--end=exit3"], {}, 3, []),
])
def test_exit_status_tells_user_errors_from_bugs(tmp_path, args, env, status, stderr_words):
    """0 success, 1 user error (one line unless NVFM_TRACEBACK=1), 2 for an uncaught exception that
    is a bug (after its traceback and whatever the script printed); a script's own SystemExit keeps
    its status."""
    (tmp_path / "exit_script.py").write_text(EXIT_SCRIPT)
    full_env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", **env)
    if "NVFM_TRACEBACK" not in env:
        full_env.pop("NVFM_TRACEBACK", None)
    r = subprocess.run([sys.executable, "exit_script.py", *args], cwd=tmp_path, env=full_env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == status, (r.returncode, r.stderr)
    assert all(w in r.stderr for w in stderr_words), r.stderr
    assert "Error in sys.excepthook" not in r.stderr, r.stderr
    if status == 1 and "NVFM_TRACEBACK" not in env:
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    if "edn" not in " ".join(args):
        assert r.stdout.endswith("work done so far"), r.stdout


# One interpreter runs every bench script's --help (each start-up imports torch: ~1 s apiece when
# run one process per script). Each script runs as __main__ with its own argv[0] and bench/ on
# sys.path, as `python bench/<name>.py --help` would; its stdout and stderr are captured separately.
BENCH_DRIVER = r'''
import contextlib, io, json, os, runpy, sys
bench, names = sys.argv[1], sys.argv[2:]
sys.path.insert(0, bench)
res = {}
for name in names:
    path = os.path.join(bench, name)
    sys.argv = [path, "--help"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException as e:  # noqa: BLE001 - reported, not raised: the other scripts still run
            code, _ = 2, err.write(f"{type(e).__name__}: {e}")
    res[name] = (code, out.getvalue(), err.getvalue())
sys.stdout.write(json.dumps(res))
'''


def bench_scripts():
    """bench/*.py that are scripts: a helper module that other bench scripts import (timing.py)
    is not one (it has no __main__ entry and prints nothing)."""
    bench = os.path.join(ROOT, "bench")
    names = sorted(f for f in os.listdir(bench) if f.endswith(".py"))
    sources = {f: open(os.path.join(bench, f)).read() for f in names}
    imported = {f for f in names for g in names if g != f
                and re.search(rf"^\s*(from|import) {f[:-3]}\b", sources[g], re.M)}
    return bench, [f for f in names if f not in imported]


def test_every_bench_script_answers_help(tmp_path):
    """`bench/` is lean and every script in it runs: `python bench/<name>.py --help` exits 0,
    writes nothing, and prints a usage line or the script's docstring first, with the docstring's
    first line somewhere in it."""
    import ast
    import json
    bench, names = bench_scripts()
    assert "timing.py" not in names and "bench_llava.py" in names
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", BENCH_DRIVER, bench, *names], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    failures = []
    for name in names:
        code, out, err = res[name]
        doc = ast.get_docstring(ast.parse(open(os.path.join(bench, name)).read())) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else None
        text = out.lstrip()
        if not (code == 0 and first and (text.startswith("usage:") or text.startswith(first))
                and " ".join(first.split()) in " ".join(out.split())):
            failures.append(f"{name}: exit {code}\nstdout:\n{out[:400]}\nstderr:\n{err[-800:]}")
    assert not failures, "\n\n".join(failures)
    assert not os.listdir(tmp_path)  # --help writes nothing


def test_encode_records_its_precision_and_refuses_to_mix(tmp_path):
    """encode.py on the CPU writes float32 features and says so in the cache index; a cache that
    holds CUDA bf16-autocast features (features that differ beyond float16 storage) is not resumed
    on the CPU: one line, exit 1, the cache untouched."""
    import json
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, shape=(8, 32, 32))
    out = tmp_path / "feat"
    r = run("encode.py", f"--shards={shards}", "--encoder=random:tiny", f"--out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["precision"] == "float32" and len(index["studies"]) == 2
    index["precision"] = "bfloat16-autocast"   # as a GPU run would have written it
    (out / "index.json").write_text(json.dumps(index))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run("encode.py", f"--shards={shards}", "--encoder=random:tiny", f"--out={out}", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "bfloat16-autocast" in lines[0] and "float32" in lines[0], r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_config_mistakes_on_a_real_script_are_one_line_and_write_nothing(tmp_path):
    """A broken config file was a traceback and exit 2; `--salt=123456` was refused with the salt echoed;
    `--input=~/in` (bash does not expand ~ after =) was reported as not a directory."""
    (tmp_path / "bad.py").write_text("max_steps = 10\nlr_peak = (1e-3\n")
    (tmp_path / "c.yaml").write_text("max_steps: 10\n")
    out = tmp_path / "run"
    for cfg, words in (("bad.py", [f"{tmp_path / 'bad.py'}:2: syntax error"]),
                       ("c.yaml", [f"{tmp_path / 'c.yaml'}:1: 'max_steps: 10' sets nothing"])):
        r = run("train_jepa.py", tmp_path / cfg, f"--out_dir={out}", cwd=tmp_path)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (r.returncode, r.stderr)
        assert all(w in r.stderr for w in words) and not out.exists(), r.stderr
    home = tmp_path / "home"
    (home / "in").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1", HOME=str(home))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--input=~/in", f"--output={out}",
                        "--salt=12345678"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "12345678" not in r.stdout + r.stderr and "expected str" not in r.stderr, r.stderr
    assert f"input='{home / 'in'}'" in r.stdout and "must be a directory" not in r.stderr, r.stdout + r.stderr
