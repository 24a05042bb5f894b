"""Audit 4 of the shard format (nvfm/data.py) and the ViT (nvfm/model.py), against arrays written by hand,
direct reads of the files and hand counts: a shard set rewritten under an open reader, a merge from a source
cut short, values-block records that disagree with their bytes, FLOPs of an MLP whose ratio is not a whole
hidden size, predictor and encoder inputs that were accepted silently or failed with a raw traceback."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nvfm import data as D
from nvfm import model as Mdl
from nvfm.tokenize import token_foreground


def _volume(rng, modality, shape):
    """(data (C, D, H, W) uint8, mask (D, H, W) uint8, token mask) of an ellipsoid head of random voxels."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    mask = ((z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1).astype(np.uint8)
    data = rng.integers(0, 256, ((2 if modality == "CT" else 1),) + shape, dtype=np.uint8)
    return data, mask, token_foreground(torch.from_numpy(mask)).numpy()


def _study(rng, key, split="train", shapes=(("CT", (10, 61, 75)), ("MR", (16, 96, 90))), values=None):
    vols = []
    for j, (mod, shape) in enumerate(shapes):
        data, mask, tm = _volume(rng, mod, shape)
        rec = dict(volume_id=f"{key}-v{j}", study_key=key, series_key=f"v{j}", split=split, modality=mod,
                   family="CT" if mod == "CT" else "T2", shape=list(shape), channels=data.shape[0],
                   spacing=[4.0, 1.0, 1.0], token_grid=list(tm.shape), n_tokens=int(tm.sum()),
                   token_mask=D.pack_mask(tm))
        vols.append((rec, data, mask) + ((values,) if values is not None else ()))
    return key, vols


def _add(out, tag, studies):
    w = D.PartWriter(out, tag, fsync=False)
    for key, vols in studies:
        w.add_study(key, vols, [])
    w.close()
    D.merge(out, D.read_done(out), {"salt_id": "x"}, fsync=False)
    D.remove_parts(out)


def _written(studies):
    return {rec["volume_id"]: (data, mask) for _, vols in studies for rec, data, mask, *_ in vols}


# ---------------------------------------------------------------------------------------
# a shard set written again while a reader has it open

def test_a_reader_opened_before_a_merge_refuses_the_rewritten_shards(tmp_path):
    """Shards are mapped lazily (in each data-loader worker). When preprocess.py merged new studies into
    the set after a reader had read the manifest, the reader mapped the new files and read its old offsets
    in them: 4 of 8 volumes came back as other volumes' bytes, silently. Now mapping a shard file that is
    not the one the manifest was read with is a one-line ValueError naming it; a shard mapped before the
    merge keeps reading the old file as written, and a reader opened after it reads every volume as written."""
    out = str(tmp_path)
    rng = np.random.default_rng(0)
    old = [_study(rng, f"k{s:02d}", ["train", "val"][s % 2]) for s in range(4)]
    _add(out, "a", old)
    r = D.ShardReader(out)
    want = _written(old)
    first = next(i for i, v in enumerate(r.volumes) if v["shard"] == "train_0.bin")
    np.testing.assert_array_equal(r.volume(first)[0], want[r.volumes[first]["volume_id"]][0])  # maps train_0.bin
    new = [_study(rng, "a0"), _study(rng, "k015", "val")]  # sort before / among the old ones: offsets move
    _add(out, "b", new)
    for i, v in enumerate(r.volumes):
        if v["shard"] == "train_0.bin":  # mapped before the merge: the old file, read as written
            data, mask = r.volume(i)
            np.testing.assert_array_equal(data, want[v["volume_id"]][0])
            np.testing.assert_array_equal(mask, want[v["volume_id"]][1])
        else:
            with pytest.raises(ValueError, match=rf"{os.path.join(out, v['shard'])} was replaced or changed "
                                                 r"after .*manifest.json was read") as e:
                r.volume(i)
            assert "\n" not in str(e.value)
    fresh = D.ShardReader(out)
    want.update(_written(new))
    assert len(fresh) == 12
    for i, v in enumerate(fresh.volumes):  # a direct read of the file at the record's offset
        C, (d, h, w) = v["channels"], v["shape"]
        raw = np.fromfile(os.path.join(out, v["shard"]), np.uint8, count=(C + 1) * d * h * w, offset=v["offset"])
        np.testing.assert_array_equal(raw[:C * d * h * w].reshape(C, d, h, w), want[v["volume_id"]][0])
        np.testing.assert_array_equal(fresh.volume(i)[0], want[v["volume_id"]][0])


def test_merge_refuses_a_source_cut_short(tmp_path):
    """A rerun that adds studies to a finished output copies the old volumes from the old shards. With a
    shard cut short (full disk, partial copy) the merge copied fewer bytes than the record's nbytes without
    a word, the manifest recorded the short file's size (so the set opened), and the volumes after the cut
    in the new shard were read shifted: silently other bytes. Now the merge refuses before writing anything,
    naming the file and the volume, and leaves the old manifest in place."""
    out = str(tmp_path)
    rng = np.random.default_rng(1)
    old = [_study(rng, f"k{s:02d}") for s in range(3)]
    _add(out, "a", old)
    man_before = open(os.path.join(out, "manifest.json")).read()
    last = max(json.loads(man_before)["volumes"], key=lambda v: v["offset"])
    path = os.path.join(out, last["shard"])
    os.truncate(path, os.path.getsize(path) - 1000)  # the last volume loses its last 1000 bytes
    w = D.PartWriter(out, "b", fsync=False)
    for key, vols in [_study(rng, "z0"), _study(rng, "z1")]:  # sorted after the cut volume
        w.add_study(key, vols, [])
    w.close()
    end = last["offset"] + last["nbytes"]
    with pytest.raises(ValueError, match=rf"{path} is {end - 1000} bytes, but volume {last['volume_id']} ends at "
                                         rf"byte {end} of it \(cut short") as e:
        D.merge(out, D.read_done(out), {"salt_id": "x"}, fsync=False)
    assert "\n" not in str(e.value)
    assert open(os.path.join(out, "manifest.json")).read() == man_before
    assert not os.path.exists(os.path.join(out, D.NEXT_MANIFEST))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------
# values blocks (format 2) whose records disagree with their bytes

@pytest.fixture(scope="module")
def values_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("values"))
    rng = np.random.default_rng(5)
    hu = rng.integers(-1100, 2500, (9, 33, 47)).astype(np.int16)
    _add(out, "a", [_study(rng, "z", shapes=(("CT", hu.shape),), values=hu)])
    return out, hu


def _values_at_zero(v, path):  # the intensities read from the window bytes
    v["values_at"] = 0


def _values_at_off(v, path):  # 8 bytes further: the block ran past the volume
    v["values_at"] += 8


def _unknown_kind(v, path):  # a kind this version does not write (KeyError)
    v["values"] = "float16"


def _cut_short(v, path):  # the shard cut inside the values block, the manifest without shard sizes
    os.truncate(path, os.path.getsize(path) - 100)
    return True


def _negative_offset(v, path):
    v["offset"] = -64


@pytest.mark.parametrize("edit, reason", [
    (_values_at_zero, r"manifest.json: volume 0 \(z-v0\): its values block is at 0, its data and mask put it at 41880"),
    (_values_at_off, r"manifest.json: volume 0 \(z-v0\): its values block is at 41888, its data and mask put it at 41880"),
    (_unknown_kind, r"manifest.json: volume 0 \(z-v0\): values block of kind 'float16'; this nvfm reads int16, float32"),
    (_cut_short, r"train_0.bin: volume 0 \(z-v0\): its bytes end at 69798, past the file's end \(69698 bytes"),
    (_negative_offset, r"manifest.json: volume 0 \(z-v0\): offset -64 is not a byte position"),
])
def test_a_values_record_that_disagrees_with_its_bytes_is_a_clear_error(values_set, tmp_path, edit, reason):
    """values() read the block at the record's values_at without a check: values_at 0 gave the window bytes
    as HU (and window_float turned them into a float window), silently; a values_at off by 8, or a shard cut
    inside the block, was numpy's 'cannot reshape'; an unknown kind a KeyError; a negative offset a reshape
    error. Now each is a one-line ValueError naming the file and the volume, from values() and window_float().
    The intact set reads back the int16 block as written (2 channels + mask of 9 x 33 x 47 voxels: 41877 bytes,
    padded to the multiple of 8 41880; + 2 bytes per voxel = 69798)."""
    src, hu = values_set
    r = D.ShardReader(src)
    np.testing.assert_array_equal(r.values(0), hu)
    assert (r.volumes[0]["values_at"], r.volumes[0]["nbytes"]) == (41880, 69798) == (3 * hu.size + 3, 3 * hu.size + 3 + 2 * hu.size)
    root = str(tmp_path / "sh")
    shutil.copytree(src, root)
    man = json.load(open(os.path.join(root, "manifest.json")))
    if edit(man["volumes"][0], os.path.join(root, "train_0.bin")):
        del man["shards"]
    open(os.path.join(root, "manifest.json"), "w").write(json.dumps(man))
    r = D.ShardReader(root)
    for read in (lambda: r.values(0), lambda: r.window_float(0, "brain")):
        with pytest.raises(ValueError, match=reason) as e:
            read()
        assert "\n" not in str(e.value) and "rerun preprocess.py" in str(e.value)


# ---------------------------------------------------------------------------------------
# FLOPs, predictor and encoder inputs

def test_transformer_flops_use_the_mlp_width_the_block_has():
    """A block's MLP is int(dim * mlp_ratio) wide (the ratio of a configless official file is hidden / dim);
    transformer_flops counted dim * mlp_ratio: for dim 224 and ratio 1.03, 230.72 columns where fc1 has 230.
    By hand, one layer, 5 tokens, one sequence: qkv 2*5*224*672, proj 2*5*224*224, fc1 and fc2 2*5*224*230
    each, Q K^T and P V 2*5*5*224 each. And against torch's FlopCounterMode on a real block."""
    from torch.utils.flop_counter import FlopCounterMode
    hand = 2 * 5 * 224 * 672 + 2 * 5 * 224 * 224 + 2 * (2 * 5 * 224 * 230) + 2 * (2 * 5 * 5 * 224)
    assert Mdl.transformer_flops(5, [5], 224, 1, 1.03) == hand
    t = Mdl.Transformer(224, 1, 4, 1.03)
    assert t.blocks[0].fc1.out_features == 230
    t.blocks[0].attn_impl = "reference"
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        t(torch.randn(5, 224), torch.tensor([0, 5], dtype=torch.int32), 5)
    assert fc.get_total_flops() == hand


@pytest.mark.parametrize("dim", [30, 24])
def test_a_predictor_with_no_room_beside_the_position_code_is_refused(dim):
    """The predictor embeds context latents and the mask token into dim - pos_dim channels beside the position
    code. train_jepa.py --predictor_dim=30 (pos_dim 30) built a predictor whose every token was its position
    code alone: its predictions ignored the context, silently; --predictor_dim=24 failed in torch with
    'negative dimension'. Now both are a ValueError naming pos_dim and dim, as the Encoder's."""
    with pytest.raises(ValueError, match=rf"pos_dim 30 must be in \(0, dim={dim}\)"):
        Mdl.Predictor(Mdl.PredictorConfig(enc_dim=48, dim=dim, depth=1, heads=2, pos_dim=30))
    Mdl.Predictor(Mdl.PredictorConfig(enc_dim=48, dim=36, depth=1, heads=2, pos_dim=30))  # 6 channels: fine


def test_encoder_coords_of_another_width_are_refused():
    """Encoder.forward's message promised coords (N, 3) but checked only N: (N, 2) coords failed inside the
    position code with torch's reshape error. Now the same one-line ValueError as for x."""
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=1, heads=2, pos_dim=12))
    x = torch.randn(4, 1024)
    with pytest.raises(ValueError, match=r"coords \(4, 2\) do not match"):
        enc(x, torch.zeros(4, 2, dtype=torch.long), torch.tensor([0, 4], dtype=torch.int32), 4)
    assert enc(x, torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 4], dtype=torch.int32), 4).shape == (4, 48)
