"""DeepSpeed training on CPU: real launcher processes over gloo, tiny shards, resnet18 backbone."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from zoome_dist.config import load_config, parse_set, valid_keys
from zoome_dist.train.engine import deepspeed_config, free_port

pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
        "data": {"image_size": 32, "num_threads": 1},
        "optim": {"lr": 0.002, "warmup_epochs": 0.5},
        "train": {"epochs": 3, "global_batch_size": 8, "micro_batch_size": 4, "precision": "fp32",
                  "checkpoint_every_steps": 1, "keep_checkpoints": 2, "log_every": 1}}


def env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def ds_cmd(ranks: int, script: str, *args: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
            script, *args]


def train_args(cfg: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", str(cfg), "--shards", str(shards), "--fold", "0", "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def reference_run(tiny_cfg, shards_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run, shared by several tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = subprocess.run(ds_cmd(2, str(ROOT / "launchers" / "train.py"), *train_args(tiny_cfg, shards_dir, out)),
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_rank_run(reference_run, shards_dir):
    summary = json.loads((reference_run / "summary.json").read_text())
    run = json.loads((reference_run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["global_steps"] == TINY["train"]["epochs"] * run["steps_per_epoch"]
    lines = [json.loads(x) for x in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    for key in ("val_auc", "val_acc", "val_sens", "val_spec", "val_acc_t", "val_sens_at_spec90", "data_wait"):
        assert all(key in x for x in lines), key
    folds = pd.read_csv(shards_dir / "folds.csv")
    pred = pd.read_csv(reference_run / "predictions.csv")
    assert sorted(pred["image_name"]) == sorted(folds[folds["fold"] == 0]["image_name"])
    # what the 2 ranks trained on: the other folds only (all of them but each rank's last partial batch)
    assert run["train_folds"] == [1, 2]
    trained = set(pd.read_csv(reference_run / "predictions_train.csv")["image_name"])
    others = set(folds[folds["fold"] != 0]["image_name"])
    assert trained <= others and len(others - trained) < 2 * TINY["train"]["micro_batch_size"]
    assert list(pred.columns) == ["image_name", "patient_id", "target", "prob", "source", "sex", "age_approx", "site",
                                  "fitzpatrick_skin_type"]  # + the subgroups of folds.csv
    assert pred["prob"].between(0, 1).all()
    best = json.loads((reference_run / "best.json").read_text())
    assert best["metrics"]["auc"] == max(x["val_auc"] for x in lines)
    ckpts = sorted(p.name for p in (reference_run / "checkpoints").iterdir() if p.is_dir())
    assert f"step{summary['global_steps']:07d}" in ckpts and best["tag"] in ckpts
    assert len(ckpts) <= TINY["train"]["keep_checkpoints"] + 1
    assert list((reference_run / "tensorboard").rglob("events.out.tfevents*"))
    saved = yaml.safe_load((reference_run / "config.yaml").read_text())
    assert saved["model"]["backbone"] == "resnet18"
    ds = json.loads((reference_run / "deepspeed.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 1
    state = torch.load(reference_run / "model_best.pt", weights_only=True)
    assert state["metadata_encoding"]["dim"] == 12 and "backbone.fc.weight" in state["state_dict"]


@pytest.mark.slow
def test_kill_one_rank_and_resume(reference_run, tiny_cfg, shards_dir, tmp_path):
    out = tmp_path / "killed"
    spe = json.loads((reference_run / "run.json").read_text())["steps_per_epoch"]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(ds_cmd(2, str(ROOT / "launchers" / "train.py"), *train_args(tiny_cfg, shards_dir, out)),
                            env=env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    latest, killed_at = out / "checkpoints" / "latest", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        tag = latest.read_text().strip() if latest.is_file() else ""  # DeepSpeed writes it in place
        step = int(tag[4:]) if tag[4:].isdigit() else 0
        if spe < step < 2 * spe:  # a mid-epoch checkpoint of epoch 1
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
                     if any("--local_rank=1" in c for c in p.cmdline())]
            if ranks:
                ranks[0].send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.01)
    proc.wait(timeout=120)
    log.close()
    assert killed_at is not None, "the run finished before a rank could be killed mid-epoch"
    assert proc.returncode != 0 and not (out / "summary.json").exists()
    r = subprocess.run(ds_cmd(2, str(ROOT / "launchers" / "train.py"),
                              *train_args(tiny_cfg, shards_dir, out, "--resume")),
                       env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    ref = json.loads((reference_run / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert got["global_steps"] == ref["global_steps"], "resume changed the number of optimizer steps"
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    # The resumed epoch replays the same batches (loaders are a function of seed, epoch and rank), so
    # the final model matches the uninterrupted one up to float reduction order: stated tolerance
    # 1e-3 on validation AUC and on every out-of-fold probability.
    assert abs(got["last"]["val_auc"] - ref["last"]["val_auc"]) <= 1e-3
    a = pd.read_csv(out / "predictions_last.csv").set_index("image_name")["prob"]
    b = pd.read_csv(reference_run / "predictions_last.csv").set_index("image_name")["prob"]
    assert (a - b.loc[a.index]).abs().max() <= 1e-3


@pytest.mark.slow
def test_two_nodes_on_loopback_with_zero2(tiny_cfg, shards_dir, tmp_path):
    """Two launcher invocations (node ranks 0 and 1) on 127.0.0.1, ZeRO stage 2 across them."""
    port = free_port()
    out = tmp_path / "two-node"
    procs = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(node),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(ROOT / "launchers" / "train.py"),
                               *train_args(tiny_cfg, shards_dir, out, "--set", "train.epochs=1",
                                           "--set", "train.checkpoint_every_steps=0",
                                           "--set", "train.zero_stage=2")],
                              env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert json.loads((out / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2


@pytest.mark.slow
def test_data_parallel_equals_single_process_bn_free(tmp_path):
    script = str(ROOT / "tests" / "helpers" / "dp_equivalence.py")
    for ranks in (1, 2):
        r = subprocess.run(ds_cmd(ranks, script, "--out", str(tmp_path / f"params{ranks}.pt")), env=env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one = torch.load(tmp_path / "params1.pt", weights_only=True)
    two = torch.load(tmp_path / "params2.pt", weights_only=True)
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_default_config_starts_at_every_world_size_dividing_the_global_batch():
    cfg = load_config()  # global 64, micro 32
    for world in range(1, 65):
        if 64 % world:
            with pytest.raises(ValueError, match="does not divide over"):
                deepspeed_config(cfg, world)
            continue
        ds = deepspeed_config(cfg, world)
        micro, gas = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        assert micro * gas * world == 64 and micro == min(32, 64 // world), world
    odd = load_config(overrides={"train.global_batch_size": 96, "train.micro_batch_size": 32})
    ds = deepspeed_config(odd, 4)  # a share of 24: the largest micro ≤ 32 dividing it is 24
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 1)
    ds = deepspeed_config(load_config(overrides={"train.global_batch_size": 96, "train.micro_batch_size": 16}), 2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 3)


@pytest.mark.slow
def test_config_errors(tmp_path, shards_dir):
    with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['optim.learning_rate'\].*optim.lr"):
        load_config(overrides={"optim.learning_rate": 0.1})
    (tmp_path / "typo.yaml").write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValueError, match=r"train.epochz"):
        load_config(tmp_path / "typo.yaml")
    with pytest.raises(ValueError, match="expected an integer"):
        load_config(overrides=parse_set(["train.epochs=three"]))
    cfg = load_config(overrides=parse_set(["train.global_batch_size=64", "train.micro_batch_size=16"]))
    assert deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 2
    with pytest.raises(ValueError, match=r"global_batch_size 64 does not divide over 3 rank\(s\); run on one of "
                                         r"\[1, 2, 4, 8, 16, 32, 64\] ranks"):
        deepspeed_config(cfg, 3)
    assert "model.pool_size" in valid_keys() and "train.zero_stage" in valid_keys()
    launcher = [sys.executable, str(ROOT / "launchers" / "train.py"), "--shards", str(shards_dir), "--out",
                str(tmp_path / "r")]
    cases = [(["--fold", "9"], "fold 9 does not exist"),
             (["--fold", "0", "--set", "model.name=zoomy"], "Invalid model.name 'zoomy'"),
             (["--fold", "0", "--set", "train.precision=fp8"], "Invalid train.precision 'fp8'"),
             (["--fold", "0", "--set", "model.backbone=vgg"], "Invalid model.backbone 'vgg'")]
    for extra, message in cases:
        r = subprocess.run(launcher + extra, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and message in r.stderr, (extra, r.stderr[-1500:])
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "train.py"), "--shards", str(tmp_path),
                        "--fold", "0", "--out", str(tmp_path / "r")], env=env(), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no manifest.json" in r.stderr


@pytest.mark.slow
def test_non_editable_install_trains(shards_dir, tiny_cfg, tmp_path):
    """`pip install .` (not -e) then `python -m zoome_dist.train` from elsewhere: no path into the checkout."""
    import shutil

    site, src = tmp_path / "site", tmp_path / "src"  # build from a copy: the checkout stays untouched
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                            "runs", "data", "demo", ".whl", ".diag", ".gl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-m", "zoome_dist.train", *train_args(tiny_cfg, shards_dir, tmp_path / "run"),
                        "--set", "train.epochs=1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs"] == 1
    assert str(ROOT) not in r.stdout + r.stderr.replace(str(shards_dir), "")
    # the CV driver too (one rank, one fold), and the tuning entry point resolves
    r = subprocess.run([sys.executable, "-m", "zoome_dist.cli.main", "cv", "--config", str(tiny_cfg), "--shards",
                        str(shards_dir), "--folds", "1", "--out", str(tmp_path / "cv"), "--set", "train.epochs=1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "cv" / "table.md").is_file()
    r = subprocess.run([sys.executable, "-m", "zoome_dist.cli.main", "tune", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "zoome tune" in r.stdout


def test_launch_commands(tmp_path):
    from zoome_dist.launch.command import Launch, local_rank_commands, train_command

    assert train_command(["--fold", "0"])[1:] == ["-m", "zoome_dist.train", "--fold", "0"]
    cmd = train_command(["--fold", "0"], Launch(ranks=2))
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and cmd[-4:] == ["--module", "zoome_dist.train", "--fold", "0"]
    assert cmd[cmd.index("--log_level") + 1] == "warning"  # DeepSpeed's launcher INFO lines: only with debug
    cmd = train_command(["--fold", "0", "--log-level", "debug"], Launch(ranks=2))
    assert cmd[cmd.index("--log_level") + 1] == "info"
    (tmp_path / "hosts").write_text("node1 slots=8\n")
    with pytest.raises(ValueError, match="needs --master-addr"):
        train_command([], Launch(hostfile=str(tmp_path / "hosts")))
    cmd = train_command([], Launch(hostfile=str(tmp_path / "hosts"), master_addr="node1"))
    assert cmd[cmd.index("--master_addr") + 1] == "node1" and "--num_gpus" not in cmd
    ranks = local_rank_commands(["--fold", "0"], 2, tmp_path / "run" / ".rendezvous")
    assert [e["RANK"] for _, e in ranks] == ["0", "1"] and {e["ZOOME_RENDEZVOUS_FILE"] for _, e in ranks} == \
        {str(tmp_path / "run" / ".rendezvous")}


def test_batch_policy_micro_scales_global_batch_and_lr():
    base = {"train.global_batch_size": 64, "train.micro_batch_size": 8, "optim.lr": 1e-4}
    from zoome_dist.train.engine import batch_plan

    fixed = load_config(overrides=base)
    assert [(p.global_batch, p.micro, p.accumulation, p.lr) for p in (batch_plan(fixed, w) for w in (1, 8, 32))] == [
        (64, 8, 8, 1e-4), (64, 8, 1, 1e-4), (64, 2, 1, 1e-4)]  # the paper's batch: micro 2 on 32 GPUs
    for scaling, factor in (("linear", 4.0), ("sqrt", 2.0), ("none", 1.0)):
        cfg = load_config(overrides={**base, "train.batch_policy": "micro", "optim.lr_scaling": scaling})
        plan = batch_plan(cfg, 32)
        assert (plan.global_batch, plan.micro, plan.accumulation) == (256, 8, 1)
        assert plan.lr == pytest.approx(1e-4 * factor), scaling
        ds = deepspeed_config(cfg, 32)
        assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
            256, 8, 1)
    from zoome_dist.config import choices, validate
    from zoome_dist.train.engine import LR_SCALING

    assert set(LR_SCALING) == set(choices("optim.lr_scaling"))
    for key, value, message in (("train.batch_policy", "fixed", "Valid choices: ['global', 'micro']"),
                                ("train.zero_stage", 3, "Valid choices: [0, 1, 2]")):
        with pytest.raises(ValueError, match=re.escape(message)):  # refused where the value is parsed
            load_config(overrides={key: value})

    for overrides, message in (({"model.sync_bn": True}, "model.sync_bn needs CUDA"),
                               ({"train.cuda_graphs": True}, "train.cuda_graphs needs a CUDA GPU (CUDA graphs replay "
                                                             "GPU kernels); this runs on cpu"),
                               ({"train.cuda_graphs": True, "train.zero_stage": 1},
                                "train.cuda_graphs needs train.zero_stage 0"),
                               ({"monitor.flops_profile_step": -1}, "monitor.flops_profile_step must be 0")):
        with pytest.raises(ValueError) as e:
            validate(load_config(overrides=overrides))
        assert message in str(e.value)


@pytest.mark.slow
def test_batch_policy_micro_on_two_ranks(tiny_cfg, shards_dir, tmp_path):
    """Two real ranks with a fixed micro batch: the run steps micro × 2 samples with the lr scaled."""
    out = tmp_path / "run"
    cmd = ds_cmd(2, str(ROOT / "launchers" / "train.py"), *train_args(
        tiny_cfg, shards_dir, out, "--set", "train.epochs=1", "--set", "train.batch_policy=micro",
        "--set", "train.micro_batch_size=8", "--set", "optim.lr_scaling=linear",
        "--set", "monitor.csv=true", "--set", "monitor.flops_profile_step=2"))
    r = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # DeepSpeed's CPU shm all-reduce ran, and left none of its 66 MB /dev/shm buffers behind
    assert "deepspeed_shm_comm_op built successfully" in r.stdout + r.stderr
    port = cmd[cmd.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    run = json.loads((out / "run.json").read_text())
    ds = json.loads((out / "deepspeed.json").read_text())
    # TINY: global 8 is the batch optim.lr 0.002 was set for; 2 ranks × micro 8 = 16 → lr × 2
    assert run["global_batch"] == ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 1
    assert run["lr"] == pytest.approx(0.004)
    assert "global batch 16 = 8 × 1 accumulation × 2" in r.stdout + r.stderr
    # logging: time, rank and level on each line; the story from rank 0 only; curves redrawn per epoch
    info = [ln for ln in r.stdout.splitlines() if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d .*INFO ", ln)]
    assert info and all("[rank 0] INFO" in ln for ln in info), info
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # DeepSpeed's own monitors and profiler from the config
    assert {"Val_auc.csv", "Train_Samples_lr.csv", "Train_Samples_train_loss.csv"} <= {
        p.name for p in (out / "monitor" / "train").iterdir()}  # the training loss and lr per step, not only epochs
    assert "Flops Profiler" in (out / "flops.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_to_the_launcher_ends_every_rank(tiny_cfg, shards_dir, tmp_path, sig):
    """SIGTERM (kill) or SIGHUP (a closed terminal or ssh session) to `deepspeed ... zoome_dist.train` with 2
    ranks: its launch.py and both ranks end too, within seconds, as on Ctrl-C. DeepSpeed forwards SIGTERM
    itself; on SIGHUP its runner dies alone, and the ranks, watching it, end the job."""
    out = tmp_path / "run"
    proc = subprocess.Popen(ds_cmd(2, str(ROOT / "launchers" / "train.py"),
                                   *train_args(tiny_cfg, shards_dir, out, "--set", "train.epochs=50")),
                            env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoints" / "latest").is_file():
            time.sleep(0.2)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert sum(any("--local_rank" in c for c in p.cmdline()) for p in started) == 2, "the ranks never trained"
        proc.send_signal(sig)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        try:  # whatever is left of the job (its own session)
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
