"""Ray for real: ``ray up`` / ``ray submit`` / ``ray job submit`` of the tuning search onto network-
namespace nodes (``tests/cluster.py``: own IP, own process table, own home and /tmp/ray), with the
project's ``tuning/cluster.yaml`` as written except the provider addresses, the user, the ssh key and
the install step (a prebuilt environment: a full install per node is too heavy
for CI). Token authentication is on; a lost worker node costs a restart from the last checkpoint.

Never ``ray stop``/``ray down`` here: both end every Ray process on the machine. The nodes' processes
end by PID with their namespaces (``Cluster.down``); the client's files live in the test's folders.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from cluster import Cluster, unavailable
from conftest import cv_args
from test_cv import finished, same_table

from zoome_dist.core.rundir import RunDir

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.usefixtures("deepspeed_shm_op"),
              pytest.mark.skipif(bool(unavailable()), reason=f"no test cluster: {unavailable()}")]
ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)
TINY = ["--batch-sizes", "16", "--scheduler", "fifo", "--verbose", "0", "--cpus-per-worker", "2",
        "--set", "model.backbone=resnet18", "--set", "data.image_size=32", "--set", "data.num_threads=1",
        "--set", "train.micro_batch_size=16", "--set", "train.precision=fp32", "--set", "optim.warmup_epochs=0"]


def cluster_yaml(c: Cluster) -> dict:
    """``tuning/cluster.yaml`` for the test nodes: addresses, user and key swapped, install step replaced
    by a link to this checkout's environment; every other line (the sync into each node's own home
    included) runs as written."""
    cfg = yaml.safe_load((ROOT / "tuning" / "cluster.yaml").read_text())
    cfg["cluster_name"] = f"zoome-test-{c.tag}"
    cfg["provider"].update(head_ip=c.addrs[0], worker_ips=c.addrs[1:])
    cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(c.dir / "id_ed25519")}
    cfg["min_workers"] = cfg["max_workers"] = len(c.addrs) - 1
    install = [s for s in cfg["setup_commands"] if "pip install" in s or "-m venv" in s]
    assert len(install) == 2, cfg["setup_commands"]
    cfg["setup_commands"] = [f"ln -sfn {VENV} ~/zoome-venv"] + [s for s in cfg["setup_commands"] if s not in install]
    return cfg


class RayClient:
    """The user's machine: its own home (the token) and temp dir (Ray's cluster state, config cache)."""

    def __init__(self, c: Cluster, root: Path) -> None:
        self.home, self.tmp = root / "client-home", root / "client-tmp"
        self.home.mkdir()
        self.tmp.mkdir()
        self.yaml = root / "cluster.yaml"
        self.env = {**c.env, "HOME": str(self.home), "TMPDIR": str(self.tmp),
                    "PATH": f"{c.env['PATH'].split(':')[0]}:{VENV / 'bin'}:{os.environ['PATH']}"}
        self.env.pop("RAY_ADDRESS", None)

    def ray(self, *args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV / "bin" / "ray"), *args], env={**self.env, **(env or {})}, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def ssh_masters_cleanup(self, cluster_name: str) -> None:
        """Ray's ssh control masters for this cluster (ControlPersist) and their socket folder, found
        as Ray names them (``command_runner.py``): nothing of another cluster is touched."""
        user = Path(f"/tmp/ray_ssh_{hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]}")
        mine = user / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]
        for sock in mine.glob("*"):
            subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"], capture_output=True,
                           env=self.env, timeout=10)
        shutil.rmtree(mine, ignore_errors=True)
        try:
            user.rmdir()
        except OSError:
            pass


def search_args(shards: Path, out: Path, samples: int, epochs: int) -> list[str]:
    return ["--shards", str(shards), "--out", str(out), "--folds", "0", "--num-samples", str(samples),
            "--pool-sizes", "2,4", "--ray-address", "auto", "--set", f"train.epochs={epochs}", *TINY]


def wait_nodes(client: RayClient, n: int, timeout: float = 180) -> str:
    deadline, status = time.time() + timeout, ""
    while time.time() < deadline:
        r = client.ray("exec", str(client.yaml), "ray status", timeout=60)
        status = r.stdout + r.stderr
        if f"{n} local.cluster.node" in status.split("Pending:")[0]:
            return status
        time.sleep(3)
    raise AssertionError(f"{n} nodes not active after {timeout}s:\n{status[-2000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Two nodes brought up by `ray up` from a client with its own home."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    root = tmp_path_factory.mktemp("raycluster")
    try:
        with Cluster(2) as c:
            client = RayClient(c, root)
            client.yaml.write_text(yaml.safe_dump(cluster_yaml(c), sort_keys=False))
            try:
                r = client.ray("get-auth-token", "--generate", env={"RAY_AUTH_MODE": "token"})
                assert r.returncode == 0, r.stderr
                (client.home / ".ray" / "auth_token").chmod(0o600)
                r = client.ray("up", "-y", "--no-config-cache", str(client.yaml), timeout=300)
                assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
                wait_nodes(client, 2)
                yield c, client
            finally:
                client.ssh_masters_cleanup(f"zoome-test-{c.tag}")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ray_up_starts_every_node_with_token_auth(ray_cluster):
    c, client = ray_cluster
    # every command Ray runs on a node gets the project's Python and token authentication
    # the whole package was synced (the excludes name top-level folders only: not zoome_dist/data)
    # into each node's own home, at the yaml's ~/zoome-src (not ~/zoome_dist, which shadows the package)
    for i in range(2):
        project = c.dir / f"node{i}" / "home" / "zoome-src"
        synced = {p.relative_to(project).as_posix() for p in project.rglob("*.py")}
        assert {"zoome_dist/data/__init__.py", "zoome_dist/pipeline/dali.py", "tuning/tune.py"} <= synced, i
        assert not any(p.startswith((".venv/", "runs/")) for p in synced)
        assert not (c.dir / f"node{i}" / "home" / "zoome_dist").exists()
    r = client.ray("exec", str(client.yaml), "which python; echo mode=$RAY_AUTH_MODE", timeout=60)
    assert "/zoome-venv/bin/python" in r.stdout and "mode=token" in r.stdout, r.stdout[-2000:]
    for i in range(2):
        home = c.dir / f"node{i}" / "home"
        assert (home / ".ray" / "auth_token").read_text() == (client.home / ".ray" / "auth_token").read_text()
        assert (home / ".ray" / "auth_token").stat().st_mode & 0o077 == 0
    # a process without the token is refused by the cluster (it joins on the worker node's raylet)
    probe = (f"HOME=$(mktemp -d) {VENV}/bin/python -c "
             "\"import ray; ray.init(address='auto'); print('JOINED')\"")
    r = c.ssh(1, f"timeout 60 sh -c {json.dumps(probe)}", timeout=90)
    assert r.returncode != 0 and "JOINED" not in r.stdout, r.stdout[-2000:]
    assert "uthentication" in r.stdout + r.stderr, (r.stdout + r.stderr)[-2000:]


def test_ray_submit_runs_trials_on_both_nodes(ray_cluster, shards_dir, tmp_path):
    c, client = ray_cluster
    out = tmp_path / "tune"
    r = client.ray("submit", str(client.yaml), "tuning/tune.py", "--", *search_args(shards_dir, out, 2, 1),
                   timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and trials["complete"].all()
    assert set(trials["node_ip"]) == set(c.addrs), "each trial needs a whole node: one per node"
    assert (out / "best.yaml").is_file()


def test_ray_job_submit_through_the_forwarded_dashboard(ray_cluster, shards_dir, tmp_path):
    c, client = ray_cluster
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fwd = subprocess.Popen([str(VENV / "bin" / "ray"), "dashboard", "--port", str(port), str(client.yaml)],
                           env=client.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        out = tmp_path / "tune"
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        address = f"http://127.0.0.1:{port}"
        refused = client.ray("job", "list", "--address", address, timeout=60,
                             env={"HOME": str(tmp_path)})  # a client without the token
        assert refused.returncode != 0 and "uthentication" in refused.stdout + refused.stderr
        r = client.ray("job", "submit", "--address", address, "--", "python", "-m", "zoome_dist.cli.tune",
                       *search_args(shards_dir, out, 1, 1), timeout=300, env={"RAY_AUTH_MODE": "token"})
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        assert "succeeded" in r.stdout + r.stderr
        assert pd.read_csv(out / "trials.csv")["complete"].all()
    finally:
        os.killpg(fwd.pid, signal.SIGKILL)
        fwd.wait()


def test_cv_jobs_across_the_cluster_equal_sequential(ray_cluster, cv_sequential, cv_config, shards_dir, tmp_path):
    """`zoome cv --ray-address auto` submitted with `ray submit`: the (variant, fold) jobs run as Ray tasks
    on both nodes and give the sequential CV's table; a re-run retrains nothing."""
    c, client = ray_cluster
    out = tmp_path / "cv"
    cmd = ["submit", str(client.yaml), "launchers/cv.py", "--", *cv_args(cv_config, shards_dir, out),
           "--ray-address", "auto"]
    r = client.ray(*cmd, timeout=420)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    same_table(out, cv_sequential)
    nodes = {line.split("[node ")[1].split("]")[0] for log in out.glob("*/fold-*/job.log")
             for line in log.read_text().splitlines() if "[node " in line}
    assert nodes == set(c.addrs), f"jobs ran on {nodes}"
    before = finished(out)
    r = client.ray(*cmd, timeout=300)
    assert r.returncode == 0 and "4 finished before" in r.stdout, r.stdout[-3000:]
    assert finished(out) == before


@pytest.mark.parametrize("script", ["tuning/tune.py", "launchers/cv.py"])
def test_out_that_one_node_cannot_see_fails_fast(ray_cluster, cv_config, shards_dir, script):
    """--out in the head node's own home (the worker has its own folder there): the search or the CV stops
    before its first trial/job with one line naming the worker node and the path (before: every trial
    failed and `zoome tune` exited 0; the CV trained every job, then failed on a missing file)."""
    c, client = ray_cluster
    out = Path.home() / f"private-{Path(script).stem}"  # inside a node: that node's own home
    args = (search_args(shards_dir, out, 1, 1) if script.startswith("tuning") else
            [*cv_args(cv_config, shards_dir, out), "--ray-address", "auto"])
    start = time.time()
    r = client.ray("submit", str(client.yaml), script, "--", *args, timeout=300)
    took = time.time() - start
    text = r.stdout + r.stderr
    assert r.returncode != 0, text[-3000:]
    line = next((ln for ln in text.splitlines() if "does not see the run folder" in ln), "")
    assert f"Ray node {c.addrs[1]}" in line and str(out) in line and "every node mounts" in line, text[-3000:]
    assert took < 90, f"{took:.0f} s"  # ray submit's ssh + imports + ray.init + a task per node
    assert not (c.dir / "node0" / "home" / out.name / "trials").exists(), "a trial ran anyway"


def test_lost_worker_node_mid_trial(ray_cluster, shards_dir, tmp_path):
    """The worker node dies (every process at once) after its trial finished an epoch: Tune restarts
    that trial on the surviving node from its checkpoint and the search completes."""
    c, client = ray_cluster
    out = tmp_path / "tune"
    search = subprocess.Popen([str(VENV / "bin" / "ray"), "submit", str(client.yaml), "tuning/tune.py", "--",
                               *search_args(shards_dir, out, 2, 3), "--max-failures", "2"],
                              env=client.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        victim, deadline = None, time.time() + 300
        while victim is None and time.time() < deadline and search.poll() is None:
            for pid in c.pids(1):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                for fold_dir in (Path(a.decode()) for a in cmd if b"/trials/" in a):
                    if RunDir(fold_dir).read_metrics() and RunDir(fold_dir).resumable:  # epoch 0 done
                        victim = fold_dir
            time.sleep(0.2)
        assert victim is not None, "no trial on the worker node finished an epoch"
        c.kill_node(1)
        log, _ = search.communicate(timeout=600)
    finally:
        if search.poll() is None:
            os.killpg(search.pid, signal.SIGKILL)
            search.wait()
    assert search.returncode == 0, log[-4000:]
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and trials["complete"].all(), trials.to_string()
    assert set(trials["node_ip"]) == {c.addrs[0]}, "the lost node's trial should finish on the head"
    assert "resumed from" in (victim / "rank0.log").read_text(), "the restarted trial started over"
    epochs = [json.loads(x)["epoch"] for x in (victim / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]
