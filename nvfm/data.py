"""Memory-mapped volume shards: writer (resumable parts + deterministic merge) and reader.

Layout of a shard set (DESIGN.md section 2):
    SHARDS/manifest.json     {"version", "salt_id", "volumes": [...], "failures": [...], "summary": {...}}
    SHARDS/<split>_<k>.bin   uint8, volumes back to back (k = 0, 1, ...; a new file starts
                             after `shard_bytes`), each volume starts at a multiple of 64 bytes
    SHARDS/labels.csv, SHARDS/findings.jsonl   re-keyed copies (study_uid -> study_key)
One volume at `offset`: `channels x D x H x W` uint8 (MR: 1 channel; CT: [brain W80/L40,
blood << 4 | bone]), then the voxel foreground mask `D x H x W` uint8 0/1; `nbytes` is both.
Format version 2 (manifest "version"; written only when a volume has one, else 1) adds an
optional third block: a volume record with `values` ("int16" | "float32") holds the
resampled intensities (CT: HU; MR: scanner values) `D x H x W` little-endian at byte
`values_at` from `offset` (a multiple of 8), and `nbytes` covers it. preprocess.py
--preset=neurovfm writes it (MR records then carry `clip` [lo, hi]), so their float [0, 1]
windows are exact (`ShardReader.window_float`) where the uint8 windows are 1/510 (brain, MR)
or 1/30 (blood, bone nibbles) off. Readers of version 1 ignore the block (it lies past the
mask), so every reader of the uint8 windows reads both versions alike.

Volume record keys: volume_id, study_key, series_key, split, modality ("CT"|"MR"), family,
shard, offset, nbytes, shape [D, H, W], channels, spacing [4, 1, 1] (mm, D H W), affine
(4x4 canonical voxel -> RAS mm), orientation (e.g. "IPR"), original_orientation (axis
codes of the native slice/row/column axes), original_spacing (slice gap, row, column mm),
tilt_deg, token_grid [gz, gy, gx], n_tokens, token_mask (base64 of
numpy.packbits(mask.ravel()) of the (gz, gy, gx) bool token mask, raster order z, y, x).
Refinements of DESIGN.md (additions only; nothing in section 2 changed):
  - volume records also carry `nbytes`, `n_tokens`, `tilt_deg` (gantry tilt removed by
    resampling, degrees), `duplicates_dropped`, the file ledger's `n_files` (input files whose
    slices it holds) and `files_dropped` (files of its series it used none of), and the token mask;
    `volume_id` = "<study_key>-<series_key>" (+ ".<part>" when a series was split by
    orientation/size/echo/b-value), `series_key` = salted hash of SeriesInstanceUID (NIfTI:
    of "nifti:" + relative path);
  - failures are {"kind": "file"|"series", "status": "failed"|"skipped", "reason",
    "study_key"?, "series_key"?, "file_key"?, "n_files"? (series: its files)}; file_key is a salted hash of the path
    relative to the input root (folder names can hold patient names, so no path is stored);
  - the manifest also has "shards" {name: bytes}, "patch", "min_fg_fraction", "min_slices",
    "min_tokens" (preprocess.py's SHARED settings) and
    "study_events" (per study, its failures: the done-list a later run resumes from);
  - summary = {studies_input, studies_done, studies_with_volumes, series_kept,
    series_skipped {reason: n}, series_failed {reason: n}, files_failed {reason: n},
    files_input, files {in_volumes, dropped_from_volumes, in_skipped_series {reason: n},
    in_failed_series {reason: n}, failed_before_grouping, nifti_sidecars, unaccounted (0)}, volumes, volumes_by_family, volumes_by_split, tokens, gigabytes}.

Writing (resumable). Each worker appends finished studies to its own part
(`SHARDS/parts/<tag>.bin` + `<tag>.jsonl`): first the bytes (flushed, fsync'ed), then one
JSON line per study (the commit record). A killed run leaves at most a half-written tail
that no JSON line points to; a restart reads the committed lines, skips those studies and
writes new parts. `merge()` then copies every volume, sorted by (split, study_key,
volume_id), into new shards (`<name>.tmp`), commits by writing `manifest.json.next`, then moves
the shards and the manifest into place (`finish_merge`, which the next run repeats when that was
interrupted), so the output is byte-identical however the work was scheduled or interrupted.
Parts are deleted after the manifest is committed; the manifest then serves as the done-list
for later runs.

Reading. `ShardReader(SHARDS)` memory-maps shards lazily; `.volume(i)` returns zero-copy
views; `.window(i, name)` gives one window as (D, H, W) uint8 (4-bit windows expanded to
0..255 by v * 17); `.slab(i, start, stop)` is the zero-copy D-slab holding a range of
foreground tokens; `.tokens(i, name, start, stop)` the packed (n, 1024) tokens + coords.
"""
import base64
import contextlib
import glob
import json
import os
import tempfile
import time

import numpy as np

VERSION = 2  # the newest format this module writes and reads (1: no source blocks)
VALUES_DTYPES = {"int16": "<i2", "float32": "<f4"}
ALIGN = 64
PATCH = (4, 16, 16)


def pack_mask(m):
    return base64.b64encode(np.packbits(np.asarray(m, bool).ravel())).decode()


def unpack_mask(s, grid):
    """pack_mask's string -> (grid) bool; ValueError when it holds another number of bytes than the grid
    needs (np.unpackbits pads a short one with zeros: a mask cut short lost its last tokens silently)."""
    n = int(np.prod(grid))
    raw = base64.b64decode(s)
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"token mask of {len(raw)} bytes, a {list(grid)} token grid needs {(n + 7) // 8}")
    return np.unpackbits(np.frombuffer(raw, np.uint8), count=n).astype(bool).reshape(grid)


_UMASK = os.umask(0o022)  # read once: a temp file gets the permissions a plain open() would give
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path in path's directory to write the file to; on success it is fsync'ed,
    renamed over path and the directory entry fsync'ed (so the rename survives a power cut).
    On any failure (disk full, kill) the temp file is removed and the old path left intact; a temp
    file that a SIGKILL left (nothing could remove it) is removed by the next write of path that
    succeeds, if it was last written before that write began (repeated preemptions of a job saving
    a checkpoint piled them up, each the checkpoint's size)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    started = time.time()
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=d)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for name in os.listdir(d):
        left = os.path.join(d, name)
        try:
            if name.startswith(prefix) and os.path.getmtime(left) < started - 1.0:  # not a write in progress
                os.unlink(left)
        except OSError:  # gone meanwhile
            pass
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some file systems cannot fsync a directory; the file itself is on disk
        pass


def write_atomic(path, text_or_bytes):
    """Write a file so that a reader sees the old contents or the new, never a part (atomic_path)."""
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        f.write(text_or_bytes)


def _check_volume(rec, data, mask, values):
    """Check one volume before it is written: data (C, D, H, W) uint8, mask (D, H, W) uint8 or bool,
    the record's shape / channels (what readers reshape by) equal to the arrays', values None or
    int16 / float32 of the mask's shape. -> the values kind ("int16" | "float32") or None."""
    name = rec.get("volume_id", "?")
    data, mask = np.asarray(data), np.asarray(mask)
    if data.dtype != np.uint8 or data.ndim != 4 or mask.dtype not in (np.uint8, np.bool_) or data.shape[1:] != mask.shape:
        raise ValueError(f"volume {name}: data must be uint8 (C, D, H, W) and mask uint8 (D, H, W) of the same "
                         f"D, H, W, not {data.dtype} {data.shape} and {mask.dtype} {mask.shape}")
    if list(rec.get("shape", mask.shape)) != list(mask.shape) or rec.get("channels", data.shape[0]) != data.shape[0]:
        raise ValueError(f"volume {name}: record shape {rec.get('shape')} / channels {rec.get('channels')} do not "
                         f"match the data {data.shape}")
    if values is None:
        return None
    kind = {np.dtype(np.int16): "int16", np.dtype(np.float32): "float32"}.get(np.dtype(values.dtype))
    if kind is None or values.shape != mask.shape:
        raise ValueError(f"volume {name}: values block must be int16 or float32 of the mask's shape, "
                         f"not {values.dtype} {values.shape}")
    return kind


class PartWriter:
    """Appends studies (volume bytes + one JSON commit line) to SHARDS/parts/<tag>.*"""

    def __init__(self, out_dir, tag, fsync=True):
        self.dir = os.path.join(out_dir, "parts")
        os.makedirs(self.dir, exist_ok=True)
        self.tag = tag
        self.bin = open(os.path.join(self.dir, tag + ".bin"), "ab")
        self.log = open(os.path.join(self.dir, tag + ".jsonl"), "a")
        self.fsync = fsync
        self.pos = self.bin.seek(0, os.SEEK_END)

    def add_study(self, study_key, volumes, events):
        """volumes: list of (record dict, data (C,D,H,W) uint8, mask (D,H,W) uint8[, values
        (D,H,W) int16 / float32: the format-2 values block, or None]). Every volume is checked
        before any byte is written (ValueError naming the volume), so a refused study leaves
        nothing behind and the next study's offsets stay right."""
        kinds = [_check_volume(rec, data, mask, more[0] if more else None) for rec, data, mask, *more in volumes]
        self.pos = self.bin.tell()  # where the bytes land (append mode), even after a failed write
        recs = []
        for (rec, data, mask, *more), kind in zip(volumes, kinds):
            src = more[0] if more else None
            pad = (-self.pos) % ALIGN
            if pad:
                self.bin.write(b"\0" * pad)
                self.pos += pad
            for a in (data, mask):  # straight from the array's buffer (no bytes copy of a whole volume)
                self.bin.write(np.ascontiguousarray(a, np.uint8).reshape(-1))
            n = data.nbytes + mask.nbytes
            rec = dict(rec)
            if src is not None:
                gap = (-n) % 8
                self.bin.write(b"\0" * gap)
                self.bin.write(np.ascontiguousarray(src, VALUES_DTYPES[kind]).reshape(-1).view(np.uint8))
                rec.update(values=kind, values_at=n + gap)
                n += gap + src.nbytes
            recs.append(dict(rec, source=os.path.join("parts", self.tag + ".bin"), source_offset=self.pos, nbytes=n))
            self.pos += n
        self.bin.flush()
        if self.fsync:
            os.fsync(self.bin.fileno())
        self.log.write(json.dumps({"study_key": study_key, "volumes": recs, "events": events}) + "\n")
        self.log.flush()
        if self.fsync:
            os.fsync(self.log.fileno())

    def close(self):
        self.bin.close()
        self.log.close()


def read_done(out_dir):
    """Committed studies: {study_key: {"volumes": [...], "events": [...]}} from the manifest
    (merged earlier; an interrupted merge is completed first) and the parts (newer).
    Uncommitted tails are ignored."""
    finish_merge(out_dir)
    done = {}
    man = os.path.join(out_dir, "manifest.json")
    if os.path.exists(man):
        with open(man) as f:
            m = json.load(f)
        for v in m["volumes"]:
            e = done.setdefault(v["study_key"], {"volumes": [], "events": []})
            e["volumes"].append(dict(v, source=v["shard"], source_offset=v["offset"]))
        for ev in m.get("study_events", []):
            done.setdefault(ev["study_key"], {"volumes": [], "events": []})["events"] = ev["events"]
    for path in sorted(glob.glob(os.path.join(out_dir, "parts", "*.jsonl"))):
        size = os.path.getsize(path[:-6] + ".bin") if os.path.exists(path[:-6] + ".bin") else -1
        with open(path) as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line: not committed
                if all(v["source_offset"] + v["nbytes"] <= size for v in e["volumes"]):
                    done[e["study_key"]] = {"volumes": e["volumes"], "events": e["events"]}
    return done


def merge(out_dir, done, manifest_extra, shard_bytes=4 << 30, fsync=True):
    """Write final shards (sorted, deterministic) and the manifest from `done` entries.

    manifest_extra: dict merged into the manifest (salt_id, summary, failures, ...).
    fsync: flush the shard bytes to disk before the manifest names them (crash safety; off
    only in benchmarks, like preprocess.py's `fsync`).
    A source file (a part, or an old shard) that ends before one of its volumes is a ValueError
    naming it, raised before anything is written.
    Returns the manifest dict.
    """
    vols = [v for e in done.values() for v in e["volumes"]]
    vols.sort(key=lambda v: (v["split"], v["study_key"], v["volume_id"]))
    have = {}
    for v in vols:  # before anything is written: a source cut short gave fewer bytes than nbytes, and every
        src = os.path.join(out_dir, v["source"])  # later volume of its output shard was read shifted
        if src not in have:
            have[src] = os.path.getsize(src) if os.path.isfile(src) else None
        end = v["source_offset"] + v["nbytes"]
        if have[src] is None or end > have[src]:
            what = "is missing" if have[src] is None else f"is {have[src]} bytes"
            raise ValueError(f"{src} {what}, but volume {v['volume_id']} ends at byte {end} of it (cut short or "
                             f"removed after it was written): restore it, or rerun preprocess.py into a new --output")
    out_vols, writers, sizes = [], {}, {}
    srcs = {}
    try:
        for v in vols:
            split = v["split"]
            k, size = sizes.get(split, (0, 0))
            if size > 0 and size + v["nbytes"] > shard_bytes:
                k, size = k + 1, 0
                writers.pop(split).close()
            name = f"{split}_{k}.bin"
            if split not in writers:
                writers[split] = open(os.path.join(out_dir, name + ".tmp"), "wb")
            w = writers[split]
            pad = (-size) % ALIGN
            w.write(b"\0" * pad)
            size += pad
            src = v["source"]
            if src not in srcs:
                srcs[src] = np.memmap(os.path.join(out_dir, src), np.uint8, mode="r")
            w.write(srcs[src][v["source_offset"]:v["source_offset"] + v["nbytes"]])  # the mapped bytes, no copy
            rec = {key: val for key, val in v.items() if key not in ("source", "source_offset")}
            rec.update(shard=name, offset=size)
            out_vols.append(rec)
            sizes[split] = (k, size + v["nbytes"])
        for w in writers.values():
            w.flush()
            if fsync:
                os.fsync(w.fileno())
            w.close()
    finally:
        for w in writers.values():
            w.close()
        srcs.clear()
    names = sorted({v["shard"] for v in out_vols})
    manifest = {"version": 2 if any(v.get("values") for v in out_vols) else 1}  # 1 stays byte-identical
    manifest.update(manifest_extra)
    manifest["volumes"] = out_vols
    manifest["shards"] = {n: os.path.getsize(os.path.join(out_dir, n + ".tmp")) for n in names}
    # the commit point: the old shards (sources of this merge) are replaced only after it
    write_atomic(os.path.join(out_dir, NEXT_MANIFEST), dump_manifest(manifest))
    finish_merge(out_dir)
    return manifest


NEXT_MANIFEST = "manifest.json.next"  # a merge's manifest before its shards are in place


def finish_merge(out_dir):
    """Complete a merge that wrote OUTPUT/manifest.json.next (every new shard written as
    <name>.tmp): move its shards into place, remove shards it does not name, then make it
    manifest.json. A merge killed anywhere in here completes on the next call (preprocess.py
    calls it first); before this, the old manifest.json named old shards that were already
    replaced, and a rerun copied the wrong bytes into the volumes it took from them."""
    nxt = os.path.join(out_dir, NEXT_MANIFEST)
    try:
        with open(nxt) as f:
            names = set(json.load(f)["shards"])
    except FileNotFoundError:
        return

    def quietly(fn, *args):  # a step done before the interruption (or by another job) is skipped
        with contextlib.suppress(FileNotFoundError):
            fn(*args)
    for name in sorted(names):
        quietly(os.replace, os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    for stale in glob.glob(os.path.join(out_dir, "*_*.bin")):
        if os.path.basename(stale) not in names:
            quietly(os.remove, stale)
    quietly(os.replace, nxt, os.path.join(out_dir, "manifest.json"))


def dump_manifest(m):
    """JSON text of a manifest: small fields indented, one line per volume / failure."""
    lists = [k for k in ("failures", "study_events", "volumes") if k in m]
    head = json.dumps({k: v for k, v in m.items() if k not in lists}, indent=1)
    body = "".join(f',\n "{k}": [\n' + ",\n".join("  " + json.dumps(x) for x in m[k]) + "\n ]" for k in lists)
    return head[:-2] + body + "\n}\n"


def remove_parts(out_dir):
    """Parts go first and the done_* markers last: a run killed half way through still has
    every marker, so the same command merges again."""
    ps = sorted(glob.glob(os.path.join(out_dir, "parts", "*")))
    for p in sorted(ps, key=lambda p: os.path.basename(p).startswith("done_")):
        os.remove(p)
    try:
        os.rmdir(os.path.join(out_dir, "parts"))
    except OSError:
        pass


def shard_size_problem(root, manifest):
    """One line naming the first shard file whose size is not the one manifest["shards"] records
    (cut short by a full disk or a partial copy, or changed since), or None when all match."""
    for name, size in sorted((manifest.get("shards") or {}).items()):
        path = os.path.join(root, name)
        have = os.path.getsize(path) if os.path.isfile(path) else None
        if have != size:
            return (f"{path} is {'missing' if have is None else f'{have} bytes'}, but "
                    f"{os.path.join(root, 'manifest.json')} records {size} bytes (cut short or changed after "
                    f"preprocess.py wrote it): restore it, or rerun preprocess.py into a new --output")
    return None


TOKEN_MASKS_KEPT = 4096  # decoded token masks a reader keeps (a few KB each): a loader worker that samples
                        # millions of volumes over a run holds at most these, not one per volume it saw


class ShardReader:
    """Random access to a shard set. `volumes` is the list of volume records. Opening it checks
    every shard file's size against the manifest (ValueError naming the file otherwise) and notes
    each file's identity (device, inode, size, mtime): shards are mapped lazily (in each loader
    worker), and a file that preprocess.py's merge replaced since holds the volumes at other offsets,
    so mapping it is a ValueError naming the file, not the old records read over the new bytes."""

    def __init__(self, root):
        self.root = root
        with open(os.path.join(root, "manifest.json")) as f:
            self.manifest = json.load(f)
        version = self.manifest.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= VERSION:
            raise ValueError(f"{os.path.join(root, 'manifest.json')}: shard format version {version!r}; this nvfm "
                             f"reads versions 1..{VERSION} (update nvfm, or rerun preprocess.py)")
        problem = shard_size_problem(root, self.manifest)
        if problem:
            raise ValueError(problem)
        self.volumes = self.manifest["volumes"]
        self._maps = {}
        self._stats = {}  # shard name -> (st_dev, st_ino, st_size, st_mtime_ns) when the set was opened
        for name in sorted(set(self.manifest.get("shards") or {}) | {v.get("shard") for v in self.volumes} - {None}):
            with contextlib.suppress(OSError):  # a missing file: check_bytes names it for the volumes in it
                st = os.stat(os.path.join(root, name))
                self._stats[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._tmask = {}

    def __len__(self):
        return len(self.volumes)

    def _map(self, name):
        m = self._maps.get(name)
        if m is None:
            path = os.path.join(self.root, name)
            with open(path, "rb") as f:  # the file mapped is the one checked (not a name replaced in between)
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._stats.get(name):
                    raise ValueError(f"{path} was replaced or changed after {os.path.join(self.root, 'manifest.json')} "
                                     f"was read (preprocess.py wrote the shard set again?): its volumes are at other "
                                     f"offsets now; open the shard set again (restart the job)")
                m = self._maps[name] = np.memmap(f, np.uint8, mode="r")
        return m

    def _bad_record(self, i, name, reason):
        """ValueError: file `name` (in the shard set) and volume i's record disagree, in one line."""
        return ValueError(f"{os.path.join(self.root, name)}: volume {i} ({self.volumes[i].get('volume_id')}): {reason}; "
                          f"rerun preprocess.py into a new --output")

    def check_bytes(self, i):
        """ValueError naming the file when volume i's record needs other bytes (data + mask of its shape and
        channels, + the values block) than its nbytes, or more than its shard file held when the set was
        opened, or its values block is of an unknown kind or not where the writer puts it (right after the
        mask, at the next multiple of 8: another values_at read other bytes as the intensities). Maps nothing."""
        v = self.volumes[i]
        C, (D, H, W) = v["channels"], v["shape"]
        need = (C + 1) * D * H * W
        if not isinstance(v.get("offset"), int) or v["offset"] < 0:
            raise self._bad_record(i, "manifest.json", f"offset {v.get('offset')!r} is not a byte position")
        if v.get("values"):
            if v["values"] not in VALUES_DTYPES:
                raise self._bad_record(i, "manifest.json", f"values block of kind {v['values']!r}; this nvfm reads "
                                                           f"{', '.join(VALUES_DTYPES)}")
            if v.get("values_at") != need + (-need) % 8:
                raise self._bad_record(i, "manifest.json", f"its values block is at {v.get('values_at')!r}, its data "
                                                           f"and mask put it at {need + (-need) % 8}")
            need += (-need) % 8 + D * H * W * np.dtype(VALUES_DTYPES[v["values"]]).itemsize
        if need != v.get("nbytes", need):  # a shape / channels not the data's: it read other bytes as voxels
            values = " + values" if v.get("values") else ""
            raise self._bad_record(i, "manifest.json", f"its shape {v['shape']} x {C} channels{values} needs {need} "
                                                       f"bytes, its nbytes is {v['nbytes']}")
        if v["shard"] not in self._stats:
            raise self._bad_record(i, v["shard"], "the file is missing")
        size = self._stats[v["shard"]][2]
        if v["offset"] + need > size:  # a manifest without shard sizes does not catch a cut file on open
            raise self._bad_record(i, v["shard"], f"its bytes end at {v['offset'] + need}, past the file's end "
                                                  f"({size} bytes: cut short)")

    def volume(self, i):
        """-> (data (C, D, H, W) uint8 view, mask (D, H, W) uint8 view), zero-copy (check_bytes first)."""
        self.check_bytes(i)
        v = self.volumes[i]
        C, (D, H, W) = v["channels"], v["shape"]
        buf = self._map(v["shard"])
        n = C * D * H * W
        data = buf[v["offset"]:v["offset"] + n].reshape(C, D, H, W)
        mask = buf[v["offset"] + n:v["offset"] + n + D * H * W].reshape(D, H, W)
        return data, mask

    def values(self, i):
        """(D, H, W) int16 / float32 view of volume i's values block (format 2: the resampled
        HU / MR intensities), or None when the volume has none."""
        v = self.volumes[i]
        kind = v.get("values")
        if not kind:
            return None
        self.check_bytes(i)
        D, H, W = v["shape"]
        start = v["offset"] + v["values_at"]
        n = D * H * W * np.dtype(VALUES_DTYPES[kind]).itemsize
        return self._map(v["shard"])[start:start + n].view(VALUES_DTYPES[kind]).reshape(D, H, W)

    def window_float(self, i, name):
        """One window as (D, H, W) float32 in [0, 1]: from the values block when the volume has
        one (exact: the authors' (clip(x, lo, hi) - lo) / (hi - lo + 1e-8), in float64, with
        the CT window's lo/hi or the MR record's `clip`), else the uint8 window / 255."""
        vals = self.values(i)
        rec = self.volumes[i]
        if vals is None:
            return self.window(i, name).astype(np.float32) / np.float32(255.0)
        expand_window(self.volume(i)[0][:, :0], rec["modality"], name)  # checks the window name
        if rec["modality"] == "MR":
            lo, hi = rec["clip"]
        else:
            from nvfm.volume import CT_WINDOWS
            width, level, _ = CT_WINDOWS[name]
            lo, hi = level - width / 2.0, level + width / 2.0
        out = np.empty(vals.shape, np.float32)
        for d in range(vals.shape[0]):  # slice by slice: float64 scratch of one slice
            x = np.clip(np.asarray(vals[d], np.float64), lo, hi)
            out[d] = (x - lo) / (hi - lo + 1e-8)
        return out

    def window(self, i, name):
        """One window as (D, H, W) uint8: "mr" and "brain" are views; "blood"/"bone" are the
        4-bit nibbles expanded to 0..255 (v * 17)."""
        data, _ = self.volume(i)
        return expand_window(data, self.volumes[i]["modality"], name)

    def token_mask(self, i):
        """(gz, gy, gx) bool token foreground of volume i (decode_token_mask, cached)."""
        m = self._tmask.get(i)
        if m is None:
            if len(self._tmask) >= TOKEN_MASKS_KEPT:
                self._tmask.clear()
            m = self._tmask[i] = self.decode_token_mask(i)
        return m

    def decode_token_mask(self, i):
        """Volume i's (gz, gy, gx) bool token mask decoded from its record, not cached. ValueError naming
        the manifest when the token grid is not its shape's, the mask string not the grid's size, or
        n_tokens not the mask's count (a corrupted record put tokens at other positions, or lost them)."""
        from nvfm.tokenize import token_grid
        v = self.volumes[i]
        grid, want = list(v["token_grid"]), list(token_grid(v["shape"]))
        if grid != want:
            raise self._bad_record(i, "manifest.json", f"token grid {grid} is not the {want} of its shape {v['shape']}")
        try:
            m = unpack_mask(v["token_mask"], tuple(grid))
        except ValueError as e:  # binascii.Error (not base64) is a ValueError too
            raise self._bad_record(i, "manifest.json", str(e)) from None
        if v.get("n_tokens", m.sum()) != m.sum():
            raise self._bad_record(i, "manifest.json", f"n_tokens {v['n_tokens']} but its token mask holds {m.sum()}")
        return m

    def token_coords(self, i):
        """(n, 3) int32 grid coords (z, y, x) of the foreground tokens, raster order."""
        return np.argwhere(self.token_mask(i)).astype(np.int32)

    def slab(self, i, start=0, stop=None):
        """Zero-copy D-slab for foreground tokens [start, stop) of volume i.

        -> (data (C, dz, H, W) view, mask (dz, H, W) view, coords (n, 3) int32, z0 voxel offset)
        """
        coords = self.token_coords(i)[start:stop]
        data, mask = self.volume(i)
        if len(coords) == 0:
            return data[:, :0], mask[:0], coords, 0
        z0, z1 = int(coords[0, 0]) * PATCH[0], (int(coords[-1, 0]) + 1) * PATCH[0]
        return data[:, z0:z1], mask[z0:z1], coords, z0

    def tokens(self, i, name, start=0, stop=None):
        """Foreground tokens [start, stop) of one window -> (tokens (n, 1024) uint8, coords (n, 3) int32)."""
        data, _, coords, z0 = self.slab(i, start, stop)
        if len(coords) == 0:
            return np.zeros((0, int(np.prod(PATCH))), np.uint8), coords
        x = expand_window(data, self.volumes[i]["modality"], name)
        pd, ph, pw = PATCH
        gz = x.shape[0] // pd + (x.shape[0] % pd > 0)
        gy, gx = self.volumes[i]["token_grid"][1:]
        pad = np.zeros((gz * pd, gy * ph, gx * pw), np.uint8)
        pad[:x.shape[0], :x.shape[1], :x.shape[2]] = x
        blocks = pad.reshape(gz, pd, gy, ph, gx, pw)
        zz = coords[:, 0] - z0 // pd
        toks = blocks[zz, :, coords[:, 1], :, coords[:, 2], :]  # (n, pd, ph, pw)
        return toks.reshape(len(coords), -1), coords


def expand_window(data, modality, name):
    """(C, D, H, W) uint8 volume -> (D, H, W) uint8 window."""
    if modality == "MR":
        if name != "mr":
            raise ValueError(f"MR volumes have only the 'mr' window, not {name!r}")
        return data[0]
    if name == "brain":
        return data[0]
    if name == "blood":
        return (data[1] >> 4) * np.uint8(17)
    if name == "bone":
        return (data[1] & np.uint8(15)) * np.uint8(17)
    raise ValueError(f"CT windows are brain, blood, bone; not {name!r}")
