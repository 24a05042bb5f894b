"""Vol-JEPA data loading: a Dataset over shard volumes whose items are whole masked batches.

Masks are made in the DataLoader workers (nvfm/masks.py), never in the training step. Every
random choice for a sample comes from a numpy Generator seeded by (seed, step, slot), where
slot = rank * local_batch + j is the sample's place in the global batch. So:
  - different ranks and different data-loader workers never share a random stream (the
    reference code seeds every worker the same);
  - the stream does not depend on the number of workers or ranks: a 2-rank run sees the same
    global batch as a 1-rank run with the same global batch size, and `resume` at step s
    simply restarts the stream at s (bit-for-bit).
The volume visited at global sample position p = step * global_batch + slot is
perm_e[p mod n] with perm_e a permutation of the training volumes seeded by (seed, 7, e),
e = p // n: epochs without replacement, any batch size, any number of volumes. (That key is also
the sample stream of step 7, slot e: one sample's draws repeat the start of a permutation's, which
correlates nothing that matters; changing the key would change every run's data order.)

Also here: `ArrayReader`, an in-memory reader with the ShardReader interface (DESIGN.md
section 2) for tests and benchmarks, and `synthetic_volume` to fill it.
"""
import numpy as np
import torch

from nvfm import masks as M



# ---------------------------------------------------------------------------------------
# in-memory stand-in for nvfm.data.ShardReader

class ArrayReader:
    """ShardReader interface over in-memory arrays.

    items: list of (record dict with at least volume_id, modality ("CT"|"MR"), family,
    split; data uint8 (C, D, H, W); mask uint8 (D, H, W)). CT data has 2 channels:
    [0] brain, [1] blood (high nibble) | bone (low nibble), as in the shards."""

    def __init__(self, items):
        self.volumes, self._data, self._tmask = [], [], {}
        for rec, data, mask in items:
            rec = dict(rec)
            rec.setdefault("shape", list(mask.shape))
            rec.setdefault("channels", data.shape[0])
            self.volumes.append(rec)
            self._data.append((np.ascontiguousarray(data, dtype=np.uint8), np.ascontiguousarray(mask, dtype=np.uint8)))

    def __len__(self):
        return len(self.volumes)

    def volume(self, i):
        return self._data[i]

    def window(self, i, name):
        from nvfm.data import expand_window
        return expand_window(self._data[i][0], self.volumes[i]["modality"], name)

    def token_mask(self, i):
        """(gz, gy, gx) bool token foreground (tokenize's default rule, as preprocess stores it)."""
        if i not in self._tmask:
            from nvfm.tokenize import token_foreground
            self._tmask[i] = token_foreground(torch.from_numpy(self._data[i][1])).numpy()
        return self._tmask[i]


def synthetic_volume(rng, modality="MR", shape=(36, 160, 160), volume_id="synthetic-0"):
    """A head-like test volume: ellipsoid foreground with smooth structure and noise.

    Returns (record, data uint8 (C, D, H, W), mask uint8 (D, H, W))."""
    D, H, W = shape
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s, dtype=np.float32) for s in shape), indexing="ij")
    c = rng.uniform(-0.1, 0.1, 3).astype(np.float32)
    r = (z - c[0]) ** 2 / 0.8 + (y - c[1]) ** 2 / 0.75 + (x - c[2]) ** 2 / 0.65
    mask = (r < 1).astype(np.uint8)
    f = rng.uniform(2, 6, 3).astype(np.float32)
    img = 0.5 + 0.25 * np.sin(f[0] * z + 3 * r) * np.cos(f[1] * y) + 0.15 * np.cos(f[2] * x * y * 3)
    img = img + rng.normal(0, 0.03, shape).astype(np.float32)
    img = np.clip(img * mask, 0, 1)
    brain = (img * 255).astype(np.uint8)
    if modality == "MR":
        data = brain[None]
        family = ["T1", "T2", "FLAIR"][int(rng.integers(3))]
    else:
        blood = (np.clip(img * 1.3 - 0.1, 0, 1) * 15).astype(np.uint8)
        bone = (np.clip(r * mask, 0, 1) ** 4 * 15).astype(np.uint8)
        data = np.stack([brain, (blood << 4) | bone])
        family = "CT"
    rec = dict(volume_id=volume_id, study_key=f"study-{volume_id}", series_key=volume_id, split="train",
               modality=modality, family=family, shape=list(shape), channels=data.shape[0])
    return rec, data, mask


def synthetic_reader(n=6, seed=0, shape=(24, 128, 128)):
    """An ArrayReader with n synthetic volumes alternating MR / CT."""
    rng = np.random.default_rng(seed)
    return ArrayReader([synthetic_volume(rng, "MR" if i % 2 == 0 else "CT", shape, f"synthetic-{i}")
                        for i in range(n)])


# ---------------------------------------------------------------------------------------
# the training stream

class JepaBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's share of global batch `step`, masked and packed
    (nvfm.masks.collate). Use with DataLoader(batch_size=None, sampler=range(start, steps)).

    reader: ShardReader-like; indices: the volumes to train on (e.g. split == "train");
    global_batch = local_batch * world_size; rank in [0, world_size)."""

    def __init__(self, reader, indices, global_batch, rank=0, world_size=1, seed=0, mask_config=None):
        # each of these failed late or not at all: a global batch of 0 (or < 0) packed an empty batch in a
        # data-loader worker (numpy "need at least one array"), a negative seed stopped the worker's numpy
        # stream ("expected non-negative integer"), and a rank >= world_size made the next step's slots
        # (the same volumes and masks as that step's other ranks), silently
        if int(world_size) != world_size or world_size < 1:
            raise ValueError(f"world size must be an integer >= 1, got {world_size}")
        if int(global_batch) != global_batch or global_batch < 1:
            raise ValueError(f"global batch must be an integer >= 1 (volumes per step), got {global_batch}")
        if int(rank) != rank or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}) (world size {world_size})")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an integer >= 0 (it seeds numpy's streams), got {seed}")
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        self.reader, self.indices = reader, np.asarray(indices, np.int64)
        if len(self.indices) == 0:
            raise ValueError("no training volumes")
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.local_batch = global_batch // world_size
        self.cfg = mask_config or M.MaskConfig()
        self._perm = {}

    def __len__(self):
        return 1 << 40  # an endless stream; the sampler says which steps to make

    def volume_at(self, position):
        """Volume index visited at global sample position p (epochs without replacement)."""
        epoch, j = divmod(int(position), len(self.indices))
        if epoch not in self._perm:
            if len(self._perm) > 4:
                self._perm.clear()
            self._perm[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.indices))
        return int(self.indices[self._perm[epoch][j]])

    def sample(self, step, slot):
        """The sample at `slot` of global batch `step` (any rank can make any slot)."""
        rng = np.random.default_rng([self.seed, int(step), int(slot)])
        vol = self.volume_at(step * self.global_batch + slot)
        return M.sample_volume(self.reader, vol, rng, self.cfg, config_multi=(slot % 2 == 0))

    def __getitem__(self, step):
        first = self.rank * self.local_batch
        return M.collate([self.sample(step, first + j) for j in range(self.local_batch)])


def train_indices(reader, split="train", min_tokens=8, max_patches=None, warn=None):
    """Indices of the volumes of a split with at least min_tokens foreground tokens.

    With max_patches (the training crop, tokens per axis), a volume that no crop can serve (fewer than
    2 foreground tokens, or none of nvfm.masks.crop_box_dense's placements holds 2) is left out too,
    and warn(line) is called with one line naming it by shard index and volume_id (salted keys);
    sample_volume would raise on it inside a data-loader worker and stop the run."""
    out = []
    for i, v in enumerate(reader.volumes):
        if v.get("split", "train") != split:
            continue
        n = v.get("n_tokens")
        if n is None:
            n = int(M.token_mask_of(reader, i).sum())
        if n < min_tokens:
            continue
        if max_patches is not None:
            reason = None
            try:  # a record that disagrees with its bytes (ShardReader's checks) would stop a loader worker
                tmask = _token_mask_uncached(reader, i)
            except ValueError as e:
                reason = str(e)
            else:
                if n < 2:
                    reason = f"{n} foreground tokens, a context/target split needs 2"
                elif M.crop_box_dense(tmask, max_patches, np.random.default_rng(0)) is None:
                    reason = f"no crop of <= {max_patches} tokens per axis holds 2 of its {n} foreground tokens"
            if reason:
                if warn is not None:
                    warn(f"warning: volume {i} ({v.get('volume_id')}) left out of training: {reason}")
                continue
        out.append(i)
    return out


def _token_mask_uncached(reader, i):
    """Volume i's token mask, decoded from the manifest record without filling ShardReader's cache (a
    check of every volume at start would otherwise hold every mask in memory for the whole run), after
    ShardReader's record checks (ValueError naming the file); no shard is mapped before the workers start."""
    if hasattr(reader, "decode_token_mask"):
        reader.check_bytes(i)
        return reader.decode_token_mask(i)
    return M.token_mask_of(reader, i)


def make_loader(dataset, start_step, max_steps, num_workers=2, pin_memory=False):
    """DataLoader over steps [start_step, max_steps) of a JepaBatches; workers make the masks."""
    # the workers' base seed comes from a private generator: drawn from the global torch RNG, it left a
    # resumed run's RNG one draw ahead of the uninterrupted run's (the batches use numpy streams only)
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, max_steps), num_workers=num_workers,
        pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0))


def write_shards(out_dir, items, tag="synthetic"):
    """Write (record, data, mask) items (synthetic_volume's output) as a real shard set (nvfm.data
    layout), one study per volume. Returns out_dir."""
    from nvfm import data as D
    from nvfm.tokenize import token_foreground
    w = D.PartWriter(out_dir, tag, fsync=False)
    for rec, data, mask in items:
        tm = token_foreground(torch.from_numpy(mask)).numpy()
        rec = dict(rec, token_grid=list(tm.shape), n_tokens=int(tm.sum()), token_mask=D.pack_mask(tm),
                   spacing=[4, 1, 1])
        w.add_study(rec["study_key"], [(rec, data, mask)], [])
    w.close()
    D.merge(out_dir, D.read_done(out_dir), {"salt_id": tag, "failures": [], "summary": {}})
    D.remove_parts(out_dir)
    return out_dir


def write_synthetic_shards(out_dir, n=8, seed=0, shape=(24, 128, 128)):
    """Write n synthetic volumes (alternating MR / CT) as a real shard set: for tests, benchmarks
    and a data-free smoke run of train_jepa.py. Returns out_dir."""
    rng = np.random.default_rng(seed)
    return write_shards(out_dir, (synthetic_volume(rng, "MR" if i % 2 == 0 else "CT", shape, f"synthetic-{i}")
                                  for i in range(n)))


# ---------------------------------------------------------------------------------------
# a positive control for self-supervised learning

def control_volume(rng, label, amp=0.1, noise=0.08, shape=(32, 128, 128), volume_id="control-0"):
    """An MR-like volume whose every foreground voxel carries a weak in-plane grating, along x
    (label 0) or along y (label 1), with a period of 8 voxels and a random phase, under noise.

    The orientation is one latent per volume: a token's position says nothing about it, a single
    token shows it faintly (a linear probe on a random-init encoder's token features scores
    AUROC ~0.67 at amp 0.1), and the other tokens of the volume show it plainly. A pretext task
    that predicts masked tokens from their context can learn it, one that uses only positions
    cannot. Returns (record, data uint8 (1, D, H, W), mask uint8 (D, H, W))."""
    z, y, x = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    centre = (np.array(shape) - 1) / 2 + rng.uniform(-3, 3, 3) * np.array([0.25, 1, 1])
    r = sum(((c - m) / (f * s)) ** 2 for c, m, f, s in zip((z, y, x), centre, (0.45, 0.42, 0.38), shape))
    mask = (r < 1).astype(np.uint8)
    grating = np.sin(2 * np.pi * (y if label else x) / 8 + rng.uniform(0, 2 * np.pi))
    img = 0.45 + 0.12 * np.cos(2.5 * np.pi * np.sqrt(r)) + amp * grating + rng.normal(0, noise, shape)
    data = (np.clip(img * mask, 0, 1) * 255).round().astype(np.uint8)[None]
    rec = dict(volume_id=volume_id, study_key=f"study-{volume_id}", series_key=volume_id, split="train",
               modality="MR", family="T1", shape=list(shape), channels=1)
    return rec, data, mask


def write_control_shards(out_dir, n=96, seed=0, amp=0.1, noise=0.08, shape=(32, 128, 128)):
    """n control_volume's as a shard set, labels alternating, the first 2/3 'train', the rest
    'val' and 'test'; SHARDS/labels.csv has each study's label (column 'grating_y'). Returns out_dir."""
    import os

    from nvfm.data import write_atomic
    rng = np.random.default_rng(seed)
    items, rows = [], ["study_key,split,grating_y"]
    for i in range(n):
        label = i % 2
        rec, data, mask = control_volume(rng, label, amp, noise, shape, f"control-{i}")
        rec["split"] = "train" if i < 2 * n // 3 else ("val" if i < 5 * n // 6 else "test")
        items.append((rec, data, mask))
        rows.append(f"{rec['study_key']},{rec['split']},{label}")
    write_shards(out_dir, items, tag="control")
    write_atomic(os.path.join(out_dir, "labels.csv"), "\n".join(rows) + "\n")  # whole or absent
    return out_dir
