"""Anatomy probes of frozen dense embeddings (the NeuroVFM paper, Methods: evaluation), no training involved.

Patch matching: two volumes of one study lie in one world frame (same patient, same
session). For every token of volume A, its cosine nearest neighbour among the tokens of
volume B is found; the error is the world distance (mm) between the two token centres
(token centre = canonical voxel box centre mapped with the record's affine). Reported: median
error and the fraction within 16 mm (one token), next to chance (a random token of B).
Across sequences (T1 vs FLAIR) this asks whether the embedding encodes *where* in the head a
patch is, not only what it looks like.

K-means: k = 3 clusters of one volume's token embeddings; the cluster that best overlaps the
brain (token-level IoU, brain = parenchyma + ventricles from the demo cohort's template
anatomy mapped to the subject's world frame) is compared with the brain mask; chance = the
IoU of "every token" with the brain.
"""
import json
import os
from collections import Counter

import numpy as np

from nvfm.grounding import PATCH, cache_crop, nearest_voxel, to_world, token_box_points, token_origin


def token_centers(coords, affine, patch=PATCH, origin=(0, 0, 0)):
    """(n, 3) grid coords -> (n, 3) world mm of the token box centres (token (0, 0, 0) starts at
    canonical voxel `origin`: grounding.token_origin)."""
    c = np.asarray(coords, np.float64) * np.asarray(patch) + (np.asarray(patch) - 1) / 2.0 + np.asarray(origin)
    return to_world(c, affine)


def patch_matching(emb_a, coords_a, affine_a, emb_b, coords_b, affine_b, tol_mm=16.0, seed=0,
                   origins=((0, 0, 0), (0, 0, 0))):
    """Cosine nearest-neighbour matching of A's tokens into B (origins: each volume's token
    origin, token_centers). Returns dict(median_mm, within_tol, chance_median_mm, chance_within_tol, n)."""
    a = np.asarray(emb_a, np.float32)
    b = np.asarray(emb_b, np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-8)
    nn = np.empty(len(a), np.int64)
    for s in range(0, len(a), 4096):   # bounded memory for big volumes
        nn[s:s + 4096] = np.argmax(a[s:s + 4096] @ b.T, 1)
    ca, cb = token_centers(coords_a, affine_a, origin=origins[0]), token_centers(coords_b, affine_b, origin=origins[1])
    err = np.linalg.norm(ca - cb[nn], axis=1)
    rnd = np.random.default_rng(seed).integers(0, len(b), len(a))
    chance = np.linalg.norm(ca - cb[rnd], axis=1)
    return {"median_mm": float(np.median(err)), "within_tol": float((err <= tol_mm).mean()),
            "chance_median_mm": float(np.median(chance)), "chance_within_tol": float((chance <= tol_mm).mean()),
            "n": int(len(a))}


def kmeans_iou(emb, brain, k=3, seed=0):
    """k-means of token embeddings (n, D); brain (n,) bool. Returns dict(iou (best cluster),
    chance_iou (all tokens), cluster_sizes)."""
    from sklearn.cluster import KMeans
    x = np.asarray(emb, np.float32)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-6)
    lab = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
    brain = np.asarray(brain, bool)
    ious = []
    for c in range(k):
        m = lab == c
        union = (m | brain).sum()
        ious.append((m & brain).sum() / union if union else 0.0)
    return {"iou": float(max(ious)), "chance_iou": float(brain.mean()), "cluster_sizes": np.bincount(lab, minlength=k).tolist()}


def brain_tokens(coords, affine, world_from_template, anat=None, min_fraction=0.5, origin=(0, 0, 0)):
    """(n,) bool: tokens whose box is mostly brain (GM, WM, ventricles) in the demo cohort's
    template anatomy placed with the subject's world_from_template (4x4, template mm -> world)."""
    from nvfm import phantom_anatomy as pa
    anat = anat or pa.load_anatomy()
    pts = to_world(token_box_points(coords, per_axis=(2, 3, 3), origin=origin), affine)            # (n, m, 3) world
    tmm = to_world(pts, np.linalg.inv(np.asarray(world_from_template, np.float64)))   # template mm
    ijk = nearest_voxel(to_world(tmm, np.linalg.inv(anat.affine)))   # the rule grounding uses everywhere
    ok = np.all((ijk >= 0) & (ijk < np.asarray(anat.tissue.shape)), -1)
    t = np.zeros(ijk.shape[:-1], np.uint8)
    t[ok] = anat.tissue[ijk[ok][:, 0], ijk[ok][:, 1], ijk[ok][:, 2]]
    return np.isin(t, (pa.GM, pa.WM, pa.VENT)).mean(1) >= min_fraction


MIN_TOKENS = 8   # a volume with fewer tokens is too small to match or cluster


def anatomy_eval(cache, reader, cohort, keys, names_by_key, max_studies=20, seed=0):
    """Patch matching (first two volumes of each multi-volume study, first window each) and
    k-means brain IoU (every volume, first window) on up to max_studies studies.
    names_by_key: study_key -> demo study name (for gt/<study>/subject.json).

    Every input is accounted for, by counts (no study key or name): "studies" {n, done (gave a
    pair or a k-means volume), skipped {reason: n}}; each figure's "skipped" {reason: n} counts
    the studies (patch matching) or volumes (k-means) of the evaluated studies it left out, so
    n_pairs + skipped = evaluated studies and n_volumes + skipped = their volumes. A ValueError
    (naming the cache and the reasons) when neither figure has anything to average."""
    vol_index = {v["volume_id"]: i for i, v in enumerate(reader.volumes)}
    where = getattr(cache, "path", "feature cache")

    def record(key, e):
        if e["volume_id"] not in vol_index:   # features encoded from other shards: no geometry to map them with
            raise ValueError(f"{where}: volume {e['volume_id']} of study {key} is "
                             f"not in the shards {getattr(reader, 'root', '')} (were the features encoded from them?)")
        return reader.volumes[vol_index[e["volume_id"]]]
    crop = cache_crop(cache)  # tokens of a --preset=neurovfm cache start at the centre crop's corner
    origin = lambda rec: token_origin(rec["shape"], crop)  # noqa: E731
    match, km = [], []
    skip_study, skip_pair, skip_km = Counter(), Counter(), Counter()
    if len(keys) > max_studies:
        skip_study[f"over max_studies={max_studies}"] = len(keys) - max_studies
    done = 0
    for key in keys[:max_studies]:
        by_vol = {}
        for e in cache.study(key):
            by_vol.setdefault(e["volume_id"], []).append(e)
        # each volume's first window with enough tokens
        ents = [next((e for e in es if len(e["emb"]) >= MIN_TOKENS), None) for es in by_vol.values()]
        if None in ents:
            skip_km[f"fewer than {MIN_TOKENS} tokens"] += ents.count(None)
        ents = [e for e in ents if e is not None]
        n_km = len(km)
        if len(ents) >= 2:
            ra, rb = (record(key, e) for e in ents[:2])
            m = patch_matching(ents[0]["emb"], ents[0]["coords"], ra["affine"], ents[1]["emb"], ents[1]["coords"],
                               rb["affine"], seed=seed, origins=(origin(ra), origin(rb)))
            m["pair"] = f"{ents[0]['family']}->{ents[1]['family']}"
            match.append(m)
        else:
            skip_pair[f"fewer than 2 volumes of >= {MIN_TOKENS} tokens"] += 1
        sj = os.path.join(cohort or "", "gt", names_by_key.get(key, ""), "subject.json")
        if not cohort or not names_by_key.get(key) or not os.path.exists(sj):
            if ents:
                skip_km["no brain map (no cohort gt/<study>/subject.json)"] += len(ents)
        else:
            with open(sj) as f:
                wft = json.load(f)["world_from_template"]
            for e in ents:
                rec = record(key, e)
                brain = brain_tokens(e["coords"], rec["affine"], wft, origin=origin(rec))
                if 0 < brain.sum() < len(brain):
                    r = kmeans_iou(e["emb"], brain, seed=seed)
                    r["family"] = e["family"]
                    km.append(r)
                else:
                    skip_km["every token brain" if brain.all() else "no brain token"] += 1
        if len(ents) >= 2 or len(km) > n_km:
            done += 1
        else:
            skip_study["a single volume, not clustered" if ents else f"no volume of >= {MIN_TOKENS} tokens"] += 1
    if not match and not km:
        why = "; ".join(f"{n} {r}" for r, n in (skip_study + skip_pair + skip_km).items())
        raise ValueError(f"{where}: neither a volume pair nor a k-means volume from {len(keys)} studies ({why})")

    def mean(lst, f):
        return float(np.mean([x[f] for x in lst])) if lst else None
    # patch matching: each volume pair's median error (and share within 16 mm), averaged over pairs
    return {"studies": {"n": len(keys), "done": done, "skipped": dict(skip_study)},
            "patch_matching": {"n_pairs": len(match), "median_mm": mean(match, "median_mm"),
                               "within_16mm": mean(match, "within_tol"),
                               "chance_median_mm": mean(match, "chance_median_mm"),
                               "chance_within_16mm": mean(match, "chance_within_tol"), "skipped": dict(skip_pair)},
            "kmeans_brain": {"n_volumes": len(km), "iou": mean(km, "iou"), "chance_iou": mean(km, "chance_iou"),
                             "skipped": dict(skip_km)}}
