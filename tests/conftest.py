"""Shared fixtures: a tiny synthetic ISIC dataset and its shards, made once per test session."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

# A suite started in the background by a non-interactive shell inherits SIGINT ignored (under nohup, SIGHUP),
# and so would every process it starts: the Ctrl-C and hang-up tests would signal processes that cannot hear
# it. The defaults here make the children start with the defaults again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ["DS_ACCELERATOR"] == "cpu":  # Triton kernels on CPU tensors (test_zoom_se_triton.py): Triton reads
    os.environ.setdefault("TRITON_INTERPRET", "1")  # this when it is first imported, so before any test imports it

from zoome_dist.data.synth import synthesize  # noqa: E402
from zoome_dist.data.writer import BuildOptions, build  # noqa: E402

SYNTH_N = 96
SYNTH_SIZE = 64
SHARD_OPTS = BuildOptions(folds=3, seed=0, max_side=0, samples_per_shard=12)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, SYNTH_N, seed=3, prevalence=0.25, size=SYNTH_SIZE, progress=False)
    return out


@pytest.fixture(scope="session")
def shards_dir(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shards"
    build(synth_data / "train.csv", synth_data / "jpeg" / "train", out, SHARD_OPTS, progress=False)
    return out


@pytest.fixture(scope="session")
def deepspeed_shm_op() -> None:
    """Build DeepSpeed's CPU shm-comm op once (a hidden 20–45 s JIT compile, docs/stack.md), cached in
    $TORCH_EXTENSIONS_DIR, so the training tests' ranks do not all compile it at start-up."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()


CV_TINY = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
           "data": {"image_size": 32, "num_threads": 1},
           "optim": {"lr": 0.002, "warmup_epochs": 0.5},
           "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 8, "precision": "fp32"}}


def cv_args(cfg: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    """`zoome cv` of 2 variants × 2 folds on the tiny data, one core per job (so that concurrent and
    sequential jobs compute with the same threads, hence the same numbers)."""
    return ["--config", str(cfg), "--shards", str(shards), "--folds", "0,1", "--variants", "zoome,zoome_no_meta",
            "--cpus-per-job", "1", "--out", str(out), *extra]


@pytest.fixture(scope="session")
def cv_config(tmp_path_factory) -> Path:
    import yaml

    path = tmp_path_factory.mktemp("cvcfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(CV_TINY))
    return path


@pytest.fixture(scope="session")
def cv_sequential(cv_config, shards_dir, tmp_path_factory, deepspeed_shm_op) -> Path:
    """The reference: the CV's jobs one after the other (`zoome cv` as a user runs it)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("cvseq") / "cv"
    r = subprocess.run([sys.executable, "-m", "zoome_dist.cli.cv", *cv_args(cv_config, shards_dir, out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out
