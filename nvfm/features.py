"""On-disk cache of frozen-encoder token embeddings, one entry per study (DESIGN.md section 6).

Layout of a cache directory:
    DIR/index.json    {"version", "encoder_hash", "encoder", "dim", "rows", "precision", "origin"?, "studies":
                       {study_key: [{volume_id, family, window, modality, row, n, source?}, ...]}}
    DIR/emb.f16       float16 (rows, dim), C order: the embeddings of every entry back to back
    DIR/coords.i32    int32 (rows, 3): token grid coords (z, y, x) of the same rows
A (volume, window) entry owns rows [row, row + n). Studies are keyed by `study_key` (the
salted hash from the shards), never by a patient identifier.

Resumable writes: a study's rows are appended to both files first, the index is rewritten
atomically (temp file + rename) afterwards, every `flush_every` studies and at close. A
killed run leaves rows past index["rows"] that nothing points to: reopening for writing
truncates the files back to index["rows"], and studies already in the index are skipped.
A data file SHORTER than the index needs (a copy cut short, a file truncated after the
run) is never zero-padded: the writer keeps the studies whose rows are all intact (the
index is in write order, so they are a prefix), drops the rest from the index so that
they are encoded again, and says so in `.repaired`; the reader refuses such a cache
(`StaleCacheError` naming the file, its size and the size the index needs). One writer at a
time: a writer holds a lock on DIR/.writer.lock, and a second process opening the cache for
writing is a `StaleCacheError` (two writers would each write at their own idea of the next row).

Staleness: `encoder_hash` identifies the encoder (sha256 of the checkpoint file, or
"random:<size>:seed<k>" for a random-initialised encoder), followed by "+tokens:fg<f>,<crop>[,float]"
when the token rules are not nvfm's (`rules_suffix`; `token_rules` reads them back: grounding
needs the crop to place tokens, the flip test the rules to re-encode). Opening a cache for writing
with another hash raises `StaleCacheError` (pass overwrite=True to start afresh: the old cache
stays whole until the first study is added, so a run that fails before that loses nothing), and a
probe trained on one cache refuses to run on a cache with another hash.

Precision: the same encoder gives other features in float32 (CPU) than under CUDA bfloat16
autocast (model.encode_study; ~14x the float16 storage step apart), so "precision"
(`encode_precision(device)`) records how the cached studies were computed and a writer with
another precision refuses to add to the cache: a CPU-started cache resumed on a GPU would
otherwise mix the two silently. Caches written before the field existed have none
(`FeatureCache.precision` None): they stay readable, and a resume cannot check them (`.note`).
"""
import errno
import fcntl
import hashlib
import json
import os

import numpy as np

from nvfm.data import write_atomic
from nvfm.tokenize import DEFAULT_MIN_FG_FRACTION

VERSION = 1


class StaleCacheError(RuntimeError):
    pass


# nvfm's token rules (encode.py --preset=nvfm): a cache made with them has no "+tokens:" suffix
DEFAULT_RULES = dict(min_fg_fraction=DEFAULT_MIN_FG_FRACTION, crop="pad", full_precision=False)


def rules_suffix(rules):
    """Token rules dict(min_fg_fraction, crop, full_precision) -> the encoder-hash suffix ("" for nvfm's)."""
    if rules == DEFAULT_RULES:
        return ""
    fg = float(rules["min_fg_fraction"])
    text = f"{fg:g}" if float(f"{fg:g}") == fg else repr(fg)  # :g keeps 6 digits: two rules would share a hash
    return f"+tokens:fg{text},{rules['crop']}" + (",float" if rules["full_precision"] else "")


def token_rules(encoder_hash):
    """Inverse of `rules_suffix`: encoder_hash -> (the encoder's own hash, token rules dict)."""
    base, sep, tail = encoder_hash.partition("+tokens:")
    if not sep:
        return encoder_hash, dict(DEFAULT_RULES)
    parts = tail.split(",")
    try:
        fg = float(parts[0][2:]) if parts[0].startswith("fg") else -1.0
    except ValueError:
        fg = -1.0
    if len(parts) not in (2, 3) or not 0.0 <= fg <= 1.0 or parts[1] not in ("pad", "centre") \
            or parts[2:] not in ([], ["float"]):
        raise ValueError(f"encoder hash {encoder_hash!r}: unreadable token rules {tail!r}")
    return base, dict(min_fg_fraction=fg, crop=parts[1], full_precision=parts[2:] == ["float"])


def _lock_writer(path):
    """Lock DIR/.writer.lock for this process (-> the open lock file; closing it unlocks), or a
    StaleCacheError when another process holds it."""
    f = open(os.path.join(path, ".writer.lock"), "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.close()
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            return None  # a file system without locks (ENOLCK): nothing to wait for, write unlocked
        raise StaleCacheError(f"{path}: another process is writing this feature cache (encode.py with the same "
                              f"--out?); wait for it to finish, or use another output directory") from None
    return f


ROW_BYTES = {"emb.f16": lambda dim: dim * 2, "coords.i32": lambda dim: 3 * 4}


def encode_precision(device):
    """How model.encode_study computes on `device` (torch.device or str): bfloat16 autocast on
    CUDA, float32 elsewhere."""
    kind = str(getattr(device, "type", device)).split(":")[0]
    return "bfloat16-autocast" if kind == "cuda" else "float32"


def trained_precision(ck, trained_on, open_cache=None):
    """How the features a checkpoint (a probe.pt, a train_llava ckpt.pt) was trained on were
    computed: its recorded `feature_precision`, else what its training cache at `trained_on`
    records now (`open_cache`, a FeatureCache already open, when it is that cache); None when
    neither says (an old checkpoint whose cache has moved, gone or never recorded it)."""
    if ck.get("feature_precision"):
        return ck["feature_precision"]
    if not trained_on:
        return None
    if open_cache is not None and os.path.realpath(trained_on) == os.path.realpath(open_cache.path):
        return open_cache.precision
    try:
        return FeatureCache(trained_on).precision
    except (OSError, ValueError, StaleCacheError):  # moved, deleted or cut short since: unknown
        return None


def _read_index(path):
    """index.json -> dict; a file that is not a cache index is a StaleCacheError naming it."""
    index = os.path.join(path, "index.json")
    try:
        with open(index) as f:
            out = json.load(f)
        rows, _, _ = int(out["rows"]), int(out["dim"]), out["encoder_hash"]
        outside = [(key, r["row"], r["row"] + r["n"]) for key, recs in out["studies"].items() for r in recs
                   if not 0 <= r["row"] <= r["row"] + r["n"] <= rows]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StaleCacheError(f"{index}: not a readable feature-cache index ({type(e).__name__}: {e}); "
                              f"rerun encode.py with --overwrite=True") from None
    if outside:  # a study whose rows are not all in the cache would read short
        key, lo, hi = outside[0]
        raise StaleCacheError(f"{index}: study {key} lists rows [{lo}, {hi}) but the cache holds {rows} rows "
                              f"(an inconsistent index); rerun encode.py with --overwrite=True")
    if out.get("version") != VERSION:  # checked for the writer too: it appended to caches the reader then refused
        raise StaleCacheError(f"{index}: cache version {out.get('version')} != {VERSION} (another nvfm's layout); "
                              f"use another output directory or rerun encode.py with --overwrite=True")
    return out


def _short_files(path, rows, dim):
    """[(file, size, expected size)] of the data files shorter than `rows` rows need."""
    out = []
    for name, per_row in ROW_BYTES.items():
        p = os.path.join(path, name)
        size = os.path.getsize(p) if os.path.exists(p) else 0
        if size < rows * per_row(dim):
            out.append((p, size, rows * per_row(dim)))
    return out


def _short_message(path, short):
    p, size, need = short[0]
    return f"{p} is {size} bytes but {os.path.join(path, 'index.json')} needs {need} (cut short: a partial copy or a truncated file)"


def file_hash(path, chunk=1 << 22):
    """sha256 hex of a file (the encoder checkpoint), prefixed with 'sha256:'."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


class FeatureCache:
    """Read access: `.study_keys()`, `.study(key)`, `.encoder_hash`, `.dim`, `len()`.

    `.study(key)` -> list of dict(volume_id, family, window, modality, coords (n, 3) int32,
    emb (n, dim) float16), both memmap views (read-only; copy before changing them).
    """

    def __init__(self, path, expect_hash=None):
        self.path = path
        index = os.path.join(path, "index.json")
        if not os.path.exists(index):
            raise FileNotFoundError(f"{path}: not a feature cache (no index.json); run encode.py first")
        self.index = _read_index(path)
        self.encoder_hash = self.index["encoder_hash"]
        self.precision = self.index.get("precision")  # None: written before it was recorded
        self.dim = int(self.index["dim"])
        short = _short_files(path, int(self.index["rows"]), self.dim)
        if short:
            raise StaleCacheError(f"{_short_message(path, short)}; rerun encode.py with the same --out to "
                                  f"re-encode the lost studies, or with --overwrite=True")
        if expect_hash is not None and expect_hash != self.encoder_hash:
            raise StaleCacheError(f"{path}: features were made by encoder {self.encoder_hash}, "
                                  f"expected {expect_hash}; re-run encode.py with the right encoder")
        # mapped now, not at the first study(): an --overwrite run replacing the files later must not
        # be read through this index (the old files stay mapped: the writer unlinks, never truncates them)
        rows = int(self.index["rows"])
        if rows == 0:
            self._emb, self._coords = np.zeros((0, self.dim), np.float16), np.zeros((0, 3), np.int32)
        else:
            self._emb = np.memmap(os.path.join(path, "emb.f16"), np.float16, "r", shape=(rows, self.dim))
            self._coords = np.memmap(os.path.join(path, "coords.i32"), np.int32, "r", shape=(rows, 3))

    def __len__(self):
        return len(self.index["studies"])

    def __contains__(self, key):
        return key in self.index["studies"]

    def study_keys(self):
        return list(self.index["studies"])

    def study(self, key):
        if key not in self.index["studies"]:
            raise KeyError(f"{self.path}: study {key} is not in the feature cache (encode it first, "
                           f"or check that the cache was made from the same shards)")
        emb, coords = self._emb, self._coords
        out = []
        for e in self.index["studies"][key]:
            r, n = e["row"], e["n"]
            out.append(dict(volume_id=e["volume_id"], family=e["family"], window=e["window"],
                            modality=e["modality"], coords=coords[r:r + n], emb=emb[r:r + n]))
        return out

    def n_tokens(self, key, windows=None):
        """Token count of a study (in `windows` only, when given), from the index alone."""
        return sum(e["n"] for e in self.index["studies"][key] if windows is None or e["window"] in windows)

    def study_tokens(self, key, windows=None):
        """All tokens of a study as one bag: (emb (n, dim) float16 ndarray, entries) where
        entries lists (entry dict, start, stop) rows of the bag. windows: keep only these."""
        ents = [e for e in self.study(key) if windows is None or e["window"] in windows]
        if not ents:
            return np.zeros((0, self.dim), np.float16), []
        spans, start = [], 0
        for e in ents:
            spans.append((e, start, start + len(e["emb"])))
            start += len(e["emb"])
        return np.concatenate([e["emb"] for e in ents]), spans


class FeatureWriter:
    """Append studies to a cache directory; resumable (see module docstring).

    with FeatureWriter(dir, encoder_hash, dim, encoder_name, precision=encode_precision(device)) as w:
        for key in keys:
            if key in w: continue
            w.add(key, entries)   # entries: encode_study() output (+ modality)

    precision: see the module docstring; None (unknown) is neither recorded nor checked.
    origin: what every study is encoded from (encode.py: a fingerprint of the shard set's settings), kept
    as index["origin"]; resuming a cache with another one is a StaleCacheError (it would mix studies of
    two shard sets, e.g. a train split of one and a test split of another, that no study key links).
    None is neither recorded nor checked; a cache without one takes the first one given.
    """

    def __init__(self, path, encoder_hash, dim, encoder_name="", overwrite=False, flush_every=16, precision=None,
                 origin=None):
        self.path = path
        self.flush_every = flush_every
        self.repaired = None  # a message when a cut-short cache was cut back to its intact studies
        self.note = None  # a message when the cached studies' precision cannot be checked
        index = os.path.join(path, "index.json")
        # an existing cache is locked before it is read; a new one when its directory is made (_open_files)
        self._lock = _lock_writer(path) if os.path.exists(index) else None
        resume = os.path.exists(index) and not overwrite
        if resume:
            self.index = _read_index(path)
            if self.index.get("encoder_hash") != encoder_hash:
                raise StaleCacheError(
                    f"{path}: cache was made by encoder {self.index.get('encoder_hash')}, not {encoder_hash}; "
                    f"use another output directory or --overwrite=True")
            if int(self.index["dim"]) != dim:
                raise StaleCacheError(f"{path}: cache dim {self.index['dim']} != encoder dim {dim}")
            if origin is not None and self.index.get("origin", origin) != origin:
                raise StaleCacheError(
                    f"{path}: cached studies were encoded from another shard set ({self.index['origin']}, this run's "
                    f"{origin}: another salt, preset or preprocessing setting); use another output directory "
                    f"or --overwrite=True")
            if origin is not None:  # a cache written before the origin was kept takes this run's
                self.index["origin"] = origin
            cached = self.index.get("precision")
            if precision is not None and cached is not None and cached != precision:
                raise StaleCacheError(
                    f"{path}: cached features were computed in {cached}, this run computes {precision} "
                    f"(another --device); resume on the same kind of device, or use another output directory "
                    f"or --overwrite=True")
            if precision is not None and cached is None:
                if self.index["studies"]:  # can't tell how they were made: not recorded as if known
                    self.note = (f"{path}: the {len(self.index['studies'])} cached studies were written before the "
                                 f"precision was recorded; resuming in {precision} cannot check that they match")
                else:
                    self.index["precision"] = precision
            short = _short_files(path, int(self.index["rows"]), dim)
            if short:  # never zero-pad: keep the intact prefix of studies, encode the rest again
                # the rows every file still holds (a file that is not short holds them all)
                intact = min(size // ROW_BYTES[os.path.basename(p)](dim) for p, size, _ in short)
                kept, rows, dropped = {}, 0, 0
                for key, recs in self.index["studies"].items():
                    end = max((r["row"] + r["n"] for r in recs), default=rows)
                    if dropped or end > intact:
                        dropped += 1
                        continue
                    kept[key], rows = recs, max(rows, end)
                self.repaired = (f"{_short_message(path, short)}: kept the {len(kept)} studies stored "
                                 f"before the cut, {dropped} to be encoded again")
                self.index["studies"], self.index["rows"] = kept, rows
        else:
            self.index = {"version": VERSION, "encoder_hash": encoder_hash, "encoder": encoder_name,
                          "dim": int(dim), "rows": 0, "precision": precision, "studies": {}}
            if origin is not None:
                self.index["origin"] = origin
        self.dim = int(dim)
        self._pending = 0
        self._emb = self._co = None
        # a new cache (or an overwrite) is made when the first study is added: a run that encodes nothing
        # writes nothing, and an overwrite keeps the old cache whole until then
        self._start = not resume
        if resume:
            self._open_files(fresh=False)

    def _open_files(self, fresh):
        """Write the index and open the data files at its row count; fresh: start them empty."""
        os.makedirs(self.path, exist_ok=True)
        if self._lock is None:  # before anything is written: another writer may have made the cache since
            self._lock = _lock_writer(self.path)
        index = os.path.join(self.path, "index.json")
        emb_path, co_path = os.path.join(self.path, "emb.f16"), os.path.join(self.path, "coords.i32")
        # the index first: a kill before the files are cut leaves rows past it, never an old index on new files
        write_atomic(index, json.dumps(self.index))
        for p in (emb_path, co_path):
            if fresh and os.path.exists(p):
                os.unlink(p)  # not truncated: readers of the old cache keep their mapped files
            open(p, "ab").close()  # create; "r+b" so that add() can write at the index's row
        self._emb = open(emb_path, "r+b")
        self._co = open(co_path, "r+b")
        self._truncate()  # drop any half-written tail of a killed run: nothing in the index points there

    def __contains__(self, key):
        return key in self.index["studies"]

    def add(self, key, entries):
        """entries: list of dict(volume_id, family, window, modality, coords (n,3), emb (n,dim),
        optionally source: a string kept in the index, encode.py's fingerprint of what the volume
        was encoded from). A study already in the cache is a ValueError; a failed add writes nothing."""
        if key in self.index["studies"]:  # a second copy would orphan the first one's rows
            raise ValueError(f"{self.path}: study {key} is already in the feature cache")
        rows = int(self.index["rows"])
        arrays = []
        for e in entries:   # validate everything before writing anything: rows stay consistent
            missing = [f for f in ("volume_id", "window", "modality", "coords", "emb") if f not in e]
            if missing:
                raise ValueError(f"study {key}, volume {e.get('volume_id')}: entry without {', '.join(missing)}")
            with np.errstate(over="ignore"):
                emb = np.ascontiguousarray(np.asarray(e["emb"], dtype=np.float32).astype(np.float16))
            raw = np.asarray(e["coords"])
            with np.errstate(invalid="ignore"):
                co = np.ascontiguousarray(raw.astype(np.int32))
            if not np.array_equal(co, raw) or (co < 0).any():  # a cast would truncate 2.7 and wrap 2**32 silently
                raise ValueError(f"study {key}, volume {e.get('volume_id')}: coords must be token grid indices "
                                 f"(integers in [0, 2**31)), got {raw.dtype} values {raw.min()}..{raw.max()}")
            if emb.ndim != 2 or emb.shape[1] != self.dim or co.shape != (len(emb), 3):
                raise ValueError(f"study {key}, volume {e.get('volume_id')}: emb {emb.shape} / coords "
                                 f"{co.shape} do not match dim {self.dim}")
            if not np.isfinite(emb).all():
                raise ValueError(f"study {key}, volume {e.get('volume_id')}: non-finite embeddings "
                                 f"(float16 overflow or a broken encoder)")
            arrays.append((e, emb, co))
        if self._start:  # the first study: now the cache is made (an old one goes)
            self._open_files(fresh=True)
            self._start = False
        # write where the index says the next row is, not at the file's end: bytes of an add that
        # failed midway (disk full) are overwritten, never counted as the next study's rows
        self._emb.seek(rows * self.dim * 2)
        self._co.seek(rows * 3 * 4)
        recs = []
        for e, emb, co in arrays:
            self._emb.write(emb.tobytes())
            self._co.write(co.tobytes())
            recs.append(dict(volume_id=e["volume_id"], family=e.get("family"), window=e["window"],
                             modality=e["modality"], row=rows, n=len(emb),
                             **({"source": e["source"]} if "source" in e else {})))
            rows += len(emb)
        self.index["studies"][key] = recs
        self.index["rows"] = rows
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self):
        if self._emb is None:  # a new cache (or an overwrite) that has added nothing: nothing is written
            return
        for f in (self._emb, self._co):
            f.flush()
            os.fsync(f.fileno())
        write_atomic(os.path.join(self.path, "index.json"), json.dumps(self.index))
        self._pending = 0

    def _truncate(self):
        rows = int(self.index["rows"])
        self._emb.truncate(rows * self.dim * 2)
        self._co.truncate(rows * 3 * 4)

    def close(self):
        if self._emb is not None and not self._emb.closed:
            self.flush()
            self._truncate()  # the bytes of a failed last add
            self._emb.close()
            self._co.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
