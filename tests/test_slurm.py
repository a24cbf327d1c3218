"""SLURM for real: ``slurmctld`` + ``slurmd`` on network-namespace nodes (``tests/slurm_cluster.py``),
jobs submitted with the project's own ``launchers/slurm/`` scripts, edited only where a user edits them
(the settings at their top; the GPU line deleted, as on CPU-only nodes).

Skipped, with the reason, where the cluster cannot be made (not root, SLURM or munge not installed).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import CV_TINY
from slurm_cluster import SlurmCluster, unavailable
from test_cv import same_table
from test_multinode import TINY, check_run
from test_ray_cluster import TINY as RAY_TINY

from zoome_dist.launch.slurm import parse_nodelist

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.usefixtures("deepspeed_shm_op"),
              pytest.mark.skipif(bool(unavailable()), reason=f"no SLURM test cluster: {unavailable()}")]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {"PATH": f"{BIN}:{os.environ['PATH']}", "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module")
def slurm():
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # CI's timeout still tears down
    try:
        with SlurmCluster(3) as c:  # 2-node jobs, and a spare for a job whose node died
            yield c
    finally:
        signal.signal(signal.SIGTERM, previous)


def scripts(tmp_path: Path) -> Path:
    """``launchers/slurm`` as a CPU-only user edits it: the GPU request deleted."""
    d = tmp_path / "slurm"
    d.mkdir()
    for f in (ROOT / "launchers" / "slurm").iterdir():
        text = f.read_text()
        (d / f.name).write_text("\n".join(ln for ln in text.splitlines() if "--gpus-per-task" not in ln) + "\n")
    return d


def submit(c: SlurmCluster, *args: str, env: dict) -> str:
    r = c.client("sbatch", "--parsable", *args, env={**ENV, **env}, cwd=ROOT)
    return r.stdout.strip().split(";")[0]


def tiny_config(tmp_path: Path, **train) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], **train}}))
    return path


def train_job(c: SlurmCluster, tmp_path: Path, shards: Path, out: Path) -> str:
    """`sbatch launchers/slurm/train.sbatch`: 2 nodes, one task each, 2 epochs of the tiny recipe."""
    return submit(c, "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={tmp_path}/job-%j.out",
                  str(scripts(tmp_path) / "train.sbatch"),
                  env={"CONFIG": str(tiny_config(tmp_path, epochs=2)), "SHARDS": str(shards), "FOLD": "0",
                       "OUT": str(out), "OMP_NUM_THREADS": "1"})


def job_logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("job-*.out")))


@pytest.fixture(scope="module")
def reference(slurm, shards_dir, tmp_path_factory) -> dict:
    """An uninterrupted `sbatch` training run across the two nodes."""
    tmp = tmp_path_factory.mktemp("slurmref")
    state = slurm.wait_job(train_job(slurm, tmp, shards_dir, tmp / "run"), timeout=400)
    assert state == "COMPLETED", job_logs(tmp)
    return check_run(tmp / "run", shards_dir, 2)


def test_sbatch_trains_one_run_across_two_nodes(reference):
    """srun's two tasks on two nodes form one world of 2, rank 0 on the first node (MASTER_ADDR)."""
    hosts = reference["hosts"]
    assert len(set(hosts)) == 2 and hosts == sorted(hosts) and set(hosts) <= {"n1", "n2", "n3"}, hosts


def test_lost_node_then_the_requeued_job_resumes(slurm, reference, shards_dir, tmp_path):
    """A node dies mid-epoch: SLURM requeues the job (--requeue), which runs again once the node is back
    and resumes from the newest checkpoint to the uninterrupted run's optimizer steps."""
    out = tmp_path / "run"
    job = train_job(slurm, tmp_path, shards_dir, out)
    deadline = time.time() + 300
    while time.time() < deadline and not any((out / "checkpoints").glob("step*")):
        time.sleep(0.2)
    assert any((out / "checkpoints").glob("step*")), job_logs(tmp_path)
    assert not (out / "summary.json").exists(), "the run ended before the node could be lost"
    nodes = slurm.client("squeue", "-h", "-j", job, "-o", "%N").stdout.strip()  # e.g. n[1-2]
    lost = slurm.names.index(parse_nodelist(nodes)[-1])
    slurm.kill_node(lost)
    deadline = time.time() + 120
    while time.time() < deadline and "Restarts=1" not in slurm.client("scontrol", "show", "job", job).stdout:
        time.sleep(1)
    assert "Restarts=1" in slurm.client("scontrol", "show", "job", job).stdout, job_logs(tmp_path)
    # the job runs again on the nodes left (the lost one stays down until the job is done: SLURM may still
    # deliver the old run's termination to a node that comes back, and it names only the job id)
    try:
        assert slurm.wait_job(job, timeout=500) == "COMPLETED", job_logs(tmp_path) + slurm.log_tail()
    finally:
        slurm.start_node(lost)
        slurm.wait_idle()
    got = check_run(out, shards_dir, 2)
    assert got["global_steps"] == reference["global_steps"]
    assert abs(got["last"]["val_auc"] - reference["last"]["val_auc"]) <= 1e-3
    assert "resumed from" in job_logs(tmp_path)


def test_out_not_shared_fails_fast_naming_the_node(slurm, shards_dir, tmp_path):
    """--out on each node's own disk: every task stops within seconds, naming the node and the path
    (before: the first run 'succeeded' and a resume hung until dist.timeout_s)."""
    out = slurm.node_local / f"run-{tmp_path.name}"
    start = time.time()
    r = slurm.client("srun", "-N2", "-n2", "-w", "n1,n2", "--kill-on-bad-exit=1", "python", "-m", "zoome_dist.train",
                     "--config", str(tiny_config(tmp_path)), "--shards", str(shards_dir), "--fold", "0",
                     "--out", str(out), "--no-progress", env={**ENV, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                     check=False, timeout=120)
    took = time.time() - start
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("zoome train: error:")]
    assert errors, r.stdout[-3000:] + r.stderr[-3000:]
    assert "on n2 does not see the run folder" in errors[0] and str(out) in errors[0], errors
    assert "every node mounts" in errors[0]
    assert took < 45, f"{took:.0f} s"  # imports (~10 s per task on 2 shared cores) + the 10 s marker wait
    assert not any((slurm.local_dir(2) / "own").rglob("checkpoints")), "rank 1 trained anyway"
    for node in range(1, len(slurm.names)):
        shutil.rmtree(slurm.local_dir(node) / "own" / out.name, ignore_errors=True)


def test_array_cv_then_report_equals_sequential(slurm, cv_sequential, cv_config, shards_dir, tmp_path):
    """`bash launchers/slurm/cv.sh`: one array task per (variant, fold), then the report step; the table
    equals the sequential `zoome cv`'s (same per-fold AUCs)."""
    out = tmp_path / "cv"
    d = scripts(tmp_path)
    env = {**ENV, "CONFIG": str(cv_config), "SHARDS": str(shards_dir), "FOLDS": "0,1", "VARIANTS": "zoome,zoome_no_meta",
           "OUT": str(out), "OMP_NUM_THREADS": "1",
           "SBATCH_ARGS": f"--cpus-per-task=1 --output={tmp_path}/%x-%A_%a.out"}
    r = slurm.client("bash", str(d / "cv.sh"), env=env, cwd=ROOT, timeout=120)
    ids = dict(kv.split("=") for kv in r.stdout.split() if kv.startswith(("array=", "report=")))
    assert "4 training task(s)" in r.stdout, r.stdout
    assert slurm.wait_job(ids["array"], timeout=600).split() == ["COMPLETED"] * 4, \
        "\n".join(p.read_text()[-1500:] for p in tmp_path.glob("*.out"))
    assert slurm.wait_job(ids["report"], timeout=300) == "COMPLETED", \
        "\n".join(p.read_text()[-1500:] for p in tmp_path.glob("*report*.out"))
    report = next(tmp_path.glob("zoome-cv-report-*.out")).read_text()
    assert "4 finished before" in report, report[-2000:]
    same_table(out, cv_sequential)
    assert CV_TINY["train"]["epochs"] == 1


def test_ray_tune_on_the_allocation(slurm, shards_dir, tmp_path):
    """`sbatch launchers/slurm/tune.sbatch`: a Ray head and worker as job steps with token auth, trials on
    both nodes, the search's results written; the allocation's Ray ends with the job."""
    out = tmp_path / "tune"
    job = submit(slurm, "--nodes=2", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
                 str(scripts(tmp_path) / "tune.sbatch"),
                 env={"CONFIG": "", "SHARDS": str(shards_dir), "OUT": str(out), "FOLDS": "0", "NUM_SAMPLES": "2",
                      "GPUS_PER_TRIAL": "0", "EXTRA": " ".join(["--pool-sizes", "2,4", "--set", "train.epochs=1", *RAY_TINY])})
    state = slurm.wait_job(job, timeout=600)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED", log[-5000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and trials["complete"].all(), trials.to_string()
    assert trials["node_ip"].nunique() == 2 and set(trials["node_ip"]) <= set(slurm.addrs[1:]), trials["node_ip"].tolist()
    assert not list(out.glob(".ray-token-*")), "the job's token was left behind"
    for node in range(1, len(slurm.names)):  # nothing of Ray is left on the nodes
        ps = " ".join(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in slurm.pids(node)
                      if Path(f"/proc/{pid}/cmdline").exists())
        assert "raylet" not in ps and "gcs_server" not in ps, ps


def test_cv_run_directly_in_a_multi_task_job(slurm, shards_dir, cv_config, tmp_path):
    """`zoome cv` run in an sbatch script of 2 tasks without srun: its one-rank jobs are worlds of one
    (their rank variables set), not processes refused as stray tasks of the allocation."""
    from conftest import cv_args

    out = tmp_path / "cv"
    script = tmp_path / "cv-direct.sbatch"
    script.write_text("#!/bin/bash\nset -e\nexec python -m zoome_dist.cli.cv " + " ".join(
        cv_args(cv_config, shards_dir, out, "--folds", "0", "--variants", "zoome")) + "\n")
    job = submit(slurm, "--ntasks=2", "--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/job.out", str(script),
                 env={"OMP_NUM_THREADS": "1"})
    state = slurm.wait_job(job, timeout=300)
    log = (tmp_path / "job.out").read_text()
    assert state == "COMPLETED" and "not started by srun" not in log, log[-3000:]
    assert (out / "zoome" / "fold-00" / "summary.json").is_file() and (out / "table.md").is_file()
