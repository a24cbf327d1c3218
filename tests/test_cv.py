"""Cross-validation jobs: sequential, concurrent on this node (`--jobs`), resumed, retried; the Ray
cluster path is in test_ray_cluster.py (real namespace nodes)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from conftest import cv_args

ENV = {**os.environ, "DS_ACCELERATOR": "cpu"}


def zoome_cv(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoome_dist.cli.cv", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def same_table(a: Path, b: Path) -> None:
    """Same per-fold rows (AUC to 1e-6) and the same table."""
    fa, fb = pd.read_csv(a / "folds.csv"), pd.read_csv(b / "folds.csv")
    assert list(fa["variant"]) == list(fb["variant"]) and list(fa["fold"]) == list(fb["fold"])
    assert fa["auc"].to_numpy() == pytest.approx(fb["auc"].to_numpy(), abs=1e-6)
    pd.testing.assert_frame_equal(fa, fb, atol=1e-6)
    assert (a / "table.md").read_text() == (b / "table.md").read_text()


def finished(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.glob("*/fold-*/summary.json")}


@pytest.mark.slow
def test_concurrent_jobs_equal_sequential_and_rerun_retrains_nothing(cv_sequential, cv_config, shards_dir, tmp_path):
    out = tmp_path / "cv"
    r = zoome_cv(*cv_args(cv_config, shards_dir, out, "--jobs", "2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(finished(out)) == 4
    same_table(out, cv_sequential)
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG" and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    logs = sorted(out.glob("*/fold-*/job.log"))
    assert len(logs) == 4 and all("zoome_dist.train" in p.read_text() for p in logs)
    before = finished(out)
    r = zoome_cv(*cv_args(cv_config, shards_dir, out, "--jobs", "2"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 finished before" in r.stdout and "started" not in r.stdout
    assert finished(out) == before
    same_table(out, cv_sequential)


@pytest.mark.slow
def test_failed_job_is_retried_from_its_checkpoint(cv_config, shards_dir, tmp_path):
    """One job's training process is killed after its first checkpoint: the job is retried, resumes
    (not restarts), and the CV completes."""
    out = tmp_path / "cv"
    killed = {}

    def kill_first_checkpointed() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for latest in out.glob("*/fold-*/checkpoints/latest"):
                run_dir = str(latest.parent.parent)
                for p in psutil.process_iter(["cmdline"]):
                    if run_dir in (p.info["cmdline"] or []) and not (latest.parent.parent / "summary.json").exists():
                        p.kill()
                        killed["run"] = latest.parent.parent
                        return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_checkpointed, daemon=True)
    killer.start()
    r = zoome_cv(*cv_args(cv_config, shards_dir, out, "--jobs", "2", "--max-retries", "1", "--folds", "0",
                          "--set", "train.epochs=3", "--set", "train.checkpoint_every_steps=2"))
    killer.join(timeout=5)
    assert killed, "no job was killed"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "retry 1" in r.stdout
    log = (killed["run"] / "job.log").read_text()
    assert log.count("zoome_dist.train") == 2 and "--resume" in log.split("== ")[-1].splitlines()[0]
    assert "resumed from" in log
    assert len(finished(out)) == 2


@pytest.mark.slow
def test_failing_job_reports_and_exits_nonzero(cv_config, shards_dir, tmp_path):
    """Shards that break at run time (a fold's tar overwritten with zeros): every attempt fails, the CV
    says which jobs and how to resume, and writes no table."""
    bad = tmp_path / "shards"
    shutil.copytree(shards_dir, bad)
    tar = sorted((bad / "fold-01").glob("*.tar"))[0]
    tar.write_bytes(bytes(tar.stat().st_size))
    out = tmp_path / "cv"
    r = zoome_cv(*cv_args(cv_config, bad, out, "--jobs", "2", "--max-retries", "1", "--folds", "0"))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 of 2 job(s) failed" in r.stderr and "rerun the same command" in r.stderr
    assert not (out / "table.md").exists()


@pytest.mark.parametrize("extra, message", [
    (["--jobs", "0"], "--jobs must be positive, got 0"),
    (["--max-retries", "-1"], "--max-retries must be zero or more, got -1"),
    (["--jobs", "2", "--ray-address", "auto"], "--jobs is for this node"),
    (["--jobs", "2", "--hostfile", "HOSTFILE", "--master-addr", "10.0.0.1"], "cannot be combined"),
    (["--variants", "zoome,nope"], "Unknown variant(s) ['nope']"),
    (["--set", "model.pretrained=missing.pth"], "model.pretrained 'missing.pth': no such file"),
])
def test_cv_argument_errors(cv_config, shards_dir, tmp_path, extra, message, capsys):
    from zoome_dist.cli.cv import main

    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.1 slots=1\n")
    args = [str(hosts) if x == "HOSTFILE" else x for x in extra]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:  # in this process (each is refused before any job starts): no interpreter start-up per case
        assert main(cv_args(cv_config, shards_dir, tmp_path / "cv", *args)) == 2
    finally:
        for sig, handler in handlers.items():  # zoome cv's own handlers, installed by main()
            signal.signal(sig, handler)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_fold_selection_is_parsed_once_and_strictly():
    from zoome_dist.cli.common import parse_folds

    assert parse_folds("0-2,1") == [0, 1, 2] and parse_folds(" 0 - 2") == [0, 1, 2] and parse_folds("0,,2") == [0, 2]
    for bad in ("3-1", "a", "1-x", ","):
        with pytest.raises(ValueError, match="--folds"):
            parse_folds(bad)


@pytest.mark.slow
@pytest.mark.parametrize("sig, ranks", [(signal.SIGINT, 1), (signal.SIGTERM, 2), (signal.SIGHUP, 2)])
def test_ctrl_c_stops_every_job_without_retrying(cv_config, shards_dir, tmp_path, sig, ranks):
    """SIGINT (Ctrl-C) or SIGTERM (kill, scancel) to `zoome cv`: every running job's process group ends
    (a 2-rank job's DeepSpeed launcher and its ranks too), nothing is retried, exit 128 + the signal."""
    out = tmp_path / "cv"
    jobs = ["--jobs", "2"] if ranks == 1 else ["--jobs", "1", "--gpus-per-job", "2"]
    p = subprocess.Popen([sys.executable, "-m", "zoome_dist.cli.cv",
                          *cv_args(cv_config, shards_dir, out, *jobs, "--set", "train.epochs=20")],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not list(out.glob("*/fold-*/metrics.jsonl")):
        time.sleep(0.2)
    assert list(out.glob("*/fold-*/metrics.jsonl")), "no job got to its first epoch"
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and "interrupted" in stderr, stderr[-2000:]
    assert "retry" not in stdout
    time.sleep(1)
    left = [q for q in psutil.process_iter(["cmdline"]) if any(str(out) in c for c in (q.info["cmdline"] or []))]
    assert not left, [q.info["cmdline"] for q in left]


@pytest.mark.slow
def test_report_has_out_of_fold_threshold_calibration_and_subgroups(cv_sequential):
    """The report's honest operating point: fold k scored at the threshold of the other folds'
    out-of-fold predictions; a calibration fit on all of them, stored in each fold's model file."""
    from zoome_dist.eval.calibration import cross_fit_thresholds
    from zoome_dist.eval.metrics import youden_threshold

    out = cv_sequential
    md = (out / "table.md").read_text()
    assert "ACC@oof" in md and "SE@oof" in md and "ECE" in md
    rows = pd.read_csv(out / "folds.csv")
    for variant in ("zoome", "zoome_no_meta"):
        preds = {f: pd.read_csv(out / variant / f"fold-{f:02d}" / "predictions_last.csv") for f in (0, 1)}
        expect = cross_fit_thresholds(preds)
        got = rows[rows["variant"] == variant].set_index("fold")
        for f in (0, 1):
            other = preds[1 - f]
            assert got.loc[f, "threshold_oof"] == pytest.approx(youden_threshold(other["target"], other["prob"]))
            assert got.loc[f, "sens_oof"] == pytest.approx(expect[f]["sens_oof"])
        cal = json.loads((out / variant / "calibration.json").read_text())
        both = pd.concat(preds.values())
        assert cal["threshold"] == pytest.approx(youden_threshold(both["target"], both["prob"]))
        assert cal["temperature"] > 0 and cal["select"] == "last"
        stored = torch.load(out / variant / "fold-00" / "model_last.pt", weights_only=True)["calibration"]
        assert stored["threshold"] == cal["threshold"] and stored["temperature"] == cal["temperature"]
    assert (out / "calibration.png").read_bytes()[:4] == b"\x89PNG"
    assert "| sex |" in (out / "subgroups.md").read_text()


@pytest.mark.slow
def test_paper_comparison_and_expected_time(cv_sequential, shards_dir):
    from zoome_dist.eval.paper import VARIANTS, comparison_markdown
    from zoome_dist.launch.cv import expected_time

    rows = pd.read_csv(cv_sequential / "folds.csv")
    md = comparison_markdown(rows)
    zoome = next(line for line in md.splitlines() if line.startswith("| zoome |"))
    auc = 100 * rows[rows["variant"] == "zoome"]["auc"]
    assert f"{auc.mean():.2f}±{auc.std(ddof=1):.2f} / 92.23±1.69" in zoome and "ACC@oof" in md
    assert VARIANTS[:3] == ["zoome", "zoome_no_zoomse", "zoome_no_meta"] and len(VARIANTS) == 7
    text = expected_time(str(shards_dir), list(range(10)), VARIANTS, 20)
    assert "8 concurrent 1-GPU jobs" in text and " h (" in text
