"""Ray Tune on a real two-node local Ray cluster (ray.cluster_utils.Cluster), tiny trials."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from zoome_dist.config import load_config

TINY = ["--batch-sizes", "16", "--set", "model.backbone=resnet18", "--set", "data.image_size=32", "--set", "data.num_threads=1",
        "--set", "train.micro_batch_size=16", "--set", "train.precision=fp32", "--set", "optim.warmup_epochs=0"]


def zoome_tune(args: list[str], out: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`zoome tune` in its own process, as a user runs it: the Ray driver's signal handlers, threads and
    log handlers stay out of pytest's process. Fails with the run's output and every trial's error."""
    try:
        r = subprocess.run([sys.executable, "-m", "zoome_dist.cli.tune", *args, "--out", str(out)], capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"zoome tune ran past {timeout} s\n{str(e.stdout)[-2000:]}\n{str(e.stderr)[-4000:]}") from None
    errors = "".join(f"\n--- {p}\n{p.read_text(errors='replace')[-2000:]}"
                     for p in sorted(out.glob("ray/*/*/error.txt")))
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}{errors}"
    return r


@pytest.fixture(scope="module")
def cluster():
    """A head and a second raylet on loopback, one CPU each; stopped by Cluster.shutdown()
    (never `ray stop`, which would end every Ray process on the machine)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.mark.slow
def test_search_across_two_nodes(cluster, shards_dir, tmp_path):
    out = tmp_path / "tune"
    args = ["--shards", str(shards_dir), "--folds", "0,1", "--num-samples", "4",
            "--pool-sizes", "2,4", "--ray-address", cluster.address, "--scheduler", "fifo", "--seed", "3",
            "--verbose", "0", "--set", "train.epochs=1", *TINY]
    zoome_tune(args, out)
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 4 and trials["complete"].all()
    assert set(trials["model.pool_size"]) == {2, 4}, "the seeded search should sample both pool sizes"
    assert trials["node_id"].nunique() == 2, "trials ran on one node only"
    for _, t in trials.iterrows():
        assert t["mean_auc"] == pytest.approx((t["auc_fold_0"] + t["auc_fold_1"]) / 2)
    best = trials.sort_values("mean_auc", ascending=False).iloc[0]
    cfg = load_config(out / "best.yaml")  # what `train.py --config` reads
    assert cfg.model.pool_size == best["model.pool_size"] and cfg.model.name == best["model.name"]
    assert cfg.optim.lr == pytest.approx(best["optim.lr"]) and cfg.model.backbone == "resnet18"
    assert "| trial_id |" in (out / "trials.md").read_text()
    assert (out / "auc_vs_pool_size.png").read_bytes()[:4] == b"\x89PNG"
    # the best configuration's models are kept: a run folder per fold, no retraining needed
    assert all((Path(best["run_dir"]) / f"fold-{k:02d}" / "model_last.pt").is_file() for k in (0, 1))
    # re-running the same experiment resumes it: nothing is retrained, the same trials come back
    finished = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/fold-*/summary.json")}
    assert len(finished) == 8
    assert "resuming experiment" in zoome_tune(args, out).stdout
    again = pd.read_csv(out / "trials.csv")
    assert sorted(again["trial_id"]) == sorted(trials["trial_id"])
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/fold-*/summary.json")} == finished


@pytest.mark.slow
def test_killed_trial_resumes_from_checkpoint(cluster, shards_dir, tmp_path):
    out = tmp_path / "tune"
    killed = {}

    def kill_after_first_epoch() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            for metrics in out.glob("trials/*/fold-00/metrics.jsonl"):
                if metrics.read_text().strip() and (metrics.parent / "checkpoints" / "latest").is_file():  # epoch 0 done
                    for p in psutil.process_iter(["cmdline"]):
                        if any(str(metrics.parent) == c for c in (p.info["cmdline"] or [])):
                            p.kill()
                            killed["pid"] = p.pid
                            return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
    killer.start()
    zoome_tune(["--shards", str(shards_dir), "--folds", "0", "--num-samples", "1", "--pool-sizes", "2",
                "--ray-address", cluster.address, "--max-failures", "2", "--verbose", "0", "--set", "train.epochs=3",
                *TINY], out)
    killer.join(timeout=5)
    assert killed, "no trial rank was killed"
    trials = pd.read_csv(out / "trials.csv")
    assert trials["complete"].all()
    fold_dir = next(out.glob("trials/*/fold-00"))
    assert "resumed from" in (fold_dir / "rank0.log").read_text(), "the restarted trial started over"
    # the failed attempt's error says how the rank died and shows the end of its log
    errors = list(out.glob("ray/*/*/error.txt"))
    assert len(errors) == 1, f"expected the killed attempt's error.txt, found {errors}"
    error = errors[0].read_text()
    assert "fold 0: rank 0 killed by SIGKILL; the end of" in error and "epoch 0" in error
    epochs = [json.loads(x)["epoch"] for x in (fold_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


@pytest.mark.slow
def test_failed_trials_make_the_search_fail(cluster, shards_dir, tmp_path):
    """A trial in ERROR after its restarts is an exit status of 1 naming the trial and its error file (it
    was exit 0 with trials in ERROR); --tolerate-failed-trials N accepts up to N of them."""
    out = tmp_path / "tune"
    # a weights file that is no state dict: found by the trial's rank when it builds the model
    (tmp_path / "broken.pth").write_bytes(b"not a torch file")
    args = [sys.executable, "-m", "zoome_dist.cli.tune", "--shards", str(shards_dir), "--folds", "0", "--num-samples", "1",
            "--ray-address", cluster.address, "--scheduler", "fifo", "--verbose", "0", "--max-failures", "0", *TINY,
            "--set", f"model.pretrained={tmp_path / 'broken.pth'}", "--out", str(out)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    line = next(ln for ln in r.stderr.splitlines() if "ended in ERROR" in ln)
    trial = pd.read_csv(out / "trials.csv").iloc[0]
    assert trial["trial_id"] in line and "error.txt" in line and "broken.pth" in line, line
    assert "1 trial(s) ended in ERROR" in r.stderr


def test_cluster_yaml_passes_ray_schema():
    """tuning/cluster.yaml through the steps `ray up` runs first: fill defaults, then validate against
    Ray's cluster schema (Ray's own, private API)."""
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "tuning" / "cluster.yaml").read_text())
    validate_config(prepare_config(cfg))
    assert cfg["provider"]["type"] == "local" and "~/zoome-src" in cfg["file_mounts"]
    # a synced folder named like the package, in the home `ray submit` runs scripts from, would shadow it
    assert not any(Path(k).name in ("zoome_dist", "shards", "tuning") for k in cfg["file_mounts"])
    assert any("--dashboard-host=127.0.0.1" in c for c in cfg["head_start_ray_commands"])


def test_trials_csv_error_is_the_trials_own_message():
    """Ray wraps a trial's exception in a RayTaskError whose text starts with Ray's task header; the
    error column of trials.csv keeps the trial's own first line."""
    from ray.exceptions import RayTaskError

    from zoome_dist.launch.trial import error_line

    cause = RuntimeError("fold 0: rank 0 killed by SIGKILL; the end of r/rank0.log:\n    epoch 0: loss 0.49")
    wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...", cause, proctitle="ray::ImplicitFunc.train()",
                           pid=1, ip="192.0.2.2").as_instanceof_cause()
    assert "killed by SIGKILL" not in str(wrapped).splitlines()[0]  # what trials.csv showed before
    assert error_line(wrapped) == "fold 0: rank 0 killed by SIGKILL; the end of r/rank0.log:"
    assert error_line(ValueError("plain")) == "plain" and error_line(None) == ""


def test_trials_get_a_gpu_by_default_where_the_cluster_has_gpus():
    from zoome_dist.launch.tune import trial_resources

    assert trial_resources(None, 0, cluster_gpus=8) == (1, 1)   # GPU cluster: never silently CPU-only trials
    assert trial_resources(None, 0, cluster_gpus=0) == (1, 0)   # CPU cluster: CPU trials
    assert trial_resources(None, 2, cluster_gpus=0) == (2, 0)
    assert trial_resources(0, 0, cluster_gpus=8) == (1, 0)      # asked for explicitly
    assert trial_resources(2, 0, cluster_gpus=8) == (2, 2)
    with pytest.raises(ValueError, match="--workers-per-trial 3 > --gpus-per-trial 2"):
        trial_resources(2, 3, cluster_gpus=8)
    with pytest.raises(ValueError, match="--gpus-per-trial must be zero or more, got -1"):
        trial_resources(-1, 0, cluster_gpus=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_to_zoome_tune_ends_every_process_it_started(cluster, shards_dir, tmp_path, sig):
    """SIGTERM or SIGHUP to `zoome tune` while a trial trains (one rank: the test cluster's nodes have one
    CPU each): the driver exits and no trial rank (nor anything else running from its folders) is left."""
    out = tmp_path / "tune"
    p = subprocess.Popen([sys.executable, "-m", "zoome_dist.cli.tune", "--shards", str(shards_dir), "--folds", "0",
                          "--num-samples", "1", "--pool-sizes", "2", "--ray-address", cluster.address, "--verbose", "0",
                          "--set", "train.epochs=20", *TINY, "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours = lambda: [q for q in psutil.process_iter(["cmdline"])  # noqa: E731
                    if q.pid != p.pid and any(str(out) in c for c in (q.info["cmdline"] or []))]
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("trials/*/fold-00/metrics.jsonl")):
        time.sleep(0.2)
    assert list(out.glob("trials/*/fold-00/metrics.jsonl")), "no trial got to its first epoch"
    assert ours(), "the trial's rank should be running"
    p.send_signal(sig)
    _, err = p.communicate(timeout=90)
    assert p.returncode != 0
    deadline = time.time() + 30
    while time.time() < deadline and ours():
        time.sleep(0.5)
    assert not ours(), [q.info["cmdline"][:4] for q in ours()]


def test_search_space_file(tmp_path):
    """tuning/space.yaml is the default space; a space file may search the metadata options and freeze keys;
    unknown keys, samplers and values the config refuses are errors naming them."""
    import yaml
    from ray import tune

    from zoome_dist.launch.trial import DEFAULT_SPACE, load_space, search_space

    shipped = Path(__file__).resolve().parents[1] / "tuning" / "space.yaml"
    assert load_space(shipped) == DEFAULT_SPACE == load_space(None)
    mine = tmp_path / "space.yaml"
    mine.write_text(yaml.safe_dump({"model.meta_fusion": {"choice": ["gate", "concat"]},
                                    "optim.lr": {"loguniform": [1e-4, 1e-2]}, "train.epochs": 3}))
    space = search_space(load_space(mine), pool_sizes=(2, 4))
    assert space["train.epochs"] == 3  # frozen
    assert isinstance(space["model.meta_fusion"], tune.search.sample.Categorical)
    assert space["model.meta_fusion"].categories == ["gate", "concat"]
    assert space["model.pool_size"].categories == [2, 4]  # --pool-sizes replaces the file's
    for bad, message in [({"model.nope": {"choice": [1]}}, "model.nope"),
                         ({"optim.lr": {"normal": [0, 1]}}, "one of"),
                         ({"model.meta_fusion": {"choice": ["gate", "sum"]}}, "sum"),
                         ({"optim.lr": {"uniform": [0.1]}}, "low, high")]:
        mine.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=message):
            load_space(mine)
