"""Input pipeline: real DALI (CPU) and the torch fallback on real shards."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from zoome_dist.data.manifest import load_manifest
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.pipeline import LOADERS, Augment, make_loader
from zoome_dist.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

NO_AUG = Augment(zoom=(1.0, 1.0), rotate=0.0, flip=0.0)


def collect(shards, folds, **kw):
    it, steps = make_loader(shards, folds, num_threads=1, **kw)
    batches = list(it)
    return batches, steps


def unnormalize(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised → [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD)[None, :, None, None]
    return img * std + mean


def pattern_shards(root: Path, pattern: np.ndarray, n: int = 48) -> Path:
    """``n`` copies of one RGB test pattern, as shards of 2 folds (one patient per image; kept as copies)."""
    img_dir = root / "img"
    img_dir.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(pattern).save(img_dir / f"P_{i:04d}.jpg", quality=98)
        rows.append({"image_name": f"P_{i:04d}", "patient_id": f"Q{i}", "sex": "male", "age_approx": 50,
                     "anatom_site_general_challenge": "torso", "target": i % 2})
    pd.DataFrame(rows).to_csv(root / "train.csv", index=False)
    build(root / "train.csv", img_dir, root / "shards",
          BuildOptions(folds=2, max_side=0, samples_per_shard=16, dedup=False), progress=False)
    return root / "shards"


@pytest.mark.parametrize("loader", LOADERS)
def test_eval_sees_each_sample_exactly_once_over_two_ranks(shards_dir, loader):
    folds = pd.read_csv(shards_dir / "folds.csv")
    expect = sorted(folds[folds["fold"] == 1]["sample_id"])
    it0, _ = make_loader(shards_dir, [1], train=False, batch_size=5, image_size=32, rank=0, world_size=2,
                         loader=loader, num_threads=1)
    it1, _ = make_loader(shards_dir, [1], train=False, batch_size=5, image_size=32, rank=1, world_size=2,
                         loader=loader, num_threads=1)
    for epoch in range(2):
        seen = [s for it in (it0, it1) for b in it for s in b[3].tolist()]
        assert sorted(seen) == expect, f"epoch {epoch}: duplicates or missing samples"


@pytest.mark.parametrize("loader", LOADERS)
def test_train_steps_equal_across_ranks(shards_dir, loader):
    counts = []
    for rank in range(2):
        it, steps = make_loader(shards_dir, [0, 2], train=True, batch_size=7, image_size=32, rank=rank,
                                world_size=2, loader=loader, num_threads=1)
        per_epoch = [sum(1 for _ in it) for _ in range(2)]
        assert per_epoch == [steps, steps]
        counts.append(steps)
    samples = sum(f["samples"] for f in load_manifest(shards_dir)["folds"] if f["fold"] in (0, 2))
    assert counts[0] == counts[1] and counts[0] >= (samples // 2 - 7) // 7


@pytest.mark.parametrize("loader", LOADERS)
def test_meta_and_labels_aligned_with_keys(synth_data, shards_dir, loader):
    csv = pd.read_csv(synth_data / "train.csv", keep_default_na=False, dtype=str).set_index("image_name")
    folds = pd.read_csv(shards_dir / "folds.csv").set_index("sample_id")
    enc = MetadataEncoding.from_dict(load_manifest(shards_dir)["metadata_encoding"])
    batches, _ = collect(shards_dir, [0, 1, 2], train=True, batch_size=8, image_size=32, loader=loader)
    n = 0
    for image, meta, label, sid in batches:
        assert image.shape[1:] == (3, 32, 32) and image.dtype == torch.float32
        for m, y, s in zip(meta, label.tolist(), sid.tolist()):
            row = csv.loc[folds.loc[s, "image_name"]]
            assert y == int(row["target"])
            np.testing.assert_array_equal(m.numpy(), enc.encode(row["age_approx"], row["sex"],
                                                                row["anatom_site_general_challenge"]))
            n += 1
    assert n >= len(folds) - 8


def test_fallback_matches_dali(shards_dir):
    if "dali" not in LOADERS:
        pytest.skip("DALI not installed")
    out = {}
    for loader in ("dali", "torch"):
        batches, steps = collect(shards_dir, [2], train=False, batch_size=6, image_size=48, loader=loader)
        out[loader] = {int(s): (img, m, int(y)) for b in batches for img, m, y, s in zip(*b)}
    assert out["dali"].keys() == out["torch"].keys()
    for sid, (img, meta, y) in out["dali"].items():
        timg, tmeta, ty = out["torch"][sid]
        assert y == ty
        torch.testing.assert_close(meta, tmeta)
        # different JPEG decoders and resize filters: close, not identical
        assert (img - timg).abs().mean() < 0.1, f"sample {sid}: images differ too much"


@pytest.mark.parametrize("loader", LOADERS)
def test_flip_probability(tmp_path, loader):
    pattern = np.zeros((64, 64, 3), np.uint8)
    pattern[:, :32] = 230  # bright left half
    shards = pattern_shards(tmp_path, pattern)
    flips = {}
    for p in (0.0, 0.5, 1.0):
        batches, _ = collect(shards, [0, 1], train=True, batch_size=8, image_size=32, loader=loader,
                             aug=Augment(zoom=(1.0, 1.0), rotate=0.0, flip=p), seed=3)
        imgs = torch.cat([b[0] for b in batches])
        left, right = imgs[..., :16].mean((1, 2, 3)), imgs[..., 16:].mean((1, 2, 3))
        flips[p] = (left < right).float().mean().item()
    assert flips[0.0] == 0.0 and flips[1.0] == 1.0
    assert 0.2 <= flips[0.5] <= 0.8, flips


@pytest.mark.parametrize("loader", LOADERS)
def test_rotation_range(tmp_path, loader):
    pattern = np.zeros((96, 96, 3), np.uint8)
    pattern[44:52, 8:88] = 255  # horizontal bar through the centre
    shards = pattern_shards(tmp_path, pattern)
    batches, _ = collect(shards, [0, 1], train=True, batch_size=8, image_size=64, loader=loader,
                         aug=Augment(zoom=(1.0, 1.0), rotate=30.0, flip=0.0), seed=5)
    gray = unnormalize(torch.cat([b[0] for b in batches])).mean(1)
    angles = []
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for g in gray:
        w = (g > 0.5).float()
        cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        cov_xy = (w * (xx - cx) * (yy - cy)).sum()
        var_x, var_y = (w * (xx - cx) ** 2).sum(), (w * (yy - cy) ** 2).sum()
        angles.append(abs(0.5 * torch.atan2(2 * cov_xy, var_x - var_y).item()) * 180 / np.pi)
    assert max(angles) <= 33, angles
    assert max(angles) >= 12 and np.std(angles) > 3, f"no rotation happened: {angles}"


@pytest.mark.parametrize("loader", LOADERS)
def test_zoom_range(tmp_path, loader):
    ramp = np.tile(np.linspace(0, 255, 128), (128, 1))
    pattern = np.stack([ramp, ramp, ramp], -1).astype(np.uint8)  # brightness = x / width
    shards = pattern_shards(tmp_path, pattern)
    size = 32
    batches, _ = collect(shards, [0, 1], train=True, batch_size=8, image_size=size, loader=loader,
                         aug=Augment(zoom=(0.8, 1.0), rotate=0.0, flip=0.0), seed=7)
    gray = unnormalize(torch.cat([b[0] for b in batches])).mean(1)
    left, right = gray[:, size // 2, 0], gray[:, size // 2, -1]
    zooms = ((right - left) / (1 - 1 / size)).numpy()  # a centred crop of z × side spans z of the ramp
    assert zooms.min() >= 0.77 and zooms.max() <= 1.03, zooms
    assert zooms.max() - zooms.min() > 0.08, f"zoom not varied: {zooms}"
    assert abs(float((left + right).mean()) - 1.0) < 0.05, "crop is not centred"


def test_clear_errors(shards_dir, tmp_path):
    with pytest.raises(ValueError, match=r"fold\(s\) \[7\] do not exist.*valid folds: \[0, 1, 2\]"):
        make_loader(shards_dir, [7], train=False, batch_size=4)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_loader(tmp_path, [0], train=False, batch_size=4)
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    idx = copy / manifest["folds"][1]["shards"][0]["index"]
    idx.unlink()
    with pytest.raises(FileNotFoundError, match=f"DALI index missing: {idx}"):
        make_loader(copy, [1], train=False, batch_size=4)
    manifest["folds"][0].update(samples=0, shards=[])
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="fold 0 .* is empty"):
        make_loader(copy, [0], train=False, batch_size=4)
    with pytest.raises(ValueError, match="Invalid loader 'tf'"):
        make_loader(shards_dir, [0], train=False, batch_size=4, loader="tf")
    with pytest.raises(ValueError, match="Invalid data device 'tpu'"):
        make_loader(shards_dir, [0], train=False, batch_size=4, device="tpu")
    with pytest.raises(ValueError, match="fewer than one batch"):
        make_loader(shards_dir, [0], train=True, batch_size=1000)


def test_torch_training_batches_are_a_function_of_seed_epoch_rank(shards_dir):
    """What exact resume needs from the torch loader: a rebuilt loader gives the same augmented batches,
    whatever the process's RNG did in between (each sample's draws come from (seed, epoch, sample))."""
    def first_batches(epoch, rank):
        torch.manual_seed(np.random.randint(1 << 30))  # disturb the global RNG
        it, _ = make_loader(shards_dir, [0, 2], train=True, batch_size=4, image_size=32, rank=rank, world_size=2,
                            loader="torch", num_threads=2, seed=5, epoch=epoch)
        return [b[0] for b in list(it)[:3]]

    a, b = first_batches(1, 0), first_batches(1, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = first_batches(2, 0)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_a_torch_loader_left_mid_epoch_ends_its_workers_when_dropped(shards_dir):
    """No reference cycle between the loader and its pass: dropping both frees the loader at once, and its
    workers end then (in a cycle, the cyclic collector could close the worker queues before the DataLoader's
    shutdown wrote to them, and each worker waited out a 5 s join timeout)."""
    import multiprocessing
    import weakref

    before = {p.pid for p in multiprocessing.active_children()}
    it, _ = make_loader(shards_dir, [0, 1], train=True, batch_size=4, image_size=16, loader="torch", num_threads=1)
    batches = iter(it)
    next(batches)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    gone = weakref.ref(it)
    del it, batches
    assert gone() is None, "the loader outlived its last reference (a reference cycle)"
    assert workers and not workers & {p.pid for p in multiprocessing.active_children()}


@pytest.mark.parametrize("loader", LOADERS)
def test_one_training_loader_serves_every_epoch_as_a_fresh_one_would(shards_dir, loader):
    """Training builds its loader once and calls set_epoch each epoch (the torch loader's workers stay);
    a resumed run builds a fresh one at its epoch: both must yield the same batches, whatever the number
    of workers."""
    import multiprocessing

    def batches(it):
        return [(b[0], b[3]) for b in it]

    def fresh(epoch, threads):
        torch.manual_seed(np.random.randint(1 << 30))
        return batches(make_loader(shards_dir, [0, 2], train=True, batch_size=4, image_size=32, loader=loader,
                                   num_threads=threads, seed=5, epoch=epoch)[0])

    it, _ = make_loader(shards_dir, [0, 2], train=True, batch_size=4, image_size=32, loader=loader, num_threads=2,
                        seed=5)
    epoch0 = batches(it)
    workers = {p.pid for p in multiprocessing.active_children()}
    epoch1 = batches(it)  # no set_epoch: the next epoch
    it.set_epoch(3)
    epoch3 = batches(it)
    it.set_epoch(1)
    again1 = batches(it)
    it.set_epoch(1)  # the epoch just served: its pipeline (DALI) has moved on, so it starts afresh
    third1 = batches(it)
    if loader == "torch":
        assert workers and workers <= {p.pid for p in multiprocessing.active_children()}, "workers restarted"
    threads = 1 if loader == "torch" else 2  # the torch loader's draws do not depend on its workers
    for name, got, epoch in (("epoch 0", epoch0, 0), ("epoch 1", epoch1, 1), ("epoch 3", epoch3, 3),
                             ("epoch 1 again", again1, 1), ("epoch 1 a third time", third1, 1)):
        want = fresh(epoch, threads)
        assert len(got) == len(want) > 0, name
        for (x, sx), (y, sy) in zip(got, want):
            assert torch.equal(sx, sy) and torch.equal(x, y), f"{name}: not the fresh loader's batches"
    assert not torch.equal(torch.cat([s for _, s in epoch0]), torch.cat([s for _, s in epoch1]))


@pytest.mark.parametrize("loader", LOADERS)
def test_a_loader_started_mid_epoch_serves_the_rest_of_that_epoch(shards_dir, loader, monkeypatch):
    """A run resumed at micro-step k sets its loader to start there: it yields the epoch's batches from k
    on, then whole epochs; the torch loader does not even read the k batches before (DALI runs them)."""
    from zoome_dist.pipeline.torch_loader import ShardDataset

    def batches(it):
        return [(b[0], b[3]) for b in it]

    opts = dict(train=True, batch_size=4, image_size=32, loader=loader, seed=5)
    whole = batches(make_loader(shards_dir, [0, 2], num_threads=2, epoch=1, **opts)[0])
    read = []
    if loader == "torch":  # in-process (no workers), so the keys the dataset is asked for can be seen
        get = ShardDataset.__getitem__
        monkeypatch.setattr(ShardDataset, "__getitem__", lambda self, key: read.append(key) or get(self, key))
    it, _ = make_loader(shards_dir, [0, 2], num_threads=0 if loader == "torch" else 2, **opts)
    it.set_epoch(1, start=3)
    rest = batches(it)
    assert len(whole) > 4 and len(rest) == len(whole) - 3
    for (x, sx), (y, sy) in zip(rest, whole[3:]):
        assert torch.equal(sx, sy) and torch.equal(x, y), "not the uninterrupted epoch's batches"
    if loader == "torch":
        assert len(read) == 4 * len(rest) and all(e == 1 for e, _ in read), "the skipped batches were read"
    it.set_epoch(2, start=1)
    iter(it).close()  # a pass closed before its first batch still takes its epoch and start
    nxt = batches(it)
    want = batches(make_loader(shards_dir, [0, 2], num_threads=2, epoch=3, **opts)[0])
    assert len(nxt) == len(want) == len(whole), "the next pass is not a whole epoch"
    assert all(torch.equal(x, y) and torch.equal(sx, sy) for (x, sx), (y, sy) in zip(nxt, want))
    with pytest.raises(ValueError, match="only a training loader starts mid-epoch"):
        make_loader(shards_dir, [1], train=False, batch_size=4, image_size=32, loader=loader)[0].set_epoch(0, 1)


def test_negative_seed_is_a_seed_like_any_other(shards_dir):
    """train.seed may be negative (SeedSequence, which the per-sample seeds use, takes none)."""
    it, _ = make_loader(shards_dir, [0], train=True, batch_size=4, image_size=32, loader="torch", num_threads=1,
                        seed=-1)
    assert next(iter(it))[0].shape == (4, 3, 32, 32)
