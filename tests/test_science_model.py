"""What the model is trained with and how its output is read, checked against formulas and planted
facts written here: the learning-rate schedule per optimizer step (gradient accumulation, resume),
the exactly-once evaluation, Grad-CAM on a planted feature, and test-time augmentation's views."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from zoome_dist.config import load_config
from zoome_dist.core.rundir import RunDir
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.infer.explain import explain
from zoome_dist.infer.predict import tta_views
from zoome_dist.train.engine import (batch_plan, build_optimizer, build_scheduler, deepspeed_config, free_port,
                                     setup_distributed)
from zoome_dist.train.loop import evaluate
from zoome_dist.train.run import restore, save


@pytest.fixture(scope="module")
def world_of_one():
    """A real one-rank gloo process group in this process (DeepSpeed engines are built on it)."""
    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    setup_distributed()
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.fc(image.mean((2, 3))).squeeze(1)


def engine_for(cfg, steps_per_epoch: int, seed: int = 0):
    import deepspeed

    torch.manual_seed(seed)
    model = Tiny()
    plan = batch_plan(cfg, 1)
    opt = build_optimizer(cfg, model, plan.lr)
    sched = build_scheduler(cfg, opt, steps_per_epoch)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                      config=deepspeed_config(cfg, 1, None, plan))
    return engine


def expected_lr(base: float, step: int, *, warmup: int, total: int, schedule: str, floor: float) -> float:
    """The documented schedule, written out: linear warm-up (step+1)/warmup, then cosine from 1 to
    ``floor`` over the remaining steps (or constant 1)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    t = min(1.0, (step - warmup) / (total - warmup))
    return base * (floor + (1 - floor) * (1 + math.cos(math.pi * t)) / 2)


@pytest.mark.parametrize("schedule, accumulation", [("cosine", 1), ("cosine", 3), ("constant", 2)])
def test_learning_rate_per_optimizer_step_and_on_resume(world_of_one, tmp_path, schedule, accumulation):
    spe, epochs, warmup_epochs = 4, 3, 0.5  # 12 optimizer steps, 2 of warm-up
    cfg = load_config(None, {"optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.0, "optim.weight_decay": 0.0,
                             "optim.schedule": schedule, "optim.warmup_epochs": warmup_epochs,
                             "optim.min_lr_ratio": 0.05, "train.epochs": epochs, "train.precision": "fp32",
                             "train.global_batch_size": 2 * accumulation, "train.micro_batch_size": 2})
    total, warmup = spe * epochs, round(warmup_epochs * spe)
    want = [expected_lr(0.1, s, warmup=warmup, total=total, schedule=schedule, floor=0.05) for s in range(total)]
    assert len(set(np.round(want, 12))) > (2 if schedule == "cosine" else 1)  # the schedule moves

    def train(engine, micro_steps: range) -> list[float]:
        """The learning rate each optimizer step applies, read in the optimizer at that step."""
        seen = []
        for i in micro_steps:
            x = torch.full((2, 3, 2, 2), float(i % 5))
            engine.backward(engine(x, None).pow(2).mean())
            if engine.is_gradient_accumulation_boundary():
                seen.append(engine.optimizer.param_groups[0]["lr"])
            engine.step()
        return seen

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    first = engine_for(cfg, spe)
    cut = 5 * accumulation  # resume after 5 of the 12 optimizer steps (inside the cosine part)
    seen = train(first, range(cut))
    save(first, run, {"epoch": 1, "micro_step": cut, "best": None}, keep=1)
    second = engine_for(cfg, spe, seed=1)
    assert restore(second, run)["micro_step"] == cut and second.global_steps == 5
    seen += train(second, range(cut, total * accumulation))
    assert seen == pytest.approx(want, rel=1e-9, abs=0)


def val_batches(ids: list[list[int]]) -> list[tuple[torch.Tensor, ...]]:
    """Validation batches holding the given sample ids (images whose mean is the id)."""
    out = []
    for b in ids:
        n = len(b)
        image = torch.tensor(b, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
        out.append((image, torch.zeros(n, 4), torch.tensor([i % 2 for i in b]), torch.tensor(b, dtype=torch.int64)))
    return out


@pytest.mark.parametrize("fault, batches", [
    ("repeats a sample", [[0, 1, 2], [3, 4, 4]]),
    ("drops a sample", [[0, 1, 2], [3, 4]]),
    ("invents a sample", [[0, 1, 2], [3, 4, 99]]),
    ("repeats one and drops another", [[0, 1, 2], [3, 3, 5]]),
])
def test_evaluation_refuses_a_loader_that_is_not_an_exact_partition(world_of_one, fault, batches):
    engine = engine_for(load_config(None, {"train.precision": "fp32", "train.global_batch_size": 2,
                                           "train.micro_batch_size": 2}), 1)
    fold = np.arange(6)  # the validation fold's sample ids: 0..5
    with pytest.raises(RuntimeError, match="not an exact partition"):
        evaluate(engine, val_batches(batches), expected=fold, channels_last=False, progress=False)
    sids, probs, labels = evaluate(engine, val_batches([[5, 0, 3], [1, 4, 2]]), expected=fold,
                                   channels_last=False, progress=False)
    assert list(sids) == list(fold) and list(labels) == [i % 2 for i in fold] and probs.shape == (6,)


class PlantedRegion(nn.Module):
    """``features``: a 4×4 stride-4 convolution giving the red and the green plane's cell means (8×8);
    ``head``: the logit is the red evidence in the top-left quarter only, minus 1. Green never matters."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = None  # no metadata branch
        self.conv = nn.Conv2d(3, 2, 4, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1 / 16
            self.conv.weight[1, 1] = 1 / 16

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image)

    def head(self, feats: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return feats[:, 0, :4, :4].mean((1, 2)) * 4 - 1

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image), meta)


def test_gradcam_highlights_the_region_the_melanoma_logit_reads():
    image = torch.zeros(1, 3, 32, 32)
    image[0, 0, 2:14, 2:14] = 1.0    # a red blob in the top-left quarter: what the logit reads
    image[0, 1, 18:30, 18:30] = 1.0  # a green blob bottom-right: present, irrelevant
    model, meta, enc = PlantedRegion(), torch.zeros(1, 12), MetadataEncoding()
    e = explain(model, image, meta, enc, zoom_blocks=0, threshold=0.5)
    assert e.prob > 0.5 and e.cam_class == "melanoma"
    cam = e.gradcam
    assert cam.shape == (32, 32) and cam.max() == pytest.approx(1.0)
    assert cam[2:14, 2:14].mean() > 0.5 and cam[18:30, 18:30].max() < 0.05 and cam[:, 20:].max() < 0.3
    # the same image explained as benign (the decision threshold above its probability): the red
    # blob is evidence *for* melanoma, so the benign map must not light it up
    b = explain(model, image, meta, enc, zoom_blocks=0, threshold=0.99)
    assert b.cam_class == "benign" and b.prob == pytest.approx(e.prob)
    assert b.gradcam[2:14, 2:14].max() < 0.05


def test_eight_tta_views_are_the_eight_symmetries_of_the_square():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)  # no symmetry of its own
    views = tta_views(x, 8)
    assert len(views) == 8
    # the dihedral group written independently: rotations by 0/90/180/270°, each with and without a mirror
    group = [np.rot90(x.numpy(), k, axes=(2, 3)) for k in range(4)]
    group += [g[..., ::-1] for g in group]
    matched = []
    for v in views:
        assert v.shape == x.shape
        hits = [i for i, g in enumerate(group) if np.array_equal(v.numpy(), g)]
        assert len(hits) == 1, "a TTA view is not one rotation/mirror of the image"
        matched.append(hits[0])
    assert sorted(matched) == list(range(8)), "the 8 views repeat a transform"
    assert matched[0] == 0  # the first view is the image itself
    assert [np.array_equal(v.numpy(), x.numpy()) for v in tta_views(x, 1)] == [True]
    two = tta_views(x, 2)
    assert np.array_equal(two[1].numpy(), x.numpy()[..., ::-1])  # 2 views: + the horizontal mirror


def test_a_checkpoint_damaged_in_place_is_not_resumed_from(world_of_one, tmp_path):
    """Bytes overwritten inside the newest checkpoint (same size, still a loadable file): its recorded
    SHA-256 no longer matches, so resuming takes the previous checkpoint, and says why."""
    cfg = load_config(None, {"train.precision": "fp32", "train.global_batch_size": 2, "train.micro_batch_size": 2})
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    engine = engine_for(cfg, 4)
    for step in (1, 2):
        engine.backward(engine(torch.full((2, 3, 2, 2), float(step)), None).pow(2).mean())
        engine.step()
        save(engine, run, {"epoch": 0, "micro_step": step, "best": None}, keep=2)
    newest = run.checkpoints / "step0000002"
    assert (newest / "sha256.json").is_file()
    model_file = next(newest.glob("*model_states.pt"))
    data = bytearray(model_file.read_bytes())
    data[-200:-100] = bytes(100)  # same size, loadable or not: not what was written
    model_file.write_bytes(bytes(data))
    assert restore(engine_for(cfg, 4, seed=3), run)["micro_step"] == 1


class TopLeftPixel(nn.Module):
    """logit = 4 × the image's top-left red value: each TTA view sees another corner."""

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return 4 * image[:, 0, 0, 0]


@pytest.mark.parametrize("n", [1, 2, 8])
def test_tta_averages_the_probabilities_of_the_views(n):
    from zoome_dist.infer.predict import tta_probability

    x = torch.zeros(1, 3, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 0, -1], x[0, 0, -1, 0], x[0, 0, -1, -1] = 1.0, -2.0, 0.5, 3.0  # the four corners
    sig = lambda v: 1 / (1 + math.exp(-4 * v))  # noqa: E731
    # views' top-left pixels: 1 → the image itself; 2 → + its mirror (top-right corner); 8 → every corner twice
    want = {1: sig(1.0), 2: (sig(1.0) + sig(-2.0)) / 2, 8: (sig(1.0) + sig(-2.0) + sig(0.5) + sig(3.0)) / 4}[n]
    assert tta_probability(TopLeftPixel(), x, torch.zeros(1, 12), n).item() == pytest.approx(want, rel=1e-6)


class PlantedMeta(PlantedRegion):
    """PlantedRegion plus a linear metadata term w · meta in the logit."""

    def __init__(self) -> None:
        super().__init__()
        self.meta = nn.Linear(12, 1, bias=False)
        with torch.no_grad():
            self.meta.weight.copy_(torch.arange(1, 13, dtype=torch.float32) / 10)

    def head(self, feats: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return super().head(feats, meta) + self.meta(meta).squeeze(1)


def test_metadata_effect_is_against_the_all_unknown_patient():
    enc = MetadataEncoding()
    meta = torch.tensor([enc.encode(45, "female", "torso")])
    image = torch.zeros(1, 3, 32, 32)
    e = explain(PlantedMeta(), image, meta, enc, zoom_blocks=0)
    w = np.arange(1, 13) / 10
    unknown = np.array([0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1])  # age missing, sex unknown, site unknown (by hand)
    assert e.meta_logit_delta == pytest.approx(float(w @ (meta[0].numpy() - unknown)), rel=1e-5)
    assert e.prob_without_meta == pytest.approx(1 / (1 + math.exp(1 - float(w @ unknown))), rel=1e-5)


def test_training_loss_is_the_mean_over_images_not_over_batches(world_of_one):
    from zoome_dist.train.loop import train_one_epoch

    engine = engine_for(load_config(None, {"train.precision": "fp32", "train.global_batch_size": 2,
                                           "train.micro_batch_size": 2}), 2)
    batches = [(torch.zeros(n, 3, 2, 2), torch.zeros(n, 4), torch.tensor(y), torch.arange(n)) for n, y in
               ((1, [1]), (3, [1, 1, 0]))]

    def loss_fn(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:  # the batch's positive share
        return label.float().mean() + 0 * logits.sum()

    out = train_one_epoch(engine, batches, loss_fn, epoch=0, steps=2, channels_last=False, progress=False)
    # per image: (1 × 1 + 3 × 2/3) / 4 = 0.75 (a mean of the two batch means would say 0.83, a sum over 4: 0.42)
    assert out["train_loss"] == pytest.approx(0.75) and out["train_images"] == 4


def test_batchnorm_statistics_are_averaged_over_ranks(tmp_path):
    """Two real gloo ranks: float buffers (running mean/var) become the mean over ranks, integer ones
    (batches tracked) rank 0's, so every rank evaluates and saves one model; the weight EMA's averaged buffers
    too (its weights, equal on every rank, are left alone)."""
    import subprocess
    import sys

    code = ("import sys, torch, torch.distributed as dist\n"
            "rank = int(sys.argv[1])\n"
            f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rdv'}', rank=rank, world_size=2)\n"
            "from zoome_dist.train.loop import average_buffers\n"
            "m = torch.nn.BatchNorm1d(2)\n"
            "m.running_mean.fill_(2 * rank + 1.0); m.running_var.fill_(4.0 if rank else 2.0)\n"
            "m.num_batches_tracked.fill_(10 + rank)\n"
            "from zoome_dist.train.ema import WeightEMA\n"
            "ema = WeightEMA(m, 0.9); ema.shadow['weight'].fill_(5.0 + rank)\n"
            "ema.average_over_ranks()\n"
            "print(ema.shadow['running_mean'].tolist(), ema.shadow['weight'].tolist())\n"
            "average_buffers(m)\n"
            "print(m.running_mean.tolist(), m.running_var.tolist(), int(m.num_batches_tracked))\n"
            "dist.destroy_process_group()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    for rank, (out, _) in enumerate(outs):  # mean (1, 3) → 2; var (2, 4) → 3; batches tracked: rank 0's 10
        assert out.strip().splitlines()[-2:] == [f"[2.0, 2.0] [{5.0 + rank}, {5.0 + rank}]", "[2.0, 2.0] [3.0, 3.0] 10"]


def test_early_stopping_rule():
    """train.patience P: epoch e is not trained when the P epochs before it brought no better AUC than the
    best epoch's; 0 never stops. Counted by hand from the best epoch a checkpoint's state holds."""
    from zoome_dist.config import load_config, validate
    from zoome_dist.train.run import stalled

    best = {"epoch": 2}
    assert [e for e in range(3, 8) if stalled(best, e, 2)] == [5, 6, 7]  # epochs 3, 4 brought nothing: stop at 5
    assert not stalled(best, 3, 1) and stalled(best, 4, 1)
    assert not any(stalled(best, e, 0) for e in range(3, 50))  # off
    assert not stalled(None, 5, 1)  # nothing trained yet
    with pytest.raises(ValueError, match="train.patience must be 0"):
        validate(load_config(overrides={"train.patience": -1}))
