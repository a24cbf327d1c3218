"""Hostile and careless inputs to training: planted checkpoints, broken checkpoints, changed configs,
bad config values. Real single-process DeepSpeed runs (CPU, gloo) on tiny shards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from zoome_dist.config import load_config, parse_set, validate
from zoome_dist.train.checkpoints import write_checksums
from zoome_dist.train.run import _prune

pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")
ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
        "data": {"image_size": 32, "num_threads": 1, "loader": "torch"},
        "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 8, "precision": "fp32",
                  "checkpoint_every_steps": 2, "keep_checkpoints": 2}}


def train(cfg: Path, shards: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--config", str(cfg), "--shards",
                           str(shards), "--fold", "0", "--out", str(out), "--no-progress", *extra],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def base_run(shards_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hard")
    (root / "cfg.yaml").write_text(yaml.safe_dump(TINY))
    r = train(root / "cfg.yaml", shards_dir, root / "run")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root / "cfg.yaml", root / "run"


def copy_run(base_run, tmp_path) -> Path:
    shutil.copytree(base_run[1], tmp_path / "run")
    return tmp_path / "run"


def newest_tag(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


class Payload:
    """Pickles to a call of os.system: what a planted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_planted_pickle_in_checkpoint_never_runs(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / newest_tag(run) / "mp_rank_00_model_states.pt"
    torch.save({"module": Payload(marker)}, target)
    write_checksums(target.parent)  # whoever can plant a file can rewrite the folder's checksums too
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "refused to load: it asks for posix.system" in r.stderr and str(target) in r.stderr
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "the planted payload ran"


@pytest.mark.slow
def test_resume_onto_rebuilt_shards_is_refused(base_run, shards_dir, tmp_path):
    """Shards rebuilt at the same path (another manifest.json) under a run: continuing it would mix two datasets."""
    run = copy_run(base_run, tmp_path)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "manifest_sha256": "0" * 64}))
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 2 and "manifest.json changed" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_a_diverged_epoch_names_the_checkpoint_known_good(base_run, shards_dir, tmp_path):
    """Epoch 1 of a run continued from its epoch-0 checkpoint diverges (the checkpoint's schedule raised to lr
    1e30): the error names that checkpoint (the last one whose metrics were finite) and says to delete the
    newer ones; exit 2, no traceback."""
    run = copy_run(base_run, tmp_path)
    good = newest_tag(run)
    target = run / "checkpoints" / good / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)
    state["lr_scheduler"]["base_lrs"] = [1e30 for _ in state["lr_scheduler"]["base_lrs"]]
    torch.save(state, target)
    write_checksums(target.parent)
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "not finite" in r.stderr and f"--resume from {good}, the last checkpoint known good (the end of epoch 0)" \
        in r.stderr and "first delete the newer folders" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert len(tags) >= 2
    target = run / "checkpoints" / newest_tag(run) / "mp_rank_00_model_states.pt"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cannot be loaded" in r.stdout and f"resumed from the older checkpoint {tags[-2]}" in r.stdout


@pytest.mark.slow
def test_no_intact_checkpoint_is_a_clean_error(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    files = sorted((run / "checkpoints").glob("step*/mp_rank_00_model_states.pt"))
    files[0].write_bytes(b"not a checkpoint")
    for f in files[1:]:
        f.write_bytes(f.read_bytes()[:100])
    r = train(base_run[0], shards_dir, run, "--resume")
    assert r.returncode == 2 and "no intact checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert all(f.parent.name in r.stderr for f in files)


@pytest.mark.slow
def test_latest_must_name_one_of_our_checkpoints(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    (run / "checkpoints" / "latest").write_text("../../../etc")
    r = train(base_run[0], shards_dir, run, "--resume")
    assert r.returncode == 2 and "not one written by zoome_dist" in r.stderr


@pytest.mark.slow
def test_resume_with_changed_config_is_refused(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    before = (run / "config.yaml").read_text()
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "optim.lr=3e-4")
    assert r.returncode == 2 and "optim.lr: 0.0001 -> 0.0003" in r.stderr
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2")
    assert r.returncode == 2 and "--allow-config-change" in r.stderr
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "optim.lr=3e-4", "--allow-config-change")
    assert r.returncode == 2 and "optim.lr" in r.stderr
    assert (run / "config.yaml").read_text() == before, "a refused resume rewrote config.yaml"
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2


def rewind_and_resume(shards_dir, tmp_path, train_cfg: dict, *resume_args: str) -> tuple[subprocess.CompletedProcess, Path,
                                                                                           Path]:
    """Train 2 epochs, copy the run rewound to its first mid-epoch-1 checkpoint (its summary gone: unfinished) and
    train the copy again with ``resume_args``; returns that run's output, the copy and the uninterrupted run."""
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "num_threads": 2},
                                                       "train": {**TINY["train"], "epochs": 2, "keep_checkpoints": 100,
                                                                 **train_cfg}}))
    run = tmp_path / "run"
    r = train(tmp_path / "cfg.yaml", shards_dir, run)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    spe = json.loads((run / "run.json").read_text())["steps_per_epoch"]
    tags = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    mid = [t for t in tags if spe < int(t[4:]) < 2 * spe]
    assert mid, f"no mid-epoch-1 checkpoint among {tags} ({spe} steps per epoch)"
    rewound = tmp_path / "rewound"
    shutil.copytree(run, rewound)
    for t in tags:
        if int(t[4:]) > int(mid[0][4:]):
            shutil.rmtree(rewound / "checkpoints" / t)
    (rewound / "checkpoints" / "latest").write_text(mid[0])
    (rewound / "summary.json").unlink()
    r = train(tmp_path / "cfg.yaml", shards_dir, rewound, *resume_args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"micro-step {int(mid[0][4:]) - spe}" in r.stdout
    return r, rewound, run


def same_predictions(a: Path, b: Path, tol: float = 1e-6) -> bool:
    pa = pd.read_csv(a / "predictions_last.csv").set_index("image_name")["prob"]
    pb = pd.read_csv(b / "predictions_last.csv").set_index("image_name")["prob"]
    return len(pa) == len(pb) > 0 and (pa - pb.loc[pa.index]).abs().max() <= tol


@pytest.mark.slow
def test_torch_loader_resume_mid_epoch_repeats_the_uninterrupted_run(shards_dir, tmp_path):
    """One torch training loader serves every epoch (persistent workers, set_epoch); a resumed run builds
    a fresh one and skips to its micro-step. Rewind a finished 2-epoch run to a mid-epoch-1 checkpoint and
    resume: the same batches must follow, so the same final model (one CPU process, fp32: to 1e-6)."""
    _, rewound, run = rewind_and_resume(shards_dir, tmp_path, {}, "--resume")
    assert same_predictions(rewound, run)


@pytest.mark.slow
def test_unfinished_run_resumes_by_itself_with_its_weight_ema(shards_dir, tmp_path):
    """``train.ema_decay``: the EMA of the weights is what is validated and saved, and it travels in the
    checkpoint. An unfinished run is resumed without --resume (saying so) and ends with the uninterrupted run's
    EMA predictions; the model file holds the EMA, not the training weights."""
    r, rewound, run = rewind_and_resume(shards_dir, tmp_path, {"ema_decay": 0.9})
    assert "holds an unfinished run of this config: resuming it" in r.stdout + r.stderr
    assert same_predictions(rewound, run)
    from zoome_dist.core.safe_load import safe_load

    saved = safe_load(run / "model_last.pt")["state_dict"]
    ds = safe_load(run / "checkpoints" / newest_tag(run) / "mp_rank_00_model_states.pt")
    key = next(k for k in saved if k.endswith("weight") and saved[k].dim() == 4)
    raw = ds["module"][key]
    ema = ds["zoome"]["ema"]["shadow"][key]
    assert torch.equal(saved[key], ema.to(saved[key].dtype)) and not torch.allclose(raw, ema)


def test_a_skip_needs_a_loader_started_there():
    """train_one_epoch(skip=k) runs micro-steps k.. on the loader's batches as they come: a loader not set
    to start at k would silently feed batches 0.. to them (a broken exact resume), so it is refused."""
    from zoome_dist.train.loop import train_one_epoch

    with pytest.raises(ValueError, match=r"skip=3: the loader must be set to start .*set_epoch\(epoch, 3\)"):
        train_one_epoch(None, [0, 1, 2, 3, 4], None, epoch=0, steps=5, skip=3)


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    for step in (1, 2, 3, 4):
        (tmp_path / f"step{step:07d}").mkdir()
    _prune(tmp_path, 1, {"step0000004", "step0000001"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step0000001", "step0000004"]
    _prune(tmp_path, 0, set())  # never below one
    assert [p.name for p in tmp_path.iterdir()] == ["step0000004"]


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=-1", "optim.lr must be a finite number"),
    ("data.num_threads=0", "data.num_threads must be positive"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be positive"),
    ("model.pretrained=/nonexistent/resnext50.pth", "model.pretrained '/nonexistent/resnext50.pth': no such file"),
    # values only the model, the loader or the optimizer used to refuse (--print-config accepted them)
    ("data.zoom=[1.2,0.5]", r"data.zoom must be two numbers 0 < lo <= hi <= 1"),
    ("data.rotate=-5", r"data.rotate must lie in \[0, 180\]"),
    ("data.flip=2", r"data.flip must be a probability"),
    ("optim.betas=[1.5,0.9]", r"optim.betas must be two numbers in \[0, 1\)"),
    ("model.pool_size=0", "model.pool_size must be positive"),
    ("model.backbone=vgg", "Invalid model.backbone 'vgg'"),
    ("model.meta_hidden=0", "model.meta_hidden must be positive"),
    ("train.eval_batch_size=-1", "train.eval_batch_size must be 0"),
])
def test_bad_config_values(override, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(overrides=parse_set([override])))


def test_exponent_without_dot_is_a_number(tmp_path):
    assert load_config(overrides=parse_set(["optim.lr=3e-4"])).optim.lr == 3e-4
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "c.yaml").optim.lr == 3e-4


@pytest.mark.parametrize("text, message", [("- a\n- b\n", "must be a mapping"), ("a: [\n", "not a readable YAML")])
def test_config_file_that_is_not_a_mapping(tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_config(tmp_path / "c.yaml")


@pytest.mark.slow
def test_out_that_is_a_file(base_run, shards_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    r = train(base_run[0], shards_dir, tmp_path / "f")
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


def test_tune_resume_refuses_pickles_others_could_write(tmp_path):
    from zoome_dist.launch.trial import check_pickles_are_ours

    exp = tmp_path / "ray" / "search"
    (exp / "trial_1").mkdir(parents=True)
    for d in (tmp_path / "ray", exp, exp / "trial_1"):
        d.chmod(0o755)
    (exp / "tuner.pkl").write_bytes(b"x")
    (exp / "tuner.pkl").chmod(0o644)
    check_pickles_are_ours(exp)
    (exp / "experiment_state-2026.json").write_text("{}")
    (exp / "experiment_state-2026.json").chmod(0o664)
    with pytest.raises(ValueError, match=r"experiment_state-2026.json: refusing.*writable by others"):
        check_pickles_are_ours(exp)
    (exp / "experiment_state-2026.json").chmod(0o644)
    (exp / "trial_1").chmod(0o777)
    with pytest.raises(ValueError, match=r"trial_1: refusing.*mode 777"):
        check_pickles_are_ours(exp)
    (exp / "trial_1").chmod(0o755)
    (exp / "trial_1" / "state.pkl").write_bytes(b"x")
    (exp / "trial_1" / "state.pkl").chmod(0o666)
    with pytest.raises(ValueError, match=r"state.pkl: refusing to resume.*writable by others \(mode 666\)"):
        check_pickles_are_ours(exp)
    (exp / "trial_1" / "state.pkl").unlink()
    (exp / "trial_1" / "state.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(ValueError, match="a symbolic link"):
        check_pickles_are_ours(exp)
    (exp / "trial_1" / "state.pkl").unlink()
    check_pickles_are_ours(exp)
    # a folder above the experiment that others can write: they could swap the experiment itself
    (tmp_path / "ray").chmod(0o777)
    with pytest.raises(ValueError, match=r"ray \(above .*search\): refusing.*writable by others \(mode 777\)"):
        check_pickles_are_ours(exp)
    (tmp_path / "ray").chmod(0o1777)  # sticky, like /tmp: others cannot rename or remove what is ours
    check_pickles_are_ours(exp)
    (tmp_path / "ray").chmod(0o755)


class PopenPayload:
    def __reduce__(self):
        import subprocess as sp

        return (sp.Popen, (["true"],))


def test_safe_load_refuses_any_global_outside_the_allow_list(tmp_path):
    from zoome_dist.core.safe_load import UnsafeCheckpointError, safe_load

    torch.save({"x": PopenPayload()}, tmp_path / "p.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"asks for \S*Popen"):
        safe_load(tmp_path / "p.pt")


@pytest.mark.slow
def test_resume_with_another_fold_is_refused(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", "--config", str(base_run[0]), "--shards",
                        str(shards_dir), "--fold", "1", "--out", str(run), "--resume", "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "is a run of fold 0" in r.stderr


@pytest.mark.slow
def test_empty_latest_falls_back_to_the_newest_folder(base_run, shards_dir, tmp_path):
    run = copy_run(base_run, tmp_path)
    newest = newest_tag(run)
    (run / "checkpoints" / "latest").write_text("")
    r = train(base_run[0], shards_dir, run, "--resume", "--set", "train.epochs=2", "--allow-config-change")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"starting from the newest checkpoint folder, {newest}" in r.stdout


def test_socket_interface_avoids_loopback_in_a_multi_node_job(monkeypatch):
    from zoome_dist.train import engine

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_SIZE", "4")
    assert engine.socket_interface("127.0.0.1") == "lo"  # one node: loopback is right
    monkeypatch.setenv("CROSS_SIZE", "2")  # the master's own name resolving to 127.0.1.1 on a 2-node job
    route = engine.default_route_interface()
    if route:
        assert engine.socket_interface("127.0.1.1") == route
    else:
        with pytest.raises(ValueError, match="dist.socket_ifname"):
            engine.socket_interface("127.0.1.1")
    assert engine.socket_interface("127.0.1.1", configured="eth7") == "eth7"


@pytest.mark.slow
def test_second_training_into_a_running_folder_stops_at_once(base_run, shards_dir, tmp_path):
    """A relaunch into the --out of a run that still trains stops on the lock held by the first run's
    rank 0, on every rank of the relaunch (2 here: rank 1 learns it from rank 0) and before writing
    anything; the first run goes on, and its lock goes with it (its loader workers do not keep it)."""
    import signal
    import time

    from zoome_dist.core.folder_lock import FolderLock
    from zoome_dist.launch.command import local_rank_commands

    cfg, out = base_run[0], tmp_path / "run"
    args = [str(ROOT / "launchers" / "train.py"), "--config", str(cfg), "--shards", str(shards_dir), "--fold", "0",
            "--out", str(out), "--no-progress", "--set", "train.epochs=100000"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    ranks: list[subprocess.Popen] = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None and not (out / "metrics.jsonl").is_file():
            time.sleep(0.1)
        assert first.poll() is None and (out / "metrics.jsonl").is_file(), (tmp_path / "first.log").read_text()[-3000:]
        assert (out / ".lock").read_text().split()[0] == str(first.pid), "the first run holds no lock"
        written = {p: p.stat().st_mtime_ns for p in (out / "config.yaml", out / "run.json")}
        # the relaunch: 2 ranks started as Tune starts a trial's (each its own process, so each one's
        # exit status shows: rank 1 must stop by itself, not wait in a collective or be killed)
        ranks = [subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for cmd, rank_env in local_rank_commands([*args[1:], "--resume"], 2, tmp_path / "rendezvous", env)]
        said = [p.communicate(timeout=180)[0] for p in ranks]
        assert [p.returncode for p in ranks] == [2, 2], said
        busy = f"{out} is being trained by another process (pid {first.pid}"
        assert busy in said[0] and "Traceback" not in "".join(said), said  # said once, by rank 0
        assert first.poll() is None, "the first run did not survive the second"
        assert {p: p.stat().st_mtime_ns for p in written} == written, "the second run wrote into the first's folder"
    finally:
        for p in ranks:
            p.kill()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    with FolderLock(out / ".lock", "locked", ""):  # released with the killed run's rank, workers or not
        pass


def test_forked_children_do_not_keep_a_lock(tmp_path):
    """A loader worker forked while rank 0 holds the run lock must not hold it after rank 0 is gone
    (flock belongs to the open file, which a fork shares): released in the parent = free."""
    import multiprocessing
    import time

    from zoome_dist.core.folder_lock import FolderLock

    def worker(started) -> None:
        started.set()
        time.sleep(60)

    ctx = multiprocessing.get_context("fork")
    lock, started = FolderLock(tmp_path / ".lock", "busy", ""), ctx.Event()
    lock.__enter__()
    child = ctx.Process(target=worker, args=(started,), daemon=True)
    child.start()
    try:
        assert started.wait(30)
        with pytest.raises(FileExistsError, match=r"busy by another process \(pid \d+ "):
            FolderLock(tmp_path / ".lock", "busy", "").__enter__()
        lock.__exit__()
        with FolderLock(tmp_path / ".lock", "busy", ""):  # the child still lives
            assert child.is_alive()
    finally:
        child.kill()
        child.join()

