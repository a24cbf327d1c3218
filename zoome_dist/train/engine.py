"""Distributed setup, the DeepSpeed config derived from ``Config``, model/optimizer/scheduler."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoome_dist.config import Config, DistConfig
from zoome_dist.core.logs import get_logger
from zoome_dist.core.rundir import RunDir
from zoome_dist.launch.slurm import slurm_env
from zoome_dist.models import create_model, model_options


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT of a local process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def interface_to(host: str) -> str | None:
    """Name of the local network interface whose route reaches ``host`` (no packet is sent)."""
    import psutil

    try:
        ip = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))  # UDP connect: only picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def default_route_interface() -> str | None:
    """The interface of this node's default route (``/proc/net/route``), or None."""
    try:
        for line in open("/proc/net/route").read().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return None


def multi_node() -> bool:
    """Whether this job's ranks span several nodes (DeepSpeed's CROSS_SIZE, torchrun's LOCAL_WORLD_SIZE)."""
    if int(os.environ.get("CROSS_SIZE", "1")) > 1:
        return True
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    return bool(local) and int(os.environ.get("WORLD_SIZE", "1")) > int(local)


def socket_interface(master_addr: str, configured: str = "") -> str | None:
    """The interface gloo and NCCL should use: ``dist.socket_ifname`` if set, else what the user
    exported (``GLOO_SOCKET_IFNAME``), else the one that routes to ``MASTER_ADDR``. Without this gloo
    takes its address from the hostname, which resolves to loopback on many nodes, and ranks on other
    nodes are refused (``Gloo connectFullMesh failed ... remote=[127.0.0.1]``). On the master node
    itself the master's name may resolve to loopback (``127.0.1.1`` in Debian's /etc/hosts): in a
    multi-node job a loopback answer is replaced by the default route's interface."""
    chosen = configured or os.environ.get("GLOO_SOCKET_IFNAME") or interface_to(master_addr)
    if chosen == "lo" and not configured and multi_node():
        chosen = default_route_interface()
        if chosen is None:
            raise ValueError(f"MASTER_ADDR {master_addr} is a loopback address on this node, and it has no "
                             "default route to fall back on: set dist.socket_ifname to the interface the other "
                             "nodes reach it through")
    return chosen


def accelerator() -> str:
    """``cuda`` or ``cpu``: DeepSpeed's accelerator (``DS_ACCELERATOR``), which every device decision
    follows, not ``torch.cuda.is_available()``. Where ``DS_ACCELERATOR`` is unset, DeepSpeed's own choice
    between the two (a GPU torch sees, else cpu), made without loading DeepSpeed, whose choice would warn that
    it "was unable to detect" a GPU on a CPU machine."""
    if not os.environ.get("DS_ACCELERATOR"):
        return default_accelerator()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def default_accelerator() -> str:
    """What DeepSpeed picks, of cuda and cpu, where ``DS_ACCELERATOR`` is unset."""
    return "cuda" if torch.cuda.device_count() > 0 and torch.cuda.is_available() else "cpu"


def setup_distributed(dist_cfg: DistConfig | None = None) -> DistInfo:
    """Join the process group the launcher set up (deepspeed/torchrun), or make a 1-process one."""
    from datetime import timedelta

    import deepspeed

    dist_cfg = dist_cfg or DistConfig()
    os.environ.update(slurm_env(os.environ))  # srun tasks: rank, world size, master from SLURM_*
    if "RANK" not in os.environ:  # plain `python launchers/train.py`: no MPI discovery (docs/stack.md)
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    if os.environ.get("WORLD_SIZE", "1") == "1":  # one process (also RANK=0 WORLD_SIZE=1 set by hand)
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    ifname = socket_interface(os.environ["MASTER_ADDR"], dist_cfg.socket_ifname)
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator() == "cuda":
        import torch

        visible = torch.cuda.device_count()
        devices = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        bound = "SLURM_STEP_ID" in os.environ and len(devices) == 1  # srun --gpus-per-task=1
        if visible == 1 and local_rank > 0 and bound:  # the task's own GPU, whatever its SLURM_LOCALID
            local_rank = 0
            os.environ["LOCAL_RANK"] = "0"  # DeepSpeed's engine picks its device from LOCAL_RANK too
        if local_rank >= visible:
            raise ValueError(f"LOCAL_RANK {local_rank} but only {visible} GPU(s) are visible on this node: "
                             "start at most one rank per GPU (deepspeed --num_gpus / --include, CUDA_VISIBLE_DEVICES)")
        torch.cuda.set_device(local_rank)
    rendezvous = os.environ.get("ZOOME_RENDEZVOUS_FILE")  # zoome_dist.launch.command.local_rank_commands
    if rendezvous:
        os.environ.setdefault("MASTER_PORT", "0")  # unused with a file rendezvous; DeepSpeed checks it is set
        deepspeed.init_distributed(timeout=timedelta(seconds=dist_cfg.timeout_s), init_method=f"file://{rendezvous}",
                                   rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    else:
        deepspeed.init_distributed(timeout=timedelta(seconds=dist_cfg.timeout_s))
    import torch.distributed as dist

    _unlink_shm_buffer()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def _unlink_shm_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (every rank on one node) makes one file per rank in /dev/shm
    and never removes it: each run would keep that RAM until a reboot (docs/stack.md). Once every rank has
    mapped every buffer (the barrier), each removes its own file's name; the mappings stay valid and the
    memory goes with the last rank's exit."""
    import torch.distributed as dist

    if accelerator() != "cpu":
        return
    if dist.get_world_size() > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def micro_and_accumulation(global_batch: int, micro: int, world_size: int) -> tuple[int, int]:
    """The micro batch per rank and accumulation steps for ``world_size`` ranks: the largest micro
    batch ≤ the configured one that divides this rank's share of the global batch. Only a global batch
    that does not divide over the ranks is an error (naming the world sizes that work)."""
    if global_batch % world_size:
        valid = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        raise ValueError(f"train.global_batch_size {global_batch} does not divide over {world_size} rank(s); "
                         f"run on one of {valid} ranks, or choose a global batch that is a multiple of {world_size}")
    share = global_batch // world_size
    m = max(d for d in range(1, min(micro, share) + 1) if share % d == 0)
    if m * 2 <= min(micro, share):
        get_logger(__name__).warning(f"micro batch {m} per rank (train.micro_batch_size {micro}): {share} per rank "
                                     f"only divides into micro batches of {m}; choose a global batch with more "
                                     "divisors (e.g. a power of 2)")
    return m, share // m


LR_SCALING = {"linear": lambda r: r, "sqrt": math.sqrt, "none": lambda r: 1.0}  # optim.lr_scaling's choices


@dataclass(frozen=True)
class BatchPlan:
    """How ``world_size`` ranks step: the global batch, each rank's micro batch, accumulation, and lr."""

    global_batch: int
    micro: int
    accumulation: int
    lr: float


def batch_plan(cfg: Config, world_size: int) -> BatchPlan:
    """``train.batch_policy`` global: the configured global batch over any number of ranks (micro batch
    and accumulation derived), ``optim.lr`` as set. micro: every rank steps ``micro_batch_size`` samples
    (no accumulation), so the global batch grows with the ranks, and the learning rate, set for
    ``global_batch_size``, is scaled by ``optim.lr_scaling`` (linear: Goyal et al. 2017, with warm-up;
    sqrt: the usual rule for Adam)."""
    t = cfg.train
    if t.batch_policy == "micro":
        g = t.micro_batch_size * world_size
        return BatchPlan(g, t.micro_batch_size, 1, cfg.optim.lr * LR_SCALING[cfg.optim.lr_scaling](g / t.global_batch_size))
    m, gas = micro_and_accumulation(t.global_batch_size, t.micro_batch_size, world_size)
    return BatchPlan(t.global_batch_size, m, gas, cfg.optim.lr)


def deepspeed_config(cfg: Config, world_size: int, run: RunDir | None = None, plan: BatchPlan | None = None) -> dict:
    """The DeepSpeed config dict, derived from ``cfg`` for ``world_size`` ranks (its only source); with
    the run folder ``run``, the monitors that write into it (``plan``: ``batch_plan``'s, if made)."""
    plan = plan or batch_plan(cfg, world_size)
    ds: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "zero_allow_untested_optimizer": True,  # a client torch optimizer: nothing JIT-compiled
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optim.clip_grad > 0:
        ds["gradient_clipping"] = cfg.optim.clip_grad
    if cfg.train.precision != "fp32":
        # torch autocast keeps fp32 master weights and BatchNorm in fp32; DeepSpeed's own "bf16"
        # mode breaks BatchNorm models (docs/stack.md). fp16 adds a GradScaler at ZeRO 0.
        ds["torch_autocast"] = {"enabled": True,
                                "dtype": {"bf16": "bfloat16", "fp16": "float16"}[cfg.train.precision]}
    m = cfg.monitor
    if run is not None:
        ds["tensorboard"] = {"enabled": True, "output_path": str(run.tensorboard), "job_name": "train"}
        if m.csv:
            ds["csv_monitor"] = {"enabled": True, "output_path": str(run.monitor_csv), "job_name": "train"}
        if m.flops_profile_step:
            ds["flops_profiler"] = {"enabled": True, "profile_step": m.flops_profile_step, "module_depth": -1,
                                    "top_modules": 3, "detailed": False, "output_file": str(run.flops)}
    if m.wandb_project:
        ds["wandb"] = {"enabled": True, "project": m.wandb_project}
    if m.comet_project:
        ds["comet"] = {"enabled": True, "project": m.comet_project}
    return ds


def build_model(cfg: Config) -> nn.Module:
    """The registered model with the options of ``cfg.model`` that it takes."""
    from zoome_dist.config import ModelConfig

    takes = set(model_options(cfg.model.name))
    defaults = ModelConfig()
    opts = {}
    for key in ("backbone", "pool_size", "rd_ratio", "meta_hidden", "meta_gate", "dropout", "zoom_se_placement",
                "zoom_se_gate_bias", "meta_fusion", "zoom_se_impl"):
        value = getattr(cfg.model, key)
        if key in takes:
            opts[key] = value
        elif value != getattr(defaults, key):
            raise ValueError(f"model.{key} does not apply to model {cfg.model.name!r} "
                             f"(its options: {sorted(takes)})")
    return create_model(cfg.model.name, pretrained=cfg.model.pretrained, **opts)


META_BRANCH = ("meta", "meta_features")  # top-level module names of the metadata branch


def build_optimizer(cfg: Config, model: nn.Module, lr: float | None = None,
                    fused: bool = False) -> torch.optim.Optimizer:
    """``cfg.optim``'s optimizer at ``lr`` (default ``optim.lr``; ``batch_plan`` gives the scaled one). ``fused``
    (training on CUDA): torch's fused implementation, one kernel per step for all parameters instead of torch's
    default multi-tensor (foreach) kernels per group and operation: fewer launches for the launch-bound small-batch
    step. A run resumed from a checkpoint of the other kind keeps the checkpoint's (torch restores the parameter
    groups whole, ``fused`` included)."""
    fused_opt = {"fused": True} if fused else {}
    o = cfg.optim
    lr = o.lr if lr is None else lr
    params: list | object = model.parameters()
    meta = [p for n, p in model.named_parameters() if n.split(".")[0] in META_BRANCH]
    if o.meta_lr_mult != 1.0 and meta:  # the metadata branch at its own lr (models without one: ignored)
        rest = [p for n, p in model.named_parameters() if n.split(".")[0] not in META_BRANCH]
        params = [{"params": rest}, {"params": meta, "lr": lr * o.meta_lr_mult}]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, **fused_opt)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused_opt)


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine down to ``min_lr_ratio`` × lr (or constant); per optimizer step."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = min(total, round(cfg.optim.warmup_epochs * steps_per_epoch))
    floor = cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
