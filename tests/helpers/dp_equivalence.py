"""Run 3 SGD steps of a BatchNorm-free model on one fixed global batch, split over the ranks.

Launched by tests/test_train.py with 1 rank (global batch on one rank) and with 2 ranks (half each);
rank 0 saves the final parameters to `--out PATH`. Uses the project's engine setup (config → DeepSpeed
dict, optimizer, model registry), so it checks our data-parallel path, not a toy.
"""
import argparse

import deepspeed
import torch
import torch.distributed as dist

from zoome_dist.config import load_config
from zoome_dist.train.engine import build_model, build_optimizer, deepspeed_config, setup_distributed
from zoome_dist.train.losses import make_loss

GLOBAL = 8
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True, help="where rank 0 saves the final parameters")
parser.add_argument("--local_rank", type=int, default=0)  # added by the deepspeed launcher
args = parser.parse_args()
info = setup_distributed()
cfg = load_config(overrides={"model.name": "alexnet_meta", "model.dropout": 0.0, "optim.name": "sgd",
                             "optim.lr": 0.05, "optim.clip_grad": 0.0, "train.precision": "fp32",
                             "train.global_batch_size": GLOBAL,
                             "train.micro_batch_size": GLOBAL // info.world_size})
torch.manual_seed(0)
model = build_model(cfg)
engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(cfg, model),
                                  config=deepspeed_config(cfg, info.world_size))
gen = torch.Generator().manual_seed(1)
loss_fn = make_loss("focal")
for _ in range(3):
    image, meta = torch.randn(GLOBAL, 3, 64, 64, generator=gen), torch.rand(GLOBAL, 12, generator=gen)
    label = (torch.rand(GLOBAL, generator=gen) > 0.5).long()
    part = slice(info.rank * GLOBAL // info.world_size, (info.rank + 1) * GLOBAL // info.world_size)
    loss = loss_fn(engine(image[part], meta[part]), label[part])
    engine.backward(loss)
    engine.step()
if info.rank == 0:
    torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()}, args.out)
dist.barrier()
dist.destroy_process_group()
