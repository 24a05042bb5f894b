"""Audit 4 of evaluate.py and nvfm/grounding.py: the pointing game's targets, ties and overlay files
against hand-worked cases, and the grounding / flip-test input faults that were tracebacks."""
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from nvfm import features, grounding
from nvfm import probe as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate  # noqa: E402
from test_evaluate import _tiny_run  # noqa: E402

# canonical voxel (d, h, w) -> RAS world: x = w - 32, y = h - 32, z = 4 d  (4 mm slices); token grid (2, 4, 4)
AFF = np.array([[0, 0, 1, -32], [0, 1, 0, -32], [4, 0, 0, 0], [0, 0, 0, 1]], np.float64)
SHAPE = (8, 64, 64)
COORDS = np.argwhere(np.ones((2, 4, 4), bool)).astype(np.int32)


class AttendFeature0(torch.nn.Module):
    """Stub probe of K classes sharing one map: attention = softmax of 10 x feature 0 per bag, instance logit
    = feature 1."""

    def __init__(self, K=1):
        super().__init__()
        self.K = K

    def forward(self, x, cu, return_maps=False):
        seg = P.bag_ids(cu, x.shape[0])
        a = P.segment_softmax(x[:, :1] * 10, seg, len(cu) - 1)
        logits = P.segment_sum(a * x[:, 1:2], seg, len(cu) - 1).repeat(1, self.K)
        return (logits, a.repeat(1, self.K), x[:, 1:2].repeat(1, self.K)) if return_maps else logits


class Reader:
    """Shards of one study "k1" (volume ids "<study_key>-<series_key>", as preprocess.py writes them), each
    volume's image a constant (10, 20, ...) so a file tells which volume it came from."""

    def __init__(self, series, key="k1xyzabc"):
        self.root = "shards"
        self.volumes = [dict(volume_id=f"{key}-{s}", study_key=key, modality="CT", family="CT", shape=list(SHAPE),
                             affine=AFF.tolist(), orientation="SPR") for s in series]

    def volume(self, i):
        return np.full((1,) + SHAPE, 10 * (i + 1), np.uint8), np.ones(SHAPE, np.uint8)


def _lesion_cohort(d, lesions):
    """cohort d/cohort with one 5 mm cube lesion at world x 10..14, y -20..-16, z 2..6 (canonical w 42..46,
    h 12..16, d 0.5..1.5: tokens (0, 0, 2) and (0, 1, 2), 2 of the 32) and findings.jsonl listing `lesions`
    (dicts without the mask) of study k1xyzabc, each with that mask."""
    os.makedirs(d / "cohort" / "gt" / "demo-0001", exist_ok=True)
    LA = np.eye(4)
    LA[:3, 3] = [10, -20, 2]
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), LA), str(d / "cohort" / "gt" / "demo-0001" / "l.nii.gz"))
    (d / "findings.jsonl").write_text(json.dumps({"study_key": "k1xyzabc", "study": "demo-0001", "lesions": [
        dict(les, mask="gt/demo-0001/l.nii.gz") for les in lesions]}) + "\n")
    return str(d / "cohort"), str(d / "findings.jsonl")


def _cache(d, embs, key="k1xyzabc", series=("aaaa1111",)):
    with features.FeatureWriter(str(d / "cache"), "h", 4) as w:
        w.add(key, [dict(volume_id=f"{key}-{s}", family="CT", window="brain", modality="CT", coords=COORDS, emb=e)
                    for s, e in zip(series, embs)])
    return features.FeatureCache(str(d / "cache"))


def _emb(peak=None):
    e = np.zeros((len(COORDS), 4), np.float32)
    e[:, 1] = 1.0
    if peak is not None:
        e[np.all(COORDS == peak, 1), 0] = 5.0
    return e


def test_a_lesion_is_a_target_of_every_probe_class_it_is_labelled_with(tmp_path):
    """An MR glioma of the demo cohort is labelled brain_tumor, glioma, high_grade_glioma: a study positive for
    both probe classes glioma and brain_tumor had one trial (the class first named), the other class none,
    so its per-class figure and the trial count (the accuracy's denominator) silently lost it."""
    cohort, fj = _lesion_cohort(tmp_path, [{"diagnosis": "brain_tumor", "labels": ["brain_tumor", "glioma",
                                                                                     "high_grade_glioma"]}])
    cache = _cache(tmp_path, [_emb(peak=(0, 0, 2))])                  # the map peaks in the lesion
    data = dict(keys=["k1xyzabc"], y=np.ones((1, 3)), ck={"label_names": ["glioma", "cerebral_edema", "brain_tumor"]},
                models=[AttendFeature0(3)], cache=cache, wins=None)
    res = grounding.pointing_game_eval(data, Reader(["aaaa1111"]), cohort, fj)
    # by hand: glioma and brain_tumor each one trial, a hit; cerebral_edema is not among the lesion's labels
    assert res["n"] == 2 and res["accuracy"] == 1.0
    assert res["per_class"] == {"glioma": [1.0, 1], "brain_tumor": [1.0, 1]}
    # a class the study is negative for (y 0) gets no trial, whatever the lesion's labels
    res = grounding.pointing_game_eval(dict(data, y=np.array([[0.0, 1.0, 1.0]])), Reader(["aaaa1111"]), cohort, fj)
    assert res["per_class"] == {"brain_tumor": [1.0, 1]}


def test_a_uniform_attention_map_scores_chance_not_whether_its_first_token_is_in_the_lesion(tmp_path):
    """A mean-pool probe's map is 1/n on every token: argmax took token 0 (a corner), so its pointing game was
    0 (or 1 had the lesion been there), a figure about the token order, not the probe. Ties now count as
    the expected hit of a pick among them: for a uniform map the lesion tokens' share, 2 of 32 by hand."""
    cohort, fj = _lesion_cohort(tmp_path, [{"diagnosis": "glioma"}])
    rng = np.random.default_rng(0)
    cache = _cache(tmp_path, [rng.normal(size=(len(COORDS), 4)).astype(np.float32)])
    torch.manual_seed(0)
    m = P.make_probe("mean_pool", 4, 1).eval()
    data = dict(keys=["k1xyzabc"], y=np.ones((1, 1)), ck={"label_names": ["glioma"]}, models=[m], cache=cache,
                wins=None)
    res = grounding.pointing_game_eval(data, Reader(["aaaa1111"]), cohort, fj)
    assert res["chance"] == pytest.approx(2 / 32)
    assert res["accuracy"] == pytest.approx(2 / 32)
    # two tokens tied at the top, one in the lesion: half a hit
    e = _emb()
    e[np.all(COORDS == (0, 0, 2), 1) | np.all(COORDS == (1, 3, 3), 1), 0] = 5.0
    os.rename(tmp_path / "cache", tmp_path / "cache0")
    data = dict(data, models=[AttendFeature0()], cache=_cache(tmp_path, [e]))
    res = grounding.pointing_game_eval(data, Reader(["aaaa1111"]), cohort, fj)
    assert res["accuracy"] == pytest.approx(0.5) and res["per_class"] == {"glioma": [0.5, 1]}


def test_overlays_of_two_volumes_of_one_family_are_both_written_and_named_without_the_study_key(tmp_path):
    """Overlay files were named <study>_<family>_<volume_id[:8]>, and volume_id is "<study_key>-<series_key>":
    every volume of a study had the same tag, the study key's first 8 characters. Two CT series of one study
    wrote one set of files, the second volume's over the first's (the map's peak in the first was lost), each
    file listed twice. Now the tag is the series key's: both volumes' files, each holding its own image and map."""
    cohort, fj = _lesion_cohort(tmp_path, [{"diagnosis": "glioma"}])
    series = ("aaaa1111", "bbbb2222.1")
    cache = _cache(tmp_path, [_emb(peak=(0, 0, 2)), _emb()], series=series)
    data = dict(keys=["k1xyzabc"], y=np.ones((1, 1)), ck={"label_names": ["glioma"]}, models=[AttendFeature0()],
                cache=cache, wins=None)
    out = tmp_path / "ov"
    res = grounding.pointing_game_eval(data, Reader(series), cohort, fj, overlay_dir=str(out), n_overlays=1)
    assert res["accuracy"] == 1.0
    want = sorted(f"demo-0001_CT_{tag}_{kind}.nii.gz" for tag in ("aaaa1111", "bbbb2222.1")
                  for kind in ("image", "attention_glioma", "contribution_glioma", "lesion_glioma"))
    assert sorted(os.listdir(out)) == want
    assert sorted(os.path.basename(p) for p in res["overlays"]) == want    # each file listed once
    assert not any("k1xyzabc" in f for f in want)
    for tag, value in (("aaaa1111", 10), ("bbbb2222.1", 20)):           # each volume's own image and map
        img = np.asarray(nib.load(str(out / f"demo-0001_CT_{tag}_image.nii.gz")).dataobj)
        assert (img == value).all()
    att = np.asarray(nib.load(str(out / "demo-0001_CT_aaaa1111_attention_glioma.nii.gz")).dataobj)
    z, y, x = np.unravel_index(np.argmax(att), att.shape)
    assert (z // 4, y // 16, x // 16) == (0, 0, 2)                       # the peak, in the first volume's file
    # attention 1 over the study's 64 tokens: the peak token ~1, the other 63 share the rest
    other = np.asarray(nib.load(str(out / "demo-0001_CT_bbbb2222.1_attention_glioma.nii.gz")).dataobj)
    assert other.max() < 0.01 < att.max()


def _grounding_run(tmp_path, monkeypatch, shard_volume_ids, **kw):
    """evaluate.py on _tiny_run's probe with --cohort/--flip_test and shards whose volumes are
    shard_volume_ids(key); the lesions of findings.jsonl masked, sided left/right."""
    import nvfm.data
    pt, rows, header = _tiny_run(tmp_path, names=("intraparenchymal_hemorrhage", "lesion_left", "lesion_right"))
    os.makedirs(tmp_path / "cohort" / "gt" / "x")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), np.eye(4)), str(tmp_path / "cohort" / "gt" / "x" / "l.nii.gz"))
    with open(tmp_path / "findings.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"study_key": r[0], "study": f"d{i}", "lesions": [
                {"diagnosis": "intraparenchymal_hemorrhage", "mask": "gt/x/l.nii.gz", "side": ("left", "right")[i % 2]}]
                if r[4] else []}) + "\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "manifest.json").write_text("{}")

    class FakeShards:
        def __init__(self, root):
            self.root = root
            self.volumes = [dict(volume_id=shard_volume_ids(r[0]), study_key=r[0], shape=[8, 64, 64],
                                 affine=np.eye(4).tolist()) for r in rows]
    monkeypatch.setattr(nvfm.data, "ShardReader", FakeShards)
    settings = dict(labels=str(tmp_path / "labels.csv"), out=str(tmp_path / "ev"), n_boot=0, plots=False,
                    device="cpu", findings="", names="p", split="test", external=False, reports="", merge="",
                    probes=pt, cohort="", shards=str(tmp_path / "shards"), flip_test=False, flip_split="",
                    anatomy=False, encoder="", overlays=0)
    for k, v in dict(settings, **kw).items():
        monkeypatch.setattr(evaluate, k, v)
    return rows


def test_a_pointing_game_on_a_cache_of_other_shards_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Features encoded from other shards than --shards: the pointing game died on a KeyError traceback (exit 2,
    perhaps with overlays written). Now one line naming the cache and the shards, the probe's figures
    written, {"error": ...} in metrics.json, exit 1 (as --anatomy)."""
    _grounding_run(tmp_path, monkeypatch, lambda k: f"other-{k}", cohort=str(tmp_path / "cohort"), overlays=3)
    with pytest.raises(SystemExit, match=r"--cohort \(pointing game\) failed"):
        evaluate.main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "cache: volume k" in err[0] and "is not in the shards" in err[0]
    m = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert "not in the shards" in m["results"]["p"]["grounding"]["error"]
    assert m["results"]["p"]["per_class"]["intraparenchymal_hemorrhage"]["auroc"] is not None
    assert not os.path.exists(tmp_path / "ev" / "grounding")
    # a lesion mask that is not in the cohort: named, before any overlay is drawn
    os.remove(tmp_path / "cohort" / "gt" / "x" / "l.nii.gz")
    with pytest.raises(ValueError, match=r"lesion mask not found: .*gt/x/l.nii.gz"):
        data = dict(keys=["k01"], y=np.ones((1, 1)), ck={"label_names": ["intraparenchymal_hemorrhage"]},
                    models=[AttendFeature0()], cache=features.FeatureCache(str(tmp_path / "cache")), wins=None)

        class R:
            volumes = [dict(volume_id="k01", study_key="k01", shape=[8, 64, 64], affine=np.eye(4).tolist())]
        grounding.pointing_game_eval(data, R(), str(tmp_path / "cohort"), str(tmp_path / "findings.jsonl"),
                                     overlay_dir=str(tmp_path / "ov"))
    assert not os.path.exists(tmp_path / "ov")


def test_a_flip_test_with_another_encoder_is_one_error_line(tmp_path, monkeypatch, capsys):
    """--encoder of another model than the cache's: a RuntimeError traceback (exit 2) after every probe was scored,
    nothing written. Now one line, the figures written, exit 1."""
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "enc.safetensors"))
    (tmp_path / "enc.json").write_text(json.dumps({"config": {}}))
    _grounding_run(tmp_path, monkeypatch, lambda k: k, flip_test=True, encoder=str(tmp_path / "enc.safetensors"))
    with pytest.raises(SystemExit, match=r"--flip_test failed"):
        evaluate.main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(err) == 1 and "enc.safetensors has hash" in err[0] and "sha256:tiny" in err[0]
    m = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert "has hash" in m["results"]["p"]["flip_test"]["error"] and m["summary"]["flip_test_auroc"] is None


def test_flip_test_studies_missing_from_the_cache_are_named_not_a_key_error(tmp_path, monkeypatch):
    """--flip_split=val,test on a cache of the test split: cache.study raised a KeyError traceback. Now a
    ValueError naming the cache and the studies (evaluate.py: one line)."""
    monkeypatch.setattr(grounding, "open_encoder_from_hash", lambda *a: pytest.fail("opened before the check"))
    cache = _cache(tmp_path, [_emb()], key="t0")

    class R:
        volumes = [dict(volume_id="t0", study_key="t0"), dict(volume_id="v0", study_key="v0")]
    ck = {"label_names": ["lesion_left", "lesion_right"], "encoder_hash": "h", "thresholds": [0.0, 0.0]}
    data = dict(keys=["t0"], ck=ck, models=[], cache=cache, wins=None)
    with pytest.raises(ValueError, match=r"flip test: 1 of the 2 one-sided studies are not in the feature cache "
                                         r".*cache \(first: \['v0'\]\)"):
        grounding.flip_test_eval(data, R(), {"t0": {"left"}, "v0": {"right"}}, keys=["t0", "v0"])
