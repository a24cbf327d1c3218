"""Training across real nodes: network namespaces with their own IPs, sshd and process tables
(``tests/cluster.py``), `deepspeed --hostfile` over pdsh exactly as the README says, gloo on CPU.

Skipped, with the reason, where namespaces cannot be made (not root, no `ip netns`); CI runs as root.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cluster import Cluster, unavailable

from zoome_dist.train.engine import free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.usefixtures("deepspeed_shm_op"),
              pytest.mark.skipif(bool(unavailable()), reason=f"no test cluster: {unavailable()}")]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
        "data": {"image_size": 32, "num_threads": 1},
        "optim": {"lr": 0.002, "warmup_epochs": 0.5},
        "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32",
                  "checkpoint_every_steps": 1, "keep_checkpoints": 2}}


@pytest.fixture(scope="module")
def cluster():
    # a SIGTERM (CI's timeout) becomes KeyboardInterrupt, so pytest still runs this teardown
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Cluster(2) as c:
            yield c
    finally:
        signal.signal(signal.SIGTERM, previous)


def hostfile(c: Cluster, path: Path, slots: int) -> Path:
    path.write_text("".join(f"{a} slots={slots}\n" for a in c.addrs))
    return path


def deepspeed_cmd(c: Cluster, hosts: Path, cfg: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    """The README's multi-node command, nothing else set."""
    return [str(BIN / "deepspeed"), "--hostfile", str(hosts), "--master_addr", c.addrs[0],
            "--master_port", str(free_port()), "--module", "zoome_dist.train", "--config", str(cfg), "--shards", str(shards),
            "--fold", "0", "--out", str(out), "--no-progress", *extra]


def write_cfg(tmp_path: Path, **train) -> Path:
    cfg = {**TINY, "train": {**TINY["train"], **train}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def check_run(out: Path, shards: Path, world: int) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == world and summary["ranks_identical"]
    folds = pd.read_csv(shards / "folds.csv")
    pred = pd.read_csv(out / "predictions_last.csv")
    assert sorted(pred["image_name"]) == sorted(folds[folds["fold"] == 0]["image_name"])  # the fold, exactly
    return summary


@pytest.mark.parametrize("slots, zero", [(2, 2)])  # 1 slot per node, ZeRO 0: the next test's reference run
def test_hostfile_training_across_nodes(cluster, shards_dir, tmp_path, slots, zero):
    cfg = write_cfg(tmp_path, zero_stage=zero, epochs=1)
    out = tmp_path / "run"  # on the shared filesystem, as on NFS
    r = subprocess.run(deepspeed_cmd(cluster, hostfile(cluster, tmp_path / "hosts", slots), cfg, shards_dir, out),
                       env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "connectFullMesh" not in r.stdout + r.stderr
    check_run(out, shards_dir, 2 * slots)
    assert any((out / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))


def test_lost_node_fails_fast_then_resume_matches(cluster, shards_dir, tmp_path):
    cfg = write_cfg(tmp_path, epochs=2)
    hosts = hostfile(cluster, tmp_path / "hosts", 1)
    ref = tmp_path / "ref"
    r = subprocess.run(deepspeed_cmd(cluster, hosts, cfg, shards_dir, ref), env=cluster.env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "connectFullMesh" not in r.stdout + r.stderr  # (the hostfile test's 1-slot, ZeRO-0 case)
    reference = check_run(ref, shards_dir, 2)
    assert any((ref / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))

    out = tmp_path / "run"
    proc = subprocess.Popen(deepspeed_cmd(cluster, hosts, cfg, shards_dir, out), env=cluster.env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not any((out / "checkpoints").glob("step*")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before the node could be lost"
    cluster.kill_node(1)
    lost = time.time()
    try:
        log, _ = proc.communicate(timeout=120)  # the bound the README states for gloo
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung after losing a node")
    assert proc.returncode != 0, log[-3000:]
    assert time.time() - lost < 120
    assert "lost" in log and "rank" in log, log[-3000:]
    cluster.start_node(1)
    r = subprocess.run(deepspeed_cmd(cluster, hosts, cfg, shards_dir, out, "--resume"), env=cluster.env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    got = check_run(out, shards_dir, 2)
    assert got["global_steps"] == reference["global_steps"]
    assert abs(got["last"]["val_auc"] - reference["last"]["val_auc"]) <= 1e-3

