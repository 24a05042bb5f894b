"""train_llava.py data-path audit: a probe scores the studies of its modality when findings.jsonl names none
(the features do); a probe fitted or tuned on an evaluated study outside val is refused; a resume on other features
of the training studies is refused; the cross-check appends a finding once whatever its CT / MR name; the
answer-only loss against a hand-built prompt and label sequence; a lesion on the patient's left gets left
positions whichever way its NIfTI affine runs."""
import json
import os

import numpy as np
import pytest
import torch

from test_llava import TINY, _synthetic_cohort
from test_llava_audit import SDH, _base, _refused, _sh, _with_splits
from nvfm import llava
from nvfm.llm import load_llm, tiny_qwen3_cached


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_qwen3_cached(**TINY)


def _probe(path, modality, seen=()):
    """A mean-pool probe of one class (SDH) whose threshold -100 calls every study it scores."""
    from nvfm import probe as P
    torch.manual_seed(0)
    torch.save(dict(models=[P.make_probe("mean_pool", 16, 1).state_dict()], task="classify",
                    probe_args=dict(kind="mean_pool", dim=16, n_out=1, hidden=0, dropout=0.0), label_names=[SDH],
                    modality=modality, eval_modality=modality, encoder_hash="random:test", windows="",
                    thresholds=[-100.0], platt_a=[1.0], platt_b=[0.0], n_train_pos=[4.0], seen_keys=list(seen),
                    seen_subjects=[]), path)
    return path


def _missed(out):
    path = os.path.join(out, "reports_probe.jsonl")
    return {r["study_key"]: r["probe_missed"] for r in map(json.loads, open(path))} if os.path.exists(path) else None


def test_a_probe_scores_its_modality_when_findings_name_none(tmp_path, lm_dir):
    """An MR probe cross-checked nothing when findings.jsonl has no 'modality' (the studies' features are MR):
    no reports_probe.jsonl, no word, exit 0. A CT probe on these MR studies scores none, and says so."""
    fnd, feat = _synthetic_cohort(str(tmp_path))
    assert all("modality" not in json.loads(line) for line in open(fnd))
    ev = ["--eval_only=True", "--max_new_tokens=4", "--probe_rule=youden"]
    got = {}
    for mod in ("MR", "CT"):
        out = str(tmp_path / mod)
        r = _sh(_base(fnd, feat, lm_dir, out, *ev, f"--probe={_probe(str(tmp_path / f'{mod}.pt'), mod)}"))
        assert r.returncode == 0, r.stderr[-3000:]
        got[mod] = (_missed(out), "scores none of the 3 evaluated studies" in r.stdout)
    # by hand: every test study (k009..k011) is MR, and the threshold is below any logit
    assert got == {"MR": ({"k009": [SDH], "k010": [SDH], "k011": [SDH]}, False), "CT": (None, True)}


def test_a_probe_fitted_on_an_evaluated_study_outside_val_is_refused(tmp_path, lm_dir):
    """A probe that records test study k010 among the studies that fitted or tuned it (a CV probe trains on
    all but its own held-out fraction) appended its in-sample call to k010's report without a word; so did one
    fitted on another study of k010's subject. A probe fitted on train and val studies cross-checks val and test."""
    fnd, feat = _synthetic_cohort(str(tmp_path))
    fnd = _with_splits(fnd, str(tmp_path / "f_val.jsonl"), {"k000": "val", "k001": "val"})
    ev = ["--eval_only=True", "--max_new_tokens=4", "--probe_rule=youden", "--eval_split=val,test"]
    train_val = [f"k{i:03d}" for i in range(9)]
    bad = _probe(str(tmp_path / "bad.pt"), "all", train_val + ["k010"])
    _refused(_base(fnd, feat, lm_dir, str(tmp_path / "x"), *ev, f"--probe={bad}"),
             f"--probe={bad} was fitted or tuned on 1 of the --eval_split=val,test studies", "['k010']")
    assert not os.path.exists(tmp_path / "x")
    # by subject: k011 is subject s1's other study (labels.csv beside findings.jsonl holds salted subjects)
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("study_key,split,subject\n" + "".join(f"k{i:03d},x,{'s1' if i in (3, 11) else f's{i}x'}\n"
                                                      for i in range(12)))
    subj = str(tmp_path / "subj.pt")
    torch.save(dict(torch.load(_probe(subj, "all", train_val), weights_only=True),
                    seen_subjects=["s1", *(f"s{i}x" for i in range(9) if i != 3)]), subj)
    _refused(_base(fnd, feat, lm_dir, str(tmp_path / "y"), *ev, f"--probe={subj}"), "['k011']")
    out = str(tmp_path / "ok")
    r = _sh(_base(fnd, feat, lm_dir, out, *ev, f"--probe={_probe(str(tmp_path / 'ok.pt'), 'all', train_val)}"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _missed(out) == {k: [SDH] for k in ("k000", "k001", "k009", "k010", "k011")}


def test_loss_is_the_answer_token_mean_of_hand_built_sequences(lm_dir):
    """ReportGenerator.forward on a batch of an MR study (2 series), one without images and a CT study (3
    windows) against sequences built by hand here: the ChatML text tokenized piece by piece, each series'
    connector latents (run one series at a time) between <|vision_start|> and <|vision_end|>, every prompt and
    image position unsupervised, the reply's JSON and <|im_end|> supervised; the mean over all reply tokens."""
    lm, tok = load_llm(lm_dir)
    torch.manual_seed(0)
    gen = llava.ReportGenerator(lm, tok, enc_dim=8, dim=16, depth=1, heads=2, n_latents=4)
    g = torch.Generator().manual_seed(1)
    studies = [[{"family": "FLAIR", "modality": "MR", "emb": torch.randn(7, 8, generator=g)},
                {"family": "T1", "modality": "MR", "emb": torch.randn(3, 8, generator=g)}], [],
               [{"modality": "CT", "family": "CT", "window": w, "emb": torch.randn(5, 8, generator=g)}
                for w in ("brain", "blood", "bone")]]
    inds = ["headache and vomiting for two days", "", "fall"]
    fnds = [["Acute left subdural hematoma.", "Midline shift 5 mm."], [], ["Right frontal contusion."]]
    loss = gen(studies, inds, fnds)
    emb, ids = lm.get_input_embeddings(), tok.convert_tokens_to_ids
    total, n = 0.0, 0
    with torch.no_grad():
        for study, ind, f in zip(studies, inds, fnds):
            xs, labs, text = [], [], "<|im_start|>user\n"
            for e in study:
                name = {"MR": e["family"], "CT": f"CT-{e.get('window')}"}[e["modality"]]
                t = tok.encode(text + f"{name}: ", add_special_tokens=False) + [ids("<|vision_start|>")]
                xs.append(emb(torch.tensor(t)))
                xs.append(gen.connector(e["emb"], torch.tensor([0, len(e["emb"])], dtype=torch.int32), len(e["emb"]),
                                        torch.tensor([llava.SERIES_TYPES.index(name)])))
                xs.append(emb(torch.tensor([ids("<|vision_end|>")])))
                labs += [-100] * (len(t) + 4 + 1)
                text = "\n"
            text += f"Indication: {ind}\n" if ind else ""
            text += llava.REPORT_PROMPT + "<|im_end|>\n<|im_start|>assistant\n"
            t = tok.encode(text, add_special_tokens=False)
            ans = tok.encode(json.dumps(f), add_special_tokens=False) + [ids("<|im_end|>")]
            xs += [emb(torch.tensor(t)), emb(torch.tensor(ans))]
            labs += [-100] * len(t) + ans
            logits = lm(inputs_embeds=torch.cat(xs)[None]).logits[0, :-1]
            lab = torch.tensor(labs[1:])
            total += torch.nn.functional.cross_entropy(logits[lab != -100], lab[lab != -100], reduction="sum")
            n += int((lab != -100).sum())
    torch.testing.assert_close(loss, total / n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("header", ["sform", "qform_las", "sagittal", "sform_rotated"])
def test_a_left_lesion_gets_left_positions_whatever_the_affine(tmp_path, header):
    """A bright cube on the patient's left (low RAS x by nibabel's affine; the tokens that hold it) or right,
    in a NIfTI stored RAS, x-mirrored (LAS), sagittal or rotated: preprocessed (volume.process_stack) and
    tokenized, the hemisphere latents' side coordinate (anatomical_positions with the shard's orientation) is
    negative for the left cube's tokens and positive for the right one's."""
    import nibabel as nib
    from test_nifti_audit import _headers
    from nvfm import dicom, volume
    from nvfm.tokenize import patchify_reference
    shape = (80, 90, 12)  # (i, j, k), 0.9 x 0.9 x 5 mm: several 16-voxel tokens across
    qform, sform = _headers()[header]
    img = nib.Nifti1Image(np.zeros(shape, np.float32), None)
    img.set_qform(qform, code=1 if qform is not None else 0)
    img.set_sform(sform, code=2 if sform is not None else 0)
    p = str(tmp_path / "m.nii.gz")
    nib.save(img, p)
    A = nib.load(p).affine
    x = (np.indices(shape).reshape(3, -1).T @ A[:3, :3].T + A[:3, 3])[:, 0].reshape(shape)
    head = np.zeros(shape, bool)
    head[4:76, 4:86, 1:11] = True
    side = {}
    for name, cube in (("left", x < np.percentile(x[head], 30)), ("right", x > np.percentile(x[head], 70))):
        v = np.where(head, 30.0, -1000.0).astype(np.float32)
        v[head & cube] = 1000.0
        nib.save(nib.Nifti1Image(v, None, header=img.header), p)
        out = volume.process_stack(dicom.nifti_stack(str(tmp_path), "m.nii.gz").check(3))
        bone = torch.from_numpy(np.ascontiguousarray(out["data"][1] & 15))
        tokens, coords, _ = patchify_reference([bone], [torch.from_numpy(out["mask"])])
        hot = ((tokens >= 8).float().mean(1) > 0.1).numpy()  # bone level 10 of 16 is 1000 HU, 5 is 30 HU
        right = llava.anatomical_positions(coords.numpy(), out["orientation"])[:, 0]
        assert hot.sum() >= 2 and (~hot).sum() >= 2, (name, hot.sum())
        side[name] = (bool((right[hot] < 0).all()), bool((right[hot] > 0).all()))
    assert side == {"left": (True, False), "right": (False, True)}, (header, side)


def test_a_resume_on_other_features_of_the_training_studies_is_refused(tmp_path, lm_dir):
    """A run resumed on a cache of the same encoder, precision and studies whose every token is negated (e.g.
    re-encoded from re-preprocessed shards) trained on without a word; a copy of its own cache elsewhere resumes."""
    import shutil
    from nvfm.features import FeatureCache, FeatureWriter
    fnd, feat = _synthetic_cohort(str(tmp_path))
    c = FeatureCache(feat)
    other = str(tmp_path / "feat_negated")
    with FeatureWriter(other, "random:test", c.dim) as w:
        for k in c.study_keys():
            w.add(k, [dict(e, emb=-e["emb"].astype(np.float32)) for e in c.study(k)])
    out = str(tmp_path / "run")
    args = ["--eval_split=none", "--batch_size=2"]
    r = _sh(_base(fnd, feat, lm_dir, out, *args, "--max_iters=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    _refused(_base(fnd, other, lm_dir, out, *args, "--max_iters=2", "--init_from=resume"),
             f"training features ({feat!r} -> {other!r}")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 1
    copy = str(tmp_path / "feat_copy")
    shutil.copytree(feat, copy)
    r = _sh(_base(fnd, copy, lm_dir, out, *args, "--max_iters=2", "--init_from=resume"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]


def test_cross_check_appends_a_finding_once_whatever_its_names():
    """An 'all' probe scores a finding's CT and MR names (venous_sinus_thrombosis, cerebral_venous_sinus_thrombosis)
    alike: both were appended, the report naming one thrombosis twice. By hand: once, the higher scored of the
    names called (the other below its own threshold is not a call)."""
    from nvfm.ontology import same_finding
    from nvfm.report_metrics import extract_diagnoses
    ct, mr = "venous_sinus_thrombosis", "cerebral_venous_sinus_thrombosis"
    assert same_finding(ct) == same_finding(mr)
    for scores, th, want in (({ct: 0.9, mr: 0.8}, 0.5, [ct]), ({ct: 0.7, mr: 0.8}, 0.5, [mr]),
                             ({ct: 0.9, mr: 0.8}, {ct: 0.95, mr: 0.5}, [mr])):
        found, missed = llava.cross_check(["Small old right occipital infarct."], scores, th)
        assert missed == want, (scores, th, missed)
        assert len(found) == 2 and [d for d, _ in extract_diagnoses(found[1])] == [same_finding(want[0])]
