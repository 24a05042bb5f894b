"""Demo cohort: the sizes and thicknesses the findings quote are those of the rendered images.

A large lesion's mass effect (Subject.pushes) enlarges the lesion in the images and in its written
mask; the findings used to quote the lesion as drawn on the template, before the push: a large
acute SDH (seed 0, demo-0025) read 'up to 15 mm' over blood 31 mm deep on its CT, a large EDH
(demo-0063) 17 mm for 37 mm, a large IPH (seed 3, demo-0004) '3.8 x 3.4 cm' for 4.8 x 4.2 cm.
Each is measured here on the written ground-truth CT alone (HU thresholds, a Euclidean distance
transform in mm, extents through the NIfTI affine), not with the generator's bookkeeping."""
import os
import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from nvfm import phantom as ph
from nvfm import phantom_anatomy as pa


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory):
    """_ct_study, each study written once per module."""
    anat, out, done = pa.load_anatomy(), str(tmp_path_factory.mktemp("audit3")), {}

    def get(seed, index):
        if (seed, index) not in done:
            done[seed, index] = (out,) + _ct_study(out, anat, seed, index)
        return done[seed, index]
    return get


def _ct_study(out, anat, seed, index):
    """Write study `index` of a seed's demo cohort with only its first (soft-tissue) CT series, untilted
    so that its grid is orthogonal; the subject (anatomy, lesions, mass effect) is the cohort's own.
    Returns (record, gt CT image, its HU array)."""
    p = ph.plan_study(seed, index, "demo")
    assert p["modality"] == "CT"
    p["series"] = [dict(p["series"][0], tilt=0.0)]
    p["scout"] = p["sr"] = p["pdf"] = False
    rec = ph.generate_study(p, out, anat)
    s = rec["series"][0]
    assert s["family"] == "CT" and "BONE" not in s["description"]
    img = nib.load(os.path.join(out, s["gt"]))
    return rec, img, np.asarray(img.dataobj, np.float32)


def _mask_on_grid(out, les, img, shape):
    """Voxel indices (n, 3) of the CT grid that hold a lesion's written mask (nearest voxel)."""
    m = nib.load(os.path.join(out, les["mask"]))
    world = np.argwhere(np.asarray(m.dataobj) > 0) @ m.affine[:3, :3].T + m.affine[:3, 3]
    v = np.round((world - img.affine[:3, 3]) @ np.linalg.inv(img.affine[:3, :3]).T).astype(int)
    return np.unique(v[np.all((v >= 0) & (v < shape), 1)], axis=0)


@pytest.mark.parametrize("seed, index, kind", [(0, 25, "sdh"), (0, 63, "edh"), (0, 63, "sdh"), (1, 46, "edh")])
def test_reported_thickness_is_the_rendered_one(ct_study, seed, index, kind):
    """A large acute SDH / EDH: the thickness in the findings is the largest distance (mm) from the blood
    (HU > 50 inside its mask) to the nearest bone (HU > 300) on the rendered CT, within half a slice."""
    out, rec, img, hu = ct_study(seed, index)
    les = next(l for l in rec["lesions"] if l["kind"] == kind)
    v = _mask_on_grid(out, les, img, hu.shape)
    blood = v[hu[tuple(v.T)] > 50]
    assert len(blood) > 500
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    to_bone = ndi.distance_transform_edt(hu <= 300, sampling=spacing)
    rendered = float(to_bone[tuple(blood.T)].max())
    name = "subdural" if kind == "sdh" else "epidural"
    said = [int(m.group(1)) for f in rec["findings"]
            for m in [re.search(name + r" hematoma measuring up to (\d+) mm", f)] if m]
    assert len(said) == 1 and abs(said[0] - rendered) <= spacing[2] / 2, (said, rendered)


def test_reported_size_is_the_rendered_one(ct_study):
    """Seed 3, demo-0004: a large left insular IPH (and a right SAH, metastases). Its two reported
    dimensions are the in-plane extents (mm, voxel edges included) of the hyperdense blood on the
    rendered CT: the connected HU > 52 region through the mask, within 3 mm."""
    out, rec, img, hu = ct_study(3, 4)
    les = next(l for l in rec["lesions"] if l["kind"] == "iph")
    assert les["side"] == "left"
    v = _mask_on_grid(out, les, img, hu.shape)
    lab, _ = ndi.label(hu > 52)
    ids = lab[tuple(v.T)]
    blood = lab == np.bincount(ids[ids > 0]).argmax()
    spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
    idx = np.argwhere(blood)
    in_plane = np.sort((np.ptp(idx, 0)[:2] + 1) * spacing[:2])[::-1] / 10  # axial: columns, rows (cm)
    rx = r"intraparenchymal hemorrhage in the [a-z ]+ measuring ([\d.]+) x ([\d.]+) cm"
    said = [m.groups() for f in rec["findings"] for m in [re.search(rx, f)] if m]
    assert len(said) == 1, rec["findings"]
    said = np.array(said[0], float)
    assert np.all(np.abs(said - in_plane) <= 0.3), (said, in_plane)


def test_metastases_sentence_names_the_cerebellum():
    """Seed 0, demo-0042: four metastases on the right, one of them in the cerebellum (the written mask,
    taken back to the template by the record's rigid map, lies on AAL cerebellar labels). The sentence
    put them all 'in the right cerebral hemisphere' (then called the largest a cerebellar one): each
    compartment and side that holds a metastasis is named now."""
    import tempfile
    anat = pa.load_anatomy()
    p = ph.plan_study(0, 42, "demo")
    p["series"], p["scout"], p["sr"], p["pdf"] = p["series"][:1], False, False, False
    with tempfile.TemporaryDirectory() as out:
        rec = ph.generate_study(p, out, anat)
        A = np.array(rec["world_from_template"])
        cerebellar = {k for k, v in anat.region_names.items() if v.startswith(("Cerebel", "Vermis"))}
        want = {}
        for les in rec["lesions"]:
            if les["kind"] != "metastases":
                continue
            m = nib.load(os.path.join(out, les["mask"]))
            world = np.argwhere(np.asarray(m.dataobj) > 0) @ m.affine[:3, :3].T + m.affine[:3, 3]
            tmpl = (world - A[:3, 3]) @ np.linalg.inv(A[:3, :3]).T          # template RAS mm
            vox = np.round(anat.voxel(tmpl)).astype(int)
            labs = anat.region[tuple(vox.T)]
            labs = labs[labs > 0]
            comp = "cerebellar" if np.isin(labs, list(cerebellar)).mean() > 0.5 else "cerebral"
            side = "left" if tmpl[:, 0].mean() < 0 else "right"            # RAS: x < 0 is the patient's left
            want.setdefault(comp, set()).add(side)
    assert want == {"cerebral": {"right"}, "cerebellar": {"right"}}, want
    said = [re.search(r"grey-white junction in (.+?) with", f) for f in rec["findings"]]
    said = [m.group(1) for m in said if m]
    assert len(said) == 1
    for comp, sides in want.items():
        phrase = f"both {comp} hemispheres" if len(sides) == 2 else f"{min(sides)} {comp} hemisphere"
        assert phrase in said[0], (phrase, said[0])
