"""train_probe.py settings that crashed mid-run or trained on nothing, a "transfer" that trained on its
target modality, and reruns into one --out whose log.txt lines could not be told apart. Checked against
the labels written here and sklearn."""
import re

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from test_probe_audit import COMMON, _cohort, _run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("args, flag, rule", [
    (["--eval_interval=0"], "--eval_interval=0", "eval_interval must be at least 1"),         # ZeroDivisionError
    (["--steps=-1"], "--steps=-1", "steps must be at least 0"),                                # load_state_dict(None)
    (["--batch_studies=0"], "--batch_studies=0", "batch_studies must be at least 1"),          # torch.cat([])
    (["--cv_folds=1"], "--cv_folds=1", "cv_folds must be 0 (the split protocol) or at least 2"),   # empty training part
    (["--cv_folds=-2"], "--cv_folds=-2", "cv_folds must be 0"),                                # ran the split protocol
    (["--cv_folds=2", "--test_fraction=1.5"], "--test_fraction=1.5", "test_fraction must be in (0, 1)"),  # IndexError
    (["--task=age", "--cv_folds=2", "--age_bins=0"], "--age_bins=0", "age_bins must be at least 1"),      # IndexError
    (["--max_pos_weight=0"], "--max_pos_weight=0.0", "max_pos_weight must be above 0"),        # positives weigh 0
    (["--hidden=0"], "--hidden=0", "hidden must be at least 1"),                               # a constant probe
    (["--cv_folds=2", "--cv_grid=hidden=8,0"], "--cv_grid: 'hidden=8,0'", "hidden must be at least 1"),
])
def test_out_of_range_settings_are_one_line_errors_before_anything_is_written(tmp_path, args, flag, rule):
    """Each of these crashed with a traceback after --out was made (or trained silently: --max_pos_weight=0
    clipped every n_neg / n_pos to 0, so a positive study added nothing to the loss; --hidden=0 gave every
    study the same logit; --cv_folds=-2 ran the split protocol, not CV)."""
    _cohort(tmp_path)
    out = tmp_path / "p"
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={out}", *COMMON, *args], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"train_probe.py: error: {flag}: {rule}"), r.stderr
    assert not out.exists()


def test_a_transfer_probe_never_trains_on_its_target_modality(tmp_path):
    """--modality=all --transfer_to=MR trained and chose its checkpoint on the MR train and val studies too (10 of
    its 30), and evaluate.py then reported its MR test figures as all -> MR transfer; --modality=MR --transfer_to=MR
    was no transfer at all. Both are refused; CT -> MR trains on no MR study (by the labels written here)."""
    rows = _cohort(tmp_path, mr=set(range(0, 40, 3)))
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", *COMMON, "--transfer_to=MR"]
    for mod in ("all", "MR"):
        r = _run("train_probe.py", [*common, f"--out={tmp_path / mod}", f"--modality={mod}"], tmp_path)
        assert r.returncode == 1 and not (tmp_path / mod).exists(), r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [
            f"train_probe.py: error: --transfer_to=MR with --modality={mod}: the probe would train on MR studies too; "
            "name the other modality (--modality=CT)"]
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'ct'}", "--modality=CT"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(tmp_path / "ct" / "probe.pt", weights_only=True)
    want = {k for k, mod, split, _ in rows if mod == "CT" and split in ("train", "val")}
    assert set(ck["seen_keys"]) == want and (ck["modality"], ck["eval_modality"]) == ("CT", "MR")


def test_a_rerun_into_the_same_out_logs_under_its_own_header(tmp_path):
    """A rerun appended its lines to the first run's log.txt with nothing between them (no config, no time):
    two 'selection set' AUROCs, and nothing to say which run wrote probe.pt. Each run now starts with a header
    holding its settings; the last run's selection AUROC is the one of probe.pt's selection scores (sklearn)."""
    _cohort(tmp_path)
    args = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", f"--out={tmp_path / 'p'}", *COMMON]
    for seed in (0, 1):
        r = _run("train_probe.py", [*args, f"--seed={seed}"], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    runs = re.split(r"^== train_probe\.py run ", (tmp_path / "p" / "log.txt").read_text(), flags=re.M)
    assert runs[0] == "" and len(runs) == 3 and ["'seed': 0" in r for r in runs[1:]] == [True, False]
    assert "'seed': 1" in runs[2]
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    y, s = ck["sel_labels"].numpy()[:, 0], ck["sel_logits"].numpy()[:, 0]
    au = float(re.search(r"^selection set \(\d+ studies\): macro AUROC (\S+)", runs[2], re.M).group(1))
    assert au == pytest.approx(roc_auc_score(y, s), abs=1e-12) and np.isfinite(au)
