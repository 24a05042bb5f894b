"""Folder of studies -> embeddings: encode preprocessed shards with a frozen encoder into a
feature cache (nvfm/features.py), once, for every probe run.

    python encode.py --shards=out/shards --encoder=out/jepa/encoder.safetensors --out=out/features
    python encode.py --shards=out/shards --encoder=random:tiny --out=out/features_random   # baseline
    python preprocess.py --input=... --output=out/shards_nvfm --preset=neurovfm   # the authors' rules
    python encode.py --shards=out/shards_nvfm --encoder=neurovfm-encoder/ --out=out/features_nvfm

--encoder takes an nvfm .safetensors file or the authors' released files (a directory with
config.json + pytorch_model.bin, or a .bin/.pt state dict; converted on the fly, strictly, see
nvfm/official.py). --preset=neurovfm applies the authors' token rules for their weights: only
all-foreground tokens (min_fg_fraction 1.0) and a centred crop of each volume to whole patches
(instead of nvfm's zero padding); --preset=nvfm is nvfm's rules. The default is the preset the
shards were written with (manifest "preset", from preprocess.py --preset; nvfm when absent);
naming another one is an error unless --preset_mismatch_ok=True (e.g. the released encoder on
nvfm shards: the authors' tokens, but nvfm's foreground and intensity rules).

Every token of every volume of a study is encoded whole (no crop); CT volumes are encoded
once per window (brain, blood, bone). Resumable: studies already in the cache are skipped,
so a killed run continues where it stopped; a cache whose data files were cut short keeps the
studies stored before the cut and encodes the others again (with a warning). The cache records the encoder's hash; pointing
--out at a cache made by another encoder is an error (use --overwrite=True to redo it), and so
is a cache holding a study without some volume selected now (another --modality or --split),
or cached studies encoded from other shards (the cache's index keeps each volume's `source`, a
fingerprint of its shard record and the shards' settings; a moved or extended shard set resumes),
or from a shard set with other settings (the index's `origin`: another salt, preset or
preprocessing rule), even when no study is in both (--split=test after --split=train).
A study that fails to encode is reported (by its study_key) and skipped; exit status 1 when
every study to encode failed, and then nothing is written (a new cache is made, and an
--overwrite'd one emptied, by the first study encoded). A cache that cannot be written (a full
disk, --out naming a file) is no study's failure: the run stops at once with one line (exit
status 1), and the same command resumes it. A --split naming a split the shards do not have, or a selection of
no volume at all, is an error before anything is written.
"""
import hashlib
import json
import os
import time
from collections import OrderedDict

import torch
from tqdm import tqdm

# -----------------------------------------------------------------------------
shards = ""            # preprocessed shard directory (preprocess.py --output)
encoder = ""           # encoder .safetensors, or "random:<size>" for a random-initialised encoder
out = ""               # feature cache directory
split = "all"          # "all" or comma-separated splits, e.g. "train,val"
modality = "all"       # "all", "CT" or "MR"
device = "cuda" if torch.cuda.is_available() else "cpu"
seed = 0               # random-init encoder seed
max_tokens = 32768     # tokens per encoder forward
preset = ""            # token rules: "nvfm" (ours) or "neurovfm" (the authors'); "": the shards' preset
preset_mismatch_ok = False  # allow a --preset other than the one the shards were written with
min_fg_fraction = -1.0 # token foreground rule (nvfm/tokenize.py); -1: the preset's (nvfm 0.5, neurovfm 1.0)
heads = 0              # head count of an official state dict that comes without config.json (0: dim // 64)
overwrite = False
# -----------------------------------------------------------------------------
from nvfm.configurator import configure, fail, require_path  # noqa: E402
configure(globals())

from nvfm import features, model, official  # noqa: E402
from nvfm.data import ShardReader  # noqa: E402
from nvfm.volume import RESAMPLING  # noqa: E402

# full_precision: the authors' float [0, 1] windows where the shards store the resampled values
PRESETS = {"nvfm": dict(features.DEFAULT_RULES),
           "neurovfm": dict(min_fg_fraction=1.0, crop="centre", full_precision=True)}


def open_encoder(spec, dev, seed=0, heads=None):
    """-> (Encoder in eval mode, hash string). spec: "random:<size>", an nvfm .safetensors
    file (its hash, plus "+config:<sha>" when its config comes from a sidecar .json), or the authors' files (directory / .bin / .pt; the hash is that of the weights file,
    plus "+heads:<n>" unless a config.json gives the ViT head count dim // 64, as the release's does)."""
    if heads and (spec.startswith("random:") or official.is_nvfm_file(spec)):   # it would be ignored
        fail(f"--heads={heads}: only the authors' files take a head count; {spec} gives its own")
    if spec.startswith("random:"):
        size = spec.split(":", 1)[1]
        if size not in model.SIZES:
            fail(f"--encoder={spec}: unknown model size {size!r}; choose random:<size> with a size of {sorted(model.SIZES)}")
        torch.manual_seed(seed)
        enc = model.Encoder(model.EncoderConfig.preset(size)).to(dev).eval()
        return enc, f"random:{size}:seed{seed}"
    if not os.path.exists(spec):
        fail(f"--encoder: {spec} not found (an encoder.safetensors, the authors' directory, or random:<size>)")
    if official.is_nvfm_file(spec):
        try:
            enc = model.load_encoder(spec, dev)
            return enc, features.file_hash(spec) + model.sidecar_config_tag(spec)
        except (ValueError, RuntimeError) as e:   # truncated or foreign file, weights float32 cannot hold
            fail(str(e))
    try:
        enc = official.load_official(spec, heads=heads, device=dev)
    except official.ConversionError as e:
        fail(str(e))
    weights, cfg = official.find_official_files(spec)
    # the weights' shapes give everything but the head count, so the same file makes other features
    # with another one (--heads, or an edited config.json): keyed by it unless config.json gives dim // 64
    usual = cfg is not None and enc.config.heads == max(enc.config.dim // 64, 1)
    return enc, features.file_hash(weights) + ("" if usual else f"+heads:{enc.config.heads}")


# manifest keys that are not settings ("version" follows the volumes' own "values" field)
PER_SHARD_SET = ("version", "volumes", "summary", "shards", "failures", "study_events")
WHERE_STORED = ("shard", "offset", "split")  # a volume record's keys that do not change its features


def shard_origin(man):
    """"shards:" + sha256[:16] of a shard manifest's settings (salt, preset, preprocessing rules): the cache's
    `origin`, so that a run on a shard set with other settings (another salt: another data set) does not add
    its studies to a cache of another one, even when no study is in both (e.g. --split=test after train)."""
    settings = {k: v for k, v in man.items() if k not in PER_SHARD_SET}
    return "shards:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def volume_fingerprints(man, recs):
    """{volume_id: sha256[:16]} of volume records recs: the record (less where it is stored) and the shard
    set's settings. Another preprocess of the same study, or other settings, gives another one; the
    cache keeps it as each volume's `source`."""
    settings = {k: v for k, v in man.items() if k not in PER_SHARD_SET}
    return {r["volume_id"]: hashlib.sha256(json.dumps([settings, {k: v for k, v in r.items() if k not in WHERE_STORED}],
                                                      sort_keys=True).encode()).hexdigest()[:16] for r in recs}


VOLUME_KEYS = ("volume_id", "study_key", "split", "modality")  # what encode.py reads of every volume record


def read_manifest(path):
    """The shard set's manifest.json -> dict; fail() with one line naming it when it is not JSON (a copy cut
    short) or lacks what encode.py reads (a "volumes" list of records with VOLUME_KEYS)."""
    try:
        with open(path, "rb") as f:
            man = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        fail(f"{path}: not a readable shard manifest ({type(e).__name__}: {e}); rerun preprocess.py into a new --output")
    vols = man.get("volumes") if isinstance(man, dict) else None
    if not isinstance(vols, list):
        fail(f"{path}: not a shard manifest (no \"volumes\" list); --shards takes preprocess.py's --output")
    for i, v in enumerate(vols):
        missing = [k for k in VOLUME_KEYS if not isinstance(v, dict) or k not in v]
        if missing:
            fail(f"{path}: volume record {i} has no {', '.join(missing)}; rerun preprocess.py into a new --output")
    return man


def main():
    if not shards or not encoder or not out:
        fail("--shards, --encoder and --out are required (--help lists the settings)")
    require_path(shards, "--shards", kind="dir", hint="a shard set written by preprocess.py")
    if not os.path.exists(os.path.join(shards, "manifest.json")):
        fail(f"--shards: {shards} has no manifest.json (a shard set written by preprocess.py)")
    shard_man = read_manifest(os.path.join(shards, "manifest.json"))
    shard_preset = shard_man.get("preset", "nvfm")
    if shard_preset == "neurovfm" and shard_man.get("resampling", "tent") != RESAMPLING["neurovfm"]:
        print(f"encode: note: {shards} was written by an older --preset=neurovfm ({shard_man.get('resampling', 'tent')} "
              f"resampling, not {RESAMPLING['neurovfm']}: the authors' SimpleITK B-spline): rerun preprocess.py "
              "into a new --output for their resampling")
    use = preset or shard_preset
    if use not in PRESETS:
        fail(f"--preset={use!r}: choose one of {sorted(PRESETS)}")
    if use != shard_preset and not preset_mismatch_ok:
        fail(f"--preset={use} but {shards} was written with preprocess.py --preset={shard_preset}: rerun "
             f"preprocess.py with --preset={use}, or pass --preset_mismatch_ok=True to encode anyway")
    if modality not in ("all", "CT", "MR"):
        fail(f"--modality={modality!r}: choose one of 'all', 'CT', 'MR'")
    if min_fg_fraction > 1.0:   # each study would fail on it: refused before anything is written
        fail(f"--min_fg_fraction={min_fg_fraction}: a fraction in [0, 1] (or -1: the preset's)")
    rules = dict(PRESETS[use])
    if min_fg_fraction >= 0:
        rules["min_fg_fraction"] = min_fg_fraction
    try:
        reader = ShardReader(shards)
    except ValueError as e:  # a shard format this version does not read
        fail(str(e))
    splits = None if split == "all" else {s.strip() for s in split.split(",") if s.strip()}
    unknown = sorted(splits - {v["split"] for v in reader.volumes}) if splits is not None else []
    if unknown:   # a misspelt split selected nothing of it, silently
        fail(f"--split={split}: {shards} has no volume in split {', '.join(map(repr, unknown))} "
             f"(its splits: {', '.join(sorted({str(v['split']) for v in reader.volumes}))})")
    studies = OrderedDict()
    for i, v in enumerate(reader.volumes):
        if splits is not None and v["split"] not in splits:
            continue
        if modality != "all" and v["modality"] != modality:
            continue
        studies.setdefault(v["study_key"], []).append(i)
    if not studies:   # an empty cache and exit status 0 would pass for a finished run
        fail(f"--split={split} --modality={modality}: no volume of {shards} is selected; nothing to encode")
    enc, enc_hash = open_encoder(encoder, device, seed, heads or None)
    enc_hash += features.rules_suffix(rules)  # other token rules make other features: a cache of its own
    print(f"encode: {len(studies)} studies ({sum(map(len, studies.values()))} volumes) with encoder "
          f"{enc_hash[:23]}, dim {enc.config.dim}, on {device}; token rules {use} {rules}, shards {shard_preset}")
    failed = 0
    t0 = time.time()
    n_tokens = 0
    spec = encoder if encoder.startswith("random:") else os.path.abspath(encoder)  # for the flip test

    try:
        # CPU float32 and CUDA bf16-autocast features differ beyond float16 storage: one cache holds one of them;
        # a new cache (or an --overwrite) is made by the first study encoded, never by a run that encodes none
        writer = features.FeatureWriter(out, enc_hash, enc.config.dim, encoder_name=spec, overwrite=overwrite,
                                        precision=features.encode_precision(device), origin=shard_origin(shard_man))
    except features.StaleCacheError as e:  # another encoder's cache, or another shard set's
        fail(str(e))
    except OSError as e:  # an existing cache this user cannot write (its lock file, its index)
        fail(f"{out}: cannot open the feature cache for writing ({type(e).__name__}: {e})")
    for msg in (writer.repaired, writer.note):
        if msg:
            print(f"encode: warning: {msg}")
    # a study is skipped when cached: one cached without some volume selected now would stay without it,
    # and one encoded from other shards (another preprocess, other settings) would stay as it was
    cached = {k: {e["volume_id"]: e.get("source") for e in writer.index["studies"][k]} for k in studies if k in writer}
    short = [k for k, c in cached.items() if not {reader.volumes[i]["volume_id"] for i in studies[k]} <= set(c)]
    if short:
        writer.close()
        fail(f"{out}: {len(short)} studies are cached without volumes selected now (first: {short[0]}; encoded "
             f"with another --modality or --split, or from other shards): use another --out or --overwrite=True")
    by_id = {v["volume_id"]: v for v in reader.volumes}
    changed = [k for k, c in cached.items() if None not in c.values() and (not set(c) <= set(by_id) or c
               != volume_fingerprints(shard_man, [by_id[v] for v in c]))]
    if changed:
        writer.close()
        fail(f"{out}: {len(changed)} cached studies were encoded from other shards than {shards} (first: "
             f"{changed[0]}; preprocessed again or with other settings): use another --out or --overwrite=True")
    unrecorded = sum(None in c.values() for c in cached.values())
    if unrecorded:  # a cache written before the sources were kept
        print(f"encode: note: {unrecorded} cached studies were written without their sources; resuming cannot "
              f"check that they come from {shards}")
    todo = [k for k in studies if k not in writer]
    done = 0
    stopped = None  # why the cache cannot be written: every later study would fail the same way
    try:
        with writer as w:
            if len(todo) < len(studies):
                print(f"encode: resuming, {len(studies) - len(todo)} studies already in {out}")
            for key in tqdm(todo, desc="encode", unit="study"):
                try:
                    entries = model.encode_study(enc, reader, studies[key], device=device,
                                                 max_tokens=max_tokens, **rules)
                    source = volume_fingerprints(shard_man, [reader.volumes[i] for i in studies[key]])
                    entries = [dict(e, source=source[e["volume_id"]]) for e in entries]
                except Exception as e:  # a bad study is logged and skipped, never a crashed job
                    failed += 1
                    tqdm.write(f"encode: study {key} failed and was skipped: {type(e).__name__}: {e}")
                    continue
                try:
                    w.add(key, entries)
                except ValueError as e:  # this study's features cannot be stored (non-finite): skipped
                    failed += 1
                    tqdm.write(f"encode: study {key} failed and was skipped: {type(e).__name__}: {e}")
                    continue
                except (OSError, features.StaleCacheError) as e:  # a full disk, --out a file, another writer
                    stopped = f"{type(e).__name__}: {e}"
                    break
                done += 1
                n_tokens += sum(len(e["emb"]) for e in entries)
    except OSError as e:  # the index could not be written at close either (the disk is still full)
        stopped = stopped or f"{type(e).__name__}: {e}"
    dt = time.time() - t0
    print(f"encode: wrote {done} studies, {n_tokens} tokens in {dt:.1f} s "
          f"({n_tokens / max(dt, 1e-9):.0f} tokens/s); {failed} failed; cache {out}")
    if stopped:
        fail(f"{out}: writing the feature cache failed ({stopped}); stopped after encoding {done} of "
             f"{len(todo)} studies: free space or fix --out, then rerun the same command to resume")
    if todo and failed == len(todo):   # nothing useful was produced
        raise SystemExit(f"encode.py: every one of the {failed} studies to encode failed (messages above); "
                         "nothing written")


if __name__ == "__main__":
    main()
