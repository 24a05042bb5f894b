"""Real head anatomy for the demo cohort: tissue classes and atlas regions on a 1 mm grid.

Source, in order of preference (both ship inside installable packages, nothing is downloaded):
  1. Colin27 whole-head T1 (skull and scalp included) + AAL atlas from Debian's mricron-data
     (/usr/share/mricron/templates/{ch2,ch2bet,aal}.nii.gz, 181x217x181, 1 mm, RAS).
  2. MNI ICBM152 2009 T1 + GM/WM maps from the nilearn wheel (brain only); CSF rim, skull
     and scalp are synthesized from distance transforms of the brain mask, and regions are
     coarse lobes from coordinates.

`load_anatomy()` returns an `Anatomy` (cached per process) with:
  tissue  uint8 (X, Y, Z) tissue class, see the constants below
  region  uint8 (X, Y, Z) atlas label (0 = none); `region_names[label]` -> "Putamen_L"
  affine  float64 (4, 4) template voxel -> RAS mm
  depth_icv   float32 mm inside the intracranial cavity to its boundary (inner table)
  depth_brain float32 mm inside the parenchyma to the nearest CSF (sulcus or ventricle)
  dist_vent   float32 mm from the ventricles (0 inside)
"""
import functools
import os

import numpy as np
import nibabel as nib
from scipy import ndimage as ndi

# tissue classes (values of Anatomy.tissue); pathology classes continue after these
AIR, SOFT, FAT, BONE, CSF, VENT, GM, WM = range(8)
TISSUE_NAMES = ["air", "soft", "fat", "bone", "csf", "ventricle", "gm", "wm"]

MRICRON_DIR = os.environ.get("NVFM_MRICRON_DIR", "/usr/share/mricron/templates")
# derived maps take ~10 s to compute (distance transforms), so they are cached once per machine
CACHE_DIR = os.environ.get("NVFM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nvfm"))
CACHE_VERSION = "v1"


@functools.lru_cache(maxsize=2)
def load_anatomy(source="auto"):
    """Load (and cache) the template anatomy. source: "auto" | "mricron" | "nilearn"."""
    if source not in ("auto", "mricron", "nilearn"):
        raise ValueError(f"anatomy source must be auto, mricron or nilearn, got {source!r}")
    have_mricron = all(os.path.exists(os.path.join(MRICRON_DIR, f))
                       for f in ("ch2.nii.gz", "ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt"))
    if source == "mricron" and not have_mricron:
        raise FileNotFoundError(f"mricron-data templates not found in {MRICRON_DIR} "
                                "(apt-get install mricron-data)")
    use = "mricron" if source == "mricron" or (source == "auto" and have_mricron) else "nilearn"
    cache = os.path.join(CACHE_DIR, f"phantom_anatomy_{use}_{CACHE_VERSION}.npz")
    if os.path.exists(cache):
        try:
            z = np.load(cache, allow_pickle=False)
            names = dict(zip(z["region_ids"].tolist(), z["region_labels"].tolist()))
            return Anatomy(z["tissue"], z["region"], names, z["affine"], str(z["source"]), z["t1"],
                           dists=(z["depth_icv"], z["depth_brain"], z["dist_vent"]))
        except Exception:  # a stale or truncated cache is rebuilt, never trusted
            pass
    anat = _from_mricron() if use == "mricron" else _from_nilearn()
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = f"{cache}.{os.getpid()}.tmp.npz"
        ids = sorted(anat.region_names)
        np.savez(tmp, tissue=anat.tissue, region=anat.region, affine=anat.affine,
                 source=np.array(anat.source), t1=anat.t1.astype(np.float16),
                 depth_icv=anat.depth_icv.astype(np.float16), depth_brain=anat.depth_brain.astype(np.float16),
                 dist_vent=anat.dist_vent.astype(np.float16),
                 region_ids=np.array(ids), region_labels=np.array([anat.region_names[i] for i in ids]))
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only home: just recompute next time
    return anat


class Anatomy:
    def __init__(self, tissue, region, region_names, affine, source, t1, dists=None):
        self.tissue, self.region, self.region_names = tissue, region, region_names
        self.affine, self.source = np.asarray(affine, np.float64), source
        self.shape = tissue.shape
        if dists is None:
            icv = np.isin(tissue, (CSF, VENT, GM, WM))
            paren = np.isin(tissue, (GM, WM))
            dists = (ndi.distance_transform_edt(icv), ndi.distance_transform_edt(paren),
                     ndi.distance_transform_edt(tissue != VENT))
        self.depth_icv, self.depth_brain, self.dist_vent = (np.asarray(d, np.float32) for d in dists)
        self._voxel_lists = {}
        self.t1 = np.asarray(t1, np.float32)  # normalized template T1 (0..1.2), bone texture
        # voxel of the template origin (midline x = 0 mm)
        self.inv_affine = np.linalg.inv(self.affine)

    def voxels(self, name, cond_fn):
        """Cached (n, 3) int array of voxel indices where cond_fn(self) is True."""
        if name not in self._voxel_lists:
            self._voxel_lists[name] = np.argwhere(cond_fn(self)).astype(np.int16)
        return self._voxel_lists[name]

    def world(self, ijk):
        """template voxel indices (..., 3) -> RAS mm (..., 3)"""
        ijk = np.asarray(ijk, np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def voxel(self, xyz):
        xyz = np.asarray(xyz, np.float64)
        return xyz @ self.inv_affine[:3, :3].T + self.inv_affine[:3, 3]

    def region_at(self, ijk):
        """Atlas region name at a voxel, or of the nearest labelled voxel within 8 mm."""
        i, j, k = (int(round(v)) for v in ijk)
        sl = tuple(slice(max(c - 8, 0), c + 9) for c in (i, j, k))
        sub = self.region[sl]
        if self.region[i, j, k]:
            return self.region_names.get(int(self.region[i, j, k]), "")
        nz = np.argwhere(sub > 0)
        if len(nz) == 0:
            return ""
        c = np.array([i - sl[0].start, j - sl[1].start, k - sl[2].start])
        best = nz[np.argmin(((nz - c) ** 2).sum(1))]
        return self.region_names.get(int(sub[tuple(best)]), "")


def _largest_component(mask):
    lab, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = ndi.sum(mask, lab, range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _fill_slices(mask):
    """binary_fill_holes in 3D and then per axial slice (closes the head at the open neck)."""
    mask = ndi.binary_fill_holes(mask)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndi.binary_fill_holes(mask[:, :, k])
    return mask


def _classify(t1, brain, head):
    """Tissue classes from a normalized T1 (0..1), a brain mask and a head mask."""
    tissue = np.zeros(t1.shape, np.uint8)
    tissue[head] = SOFT
    # brain: T1 thresholds (CSF dark, GM mid, WM bright) fitted on the template histogram
    # (Colin27: CSF < 5th percentile, GM/WM boundary near the 55th)
    bvals = t1[brain]
    lo, hi = np.percentile(bvals, [6, 55])
    tissue[brain & (t1 < lo)] = CSF
    tissue[brain & (t1 >= lo) & (t1 < hi)] = GM
    tissue[brain & (t1 >= hi)] = WM
    # ventricles: CSF deep inside the brain (> 12 mm from the brain surface)
    depth = ndi.distance_transform_edt(brain)
    vent = brain & (t1 < lo) & (depth > 12)
    vent = ndi.binary_opening(vent, iterations=1)
    tissue[vent] = VENT
    # extra-axial CSF rim (2 mm) then the skull: everything between the CSF rim and the
    # scalp (outer 4-6 mm of the head), refined by T1: very dark deep voxels are air
    # (sinuses/mastoids), bright deep voxels far from the brain are fat/soft tissue (orbits)
    dist_brain = ndi.distance_transform_edt(~brain)
    rim = (~brain) & (dist_brain <= 2.5) & head
    tissue[rim] = CSF
    depth_head = ndi.distance_transform_edt(head)
    shell = head & (~brain) & (~rim) & (depth_head > 4.5)
    calvarium = shell & (dist_brain <= 9.0)
    tissue[calvarium] = BONE
    deep = shell & ~calvarium
    tissue[deep & (t1 < 0.12)] = AIR
    tissue[deep & (t1 >= 0.12) & (t1 < 0.35)] = BONE
    tissue[deep & (t1 >= 0.55)] = FAT
    # scalp: subcutaneous fat is bright on T1
    scalp = head & (depth_head <= 4.5) & ~brain
    tissue[scalp & (t1 > 0.55)] = FAT
    return tissue


def _from_mricron():
    d = MRICRON_DIR
    img = nib.as_closest_canonical(nib.load(os.path.join(d, "ch2.nii.gz")))
    t1 = np.asarray(img.dataobj, np.float32)
    t1 /= np.percentile(t1, 99.5)
    brain = np.asarray(nib.as_closest_canonical(nib.load(os.path.join(d, "ch2bet.nii.gz"))).dataobj) > 0
    brain = ndi.binary_fill_holes(_largest_component(brain))
    head = _largest_component(ndi.binary_closing(t1 > 0.08, iterations=2))
    head = _fill_slices(head | brain)
    region = np.asarray(nib.as_closest_canonical(nib.load(os.path.join(d, "aal.nii.gz"))).dataobj).astype(np.uint8)
    names = {}
    with open(os.path.join(d, "aal.nii.txt")) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    tissue = _classify(t1, brain, head)
    # AAL grey labels inside the brain are grey matter (deep nuclei included)
    deep_gm = np.isin(region, [k for k, v in names.items()
                               if v.split("_")[0] in ("Caudate", "Putamen", "Pallidum", "Thalamus")])
    tissue[deep_gm & brain & (tissue == WM)] = GM
    region[~brain] = 0
    return Anatomy(tissue, region, names, img.affine, "mricron:colin27+aal", np.clip(t1, 0, 1.2))


def _nilearn_file(name):
    import nilearn
    return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                        f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz")


def _from_nilearn():
    img = nib.as_closest_canonical(nib.load(_nilearn_file("t1")))
    t1 = np.asarray(img.dataobj, np.float32)
    t1 /= np.percentile(t1[t1 > 0], 99.5)
    gm = np.asarray(nib.as_closest_canonical(nib.load(_nilearn_file("gm"))).dataobj, np.float32)
    wm = np.asarray(nib.as_closest_canonical(nib.load(_nilearn_file("wm"))).dataobj, np.float32)
    brain = ndi.binary_fill_holes(_largest_component((gm + wm) > 0.3))
    brain = ndi.binary_closing(brain, iterations=2)
    # synthesize: 2.5 mm CSF rim, 6 mm skull, 5 mm scalp (distance transforms of the brain)
    dist = ndi.distance_transform_edt(~brain)
    tissue = np.zeros(t1.shape, np.uint8)
    tissue[dist <= 13.5] = SOFT
    tissue[(dist > 8.5) & (dist <= 11.0)] = FAT
    tissue[dist <= 8.5] = BONE
    tissue[dist <= 2.5] = CSF
    tissue[brain] = CSF
    tissue[brain & (gm >= wm) & (gm > 0.35)] = GM
    tissue[brain & (wm > gm) & (wm > 0.35)] = WM
    depth = ndi.distance_transform_edt(brain)
    csf_in = brain & (gm + wm < 0.35)
    tissue[csf_in & (depth > 12)] = VENT
    # coarse lobes from RAS coordinates (no atlas ships with the fallback)
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in t1.shape], indexing="ij")
    xyz = np.stack([ii, jj, kk], -1).reshape(-1, 3) @ img.affine[:3, :3].T + img.affine[:3, 3]
    x, y, z = (xyz[:, a].reshape(t1.shape) for a in range(3))
    lobe = np.where(y > 0, 1, np.where(y < -60, 4, np.where(z > 35, 3, 2)))  # F, T, P, O
    lobe = np.where((z < -20) & (y < -45), 5, lobe)                        # cerebellum
    region = (2 * (lobe - 1) + 1 + (x > 0)).astype(np.uint8)
    region[~brain] = 0
    names = {}
    for i, lname in enumerate(["Frontal", "Temporal", "Parietal", "Occipital", "Cerebellum"]):
        names[2 * i + 1], names[2 * i + 2] = f"{lname}_L", f"{lname}_R"
    return Anatomy(tissue, region, names, img.affine, "nilearn:mni152_2009", np.clip(t1, 0, 1.2))
