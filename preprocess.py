"""DICOM/NIfTI export -> memory-mapped 1 x 1 x 4 mm uint8 volume shards (DESIGN.md section 2).

    python preprocess.py --input=demo/dicom --output=shards [--labels=demo/labels.csv]
        [--findings=demo/findings.jsonl] [--workers=2] [--shard=0/1] [--salt=...]
        [--preset=neurovfm]   # the authors' resampling / foreground / intensity rules, for their released encoder

Steps: list files -> header scan (pydicom stop_before_pixels, parallel) -> group studies and
series (nvfm/dicom.py) -> per study, in worker processes: assemble each series, resample
to the canonical 1 x 1 x 4 mm grid, window/quantize, foreground + token masks
(nvfm/volume.py) -> append to this worker's part (nvfm/data.py) -> merge into
`<split>_<k>.bin` shards + manifest.json, sorted, byte-identical for the same input.

Resume: a killed run restarted with the same command skips every committed study (see
nvfm/data.py) and the final output is byte-identical to an uninterrupted run; a rerun of a
complete output does nothing. Studies already done are not re-read, so edits to their
files are not picked up (write to a new --output; a rerun warns when the number of input files
changed). Headers are re-scanned on every start.
Every study of an output shares one --preset, min_fg_fraction, min_slices, min_tokens, salt,
token patch and shard format (SHARED below): they are recorded in parts/settings.json before any
part is written (and in each done_i_of_N.json and the manifest), and a resumed run, array job or
rerun of a finished output (adding studies or not) with other settings is refused in one line
before anything is written.
Cluster array jobs: `--shard=i/N` processes the studies whose key hash is i mod N (every
job scans all headers, which is cheap next to pixel decoding, and keeps only its own);
each job writes parts/done_i_of_N.json when finished, and the job that finds all N done
merges (under OUTPUT/merge.lock, which holds the merging job's pid and host and is touched
every 10 s; a lock whose owner is gone is stale and removed by the next run, so restarting
the same command after a kill at any moment completes the output). One Ctrl-C stops the
workers at once (exit status 130); committed studies are kept for the rerun.

Bad input never stops the run: unreadable/non-DICOM files, unreadable directories, skipped
series (rules in nvfm/dicom.py) and failed series are counted by reason in the manifest
summary, listed in manifest["failures"] with hashed keys, and logged (with the offending
file's path); everything else is written, and kept volumes that were repaired carry
`warnings` (counted in summary["volume_warnings"]). Volumes with fewer than `min_tokens`
foreground tokens are failed. Every file is accounted for: summary["files_input"] (files under
--input, the output folder excluded) = the sum of summary["files"]: in kept volumes, dropped from
a kept volume (duplicate slices), in skipped / failed series by reason, failed before grouping,
NIfTI sidecars (the per-volume counts live in the volume records and events, so resumed and array
runs add up); a mismatch is a bug, printed as a WARNING. The run exits non-zero when --input
holds no file, when no volume was written (the manifest is still written) or when no labelled
study is found.
Labels: only ontology diagnoses, LABEL_META_COLUMNS / FINDINGS_KEYS and --label_columns
are copied (a `subject` column as a salted hash); identifier columns are dropped with a warning.
A study_uid on two rows of one file, a labels row with more or fewer cells than its header, or a
file that is not UTF-8 text (a byte-order mark is fine), is refused before anything is written; so are
labels that move a study already written (merged, or committed by an unfinished run) to another split.

Privacy: study keys are sha256(salt, StudyInstanceUID)[:16]; series keys and file keys
likewise hash the SeriesInstanceUID and the relative path. The salt comes from --salt, else
the environment variable NVFM_SALT, else DEFAULT_SALT. Trade-off: with the public default
salt anyone holding the original UIDs can recompute the keys (fine for demos, and it keeps
keys stable across sites and runs); for real data set a secret salt and keep it, because
re-running with another salt gives other keys (labels must be re-keyed with the same salt).
The manifest stores only salt_id = sha256 of the salt, never the salt. Nothing under
--output holds a path, name, ID, date or UID. The console log names offending files by
their relative path (the operator needs it; set --log_paths=False to print hashed keys
only); the copy of the log in OUTPUT/preprocess.log always uses hashed keys. Users must
not rely on folder names being hidden anywhere but in the output directory.

--preset=neurovfm also keeps each volume's resampled intensities (CT HU, MR values; int16
when integral, else float32) beside the uint8 windows: shard format 2 (nvfm/data.py), about
2 more bytes per voxel, so their float [0, 1] windows are exact (ShardReader.window_float).

Splits: from the `split` column of --labels when given (train/val/test), else a
deterministic hash of the study key: 80% train, 10% val, 10% test. The re-keyed labels.csv (and
each findings record that has a split) holds every study's split as its volumes are written, since
train_probe, evaluate and train_llava read it there.
"""
import contextlib
import csv
import glob
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter

import numpy as np
from tqdm import tqdm

from nvfm import data as shards
from nvfm import dicom
from nvfm.volume import RESAMPLING, process_stack, process_stack_neurovfm

# -----------------------------------------------------------------------------
input = ""  # input root (PACS export: folders of DICOM files and/or NIfTI files)
output = ""  # output directory (shards, manifest, re-keyed labels)
labels = ""  # optional labels.csv keyed by study_uid
findings = ""  # optional findings.jsonl keyed by study_uid
workers = 2  # worker processes (0 or 1: run in this process)
shard = "0/1"  # i/N: this array job's share of the studies
salt = ""  # "" -> $NVFM_SALT -> DEFAULT_SALT
min_slices = 3  # series with fewer slices are rejected
min_fg_fraction = -1.0  # token foreground rule (nvfm/tokenize.py); -1: the preset's (nvfm 0.5, neurovfm 1.0)
preset = "nvfm"  # foreground / intensity rules: "nvfm" (ours) or "neurovfm" (the authors', for their released encoder)
min_tokens = 1  # volumes with fewer foreground tokens are failed, not written
shard_gb = 4.0  # start a new <split>_<k>.bin after this many GB
fsync = True  # fsync each committed study (crash safety; off only for benchmarks)
log_paths = True  # console log shows relative paths of bad files (the output never does)
label_columns = ""  # extra labels.csv columns / findings.jsonl keys to keep, comma-separated (others dropped)
progress = True  # tqdm progress bars
# -----------------------------------------------------------------------------
DEFAULT_SALT = dicom.DEFAULT_SALT  # the salt rules live in nvfm/dicom.py (shared with nvfm/benchmarks.py)
resolve_salt = dicom.resolve_salt
# a study without a split in labels.csv / findings.jsonl: by its subject's salted hash when labels.csv
# has a subject (a subject's studies share a split: none is trained on and scored), else its own key
SPLIT_BINS = (("train", 8), ("val", 1), ("test", 1))  # of 10
UNREADABLE_DIR = "unreadable directory"  # a file failure that is a directory: no file of the ledger
# voxel rules per --preset (nvfm/volume.py) and the token rule each defaults to; recorded as
# manifest["preset"] (absent in older manifests: "nvfm") so encode.py can check it
PRESETS = {"nvfm": (process_stack, 0.5), "neurovfm": (process_stack_neurovfm, 1.0)}


def hash_split(study_key):
    h = int(hashlib.sha256(("split:" + study_key).encode()).hexdigest(), 16) % 10
    for name, n in SPLIT_BINS:
        if h < n:
            return name
        h -= n
    return "train"


def _clean_split(s):
    s = "".join(ch for ch in str(s).lower() if ch.isalnum())
    return s or "train"


def printable_path(path):
    """A relative path as printable text: bytes that are not UTF-8 shown as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class Log:
    """stderr (paths allowed when log_paths) + OUTPUT/preprocess.log (hashed keys only)."""

    def __init__(self, out_dir, show_paths):
        import weakref
        self.f = open(os.path.join(out_dir, "preprocess.log"), "a")
        self.show_paths = show_paths
        weakref.finalize(self, self.f.close)  # closed with the Log (or at exit), never left to the GC

    def __call__(self, msg, path=None, key=None, console_only=False):
        """console_only="raw": text that may quote a path or header values (an unforeseen error's
        message), shown on the console only when it may show paths (log_paths)."""
        if console_only == "raw" and not self.show_paths:
            return
        where = f" [{key}]" if key else ""
        if not console_only:
            self.f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}{where}\n")
            self.f.flush()
        # a file name that is not UTF-8 is shown with its odd bytes escaped (\xe9), never fatal
        shown = f" {printable_path(path)}" if (path and self.show_paths) else where
        tqdm.write(f"preprocess: {msg}{shown}", file=sys.stderr)


# ------------------------------------------------------------------ labels


# Columns copied to SHARDS/labels.csv and keys copied to SHARDS/findings.jsonl besides the
# ontology's diagnosis columns and --label_columns: everything else (MRN, accession, names,
# dates, free-text notes) is dropped with a warning, so identifiers never reach the shards.
# `indication` and `findings` are free text the report generator trains on: export them
# de-identified. `study` is a non-identifying study name (the demo's demo-0007). `subject` (the
# group id of train_probe --protocol=paper's subject-grouped splits) is kept only as a salted
# hash (dicom.subject_key), so a subject id never reaches the shards but its grouping does.
LABEL_META_COLUMNS = ("study", "modality", "split", "age", "sex", "subject")
FINDINGS_KEYS = ("study", "modality", "split", "indication", "findings", "triage", "lesions")


def _dropped_warning(log, option, path, what, dropped):
    if dropped and log:  # the file's name on the console only (log_paths): it may name a patient
        log(f"warning: {option}: dropped {len(dropped)} {what} that are neither ontology "
            "labels nor declared in --label_columns (identifiers and free text never reach the shards)", path)
        log(f"  dropped {what}: {', '.join(sorted(dropped))[:300]}", console_only=True)


def _refuse_repeats(path, keyed):
    """One-line SystemExit naming `path` and the two lines of the first study_uid given twice;
    keyed: [(line, study_key, row)]. Downstream readers refuse a study on two rows of the re-keyed copy."""
    first = {}
    for n, key, _ in keyed:
        if key in first:
            raise SystemExit(f"preprocess: {path}: lines {first[key]} and {n} have the same study_uid: one per study")
        first[key] = n


def _not_utf8(path):
    """The one-line SystemExit of a labels / findings file that is not UTF-8 text, naming its first
    such line (a cell read in another encoding would reach the shards as other characters)."""
    n = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                break
    return SystemExit(f"preprocess: {path}:{n}: not UTF-8 text (saved as Latin-1 / Windows-1252?): save it as UTF-8")


def rekey_labels(labels_path, findings_path, out_dir, salt, extra_columns=(), log=None, written_splits=None,
                 unmerged=()):
    """Copy labels.csv / findings.jsonl with study_uid replaced by study_key, keeping only
    the known columns: ontology diagnoses, LABEL_META_COLUMNS / FINDINGS_KEYS and
    `extra_columns`; the rest are dropped with a warning. Each labels row, and each findings record that
    has a split, holds its study's split as its volumes are written (train_probe, evaluate and
    train_llava read it there): the labels' split, else the findings', else its subject's
    hash_split, else its own key's.
    written_splits: {study_key: split} of the volumes already written to the output (its manifest, or
    for the keys in `unmerged` its parts/, committed by a killed run or another array job): a
    labels/findings file that puts one of them in another split is refused before either file is
    replaced, as is a study_uid on two rows of one file.
    Returns ({study_key: split} from the labels (or findings) split column, else, for a labels
    row with a subject, its subject's hash_split (a study already in written_splits keeps its
    split); set of all keys)."""
    from nvfm.ontology import ALL_DIAGNOSES
    extra = {c.strip() for c in extra_columns if c.strip()}
    written = written_splits or {}
    rows, recs, fields = [], [], []
    if labels_path:
        # utf-8-sig: the byte-order mark Excel writes is not read into the first column's name
        with open(labels_path, newline="", encoding="utf-8-sig") as f:
            rd = csv.DictReader(f)
            try:
                fields = list(rd.fieldnames or [])
                rows = [(rd.line_num, r) for r in rd]
            except UnicodeDecodeError:
                raise _not_utf8(labels_path) from None
            except csv.Error as e:  # e.g. a cell over the csv module's field size limit
                raise SystemExit(f"preprocess: {labels_path}:{rd.line_num + 1}: unreadable CSV ({e})") from None
        if "study_uid" not in fields:
            raise SystemExit(f"preprocess: {labels_path}: no study_uid column")
        for n, r in rows:  # csv.DictReader files extra cells under None and fills missing ones with None
            cells = len(fields) + len(r[None]) if None in r else sum(v is not None for v in r.values())
            if cells != len(fields):  # every later cell of the row would be read under the wrong column
                raise SystemExit(f"preprocess: {labels_path}:{n}: {cells} cells, the header has {len(fields)} "
                                 "(an unquoted comma in a cell?)")
        rows = [(n, dicom.study_key(r["study_uid"], salt), r) for n, r in rows]
        _refuse_repeats(labels_path, rows)
    if findings_path:
        with open(findings_path, encoding="utf-8-sig") as f:
            try:
                lines = list(enumerate(f, 1))
            except UnicodeDecodeError:
                raise _not_utf8(findings_path) from None
        for n, line in lines:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise SystemExit(f"preprocess: {findings_path}:{n}: not JSON")
            if not isinstance(rec, dict) or "study_uid" not in rec:
                raise SystemExit(f"preprocess: {findings_path}:{n}: no study_uid")
            recs.append((n, dicom.study_key(rec["study_uid"], salt), rec))
        _refuse_repeats(findings_path, recs)
    splits, source = {}, {}
    for path, items in ((labels_path, rows), (findings_path, recs)):  # the labels' split wins
        for _, key, r in items:
            if r.get("split") and key not in splits:
                splits[key], source[key] = _clean_split(r["split"]), path
    moved = next((k for k in sorted(splits) if k in written and written[k] != splits[k]), None)
    if moved is not None:
        where = (f"{os.path.join(out_dir, 'parts')} (committed, not merged yet)" if moved in unmerged
                 else os.path.join(out_dir, "manifest.json"))
        raise SystemExit(f"preprocess: {source[moved]}: study {moved} is in split {splits[moved]!r} there, but its "
                         f"volumes in {where} are in split {written[moved]!r}: use a new --output for other splits")
    other = sum(1 for _, k, r in recs if r.get("split") and _clean_split(r["split"]) != splits[k])
    if other and log:
        log(f"warning: --findings: {other} studies are in another split there than in --labels: the --labels "
            "split is used (and written to both re-keyed files)", findings_path)
    subjects = {key: dicom.subject_key(r["subject"], salt) for _, key, r in rows if r.get("subject")}
    for key, subject in subjects.items():  # no split given: the subject's (a study already written keeps its own)
        if key not in splits:
            splits[key] = written.get(key, hash_split(subject))

    def split_of(key):  # the split this study's volumes are (or will be) written in
        return splits.get(key) or written.get(key) or hash_split(key)
    # each written through a temp file of its own: array jobs starting together re-key at the same time
    if labels_path:
        known = set(LABEL_META_COLUMNS) | set(ALL_DIAGNOSES) | extra
        kept = [k for k in fields if k == "study_uid" or k in known]
        _dropped_warning(log, "--labels", labels_path, "column(s)", [k for k in fields if k not in kept])
        out_fields = ["study_key" if k == "study_uid" else k for k in kept]
        if "split" not in out_fields:
            out_fields.insert(1, "split")
        with shards.atomic_path(os.path.join(out_dir, "labels.csv")) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, out_fields)
            w.writeheader()
            for _, key, r in rows:
                out = {("study_key" if k == "study_uid" else k): (key if k == "study_uid" else r.get(k))
                       for k in kept}
                out["split"] = split_of(key)
                if key in subjects:
                    out["subject"] = subjects[key]
                w.writerow(out)
    if findings_path:
        known = set(FINDINGS_KEYS) | extra
        dropped = set()
        with shards.atomic_path(os.path.join(out_dir, "findings.jsonl")) as tmp, open(tmp, "w") as g:
            for _, key, rec in recs:
                out = {}
                for k, v in rec.items():
                    if k == "study_uid":
                        out["study_key"] = key
                    elif k == "split":
                        out[k] = split_of(key)
                    elif k in known:
                        out[k] = v
                    else:
                        dropped.add(str(k))
                g.write(json.dumps(out) + "\n")
        _dropped_warning(log, "--findings", findings_path, "key(s)", dropped)
    keys = {key for _, key, _ in rows + recs}
    return {k: splits[k] for k in sorted(splits)}, keys


# ------------------------------------------------------------------ workers

_W = {}  # per-process state: root, cfg, writer


def _scan(args):
    root, rel, s = args
    return dicom.scan_dicom(root, rel, s)


@contextlib.contextmanager
def _worker_pool(n_workers, initializer, initargs=()):
    """A process pool for n_workers > 1 (None otherwise): closed when the block ends, terminated at
    once on Ctrl-C or an error, not after its queue."""
    pool = mp.Pool(n_workers, initializer=initializer, initargs=initargs) if n_workers > 1 else None
    try:
        yield pool
    except BaseException:
        if pool:
            pool.terminate()
            pool.join()
        raise
    if pool:
        pool.close()
        pool.join()


def _ignore_sigint():
    """Worker processes leave Ctrl-C to the main process, which terminates them once."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _init_worker(root, out_dir, cfg, tag_prefix, counter, one_thread=True):
    if one_thread:
        _ignore_sigint()
    with counter.get_lock():
        counter.value += 1
        k = counter.value
    _W.update(root=root, cfg=cfg, writer=shards.PartWriter(out_dir, f"{tag_prefix}_w{k}", cfg["fsync"]))
    if one_thread:  # worker processes: one core each
        import torch
        torch.set_num_threads(1)


def _event(kind, status, reason, **keys):
    e = {"kind": kind, "status": status, "reason": reason}
    e.update({k: v for k, v in keys.items() if v})
    return e


def process_study(task):
    """Worker: one study -> its volumes and events committed to this worker's part.
    Returns (study_key, number of volumes, console lines (msg, path, key, console_only as Log takes it))."""
    root, cfg = _W["root"], _W["cfg"]
    key, split, kind, items = task["key"], task["split"], task["kind"], task["items"]
    salt = cfg["salt"]
    volumes, events, console = [], [], []

    failed_files = []  # (failure event, the files of its volume), counted once the kept volumes are known

    def fail(reason, status="failed", series_key=None, file_key=None, path=None, n_files=0, files=None):
        events.append(_event("series", status, reason, study_key=key, series_key=series_key, file_key=file_key,
                             n_files=n_files))
        console.append((f"{status} series: {reason}", path, series_key or file_key, False))
        if files is not None:
            failed_files.append((events[-1], files))

    jobs = []  # (series_key, volume_id, make_stack, meta with the volume's files)
    if kind == "nifti":
        for rel in items:
            sk = dicom.salted_hash("nifti:" + rel, salt)
            jobs.append((sk, sk, (lambda rel=rel: dicom.nifti_stack(root, rel)),
                         {"path": rel, "nifti": True, "files": {rel}}))
    else:
        groups, skipped = dicom.group_series(items)
        for suid, n, reason, path in skipped:
            fail(reason, "skipped", series_key=dicom.salted_hash(suid, salt), path=path, n_files=n)
        for g in groups:
            sk = dicom.salted_hash(g["series_uid"], salt)
            vid = sk if g["n_parts"] == 1 else f"{sk}.{g['part']}"
            jobs.append((sk, vid, (lambda g=g: dicom.dicom_stack(root, g, reduce=dicom.J2K_REDUCE)),
                         {"path": g["info"]["path"], "info": g["info"], "files": {h["path"] for h, _ in g["frames"]}}))
    kept_files = []  # (volume record, the files of its volume, the files whose slices it holds)
    for sk, vid, make, meta in jobs:
        try:
            st = make().check(cfg["min_slices"])
            out = PRESETS[cfg.get("preset", "nvfm")][0](st, cfg["min_fg_fraction"])
        except dicom.SeriesError as e:  # named by the offending file when known, else the series' first
            fail(str(e), series_key=vid, path=e.path or meta["path"], files=meta["files"])
            continue
        except MemoryError:
            fail("out of memory", series_key=vid, path=meta["path"], files=meta["files"])
            continue
        except Exception as e:  # a bug or an unforeseen file: this series only
            path = getattr(e, "nvfm_path", None) or meta["path"]
            fail(f"error ({type(e).__name__})", series_key=vid, path=path, files=meta["files"])
            # the raw message may quote header values or a path: console only (and only with
            # --log_paths), never the log file
            console.append((f"  detail: {type(e).__name__}: {str(e)[:200]}", path, vid, "raw"))
            continue
        tm = out["token_mask"]
        if int(tm.sum()) < cfg["min_tokens"]:  # nothing a model could read (e.g. a 16 x 16 pixel series)
            fail(f"too few foreground tokens ({int(tm.sum())} < min_tokens {cfg['min_tokens']})", series_key=vid,
                 path=meta["path"], files=meta["files"])
            continue
        for note in getattr(st, "notes", ()):  # e.g. how JPEG 2000 was decoded (nvfm/dicom.py dicom_stack)
            console.append((f"note: {note}", meta["path"], vid, False))
        for w in st.warnings:  # kept, but not as acquired: in the volume record and the log
            console.append((f"warning: {w}", meta["path"], vid, False))
        modality = st.modality
        family = "CT" if modality == "CT" else (dicom.mr_family(meta["info"]) if "info" in meta else
                                                dicom.mr_family({"description": os.path.basename(meta["path"])}))
        rec = dict(volume_id=f"{key}-{vid}", study_key=key, series_key=sk, split=split, modality=modality,
                   family=family, shape=list(out["data"].shape[1:]), channels=out["channels"],
                   spacing=out["spacing"], affine=np.round(out["affine"], 5).tolist(),
                   orientation=out["orientation"], original_orientation=out["original_orientation"],
                   original_spacing=out["original_spacing"], tilt_deg=out["tilt_deg"],
                   duplicates_dropped=st.dropped_duplicates, warnings=list(st.warnings), token_grid=list(tm.shape),
                   n_tokens=int(tm.sum()), token_mask=shards.pack_mask(tm))
        if "clip" in out:  # MR under --preset=neurovfm: their intensity clip, for ShardReader.window_float
            rec["clip"] = [float(x) for x in out["clip"]]
        used = {st.paths[i] for i in st.order} if st.paths else meta["files"]  # duplicates dropped by check()
        kept_files.append((rec, meta["files"], used))
        volumes.append((rec, out["data"], out["mask"], out.get("values")))
    count_files(kept_files, failed_files)
    _W["writer"].add_study(key, volumes, events)
    return key, len(volumes), console


def count_files(kept, failed):
    """The file ledger of one study's volumes (summarize adds it up): each file counted once, first
    where its slices are in a kept volume (rec["n_files"]), else where a kept volume dropped all of
    them (rec["files_dropped"], e.g. a duplicate slice), else in a failed volume (event["n_files"]);
    a multi-frame file whose frames went to several volumes counts in the first.
    kept: [(volume record, files of its volume, files it holds slices of)]; failed: [(event, files)]."""
    claimed = set()
    for rec, _, used in kept:
        rec["n_files"] = len(used - claimed)
        claimed |= used
    for rec, files, _ in kept:
        rec["files_dropped"] = len(files - claimed)
        claimed |= files
    for ev, files in failed:
        if files - claimed:
            ev["n_files"] = len(files - claimed)
        claimed |= files


# ------------------------------------------------------------------ main


# ------------------------------------------------------------------ merge lock

LOCK_HEARTBEAT_S = 10.0  # the merging job touches merge.lock this often
LOCK_STALE_S = 120.0  # a lock not touched for this long is stale (its owner died, on any host)


class MergeLock:
    """OUTPUT/merge.lock = {"pid", "host", "started"} of the merging job, touched every
    LOCK_HEARTBEAT_S by a thread. A lock is stale when its owner is on this host and its
    pid is gone, when it was not touched for LOCK_STALE_S (any host), or when it holds no
    owner (written by an older version, or cut short): a job that finds a stale lock
    removes it and merges, so restarting the same command after a crash always completes."""

    def __init__(self, path):
        import threading
        self.path, self.stop = path, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self):
        while not self.stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self):
        self.stop.set()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def lock_stale(path):
    """(stale, description of the owner) of an existing merge.lock."""
    import socket
    try:
        age = time.time() - os.path.getmtime(path)
        with open(path) as f:
            owner = json.load(f)
        pid, host = int(owner["pid"]), str(owner["host"])
    except FileNotFoundError:
        return True, "gone"
    except (OSError, ValueError, KeyError, TypeError):
        return True, "no owner recorded"
    who = f"pid {pid} on host {host}"
    if age > LOCK_STALE_S:
        return True, f"{who}, not refreshed for {age:.0f} s"
    if host == socket.gethostname() and not _pid_alive(pid):
        return True, f"{who}, which is no longer running"
    return False, who


def acquire_merge_lock(out_dir, log):
    """MergeLock, or None when a live job holds the lock (it will write the output)."""
    import socket
    path = os.path.join(out_dir, "merge.lock")
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(3):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:  # the owner is in the file before the lock exists
            f.write(me)
        try:
            os.link(tmp, path)  # atomic: fails when the lock exists
            return MergeLock(path)
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        stale, who = lock_stale(path)
        if not stale:
            log(f"another job is merging ({who}); it writes the output (if it died, rerun after "
                f"{LOCK_STALE_S:.0f} s and its stale lock is removed)")
            return None
        log(f"removing a stale merge.lock ({who})")
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    raise SystemExit(f"preprocess: could not take {path}")


def summarize(done, file_failures, n_studies_input, n_files_input, n_sidecars):
    """-> (manifest summary, the studies' failure events). n_files_input: the files listed under
    --input (the output folder excluded), n_sidecars: those of them read as a NIfTI's sidecar.
    summary["files_input"] is split exactly into summary["files"] (per-volume counts: count_files)."""
    vols = [v for e in done.values() for v in e["volumes"]]
    events = [ev for e in done.values() for ev in e["events"]]
    by_reason = {st: Counter() for st in ("skipped", "failed")}
    for e in events:
        by_reason[e["status"]][e["reason"]] += e.get("n_files", 0)
    files = {"in_volumes": sum(v.get("n_files", 0) for v in vols),
             "dropped_from_volumes": sum(v.get("files_dropped", 0) for v in vols),
             "in_skipped_series": dict(sorted((r, n) for r, n in by_reason["skipped"].items() if n)),
             "in_failed_series": dict(sorted((r, n) for r, n in by_reason["failed"].items() if n)),
             "failed_before_grouping": sum(1 for e in file_failures if e["reason"] != UNREADABLE_DIR),
             "nifti_sidecars": n_sidecars}
    files["unaccounted"] = n_files_input - file_ledger_total(files)
    s = {
        "studies_input": n_studies_input,
        "studies_done": len(done),
        "studies_with_volumes": sum(1 for e in done.values() if e["volumes"]),
        "series_kept": len(vols),
        "series_skipped": dict(sorted(Counter(e["reason"] for e in events if e["status"] == "skipped").items())),
        "series_failed": dict(sorted(Counter(e["reason"] for e in events if e["status"] == "failed").items())),
        "files_failed": dict(sorted(Counter(e["reason"] for e in file_failures).items())),
        "files_input": n_files_input,
        "files": files,
        "volume_warnings": dict(sorted(Counter(w for v in vols for w in v.get("warnings", ())).items())),
        "volumes": len(vols),
        "volumes_by_family": dict(sorted(Counter(f"{v['modality']}/{v['family']}" for v in vols).items())),
        "volumes_by_split": dict(sorted(Counter(v["split"] for v in vols).items())),
        "tokens": int(sum(v["n_tokens"] for v in vols)),
        "gigabytes": round(sum(v["nbytes"] for v in vols) / 1e9, 4),
    }
    return s, events


def file_ledger_total(files):
    """The files a summary["files"] ledger accounts for (equal to summary["files_input"])."""
    return sum(sum(v.values()) if isinstance(v, dict) else v for k, v in files.items() if k != "unaccounted")


def print_summary(s):
    lines = [f"studies {s['studies_done']}/{s['studies_input']} ({s['studies_with_volumes']} with volumes), "
             f"volumes {s['volumes']}, tokens {s['tokens']:,}, {s['gigabytes']:.3f} GB",
             f"by family: {s['volumes_by_family']}", f"by split: {s['volumes_by_split']}"]
    if "files" in s:  # absent from manifests written before the ledger
        f = s["files"]
        lines.append(f"files {s['files_input']}: {f['in_volumes']} in volumes, {f['dropped_from_volumes']} dropped "
                     f"from kept volumes (duplicates), {sum(f['in_skipped_series'].values())} in skipped series, "
                     f"{sum(f['in_failed_series'].values())} in failed series, {f['failed_before_grouping']} failed "
                     f"before grouping, {f['nifti_sidecars']} NIfTI sidecars")
        if f["unaccounted"]:  # on stderr too: a mismatch is a bug, never to pass unseen
            warn = (f"WARNING: the file ledger does not add up: {f['unaccounted']:+d} of {s['files_input']} input "
                    "files unaccounted for (a bug: please report it; studies written by an older version carry "
                    "no file counts)")
            lines.append(warn)
            print(f"preprocess: {warn}", file=sys.stderr)
    for title, d in (("series skipped", s["series_skipped"]), ("series failed", s["series_failed"]),
                     ("files failed", s["files_failed"]), ("volume warnings", s.get("volume_warnings", {}))):
        if d:
            lines.append(f"{title} ({sum(d.values())}):")
            lines += [f"  {n:5d}  {r}" for r, n in d.items()]
    print("\n".join(lines))


def run(input_dir, output_dir, labels_path="", findings_path="", n_workers=2, shard_spec="0/1", salt_value="",
        cfg_min_slices=3, cfg_min_fg=-1.0, cfg_shard_gb=4.0, cfg_fsync=True, cfg_log_paths=True, cfg_progress=True,
        cfg_label_columns="", cfg_min_tokens=1, cfg_preset="nvfm"):
    """The whole stage; returns the manifest dict (or None when other array jobs are pending)."""
    if cfg_preset not in PRESETS:
        raise SystemExit(f"preprocess: --preset={cfg_preset!r}: choose one of {sorted(PRESETS)}")
    if cfg_min_fg is None or cfg_min_fg < 0:
        cfg_min_fg = PRESETS[cfg_preset][1]
    # before anything is written: else every series fails alike after its decoding ("error (ValueError)")
    # and the output, recorded with the bad value, refuses the corrected rerun
    if not 0.0 <= cfg_min_fg <= 1.0:  # (NaN too)
        raise SystemExit(f"preprocess: --min_fg_fraction={cfg_min_fg}: a fraction of a token's voxels, "
                         "from 0 to 1 (or -1: the preset's)")
    if cfg_min_slices < 2:  # one slice has no slice spacing to resample along
        raise SystemExit(f"preprocess: --min_slices={cfg_min_slices}: at least 2 (a volume needs 2 slices)")
    if not input_dir or not os.path.isdir(input_dir):
        raise SystemExit(f"preprocess: --input must be a directory, got {input_dir!r}")
    if all(os.path.isdir(os.path.join(input_dir, d)) for d in ("dicom", "gt")) and any(
            os.path.exists(os.path.join(input_dir, f)) for f in ("labels.csv", "cohort.json")):
        # a demo cohort root: gt/ holds ground-truth NIfTIs that would become extra studies
        raise SystemExit(f"preprocess: {input_dir} is a demo cohort root (dicom/, gt/, labels.csv): "
                         f"use --input={os.path.join(input_dir, 'dicom')} (gt/ is ground truth, not studies)")
    if not output_dir:
        raise SystemExit("preprocess: --output is required")
    if os.path.realpath(output_dir) == os.path.realpath(input_dir):  # its files would be read as input
        raise SystemExit(f"preprocess: --output={output_dir} is the --input folder: use a folder of its own")
    for what, path, copy in (("--labels", labels_path, "labels.csv"), ("--findings", findings_path, "findings.jsonl")):
        if path and not os.path.isfile(path):  # before anything is written
            raise SystemExit(f"preprocess: {what}: {path} not found")
        if path and os.path.realpath(path) == os.path.realpath(os.path.join(output_dir, copy)):
            raise SystemExit(f"preprocess: {what}: {path} would be replaced by its re-keyed copy: use another --output")
    try:
        si, sn = (int(x) for x in shard_spec.split("/"))
        assert 0 <= si < sn
    except Exception:
        raise SystemExit(f"preprocess: --shard must be i/N with 0 <= i < N, got {shard_spec!r}")
    s = resolve_salt(salt_value)
    salt_id = hashlib.sha256(s.encode()).hexdigest()[:16]
    settings = run_settings(cfg_preset, cfg_min_fg, salt_id, cfg_min_slices, cfg_min_tokens)
    man_path = os.path.join(output_dir, "manifest.json")
    if os.path.isdir(output_dir):  # a merge interrupted after its commit point completes first
        shards.finish_merge(output_dir)
    merged = set()
    if os.path.exists(man_path):  # a finished output: its parts/settings.json is gone, the manifest records them
        with open(man_path) as f:
            old = json.load(f)
        merged = {v["study_key"] for v in old.get("volumes", [])}
        _settings_conflict(output_dir, manifest_settings(old), settings, None)
    check_settings(output_dir, settings)  # parts of a killed run or of other array jobs
    # the split of every volume written: merged, or committed to parts/ by a killed run or another array
    # job (merged later in that split, whatever the labels say now)
    written_splits = {v["study_key"]: v["split"] for e in shards.read_done(output_dir).values() for v in e["volumes"]}
    os.makedirs(output_dir, exist_ok=True)
    log = Log(output_dir, cfg_log_paths)
    splits, label_keys = rekey_labels(labels_path, findings_path, output_dir, s, cfg_label_columns.split(","), log,
                                      written_splits, set(written_splits) - merged)

    # 1. list files, scan headers, group files into studies as the headers come in
    files, unreadable_dirs = dicom.walk_inputs(input_dir)
    files = outside_output(files, input_dir, output_dir)  # the output lives inside the input: never ingest it
    if not files:
        raise SystemExit(f"preprocess: no files under --input={input_dir}"
                         + (f" ({len(unreadable_dirs)} unreadable directories)" if unreadable_dirs else ""))
    nifti = [f for f in files if dicom.is_nifti(f)]
    sidecars = [dicom.nifti_sidecar(os.path.join(input_dir, f)) for f in nifti]  # read with their NIfTI, not as DICOM
    sidecars = {os.path.relpath(p, input_dir) for p in sidecars if p} & set(files)
    dcm = [f for f in files if not dicom.is_nifti(f) and f not in sidecars]
    # (headers stream in; only this array job's studies are kept, so memory is ~1/N)
    studies, all_keys, file_failures = {}, set(), []
    for rel in unreadable_dirs:  # counted like a failed file (its contents are unknown)
        fk = dicom.salted_hash(rel, s)
        if int(fk, 16) % sn == si:
            file_failures.append(_event("file", "failed", UNREADABLE_DIR, file_key=fk))
            log("failed directory: unreadable directory (permissions?)", rel, fk)
    with _worker_pool(n_workers, _ignore_sigint) as pool:
        it = (pool.imap(_scan, [(input_dir, f, s) for f in dcm], chunksize=16) if pool
              else map(_scan, [(input_dir, f, s) for f in dcm]))
        for h in tqdm(it, total=len(dcm), desc="headers", unit="file", disable=not cfg_progress):
            if "error" not in h and not h.get("study_uid"):
                h["error"] = "missing StudyInstanceUID"
            if "error" not in h and not h.get("series_uid"):
                h["error"] = "missing SeriesInstanceUID"
            if "error" in h:
                if int(h["file_key"], 16) % sn == si:
                    file_failures.append(_event("file", "failed", h["error"], file_key=h["file_key"]))
                    log(f"failed file: {h['error']}", h["path"], h["file_key"])
                continue
            key = dicom.study_key(h["study_uid"], s)
            all_keys.add(key)
            if int(key, 16) % sn == si:
                studies.setdefault(key, ("dicom", []))[1].append(h)
    for rel in nifti:
        key = dicom.nifti_study_key(dicom.nifti_study_folder(rel), s)
        all_keys.add(key)
        if int(key, 16) % sn == si:
            studies.setdefault(key, ("nifti", []))[1].append(rel)
    if label_keys:
        matched = len(label_keys & all_keys)
        if not matched:
            raise SystemExit(f"preprocess: none of the {len(label_keys)} studies in --labels/--findings matches a "
                             f"study under --input ({len(all_keys)} studies): labels must be keyed by the "
                             "StudyInstanceUID of the DICOM files (study_uid column)")
        log(f"labels: {matched} of {len(label_keys)} labelled studies found under --input")
    mine = sorted(studies)
    done = shards.read_done(output_dir)
    todo = [k for k in mine if k not in done]
    log(f"{len(files)} files, {len(all_keys)} studies ({len(mine)} in shard {si}/{sn}), "
        f"{len(mine) - len(todo)} already done, {len(todo)} to process")

    # 2. process studies (parts are written only under the settings recorded in parts/settings.json)
    if todo or not os.path.exists(man_path) or glob.glob(os.path.join(output_dir, "parts", "*.jsonl")):
        claim_settings(output_dir, settings)
    cfg = dict(salt=s, min_slices=cfg_min_slices, min_fg_fraction=cfg_min_fg, fsync=cfg_fsync,
               min_tokens=cfg_min_tokens, preset=cfg_preset)
    run_id = len([p for p in os.listdir(os.path.join(output_dir, "parts"))]) if os.path.isdir(
        os.path.join(output_dir, "parts")) else 0
    tag = f"s{si}of{sn}_r{run_id:04d}_{os.getpid()}"
    tasks = [dict(key=k, split=splits.get(k) or hash_split(k), kind=studies[k][0], items=studies[k][1]) for k in todo]
    counter = mp.Value("i", 0)
    if todo:
        init = (input_dir, output_dir, cfg, tag, counter)
        with _worker_pool(n_workers, _init_worker, init) as pool:
            if pool is None:
                _init_worker(*init, one_thread=False)
            it = pool.imap_unordered(process_study, tasks, chunksize=1) if pool else map(process_study, tasks)
            try:
                for key, nv, console in tqdm(it, total=len(tasks), desc="studies", unit="study",
                                             disable=not cfg_progress):
                    for msg, path, k, console_only in console:
                        log(msg, path, k, console_only)
            finally:  # committed studies stay, the rest is redone on rerun
                if "writer" in _W:
                    _W.pop("writer").close()

    # 3. this job is done; merge when every array job is (complete only when no job has a study left:
    # an array job with nothing new must still leave its done marker for one that has new studies)
    if not todo and os.path.exists(man_path) and not glob.glob(os.path.join(output_dir, "parts", "*.jsonl")) \
            and all_keys <= set(done):
        with open(man_path) as f:
            manifest = json.load(f)
        problem = shards.shard_size_problem(output_dir, manifest)
        if problem:
            raise SystemExit(f"preprocess: {problem}")
        log("nothing new to process: the output is complete")
        n_then = manifest["summary"]["files_input"]
        if len(files) != n_then:  # files added to (or removed from) studies already done: not re-read
            log(f"WARNING: --input now lists {len(files)} files, the finished output accounts for {n_then}: files of "
                f"studies already done are not read again (write to a new --output to include them)")
        print_summary(manifest["summary"])
        _require_volumes(manifest)
        return manifest
    parts = os.path.join(output_dir, "parts")
    os.makedirs(parts, exist_ok=True)
    shards.write_atomic(os.path.join(parts, f"done_{si}_of_{sn}.json"),
                        json.dumps({"studies": mine, "file_failures": file_failures, "settings": settings}))
    done_files = [os.path.join(parts, f"done_{i}_of_{sn}.json") for i in range(sn)]
    if not all(os.path.exists(p) for p in done_files):
        log(f"shard {si}/{sn} finished; waiting for the other array jobs before merging")
        return None
    lock = acquire_merge_lock(output_dir, log)
    if lock is None:
        return None
    try:
        done = shards.read_done(output_dir)
        pending = len(all_keys - set(done))
        if pending:  # a done marker left by an earlier merge (killed before removing it) is no finished job
            log(f"shard {si}/{sn} finished; {pending} studies of other array jobs are not done yet: waiting for them")
            return None
        all_file_failures = []
        for p in done_files:
            with open(p) as f:
                d = json.load(f)
            _settings_conflict(output_dir, d.get("settings", settings), settings, "parts/" + os.path.basename(p))
            all_file_failures += d["file_failures"]
        if os.path.exists(man_path):  # earlier merged runs' file failures are recomputed above
            pass
        all_file_failures.sort(key=lambda e: (e["file_key"], e["reason"]))
        summary, events = summarize(done, all_file_failures, len(all_keys), len(files), len(sidecars))
        events.sort(key=lambda e: (e.get("study_key", ""), e.get("series_key", ""), e["reason"]))
        extra = {"salt_id": salt_id, "summary": summary, "failures": all_file_failures + events,
                 "study_events": [{"study_key": k, "events": done[k]["events"]} for k in sorted(done)],
                 "patch": settings["patch"], "min_fg_fraction": cfg_min_fg,
                 "min_slices": settings["min_slices"], "min_tokens": settings["min_tokens"]}
        if cfg_preset != "nvfm":  # the default adds no key: nvfm manifests stay byte-identical
            extra["preset"] = cfg_preset
            extra["resampling"] = RESAMPLING[cfg_preset]
        try:
            manifest = shards.merge(output_dir, done, extra, int(cfg_shard_gb * 1e9), cfg_fsync)
        except ValueError as e:  # a source shard or part cut short: refused before anything is written
            raise SystemExit(f"preprocess: {e}") from None
        shards.remove_parts(output_dir)
    finally:
        lock.release()
    log(f"wrote {len(manifest['volumes'])} volumes to {len(manifest['shards'])} shard file(s)")
    print_summary(summary)
    _require_volumes(manifest)
    return manifest


# ------------------------------------------------------------------ run settings


SETTINGS_FILE = "settings.json"  # OUTPUT/parts/settings.json: what the unfinished parts were written with


# What every study of one output shares, as recorded in parts/settings.json and the manifest:
# key -> (its value in a manifest that lacks the key, the option that sets it). None: not
# recorded there (not checked); an option of None: fixed by this version of nvfm, not a choice.
SHARED = {"salt_id": (None, "--salt"), "preset": ("nvfm", "--preset"),
          "min_fg_fraction": (None, "--min_fg_fraction"), "min_slices": (None, "--min_slices"),
          "min_tokens": (None, "--min_tokens"), "resampling": ("tent", None), "patch": (None, None),
          "format": (None, None)}


def run_settings(preset_name, min_fg, salt_id, min_slices=3, min_tokens=1):
    """What every study of one output must share (SHARED; the manifest records one value of each):
    voxel rules (--preset, resampling), token rule (min_fg_fraction), which series are written
    (min_slices, min_tokens), salt (study keys), token patch and the shard format version."""
    return {"preset": preset_name, "min_fg_fraction": float(min_fg), "salt_id": salt_id,
            "min_slices": int(min_slices), "min_tokens": int(min_tokens), "patch": list(shards.PATCH),
            "format": shards.VERSION, "resampling": RESAMPLING[preset_name]}


def manifest_settings(man):
    """The SHARED settings a finished output's manifest records (its "version" is the format)."""
    man = dict(man, format=man.get("version", 1))
    return {k: man.get(k, absent) for k, (absent, _) in SHARED.items() if k in man or absent is not None}


def _shown(key, value, mine, flag=False):
    """One setting as a refusal names it (`flag`: as the option to rerun with); mine: this run's."""
    if key == "resampling":
        return f"{value} resampling (this version's --preset={mine['preset']}: {mine['resampling']})"
    if key == "format":
        return f"shard format {value} (this version writes {mine['format']})"
    if key == "patch":
        return f"patch {value} (this version's: {mine['patch']})"
    return f"{SHARED[key][1] if flag else ('--preset' if key == 'preset' else key)}={value}"


def _settings_conflict(output_dir, theirs, mine, where):
    """One-line SystemExit naming each SHARED setting where `theirs` (recorded in `where`, a file
    under parts/; None: the manifest) differs from this run's `mine`; None when they all match."""
    diff = [k for k in SHARED if k in theirs and theirs[k] != mine[k]]
    if "format" in diff and not (isinstance(theirs["format"], int) and theirs["format"] > mine["format"]):
        diff.remove("format")  # an older format's studies are a subset of this one's
    if "preset" in diff or "min_fg_fraction" in diff:  # the preset sets the token rule's default and the resampling
        diff = ["preset", "min_fg_fraction"] + [k for k in diff if k not in ("preset", "min_fg_fraction", "resampling")]
    if not diff:
        return
    options, fixed = [k for k in diff if SHARED[k][1]], [k for k in diff if not SHARED[k][1]]
    old = " ".join(_shown(k, theirs.get(k), mine) for k in options + fixed)
    new = " ".join("another salt" if k == "salt_id" else _shown(k, mine[k], mine) for k in options)
    if fixed:  # another version of nvfm wrote it: this one cannot add studies of the same bytes
        older = f" (an older --preset={mine['preset']})" if "resampling" in fixed else ""
        way = (f"another version of nvfm{older} wrote it; this one writes "
               f"{' '.join(_shown(k, mine[k], mine).split(' (')[0] for k in fixed)}: use a new --output")
    else:
        again = [_shown(k, theirs.get(k), mine, flag=True) for k in options if k != "salt_id"]
        again += ["its salt (--salt or $NVFM_SALT)"] * ("salt_id" in options)
        way = f"{'resume' if where else 'rerun'} with {' '.join(again)}, or use a new --output"
    state = f"holds unfinished work ({where}) written" if where else "was written"
    raise SystemExit(f"preprocess: {output_dir} {state} with {old}" + (f"; this run has {new}" if new else "")
                     + f": {way} (studies of mixed settings are never merged)")


def check_settings(output_dir, mine):
    """Refuse a resumed run or array job whose settings differ from those the unfinished
    parts were written with (read only: nothing is created)."""
    path = os.path.join(output_dir, "parts", SETTINGS_FILE)
    try:
        with open(path) as f:
            theirs = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise SystemExit(f"preprocess: {path} is unreadable: remove {os.path.join(output_dir, 'parts')} "
                         "(unfinished work) or use a new --output")
    _settings_conflict(output_dir, theirs, mine, "parts/" + SETTINGS_FILE)


def claim_settings(output_dir, mine):
    """Record this run's settings as OUTPUT/parts/settings.json before any part is written
    (atomically: of array jobs starting together, one writes it and the others compare), or
    check them against the recorded ones."""
    parts = os.path.join(output_dir, "parts")
    os.makedirs(parts, exist_ok=True)
    path = os.path.join(parts, SETTINGS_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    shards.write_atomic(tmp, json.dumps(mine, sort_keys=True))
    try:
        os.link(tmp, path)  # fails when another job (or an earlier run) recorded its settings
    except FileExistsError:
        check_settings(output_dir, mine)
    finally:
        os.remove(tmp)


def outside_output(files, input_dir, output_dir):
    """`files` (relative to input_dir) less those in output_dir, compared by real path (one realpath
    per folder): an output inside the input is found however either path reaches it (a symlinked
    home or scratch folder, a link to the output among the input's folders). An input inside the
    output (--output=proj --input=proj/dicom) keeps its own folders."""
    out, root = os.path.realpath(output_dir), os.path.realpath(input_dir)

    def under(x, top):
        return x == top or x.startswith(top.rstrip(os.sep) + os.sep)
    inside = {}
    for d in {os.path.dirname(f) for f in files}:
        real = os.path.realpath(os.path.join(input_dir, d))
        inside[d] = under(real, out) and not (under(root, out) and under(real, root))
    return [f for f in files if not inside[os.path.dirname(f)]]


def _require_volumes(manifest):
    """A run that wrote no volume is an error (exit status 1), with the manifest on disk."""
    if not manifest["volumes"]:
        raise SystemExit("preprocess: no volume was written: every input file failed or was skipped "
                         "(reasons above and in manifest.json)")


if __name__ == "__main__":
    from nvfm.configurator import configure
    configure(globals())
    t0 = time.time()
    try:
        run(input, output, labels, findings, workers, shard, salt, min_slices, min_fg_fraction, shard_gb, fsync,
            log_paths, progress, label_columns, min_tokens, preset)
    except KeyboardInterrupt:
        print("preprocess: interrupted; committed studies are kept: rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)
    print(f"preprocess: done in {time.time() - t0:.1f} s")
