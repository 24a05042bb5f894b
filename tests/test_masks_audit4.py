"""Audit 4 of the Vol-JEPA masking / loader / collapse monitors / configurator: each test failed on
the code before its fix, and checks against an independent computation (numpy brute force, hand
cases, scikit-learn) rather than the function against itself."""
import csv
import os

import numpy as np
import pytest
import torch

from nvfm.configurator import ConfigError, configure
from nvfm.loader import JepaBatches, synthetic_reader
from nvfm.monitor import effective_rank, relative_distance


def rank_numpy(x):
    """exp(entropy) of the normalised eigenvalues of the centred covariance, float64 (scale-free)."""
    x = np.asarray(x, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = (s / s.max()) ** 2
    p = p / p.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------- collapse monitors

@pytest.mark.parametrize("scale", [1e-20, 1e-17, 1.0, 1e19, 1e21])
def test_effective_rank_does_not_depend_on_the_features_scale(scale):
    """The spectrum was squared in float32 (overflow above ~1e19, underflow below ~1e-19) and divided by
    max(sum, 1e-30): features of scale 1e19 or 1e-17 read as rank ~1.0 / 1.4, a false collapse."""
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 8)) * np.array([1, 1, 1, 1, .5, .5, .1, .01])
    want = rank_numpy(x)
    assert 5 < want < 6
    assert effective_rank(torch.tensor(x * scale, dtype=torch.float32)) == pytest.approx(want, rel=1e-4)


def test_effective_rank_hand_cases_and_degenerate_inputs():
    # equal variance along k orthogonal directions: rank k
    x = np.zeros((4, 5))
    x[0, 0], x[1, 0], x[2, 1], x[3, 1] = 1, -1, 1, -1
    assert effective_rank(torch.tensor(x)) == pytest.approx(2.0, rel=1e-5)
    assert effective_rank(torch.ones(10, 4)) == 1.0               # no variance at all: one point
    assert np.isnan(effective_rank(torch.ones(1, 4)))             # 1 token: no covariance
    bad = torch.randn(10, 3)
    bad[2, 1] = float("nan")
    assert np.isnan(effective_rank(bad))


def test_effective_rank_subsamples_past_2_to_the_24_rows():
    """torch.linspace in float32 rounded the last of 4096 positions of 2^24 + 4 rows up to 2^24 + 4:
    IndexError. With float64 positions the rows are the evenly spaced ones numpy picks."""
    n = 2 ** 24 + 4
    x = torch.zeros(n, 1)
    keep = np.linspace(0, n - 1, 4096).astype(np.int64)
    x[torch.from_numpy(keep), 0] = torch.from_numpy(np.arange(4096) % 2).float()
    assert effective_rank(x) == pytest.approx(1.0)
    assert keep[-1] == n - 1


def test_relative_distance_refuses_mismatched_lists_and_shapes():
    """zip stopped at the shorter list (num over pairs, den over all of b) and (3, 1) - (3,) broadcast to
    (3, 3): a figure of mismatched tensors, silently (0.5 and 0.866 here)."""
    a, b = [torch.ones(3), torch.ones(2)], [torch.full((3,), 2.0)]
    with pytest.raises(ValueError, match="2 tensors against 1"):
        relative_distance(a, b)
    with pytest.raises(ValueError, match=r"tensor 0 has shape \(3, 1\) against \(3,\)"):
        relative_distance([torch.ones(3, 1)], [torch.full((3,), 2.0)])
    # the matched case by hand: ||(1,1,1,1,1) - (2,2,2,0,0)|| / ||(2,2,2,0,0)|| = sqrt(5 / 12)
    got = relative_distance(iter([torch.ones(3), torch.ones(2)]), iter([torch.full((3,), 2.0), torch.zeros(2)]))
    assert got == pytest.approx((5 / 12) ** 0.5)


def test_probe_set_scores_the_fully_annotated_columns_of_a_partly_annotated_labels_csv(tmp_path):
    """load_labels allows a diagnosis annotated for some studies only (a blank cell); ProbeSet read
    every column as a class and raised ValueError at construction (train_jepa --eval_interval stopped).
    Now the classes are the columns with 0/1 in every row; a partly annotated one is left out."""
    from nvfm.loader import write_synthetic_shards
    from nvfm.monitor import ProbeSet
    shards = write_synthetic_shards(str(tmp_path / "s"), n=12, seed=0, shape=(8, 48, 48))
    keys = sorted({v["study_key"] for v in ProbeSet(shards).reader.volumes})
    a = {k: i % 2 for i, k in enumerate(keys)}
    with open(tmp_path / "s" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "split", "a", "b"])
        w.writerows([k, "train", a[k], "" if i == 3 else (i // 2) % 2] for i, k in enumerate(keys))
    probes = ProbeSet(shards)
    assert probes.Y.shape == (12, 1) and probes.scores_studies
    assert probes.Y[:, 0].tolist() == [a[k] for k in probes.labelled]
    with pytest.raises(ValueError, match=r"labels\.csv:5: column 'b' must be 0 or 1"):
        ProbeSet(shards, token_task="b")  # a token task labels every token: it needs every study


# ----------------------------------------------------------------------------- the loader

@pytest.mark.parametrize("kw,msg", [
    (dict(seed=-1), "seed must be an integer >= 0"),           # was numpy's "expected non-negative integer" in a worker
    (dict(global_batch=0), "global batch must be an integer >= 1"),   # was "need at least one array" in a worker
    (dict(global_batch=-4, world_size=2), "global batch must be"),
    (dict(rank=1, world_size=1), r"rank 1 is not in \[0, 1\)"),  # was the next step's slots, silently
    (dict(world_size=0), "world size must be"),                # was ZeroDivisionError
])
def test_jepa_batches_refuse_a_stream_they_cannot_make(kw, msg):
    reader = synthetic_reader(2, shape=(8, 64, 64))
    args = dict(global_batch=2, rank=0, world_size=1, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        JepaBatches(reader, [0, 1], **args)


def test_a_rank_makes_the_slots_a_one_rank_run_makes_there():
    """Rank r of w makes slots r * B/w ... of the global batch: the same volumes as a 1-rank run's."""
    reader = synthetic_reader(4, shape=(8, 64, 64))
    one = JepaBatches(reader, [0, 1, 2, 3], 4, seed=3)[5]
    for r in range(2):
        part = JepaBatches(reader, [0, 1, 2, 3], 4, rank=r, world_size=2, seed=3)[5]
        assert part["volumes"].tolist() == one["volumes"][2 * r:2 * r + 2].tolist()


# ----------------------------------------------------------------------------- the configurator

def test_a_directory_given_as_a_config_file_is_one_config_error(tmp_path):
    """`python train_jepa.py /data/shards` (a folder given bare): IsADirectoryError escaped, not a
    ConfigError naming what was wrong."""
    with pytest.raises(ConfigError, match=r"cannot read it as a config file: Is a directory") as e:
        configure({"x": 1}, [str(tmp_path)], verbose=False)
    assert str(e.value).startswith(str(tmp_path))


@pytest.mark.parametrize("arg,default,want", [
    ("--v=1,2", (0.9, 0.95), (1.0, 2.0)),            # float items: ints become floats (were ints)
    ("--v=[1e3, 2]", [1, 2], [1000, 2]),              # int items: a whole float is an int
    ("--v=T1,FLAIR", ["T1"], ["T1", "FLAIR"]),        # str items: comma-separated text (was refused)
    ("--v=1,2", ("a", "b"), ("1", "2")),              # ... taken as typed, like a str setting
    ("--v=['a b', 'c']", ["x"], ["a b", "c"]),
    ("--v=true,no", (False,), (True, False)),
    ("--v=3,", (0, 1, 2), (3,)),
    ("--v=3", (0, 1, 2), (3,)),                        # one item (was refused: int 3 for a tuple)
    ("--v=", (0, 1, 2), ()),
    ("--v=1,'a'", (0, "a"), (1, "a")),                # mixed default items: kept as given
])
def test_list_settings_take_items_of_the_defaults_type(arg, default, want):
    g = {"v": default}
    configure(g, [arg], verbose=False)
    assert g["v"] == want and type(g["v"]) is type(want)
    assert [type(x) for x in g["v"]] == [type(x) for x in want]


@pytest.mark.parametrize("arg,default,msg", [
    ("--v=0.5,1", (0, 1, 2), r"--v item 1: expected int like the default 0, got float 0.5"),  # was kept: int(0.5)
    ("--v=1,maybe", (True,), r"--v item 2: expected a bool"),
    ("--v=5", (0, "a"), r"expected tuple .* got int 5 \(a list is given comma-separated: --v=a,b; one item: --v=a,\)"),
])
def test_list_settings_refuse_items_of_another_type(arg, default, msg):
    with pytest.raises(ConfigError, match=msg):
        configure({"v": default}, [arg], verbose=False)


def test_a_config_file_list_is_checked_item_by_item(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("seeds = (0, 1.5)\n")
    with pytest.raises(ConfigError, match=r"c\.py: seeds item 2: expected int") as e:
        configure({"seeds": (0, 1, 2)}, [str(cfg)], verbose=False)
    assert "comma-separated" not in str(e.value)  # a file writes Python, not --key=a,b
    assert os.path.basename(str(cfg)) in str(e.value)


# ----------------------------------------------------------------------------- the masks

@pytest.mark.parametrize("bad,named", [
    (dict(n_blocks=(4, 2)), "n_blocks"),        # was numpy's "low >= high" at a worker's first draw
    (dict(n_blocks=(0, 0)), "n_blocks"),        # was block_masks' "tokens but no block" in a worker
    (dict(n_blocks=(2.5, 3)), "n_blocks"),      # was accepted
    (dict(n_blocks=(2,)), "n_blocks"),
    (dict(aspect=0), "aspect"),                 # was an OverflowError in a worker
    (dict(aspect=float("nan")), "aspect"),
    (dict(ct_window_probs=(1.2, -0.1, -0.1)), "ct_window_probs"),   # sums to 1: was accepted
])
def test_mask_config_refuses_block_settings_a_worker_would_fail_on(bad, named):
    from nvfm import masks as M
    with pytest.raises(ValueError, match=f"mask config: {named} "):
        M.MaskConfig(**bad)


def test_one_cubic_block_is_a_chebyshev_ball_around_a_foreground_token():
    """n_blocks (1, 1), aspect 1 (the edge of the accepted range), no dropout: config A's target is the
    n - round(0.25 n) tokens nearest one foreground token in the max norm, so some token has every
    target within radius r and every context token at >= r (brute force over the candidate centres)."""
    from nvfm import masks as M
    cfg = M.MaskConfig(n_blocks=(1, 1), aspect=1.0, drop=0.0)
    grid = np.argwhere(np.ones((5, 6, 7), bool)).astype(np.int32)
    n = len(grid)
    for seed in range(5):
        ctx, tgt = M.split_context_target(grid, 0.25, True, np.random.default_rng(seed), cfg)
        assert len(ctx) == round(0.25 * n) and len(tgt) == n - len(ctx)
        assert not set(ctx.tolist()) & set(tgt.tolist())
        ok = False
        for c in grid:
            d = np.abs(grid - c).max(1)
            ok |= d[tgt].max() <= d[ctx].min()
        assert ok
