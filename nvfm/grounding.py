"""Grounding of study-level probes: token maps back to voxels in world space, NIfTI
overlays, the pointing game, and the left/right flip test (the NeuroVFM paper, Methods: evaluation).

Geometry. A token at grid (z, y, x) of a volume covers canonical voxels
[o_z + 4z, o_z + 4z+4) x [o_y + 16y, ...) x [o_x + 16x, ...) (nvfm/tokenize.py), where the grid
origin o is 0 for nvfm's token rules (zero padding at the far end) and (n % p) // 2 per axis for
the authors' centre crop (encode.py --preset=neurovfm; `token_origin`, the crop read from the
cache's encoder hash, features.token_rules); the volume record's
`affine` maps canonical voxel indices (D, H, W order) to RAS world mm (DESIGN.md section 2).
So a token map becomes a voxel map on the canonical grid (`token_map_to_volume`), which is
already in world space (written with that affine, any viewer overlays it on the original
series), and can be resampled into the grid of any reference NIfTI
(`resample_to_reference`: reference voxel -> world -> canonical voxel, trilinear).

Pointing game: one trial per (test study, class k) where the study is positive for k and has
lesions of that diagnosis with masks (a lesion's diagnosis or any of its `labels`: an MR glioma is a
target of brain_tumor and of glioma): the token with the highest class-k attention over all
tokens of all volumes (and windows) of the study is a hit when its 16 mm box overlaps any of
those lesions (several metastases are one target, not one trial each; the token is the map's
resolution). Tokens tied at the highest attention (a mean-pool probe's uniform map: all of them)
count as the share of them in the lesions, the expected hit of a random pick: such a map scores
chance level, not whether its first token lies in a lesion. A box overlaps a lesion when one of
its voxel centres has a nonzero nearest mask voxel or a mask voxel's centre lies in the box (a
lesion finer than the canonical grid is not missed): token_mask_share > 0, as the lesion-token
labels count it.
Chance level = the fraction of the study's tokens whose box overlaps the lesions.

Flip test: volumes are mirrored along their left-right axis (read from the record's
`orientation` codes), re-encoded with the probe's frozen encoder and the cache's token rules,
and the probe's lesion_left / lesion_right logits compared: dL = logit_L(flipped) - logit_L, likewise dR.
For a left-sided lesion dL should fall and dR rise; AUROC of (dR - dL) for "the lesion is on
the left", over test studies with lesions on one side only.
"""
import json
import os

import numpy as np
import torch

from nvfm import metrics
from nvfm import probe as P
from nvfm.features import encode_precision, token_rules

PATCH = (4, 16, 16)


# ----------------------------------------------------------------------------- geometry


def token_origin(shape, crop="pad", patch=PATCH):
    """Canonical voxel (d, h, w) where token (0, 0, 0) starts: (0, 0, 0) for "pad" (nvfm), the
    centre crop's start (n % p) // 2 per axis for "centre" (model.centre_crop_to_patches)."""
    if crop == "pad":
        return (0, 0, 0)
    if crop == "centre":
        return tuple((int(n) % p) // 2 for n, p in zip(shape, patch))
    raise ValueError(f"crop {crop!r}: choose 'pad' or 'centre'")


def cache_crop(cache):
    """The crop rule a feature cache (or an object without an encoder hash: nvfm's) was encoded with."""
    return token_rules(getattr(cache, "encoder_hash", "") or "")[1]["crop"]


def token_map_to_volume(values, coords, shape, patch=PATCH, origin=(0, 0, 0)):
    """values (n,) per token, coords (n, 3) grid (z, y, x), shape (D, H, W) -> (D, H, W)
    float32 map, each token's value on its voxels (token (0, 0, 0) starts at voxel `origin`),
    0 elsewhere; padding cropped."""
    gz, gy, gx = (-(-(s - o) // p) for s, o, p in zip(shape, origin, patch))
    grid = np.zeros((gz, gy, gx), np.float32)
    c = np.asarray(coords, np.int64)
    grid[c[:, 0], c[:, 1], c[:, 2]] = np.asarray(values, np.float32)
    vol = grid.repeat(patch[0], 0).repeat(patch[1], 1).repeat(patch[2], 2)
    out = np.zeros(shape, np.float32)
    oz, oy, ox = origin
    out[oz:, oy:, ox:] = vol[:shape[0] - oz, :shape[1] - oy, :shape[2] - ox]
    return out


def resample_to_reference(vol, affine, ref_shape, ref_affine, order=1):
    """Resample vol (D, H, W) with affine (voxel -> world mm) into a reference grid
    (ref_shape, ref_affine). Outside vol -> 0. Returns float32 ref_shape. Nearest neighbour
    (order 0, masks) keeps each voxel's whole extent, the outer half-voxel of the array included."""
    from scipy.ndimage import map_coordinates
    M = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(ref_affine, np.float64)
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in ref_shape], indexing="ij"), 0)
    src = np.tensordot(M[:3, :3], ijk, axes=1) + M[:3, 3][:, None, None, None]
    return map_coordinates(np.asarray(vol, np.float32), src, order=order,
                           mode="grid-constant" if order == 0 else "constant", cval=0.0).astype(np.float32)


def write_nifti(path, vol, affine):
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(vol, np.float32), np.asarray(affine, np.float64))
    img.header.set_xyzt_units("mm")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nib.save(img, path)


def token_box_points(coords, patch=PATCH, per_axis=(4, 4, 4), origin=(0, 0, 0)):
    """Sample points inside each token's voxel box: (n, m, 3) canonical voxel coordinates."""
    offs = [np.linspace(0.0, p - 1.0, k) for p, k in zip(patch, per_axis)]
    o = np.stack(np.meshgrid(*offs, indexing="ij"), -1).reshape(-1, 3)
    base = np.asarray(coords, np.float64) * np.asarray(patch, np.float64) + np.asarray(origin, np.float64)
    return base[:, None, :] + o[None]


def to_world(points, affine):
    A = np.asarray(affine, np.float64)
    return points @ A[:3, :3].T + A[:3, 3]


def nearest_voxel(x):
    """Continuous voxel coordinates -> int64 index of the voxel holding them: voxel i spans
    [i - 0.5, i + 0.5), so a tie goes up (scipy.ndimage's order-0 rule; np.rint's half-to-even
    would send neighbouring ties to alternately the lower and the upper voxel)."""
    return np.floor(np.asarray(x, np.float64) + 0.5).astype(np.int64)


def mask_lookup(world, mask, mask_affine):
    """world (..., 3) mm -> bool (...): inside the nonzero region of a mask volume (nearest voxel,
    nearest_voxel's rule)."""
    A = np.linalg.inv(np.asarray(mask_affine, np.float64))
    ijk = nearest_voxel(world @ A[:3, :3].T + A[:3, 3])
    ok = np.all((ijk >= 0) & (ijk < np.asarray(mask.shape)), -1)
    out = np.zeros(ijk.shape[:-1], bool)
    i, j, k = ijk[ok].T
    out[ok] = mask[i, j, k] != 0
    return out


def _nonzero_voxels(mask):
    """(k, 3) int64: np.argwhere(mask != 0) (same rows, same order), searched only inside the
    bounding box of the nonzero voxels (a lesion mask is mostly empty)."""
    nz = np.asarray(mask) != 0
    box = []
    for ax in range(3):
        i = np.flatnonzero(nz.any(tuple(j for j in range(3) if j != ax)))
        if not len(i):
            return np.zeros((0, 3), np.int64)
        box.append(slice(i[0], i[-1] + 1))
    return np.argwhere(nz[tuple(box)]) + np.array([b.start for b in box])


def _token_counts(coords, tok):
    """(n,) int: how many rows of tok (k, 3) equal each row of coords (n, 3) (token grid positions)."""
    if not len(tok) or not len(coords):
        return np.zeros(len(coords), np.int64)
    lo = np.minimum(coords.min(0), tok.min(0))
    dims = tuple(np.maximum(coords.max(0), tok.max(0)) + 1 - lo)
    u, n = np.unique(np.ravel_multi_index(tuple((tok - lo).T), dims), return_counts=True)
    key = np.ravel_multi_index(tuple((coords - lo).T), dims)
    pos = np.minimum(np.searchsorted(u, key), len(u) - 1)
    return np.where(u[pos] == key, n[pos], 0)


def _mask_extent(affine, idx, mask_affine):
    """(lo, hi) (3,): canonical voxel coords (of a volume with `affine`) bounding every point whose
    nearest mask voxel is one of idx (k, 3), i.e. within [idx.min - 0.5, idx.max + 0.5] in mask voxels."""
    corners = np.stack(np.meshgrid(*zip(idx.min(0) - 0.5, idx.max(0) + 0.5), indexing="ij"), -1).reshape(-1, 3)
    can = to_world(to_world(corners, mask_affine), np.linalg.inv(np.asarray(affine, np.float64)))
    eps = 1e-3   # rounding of the two affines: a voxel too many costs time, one too few a miss
    return can.min(0) - eps, can.max(0) + eps


def _near_mask(coords, affine, idx, mask_affine, patch=PATCH, origin=(0, 0, 0)):
    """(n,) bool: the tokens (coords (n, 3) int) whose box [o + p*c - 0.5, o + p*(c+1) - 0.5) meets
    the mask voxels' canonical extent (_mask_extent): a box the mask overlaps at all is among them."""
    lo, hi = _mask_extent(affine, idx, mask_affine)
    base = coords * np.asarray(patch) + np.asarray(origin)
    return np.all((base - 0.5 <= hi) & (base + np.asarray(patch) - 0.5 >= lo), 1)


def _centre_tokens(coords, affine, idx, mask_affine, patch=PATCH, origin=(0, 0, 0)):
    """(n,) bool: the box of each token (coords (n, 3) int) holds the centre of a mask voxel of idx (k, 3)."""
    A = np.linalg.inv(np.asarray(affine, np.float64))
    vox = to_world(to_world(idx.astype(np.float64), mask_affine), A)   # canonical voxel coords (continuous)
    # voxel i spans [i - 0.5, i + 0.5): the token whose box holds the mask voxel's centre
    tok = np.floor((vox - np.asarray(origin) + 0.5) / np.asarray(patch)).astype(np.int64)
    return _token_counts(coords, tok) > 0


def mask_token_hits(coords, affine, mask, mask_affine, patch=PATCH, origin=(0, 0, 0)):
    """(n,) bool: the box of each token (coords (n, 3) of a volume with `affine`) overlaps the
    nonzero region of `mask`: one of its voxel centres has a nonzero nearest mask voxel, or the centre
    of a mask voxel lies in the box (a lesion finer than the canonical grid). The tokens that
    token_mask_share counts as touched, so the pointing game and the lesion-token labels agree."""
    return token_mask_share(coords, affine, mask, mask_affine, patch, origin) > 0


def _block_in_mask(v0, shape, affine, mask, mask_affine):
    """bool array of `shape` (3 ints): whether the nearest voxel of mask (bool) to canonical voxel
    v0 + (i, j, k) of a volume with `affine` is True (mask_lookup's rule; outside the mask False)."""
    M = np.linalg.inv(np.asarray(mask_affine, np.float64)) @ np.asarray(affine, np.float64)   # canonical -> mask
    R, t = M[:3, :3], M[:3, :3] @ v0 + M[:3, 3]
    k = np.argmax(np.abs(R), 1)                     # the canonical axis each mask axis follows
    if np.count_nonzero(R) == 3 and len(set(k)) == 3:
        # axes aligned (the usual case): the nearest voxel separates per axis, one index vector each
        pad = np.pad(mask, 1)                       # index -1 or n: a False voxel
        ix = [np.clip(nearest_voxel(R[j, k[j]] * np.arange(shape[k[j]]) + t[j]), -1, mask.shape[j]) + 1
              for j in range(3)]
        return pad[np.ix_(*ix)].transpose(np.argsort(k))
    vox = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1) + np.asarray(v0)
    return mask_lookup(to_world(vox.astype(np.float64), affine), mask, mask_affine)


def token_mask_share(coords, affine, mask, mask_affine, patch=PATCH, origin=(0, 0, 0)):
    """(n,) float in [0, 1]: share of each token's box (coords (n, 3) of a volume with `affine`)
    inside the nonzero region of `mask`: the share of the box's prod(patch) canonical voxel centres
    whose nearest mask voxel is nonzero, or one voxel's share where none is but the centre of a mask
    voxel lies in the box (a lesion finer than the canonical grid). So a box that a lesion touches at
    all never has share 0."""
    return token_union_share(coords, affine, [(mask, mask_affine)], patch, origin)


def token_union_share(coords, affine, masks, patch=PATCH, origin=(0, 0, 0)):
    """(n,) float in [0, 1]: token_mask_share of the union of several masks, masks a list of (mask,
    mask affine) on grids of their own: a voxel centre is inside when its nearest voxel is nonzero in
    any of them (two touching lesions covering 30% of a box each give 60%, not 30%)."""
    c = np.asarray(coords, np.int64).reshape(-1, 3)
    share = np.zeros(len(c))
    masks = [(np.asarray(m), a, i) for m, a in masks for i in [_nonzero_voxels(m)] if len(i)]
    if not masks or not len(c):
        return share
    near = np.nonzero(np.any([_near_mask(c, affine, i, a, patch, origin) for _, a, i in masks], 0))[0]
    if not len(near):   # the others share 0
        return share
    # every voxel counts, not a few sample points: 4 x 4 x 4 points put a box 37.5% covered at 0.5 (a
    # lesion token) and one 50% covered at 0.25 (partial). The near boxes tile a block of the canonical
    # grid: its voxels each mask can reach are looked up once each, and added up per box
    P, t0 = np.asarray(patch), c[near].min(0)
    v0 = t0 * P + np.asarray(origin)                                    # the block's first voxel
    g = c[near].max(0) + 1 - t0
    inside = np.zeros(g * P, bool)
    centre = np.zeros(len(near), bool)
    for m, aff, idx in masks:
        lo, hi = _mask_extent(affine, idx, aff)
        a = np.clip(np.ceil(lo).astype(np.int64) - v0, 0, g * P)
        b = np.clip(np.floor(hi).astype(np.int64) + 1 - v0, a, g * P)
        m0, m1 = idx.min(0), idx.max(0) + 1
        crop = m[m0[0]:m1[0], m0[1]:m1[1], m0[2]:m1[2]] != 0          # the mask cut to its nonzero voxels
        crop_affine = np.array(aff, np.float64)
        crop_affine[:3, 3] += crop_affine[:3, :3] @ m0
        inside[a[0]:b[0], a[1]:b[1], a[2]:b[2]] |= _block_in_mask(v0 + a, b - a, affine, crop, crop_affine)
        centre |= _centre_tokens(c[near], affine, idx, aff, patch, origin)
    n = inside.reshape(g[0], P[0], g[1], P[1], g[2], P[2]).sum((1, 3, 5), dtype=np.int64)[tuple((c[near] - t0).T)]
    n[(n == 0) & centre] = 1
    share[near] = n / P.prod()
    return share


def lesion_token_cover(cohort_dir, reader, findings_rows, cache):
    """How much of each cached token lies inside a lesion of the demo cohort's ground truth, and
    which lesion it is attributed to.

    findings_rows: the shards' findings.jsonl records (study_key, lesions [{diagnosis, mask}]);
    masks are read from cohort_dir/<mask> (world-frame NIfTI). For every (study_key, volume_id)
    entry of `cache` -> (frac, lesion):
      frac (n,) float in [0, 1]: share of the token's 4x16x16 voxels inside the union of the study's
        lesions (`token_union_share`: > 0 wherever the box overlaps a lesion at all), so two
        touching lesions covering 30% of a box each give 0.6;
      lesion (n,) int: index into that study's lesions that have a mask, -1 where frac == 0: of the
        diagnoses present in the box, the one whose lesions (their union) cover most of it (ties: the
        diagnosis listed first), and of its lesions the one covering most (ties: the first listed).
        A box covered 25% + 25% by two metastases and 40% by a glioma is a metastasis token.
    Token positions are the cache's coords, mapped by the volume record's affine."""
    import nibabel as nib
    vol = {v["volume_id"]: v for v in reader.volumes}
    crop = cache_crop(cache)
    out = {}
    for r in findings_rows:
        if r["study_key"] not in cache:
            continue
        masks, dx = [], []
        for les in r.get("lesions", []):
            if les.get("mask"):
                m = nib.load(os.path.join(cohort_dir, les["mask"]))
                masks.append((np.asarray(m.dataobj), m.affine))
                dx.append(les.get("diagnosis"))
        kinds = list(dict.fromkeys(dx))   # in order of first listing
        for e in cache.study(r["study_key"]):
            if (r["study_key"], e["volume_id"]) in out:
                continue
            rec = vol[e["volume_id"]]
            origin = token_origin(rec.get("shape"), crop)
            coords = np.asarray(e["coords"], np.int64).reshape(-1, 3)
            each = np.array([token_mask_share(coords, rec["affine"], m, a, origin=origin) for m, a in masks])
            each = each.reshape(len(masks), len(coords))

            def union(sel):   # the union's share; differs from the largest only where two lesions meet a box
                u = each[sel].max(0, initial=0.0)
                multi = np.count_nonzero(each[sel], 0) > 1
                if multi.any():
                    u[multi] = token_union_share(coords[multi], rec["affine"], [masks[i] for i in sel],
                                                 origin=origin)
                return u
            groups = [[i for i, d in enumerate(dx) if d == k] for k in kinds]
            by_kind = np.array([union(g) for g in groups]).reshape(len(groups), len(coords))
            frac = union(list(range(len(masks)))) if len(groups) > 1 else by_kind.max(0, initial=0.0)
            which = np.full(len(coords), -1, np.int64)
            for t in np.nonzero(frac > 0)[0]:
                g = groups[int(np.argmax(by_kind[:, t]))]
                which[t] = g[int(np.argmax(each[g, t]))]
            out[r["study_key"], e["volume_id"]] = (frac, which)
    return out


# ----------------------------------------------------------------------------- pointing game


def _study_names(labels_rows):
    return {r["study_key"]: r.get("study") or r["study_key"][:12] for r in labels_rows}


def pointing_game_eval(data, reader, cohort, findings_path, device="cpu", overlay_dir=None, n_overlays=3):
    """Pointing game of the first evaluated probe (evaluate.py's `data` dict) against the
    demo cohort's lesion masks, one trial per (study, class) (module docstring); writes NIfTI
    overlays for the first `n_overlays` trials (study-class targets).

    Returns dict(accuracy, chance, n (trials), per_class {name: [hits, n]} (hits a float: a tie at the top counts
    as a share), overlays (every path written)).
    """
    import nibabel as nib
    keys, names = data["keys"], data["ck"]["label_names"]
    lesions = {}
    with open(findings_path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                lesions[r.get("study_key")] = (r.get("study"), r.get("lesions", []))
    vol_index = {v["volume_id"]: i for i, v in enumerate(reader.volumes)}
    cache, wins = data["cache"], data["wins"]
    crop = cache_crop(cache)
    todo = {}   # (study index, class index) -> the lesions of that diagnosis: one target
    untrained = P.untrained_classes(data["ck"])   # a class the probe never learned has no map of its own to score
    for i, key in enumerate(keys):
        for les in lesions.get(key, (None, []))[1]:
            # a lesion is one of every probe class it is labelled with (the demo's glioma on MR is brain_tumor,
            # glioma and high_grade_glioma): a target of each, not of the first name listed only
            cand = dict.fromkeys([les.get("diagnosis")] + list(les.get("labels", [])))
            for k in [names.index(c) for c in cand if c in names]:
                if data["y"][i, k] > 0 and les.get("mask") and not untrained[k]:
                    todo.setdefault((i, k), []).append(les)
    res = {"n": 0, "hits": 0.0, "accuracy": None, "chance": None, "per_class": {}, "overlays": []}
    if not todo:
        res["note"] = "no test lesion with a mask matches a probe class"
        return res
    study_ids = sorted({i for i, _ in todo})
    sub = [keys[i] for i in study_ids]
    # every input checked before anything is scored or written: a ValueError naming the file, not a
    # KeyError traceback midway with some overlays written
    for key in sub:
        lost = [e["volume_id"] for e, _, _ in cache.study_tokens(key, wins)[1] if e["volume_id"] not in vol_index]
        if lost:
            raise ValueError(f"{getattr(cache, 'path', 'feature cache')}: volume {lost[0]} of study {key} is not in "
                             f"the shards {getattr(reader, 'root', '')} (were the features encoded from them?)")
    for les in {les["mask"]: les for les_list in todo.values() for les in les_list}.values():
        mpath = os.path.join(cohort, les["mask"])
        if not os.path.isfile(mpath):
            raise ValueError(f"lesion mask not found: {mpath} (is --cohort the demo cohort root?)")
        try:
            nib.load(mpath)   # the header only
        except Exception as e:
            raise ValueError(f"{mpath}: not a readable NIfTI lesion mask ({type(e).__name__}: {e})") from None

    def get_bag(key):
        return torch.from_numpy(np.asarray(cache.study_tokens(key, wins)[0], dtype=np.float32))

    _, maps = P.predict(data["models"], get_bag, sub, device, return_maps=True)
    maps = dict(zip(study_ids, maps))
    chances, drawn = [], 0
    for (i, k), les_list in todo.items():
        alpha, contrib = maps[i]
        _, spans = cache.study_tokens(keys[i], wins)
        masks = []
        for les in les_list:
            mpath = os.path.join(cohort, les["mask"])
            try:
                mimg = nib.load(mpath)
                masks.append((np.asarray(mimg.dataobj), mimg.affine))
            except MemoryError:
                raise
            except Exception as e:   # a cut .nii.gz: its header read, its voxels not
                raise ValueError(f"{mpath}: not a readable NIfTI lesion mask ({type(e).__name__}: {e})") from None
        hit_tok = np.zeros(len(alpha), bool)
        done = {}  # a CT volume's windows share its tokens: their overlap is computed once
        for e, s0, s1 in spans:
            key = (e["volume_id"], np.asarray(e["coords"]).tobytes())
            if key not in done:
                rec = reader.volumes[vol_index[e["volume_id"]]]
                origin = token_origin(rec["shape"], crop)
                done[key] = token_union_share(e["coords"], rec["affine"], masks, origin=origin) > 0
            hit_tok[s0:s1] = done[key]
        if not len(alpha):
            continue
        a = alpha[:, k]
        # tokens tied at the top (a mean-pool probe's uniform map: every token): the expected hit of a pick among
        # them, so a map that points nowhere scores chance, not whether the first token happens to be in the lesion
        hit = float(hit_tok[a == a.max()].mean())
        res["n"] += 1
        res["hits"] += hit
        chances.append(hit_tok.mean())
        pc = res["per_class"].setdefault(names[k], [0.0, 0])
        pc[0] += hit
        pc[1] += 1
        if overlay_dir and drawn < n_overlays:   # trials, not files: a trial writes 3-4 files per volume
            drawn += 1
            paths = write_overlays(overlay_dir, lesions[keys[i]][0] or f"study{i}", names[k], spans, alpha[:, k],
                                   contrib[:, k], reader, vol_index, masks, crop=crop)
            res["overlays"] += [p for p in paths if p not in res["overlays"]]   # a study's image: once per class
    if res["n"]:
        res["accuracy"] = res["hits"] / res["n"]
        res["chance"] = float(np.mean(chances))
    return res


def volume_tag(rec):
    """A volume's tag in overlay file names: its series key (volume_id "<study_key>-<series_key>[.<part>]",
    nvfm/data.py) cut to 8 characters, with the part. Not volume_id[:8], which is the study key's first 8
    characters for every volume of a study: two CT series of one study wrote one set of files, the
    second overwriting the first, and the study key was in the name."""
    vid, sk = str(rec["volume_id"]), str(rec.get("study_key") or "")
    if sk and vid.startswith(sk + "-"):
        vid = vid[len(sk) + 1:]
    base, dot, part = vid.partition(".")
    return base[:8] + dot + part


def write_overlays(out_dir, study_name, class_name, spans, alpha, contrib, reader, vol_index,
                   lesion_masks=(), crop="pad"):
    """Per volume of a study: the image, the class attention map, the signed contribution map
    (and the union of the lesion masks, a list of (mask, affine), if given) as NIfTI on the
    volume's canonical grid with its world affine; windows of one CT volume are combined
    (attention and contributions summed). crop: the cache's token crop rule (token_origin).
    File names use the non-identifying study name. Returns every written path."""
    written, stems = [], set()
    by_vol = {}
    for e, s0, s1 in spans:
        by_vol.setdefault(e["volume_id"], []).append((e, s0, s1))
    for vid, parts in by_vol.items():
        i = vol_index[vid]
        rec = reader.volumes[i]
        shape, aff = tuple(rec["shape"]), rec["affine"]
        o = token_origin(shape, crop)
        att = sum(token_map_to_volume(alpha[s0:s1], e["coords"], shape, origin=o) for e, s0, s1 in parts)
        con = sum(token_map_to_volume(contrib[s0:s1], e["coords"], shape, origin=o) for e, s0, s1 in parts)
        name = f"{study_name}_{rec.get('family', 'vol')}_{volume_tag(rec)}"
        j = 1
        while name + ("" if j == 1 else f"-{j}") in stems:   # two volumes one tag: neither overwrites the other
            j += 1
        name += "" if j == 1 else f"-{j}"
        stems.add(name)
        stem = os.path.join(out_dir, name)
        data, _ = reader.volume(i)
        write_nifti(stem + "_image.nii.gz", data[0].astype(np.float32), aff)
        write_nifti(stem + f"_attention_{class_name}.nii.gz", att, aff)
        write_nifti(stem + f"_contribution_{class_name}.nii.gz", con, aff)
        written += [stem + "_image.nii.gz", stem + f"_attention_{class_name}.nii.gz",
                    stem + f"_contribution_{class_name}.nii.gz"]
        if len(lesion_masks):
            m = np.max([resample_to_reference(np.asarray(lm, np.float32), la, shape, aff, order=0)
                        for lm, la in lesion_masks], 0)
            write_nifti(stem + f"_lesion_{class_name}.nii.gz", m, aff)   # per class: a study's classes have other lesions
            written.append(stem + f"_lesion_{class_name}.nii.gz")
    return written


# ----------------------------------------------------------------------------- flip test


def lr_axis(record):
    """Index (0, 1, 2 of D, H, W) of the left-right axis from the record's orientation codes,
    e.g. "IPR" -> 2; falls back to the affine (the axis with the largest |x| component)."""
    o = record.get("orientation")
    if isinstance(o, str) and len(o) == 3:
        for a, ch in enumerate(o.upper()):
            if ch in "LR":
                return a
    A = np.asarray(record["affine"], np.float64)
    return int(np.argmax(np.abs(A[0, :3])))


class FlippedReader:
    """A ShardReader view whose volumes are mirrored along their left-right axis."""

    def __init__(self, reader):
        self.reader = reader
        self.volumes = reader.volumes

    def volume(self, i):
        data, mask = self.reader.volume(i)
        a = lr_axis(self.volumes[i])
        return np.ascontiguousarray(np.flip(data, a + 1)), np.ascontiguousarray(np.flip(mask, a))

    def window(self, i, name):
        from nvfm.data import expand_window
        data, _ = self.volume(i)
        return expand_window(data, self.volumes[i]["modality"], name)

    def window_float(self, i, name):
        """The float window (encode.py --preset=neurovfm), mirrored like `window`."""
        return np.ascontiguousarray(np.flip(self.reader.window_float(i, name), lr_axis(self.volumes[i])))


def open_encoder_from_hash(spec, enc_hash, device):
    """The frozen encoder that made a cache: an nvfm .safetensors file or the authors' files
    (hash checked), or random:<size>:seed<k>. enc_hash may carry token rules (features.token_rules)
    and the head count ("+heads:<n>") or the sidecar config's hash ("+config:<sha>"), as encode.py
    keys them."""
    from nvfm import model, official
    from nvfm.features import file_hash
    enc_hash, _, heads = token_rules(enc_hash)[0].partition("+heads:")   # encode.py's open_encoder
    if enc_hash.startswith("random:"):   # random:<size>:seed<k> re-creates the same weights
        _, size, s = enc_hash.split(":")[:3]
        torch.manual_seed(int(s.replace("seed", "")))
        return model.Encoder(model.EncoderConfig.preset(size)).to(device).eval()
    if not spec or not os.path.exists(spec):
        raise FileNotFoundError(f"flip test: encoder file {spec!r} not found (pass --encoder=PATH)")
    nvfm_file = official.is_nvfm_file(spec)
    weights = spec if nvfm_file else official.find_official_files(spec)[0]
    h = file_hash(weights) + (model.sidecar_config_tag(weights) if nvfm_file else "")
    if h != enc_hash:
        raise RuntimeError(f"flip test: {weights} has hash {h}, but the probe's features came from {enc_hash}")
    return official.open_any_encoder(spec, device, heads=int(heads) if heads else None)


def flip_test_eval(data, reader, sides, keys=None, encoder_spec="", device="cpu"):
    """Flip test of the first evaluated probe on `keys` (default: its evaluated studies).
    A one-sided study without tokens in the probe's windows (an MR study under a probe of CT
    windows) has an empty bag mirrored or not, so no logit change to measure: it is left out
    and counted in n_no_tokens.
    Returns dict(auroc, auroc_dL, auroc_dR, n, n_left, n_flagged, auroc_flagged,
    mean_dL_left, mean_dL_right, n_no_tokens); n_flagged / auroc_flagged (the studies the probe
    calls positive on a side) are None when a side class has no fitted threshold. Not run (auroc
    None, a note) on a cache of another precision than `device` encodes in (`encode_precision`):
    the logit changes would mix the two."""
    from nvfm import model
    names = data["ck"]["label_names"]
    if not all(c in names for c in P.SIDE_CLASSES):
        return {"auroc": None, "n": 0, "note": "probe has no lesion_left / lesion_right classes (--side_classes)"}
    kl, kr = names.index("lesion_left"), names.index("lesion_right")
    if P.untrained_classes(data["ck"])[[kl, kr]].any():   # left out of the probe's loss: its logits are noise
        return {"auroc": None, "n": 0, "note": "the probe never learned lesion_left / lesion_right (no training "
                                               "positives or no training negatives)"}
    cache = data["cache"]
    made, here = cache.precision, encode_precision(device)
    if made and made != here:   # mirrored bags in one precision against cached ones in another
        return {"auroc": None, "n": 0, "note": f"{cache.path} holds {made} features, --device={device} re-encodes "
                f"in {here}: the logit changes would mix the two "
                f"(--device={'cuda' if made.startswith('bfloat16') else 'cpu'})"}
    studies = {}
    for i, v in enumerate(reader.volumes):
        studies.setdefault(v["study_key"], []).append(i)
    keys = data["keys"] if keys is None else keys
    wins = data["wins"]
    one_sided = [k for k in keys if len(sides.get(k, ())) == 1 and k in studies]
    lost = [k for k in one_sided if k not in cache]
    if lost:   # e.g. --flip_split=val,test on a cache of the test split: a ValueError, not a KeyError traceback
        raise ValueError(f"flip test: {len(lost)} of the {len(one_sided)} one-sided studies are not in the feature "
                         f"cache {cache.path} (first: {lost[:3]}): encode their split, or leave it out of --flip_split")
    spec = encoder_spec or cache.index.get("encoder", "")
    enc = open_encoder_from_hash(spec, data["ck"]["encoder_hash"], device)
    rules = token_rules(data["ck"]["encoder_hash"])[1]
    sel = [k for k in one_sided if len(cache.study_tokens(k, wins)[0])]
    n_empty = len(one_sided) - len(sel)
    if not sel:
        return {"auroc": None, "n": 0, "n_no_tokens": n_empty, "note": "no test study with lesions on one side only"
                + (f" and tokens in the probe's windows ({n_empty} without)" if n_empty else "")}
    flipped = FlippedReader(reader)
    bags = {}
    from tqdm import tqdm
    for k in tqdm(sel, desc="flip test", unit="study"):
        ents = model.encode_study(enc, flipped, studies[k], device=device, **rules)   # the cache's token rules
        ents = [e for e in ents if wins is None or e["window"] in wins]
        if not ents:   # the cache has tokens of these windows: the shards are not the ones it was encoded from
            raise RuntimeError(f"flip test: study {k!r} has tokens of the windows {sorted(wins or ['all'])} in the "
                               "feature cache but no such volume in --shards: pass the shard set the cache was "
                               "encoded from")
        bags[k] = torch.cat([e["emb"].half().float() for e in ents])  # as cached (float16)
    keys = sel
    lf = P.predict(data["models"], lambda k: bags[k], keys, device)
    lo = P.predict(data["models"], lambda k: torch.from_numpy(np.asarray(cache.study_tokens(k, wins)[0], np.float32)),
                   keys, device)
    dL, dR = lf[:, kl] - lo[:, kl], lf[:, kr] - lo[:, kr]
    left = np.array([1 if "left" in sides[k] else 0 for k in keys])
    thr = np.array(data["ck"]["thresholds"])
    flagged = (lo[:, kl] >= thr[kl]) | (lo[:, kr] >= thr[kr])
    unfit = P.unfitted_classes(data["ck"])[[kl, kr]].any()   # a placeholder threshold flags nothing real

    def au(score, y):
        return metrics.auroc(y, score)[0] if 0 < y.sum() < len(y) else None
    return {"auroc": au(dR - dL, left), "auroc_dL": au(-dL, left), "auroc_dR": au(dR, left),
            "n": int(len(keys)), "n_left": int(left.sum()), "n_flagged": None if unfit else int(flagged.sum()),
            "auroc_flagged": au((dR - dL)[flagged], left[flagged]) if flagged.any() and not unfit else None,
            "mean_dL_left": float(dL[left == 1].mean()) if left.any() else None,
            "mean_dL_right": float(dL[left == 0].mean()) if (left == 0).any() else None, "n_no_tokens": n_empty}
