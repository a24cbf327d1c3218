"""fp16 GradScaler handling through a real DeepSpeed engine on CPU (DeepSpeed refuses fp16 there, so a
CPU ``torch.amp.GradScaler`` stands in for the CUDA one it makes at ZeRO 0 + fp16).

Checks, written to ``--out/result.json``: an inf gradient makes the scaler skip the optimizer step,
DeepSpeed counts it as skipped and the LR schedule does not advance; the scaler state goes into our
checkpoint and comes back on resume.
"""
import argparse
import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from zoome_dist.config import load_config
from zoome_dist.core.rundir import RunDir
from zoome_dist.train.amp import OverflowFlag
from zoome_dist.train.engine import build_model, build_optimizer, build_scheduler, deepspeed_config, setup_distributed
from zoome_dist.train.losses import make_loss
from zoome_dist.train.run import restore, save

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--fused", action="store_true", help="the fused optimizer (as on CUDA): the scaler always steps it")
args = parser.parse_args()
out = Path(args.out)
setup_distributed()
cfg = load_config(overrides={"model.name": "alexnet_meta", "train.precision": "fp32", "optim.clip_grad": 0.0,
                             "train.global_batch_size": 4, "train.micro_batch_size": 4, "optim.warmup_epochs": 0.0,
                             "train.epochs": 1})


def make_engine():
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(cfg, model, fused=args.fused)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=build_scheduler(cfg, opt, 10),
                                             config=deepspeed_config(cfg, 1))
    engine.torch_autocast_z0_gradscaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # the stand-in
    return engine, OverflowFlag(opt)


engine, flag = make_engine()
loss_fn = make_loss("focal")
gen = torch.Generator().manual_seed(1)


def step(scale: float) -> None:
    image, meta = torch.randn(4, 3, 64, 64, generator=gen), torch.rand(4, 12, generator=gen)
    loss = loss_fn(engine(image, meta), torch.tensor([0, 1, 0, 1])) * scale
    engine.backward(loss)
    flag.arm()
    engine.step()


res = {"initial_scale": engine.torch_autocast_z0_gradscaler.get_scale()}
step(1.0)
res["lr_before_skip"] = engine.get_lr()[0]
step(float("inf"))
res["lr_after_skip"] = engine.get_lr()[0]
res["skipped_steps"] = engine.skipped_steps
step(1.0)
res["lr_after_next"] = engine.get_lr()[0]
state = engine.torch_autocast_z0_gradscaler.state_dict()
res["saved_scale"], res["saved_tracker"] = state["scale"], state["_growth_tracker"]
save(engine, RunDir(out / "run"), {"epoch": 0, "micro_step": 3, "best": None}, keep=2)
engine, flag = make_engine()
restore(engine, RunDir(out / "run"))
state = engine.torch_autocast_z0_gradscaler.state_dict()
res["restored_scale"], res["restored_tracker"] = state["scale"], state["_growth_tracker"]
(out / "result.json").write_text(json.dumps(res))
dist.barrier()
dist.destroy_process_group()
