"""Rank discovery from SLURM's variables (``zoome_dist.launch.slurm``): expectations written out by hand."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zoome_dist.launch.slurm import master_port, parse_nodelist, slurm_env, tasks_on_node

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("a[1-2],login1,b[9]", ["a1", "a2", "login1", "b9"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("node-a,node-b", ["node-a", "node-b"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n[a-b]", "n1]", "n[2-1]"])
def test_parse_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        parse_nodelist(bad)


def test_tasks_per_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(ValueError, match="SLURM_NODEID 2"):
        tasks_on_node("4(x2)", 2)


def test_step_task_gets_rank_world_and_master():
    env = slurm_env(STEP)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": "29542", "LOCAL_WORLD_SIZE": "2"}  # 29000 + 4242 mod 3700
    # consecutive jobs, and the steps of one job, get other ports; every task of one step the same
    assert master_port("4243", "0") == 29543 and master_port("4242", "1") == 29000 + (4242 + 997) % 3700
    assert len({master_port(str(j), str(k)) for j in range(4000, 4100) for k in range(3)}) == 300
    assert all(29000 <= master_port(str(j)) < 32700 for j in range(0, 100000, 7))
    assert slurm_env({**STEP, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})["MASTER_PORT"] \
        == env["MASTER_PORT"]


def test_explicit_variables_win():
    assert slurm_env({**STEP, "RANK": "0"}) == {}            # torchrun / deepspeed started it
    assert slurm_env({**STEP, "TORCHELASTIC_RUN_ID": "x"}) == {}
    env = slurm_env({**STEP, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.5", "1234")


def test_not_slurm_or_one_task_changes_nothing():
    assert slurm_env({}) == {}
    assert slurm_env({**STEP, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == {}
    assert slurm_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) == {}


def test_multi_task_job_without_srun_is_an_error():
    # `salloc -n2` then the program by hand: its peers would never come
    with pytest.raises(ValueError, match="not started by srun"):
        slurm_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})
    with pytest.raises(ValueError, match="SLURM_PROCID 4 is outside"):
        slurm_env({**STEP, "SLURM_PROCID": "4"})


def test_its_advice_works_one_process_in_a_multi_task_job():
    """RANK=0 WORLD_SIZE=1 (what the error suggests) inside a 2-task allocation: a world of one."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "RANK": "0", "WORLD_SIZE": "1",
           "PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "",
           **{k: os.environ[k] for k in ("HOME", "TORCH_EXTENSIONS_DIR") if k in os.environ}}  # DeepSpeed's built op
    code = ("from zoome_dist.train.engine import setup_distributed; import torch.distributed as d; "
            "print(setup_distributed()); d.destroy_process_group()")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "DistInfo(rank=0, world_size=1, local_rank=0)" in r.stdout, r.stderr[-2000:]


def test_the_error_reaches_the_user_as_one_line(tmp_path):
    """`zoome train` in a 2-task allocation without srun: one line, exit 2, before any work."""
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]", "PATH": "/usr/bin:/bin",
           "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", "--shards", str(tmp_path / "missing"),
                        "--fold", "0", "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert lines and "not started by srun" in lines[-1], r.stderr[-2000:]
