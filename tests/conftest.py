"""Shared fixtures: a tiny synthetic ISIC dataset and its shards, made once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

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
    """Build DeepSpeed's CPU shm-comm op once (a hidden 20–45 s JIT compile, STACK.md), cached in
    $TORCH_EXTENSIONS_DIR, so the training tests' ranks do not all compile it at start-up."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
