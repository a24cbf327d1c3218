"""The GPU path: nvJPEG batch decode (and its CPU twin), fp16 GradScaler resume, DALI index fallback.

CPU tests run everywhere; `gpu`-marked ones run in `launchers/gpu_check.sh` on a CUDA host.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from zoome_dist.data import wds_index
from zoome_dist.pipeline import LOADERS, Augment, make_loader
from zoome_dist.pipeline.augment import LoaderSpec
from zoome_dist.pipeline.batch_augment import BatchAugment
from zoome_dist.pipeline.selection import select_folds
from zoome_dist.pipeline.torch_loader import torch_loader

ROOT = Path(__file__).resolve().parents[1]
NO_AUG = Augment(zoom=(1.0, 1.0), rotate=0.0, flip=0.0)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def shards_dir(synth_data, tmp_path_factory) -> Path:
    """The session's shards without the duplicate search: these tests also run on GPU hosts whose torch
    stack has no imagehash (gpu_check collects this file alone)."""
    from conftest import SHARD_OPTS

    from zoome_dist.data.writer import build

    out = tmp_path_factory.mktemp("gpu_shards") / "shards"
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, replace(SHARD_OPTS, dedup=False),
          progress=False)
    return out


def _loader(shards, *, train, batch_decode, device="cpu", aug=Augment(), rank=0, world=1, epoch=0):
    spec = LoaderSpec(train=train, batch_size=5, image_size=32, rank=rank, world_size=world, device=device,
                      aug=aug, seed=4, num_threads=1, epoch=epoch)
    return torch_loader(select_folds(shards, [0, 1]), spec, batch_decode=batch_decode)


@pytest.mark.parametrize("train", [True, False])
def test_batch_decode_gives_the_same_batches_and_sharding(shards_dir, train):
    for rank in range(2):
        per_sample, _ = _loader(shards_dir, train=train, batch_decode=False, rank=rank, world=2)
        batched, steps = _loader(shards_dir, train=train, batch_decode=True, rank=rank, world=2)
        a, b = list(per_sample), list(batched)
        assert len(a) == len(b) == steps
        for x, y in zip(a, b):
            assert y[0].shape == x[0].shape == (len(x[3]), 3, 32, 32)
            for i in (1, 2, 3):
                assert torch.equal(x[i], y[i])  # meta, label, sample id: same samples, same order


def test_batch_decode_set_epoch_repeats_a_fresh_loaders_epoch(shards_dir):
    """The batch-decode path's draws restart at each epoch's seed: a loader that served epoch 0 yields
    epoch 2 as a loader built at epoch 2 does (what a resumed run builds)."""
    it, _ = _loader(shards_dir, train=True, batch_decode=True)
    list(it)
    it.set_epoch(2)
    got = list(it)
    want = list(_loader(shards_dir, train=True, batch_decode=True, epoch=2)[0])
    assert len(got) == len(want) > 0
    for x, y in zip(got, want):
        assert torch.equal(x[3], y[3]) and torch.equal(x[0], y[0])


def test_batch_decode_started_mid_epoch_draws_what_it_skips(shards_dir):
    """A resumed epoch's first batches are not decoded, but their random draws are made: the rest of the
    epoch gets the uninterrupted run's crops, angles and flips."""
    whole = list(_loader(shards_dir, train=True, batch_decode=True, epoch=1)[0])
    for prefetch in (False, True):  # inline, and through the decode-ahead thread (a GPU's default)
        it, _ = _loader(shards_dir, train=True, batch_decode=True)
        it.prefetch = prefetch
        decoded = []
        decode = it.decode.decode
        it.decode.decode = lambda raws: decoded.append(len(raws)) or decode(raws)
        it.set_epoch(1, start=2)
        rest = list(it)
        assert len(whole) > 3 and len(rest) == len(whole) - 2 == len(decoded), "skipped batches decoded"
        for x, y in zip(rest, whole[2:]):
            assert torch.equal(x[3], y[3]) and torch.equal(x[0], y[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, cuda])])
def test_decode_thread_gives_the_same_batches(shards_dir, device):
    """The decode-ahead thread keeps the batches and their random draws in order; a pass left early
    (its next batch still decoding) does not disturb the next epoch's draws."""
    plain, _ = _loader(shards_dir, train=True, batch_decode=True, device=device)
    plain.prefetch = False
    want = [list(plain) for _ in range(2)]
    ahead, _ = _loader(shards_dir, train=True, batch_decode=True, device=device)
    assert ahead.prefetch == (device == "gpu")  # the default: on a GPU only
    ahead.prefetch = True
    partial = iter(ahead)
    next(partial)
    next(partial)
    partial.close()  # left with the third batch in flight
    ahead.set_epoch(0)
    got = [list(ahead) for _ in range(2)]
    for epoch in range(2):
        assert len(got[epoch]) == len(want[epoch]) > 1
        for x, y in zip(got[epoch], want[epoch]):
            assert all(torch.equal(a, b) for a, b in zip(x, y)), f"epoch {epoch}"


@pytest.mark.gpu
@cuda
def test_decode_thread_hand_off_waits_for_the_decode(shards_dir):
    """The training stream must wait for the thread's decode: a decode that writes its batch only after
    a queued GPU sleep is still read whole (without the event wait the clone would read it unwritten)."""
    class SlowDecode(BatchAugment):
        calls = 0

        def _augment(self, raws: list[torch.Tensor]) -> torch.Tensor:
            SlowDecode.calls += 1
            x = torch.empty(len(raws), 3, 32, 32, device=self.device)
            torch.cuda._sleep(50_000_000)  # tens of ms on the decoder's stream, before the write
            return x.fill_(float(SlowDecode.calls))

    it, _ = _loader(shards_dir, train=True, batch_decode=True, device="gpu")
    assert it.prefetch
    it.decode = SlowDecode(True, 32, Augment(), torch.device("cuda"))
    seen = [float(b[0].clone().mean()) for b in it]  # clone: queued on the training stream
    assert seen == [float(k) for k in range(1, len(seen) + 1)] and len(seen) > 1


def test_batch_decode_cpu_twin_matches_per_sample_images(shards_dir):
    a = next(iter(_loader(shards_dir, train=False, batch_decode=False)[0]))[0]
    b = next(iter(_loader(shards_dir, train=False, batch_decode=True)[0]))[0]
    # Same libjpeg decode; resize of uint8 (torchvision) vs float (ours) differ by rounding only.
    assert (a - b).abs().mean() < 0.01 and (a - b).abs().max() < 0.1


def test_batch_augment_flip_zoom_rotate(shards_dir):
    it, _ = _loader(shards_dir, train=False, batch_decode=True)
    raws = next(iter(it.loader))[0]
    base = BatchAugment(False, 32, NO_AUG, torch.device("cpu"))(raws)
    flipped = BatchAugment(True, 32, Augment(zoom=(1.0, 1.0), rotate=0.0, flip=1.0), torch.device("cpu"))(raws)
    torch.testing.assert_close(flipped, base.flip(-1))
    same = BatchAugment(True, 32, NO_AUG, torch.device("cpu"))(raws)
    torch.testing.assert_close(same, base)
    zoom = BatchAugment(True, 32, Augment(zoom=(0.5, 0.5), rotate=0.0, flip=0.0), torch.device("cpu"))(raws)
    assert not torch.allclose(zoom, base)
    rot = BatchAugment(True, 32, Augment(zoom=(1.0, 1.0), rotate=180.0, flip=0.0), torch.device("cpu"))
    out = rot(raws)
    assert out.shape == base.shape and torch.isfinite(out).all()
    # Draws depend on (seed, epoch, rank) only: a rebuilt augmenter repeats them.
    again = BatchAugment(True, 32, Augment(zoom=(1.0, 1.0), rotate=180.0, flip=0.0), torch.device("cpu"))
    torch.testing.assert_close(again(raws), out)


def test_index_fallback_matches_wds2idx(shards_dir, tmp_path):
    if wds_index.IndexCreator is None:
        pytest.skip("DALI's wds2idx is not installed: nothing to compare with")
    tar = next(shards_dir.glob("fold-*/*.tar"))
    wds_index.create_index(tar, tmp_path / "dali.idx")
    (tmp_path / "ours.idx").write_text("\n".join(wds_index.index_lines(tar)) + "\n")
    assert (tmp_path / "ours.idx").read_bytes() == (tmp_path / "dali.idx").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_standin_skips_lr_and_round_trips(tmp_path, fused):
    """DeepSpeed's fp16 GradScaler path, with a CPU GradScaler standing in for the CUDA one; with the fused
    optimizer of CUDA training too (the scaler steps it always, and the kernel skips the update)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "grad_scaler_standin.py"),
                        "--out", str(tmp_path), *(["--fused"] if fused else [])], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["skipped_steps"] == 1 and res["lr_after_skip"] == res["lr_before_skip"]
    assert res["lr_after_next"] != res["lr_after_skip"]
    assert res["restored_scale"] == res["saved_scale"] < res["initial_scale"]
    assert res["restored_tracker"] == res["saved_tracker"]


@pytest.mark.gpu
@cuda
def test_nvjpeg_path_matches_its_cpu_twin(shards_dir):
    gpu = list(_loader(shards_dir, train=False, batch_decode=True, device="gpu")[0])
    cpu = list(_loader(shards_dir, train=False, batch_decode=True)[0])
    assert gpu[0][0].is_cuda and gpu[0][1].is_cuda
    for g, c in zip(gpu, cpu):
        assert torch.equal(g[3].cpu(), c[3])
        # nvJPEG and libjpeg may differ in IDCT/upsampling rounding: small, not structural
        assert (g[0].cpu() - c[0]).abs().mean() < 0.05


@pytest.mark.gpu
@cuda
def test_gpu_training_fp16_resume_restores_scaler(shards_dir, tmp_path):
    """1-GPU DeepSpeed fp16 (GradScaler) with the channels_last model and the nvJPEG loader; resuming
    from the epoch-1 checkpoint restores the scaler and reproduces epoch 2 within GPU tolerance."""
    cfg = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
           "data": {"image_size": 32, "num_threads": 2, "loader": "torch", "device": "gpu"},
           "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 8, "precision": "fp16",
                     "keep_checkpoints": 3}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def train(out: Path, *extra: str) -> None:
        r = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--config", str(tmp_path / "cfg.yaml"),
                            "--shards", str(shards_dir), "--fold", "0", "--out", str(out), "--no-progress", *extra],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    full = tmp_path / "full"
    train(full)
    summary = json.loads((full / "summary.json").read_text())
    assert summary["ranks_identical"]
    tags = sorted(p.name for p in (full / "checkpoints").iterdir() if p.name.startswith("step"))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    first = json.loads((part / "metrics.jsonl").read_text().splitlines()[0])
    epoch1_tag = f"step{first['global_step']:07d}"
    assert epoch1_tag in tags
    (part / "checkpoints" / "latest").write_text(epoch1_tag)
    ck = torch.load(part / "checkpoints" / epoch1_tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert ck["zoome"]["grad_scaler"]["scale"] > 0
    train(part, "--resume")
    a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["global_step"] for m in a] == [m["global_step"] for m in b]
    assert abs(a[-1]["val_auc"] - b[-1]["val_auc"]) < 0.05  # GPU: not bit-deterministic (README)
    # the scaler went on from its saved state: a fresh one would count its growth tracker (steps since the
    # last overflow) from the resume, not from the start, and could differ in scale and skipped steps
    last = f"step{a[-1]['global_step']:07d}"
    scalers = [torch.load(run / "checkpoints" / last / "mp_rank_00_model_states.pt",
                          weights_only=False)["zoome"]["grad_scaler"] for run in (full, part)]
    assert scalers[0] == scalers[1], scalers
    assert (json.loads((part / "summary.json").read_text())["skipped_steps"] == summary["skipped_steps"])


@pytest.mark.gpu
@cuda
@pytest.mark.skipif("dali" not in LOADERS, reason="DALI is not installed on this host")
def test_gpu_mixed_decode(shards_dir):
    it, _ = make_loader(shards_dir, [0], train=True, batch_size=4, image_size=32, device="gpu", loader="dali",
                        num_threads=1)
    image, meta, label, sid = next(iter(it))
    assert image.is_cuda and meta.is_cuda and label.is_cuda and image.shape == (4, 3, 32, 32)
