"""The one configuration source of truth: dataclasses → YAML/JSON file → ``--set a.b=value`` overrides.

Defaults are the paper's recipe (Adam 1e-4, global batch 64, 224 px, focal α 0.25 γ 2) plus our
explicit choices where it is silent (20 epochs, 1 warm-up epoch + cosine, no weight decay, gradient
clipping at 1.0, bf16 autocast). Unknown keys are errors listing the valid ones. The DeepSpeed
config is derived from this in ``zoome_dist.train.engine.deepspeed_config``; Ray search spaces
name keys of this tree (``optim.lr``) and are checked with ``check_keys``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def choice(default: Any, choices: tuple) -> Any:
    """A config field whose valid values are ``choices``: checked when the value is parsed."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class ModelConfig:
    name: str = "zoome"
    backbone: str = "resnext50_32x4d"   # ResNet-family models only
    pool_size: int = 4                  # Zoom-SE adaptive max-pool size P
    rd_ratio: float = 0.0625            # Zoom-SE reduction 1/r
    zoom_se_placement: str = choice("output", ("output", "residual"))  # gate the block output (paper) or its branch
    zoom_se_gate_bias: float | None = None  # None: default init (gates ≈ 0.5); a value: gates start at sigmoid(value)
    # Zoom-SE's code: auto (= fused until a GPU check shows triton equal and faster), triton (CUDA), fused, plain
    zoom_se_impl: str = choice("auto", ("auto", "triton", "fused", "plain"))
    meta_hidden: int = 256
    meta_gate: str = "sigmoid"
    meta_fusion: str = choice("gate", ("gate", "concat", "both"))  # gate: the paper's o = t ⊗ x; concat: MLP features
    dropout: float = 0.0
    pretrained: str | None = None       # local torchvision ImageNet state dict
    channels_last: bool = True
    sync_bn: bool = False               # BatchNorm statistics over all ranks (CUDA; for small micro batches)
    compile: bool = False               # torch.compile the model


@dataclass
class DataConfig:
    image_size: int = 224
    loader: str = "auto"                # auto (dali where it imports) | dali | torch
    device: str = "auto"                # auto | gpu | cpu: where decoding/augmentation run
    num_threads: int = 4                # DALI threads / DataLoader workers per rank
    zoom: list[float] = field(default_factory=lambda: [0.8, 1.0])
    rotate: float = 30.0
    flip: float = 0.5


@dataclass
class OptimConfig:
    name: str = choice("adam", ("adam", "adamw", "sgd"))
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9               # sgd only
    schedule: str = choice("cosine", ("cosine", "constant"))  # after the warm-up
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0              # 0 disables
    # train.batch_policy micro: lr × (global / train.global_batch_size) (linear), its square root, or none
    lr_scaling: str = choice("linear", ("linear", "sqrt", "none"))
    meta_lr_mult: float = 1.0           # the metadata branch's lr = lr × this (its own parameter group)


@dataclass
class LossConfig:
    name: str = "focal"                 # focal | bce
    alpha: float = 0.25
    gamma: float = 2.0


@dataclass
class TrainConfig:
    epochs: int = 20
    patience: int = 0                   # early stopping: stop after this many epochs without a better val AUC; 0: off
    ema_decay: float = 0.0              # EMA of the weights (validated, saved, best-picked); 0: off; e.g. 0.999
    global_batch_size: int = 64
    micro_batch_size: int = 32          # per rank and step; accumulation = global / (micro × world)
    # global: global_batch_size fixed whatever the ranks (the paper); micro: micro_batch_size per rank
    # fixed, global = micro × ranks, optim.lr set for global_batch_size and scaled (optim.lr_scaling)
    batch_policy: str = choice("global", ("global", "micro"))
    eval_batch_size: int = 0            # 0: same as micro_batch_size
    precision: str = choice("bf16", ("fp32", "bf16", "fp16"))  # fp16: CUDA, ZeRO 0
    zero_stage: int = choice(0, (0, 1, 2))
    seed: int = 0
    checkpoint_every_steps: int = 0     # optimizer steps between mid-epoch checkpoints; 0: epochs only
    cuda_graphs: bool = False           # CUDA graphs for the step (torch.compile reduce-overhead): small micro batches
    keep_checkpoints: int = 2           # newest checkpoints kept (the best epoch's is always kept)
    log_every: int = 10


@dataclass
class DistConfig:
    socket_ifname: str = ""             # interface gloo/NCCL use; "" = the one that routes to MASTER_ADDR
    timeout_s: float = 300.0            # a collective waiting longer (a lost rank) fails the job


@dataclass
class MonitorConfig:
    """DeepSpeed's own monitors and profiler, beside its TensorBoard monitor (always on)."""

    csv: bool = False                   # DeepSpeed csv_monitor: <run>/monitor/train/*.csv
    wandb_project: str = ""             # Weights & Biases project ("" off; needs wandb and a login)
    comet_project: str = ""             # Comet project ("" off; needs comet_ml and an API key)
    flops_profile_step: int = 0         # DeepSpeed flops profiler at this optimizer step (0 off): <run>/flops.txt


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    @classmethod
    def from_tree(cls, tree: dict[str, Any], where: str = "") -> "Config":
        """A nested dict (a config file's content, a checkpoint's config) over the defaults, type-checked."""
        return apply_overrides(cls(), flatten(tree, where))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types(section: str) -> dict[str, Any]:
    cls = typing.get_type_hints(Config)[section]  # the section's dataclass
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def choices(key: str) -> tuple | None:
    """The valid values of ``section.key``, where the config restricts them."""
    section, name = key.split(".", 1)
    cls = typing.get_type_hints(Config)[section]
    return next(f.metadata.get("choices") for f in dataclasses.fields(cls) if f.name == name)


def valid_keys() -> list[str]:
    """Every ``section.key`` of the config tree."""
    return [f"{s}.{k}" for s in SECTIONS for k in _section_types(s)]


def check_keys(keys: list[str]) -> None:
    """Raise naming any key that is not in the config tree."""
    bad = [k for k in keys if k not in valid_keys()]
    if bad:
        raise ValueError(f"Unknown config key(s) {bad}. Valid keys: {valid_keys()}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(typ)
        return [_coerce(key, v, inner) for v in value]
    if typ is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key {key}: expected true/false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ValueError(f"config key {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {typ} for {key}")


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set ``section.key`` values (flat dict), type-checked; unknown keys are errors."""
    check_keys(list(overrides))
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        value = _coerce(key, value, _section_types(section)[name])
        valid = choices(key)
        if valid is not None and value not in valid:
            raise ValueError(f"Invalid {key} {value!r}. Valid choices: {list(valid)}")
        setattr(getattr(cfg, section), name, value)
    return cfg


def flatten(tree: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A nested config dict → ``{"section.key": value}``; unknown sections are reported as keys."""
    flat = {}
    for section, body in tree.items():
        if not isinstance(body, dict):
            raise ValueError(f"{where}config section {section!r} must be a mapping; valid sections: "
                             f"{list(SECTIONS)}")
        for k, v in body.items():
            flat[f"{section}.{k}"] = v
    return flat


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=3e-4", "model.name=zoome_no_meta"]`` → typed values (YAML scalars)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults ← YAML/JSON file ← overrides."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
            tree = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: not a readable {'JSON' if path.suffix == '.json' else 'YAML'} config "
                             f"({str(e).splitlines()[0]})") from None
        if tree is not None and not isinstance(tree, dict):
            raise ValueError(f"{path}: a config must be a mapping of sections {list(SECTIONS)}, "
                             f"got a {type(tree).__name__}")
        apply_overrides(cfg, flatten(tree or {}, f"{path}: "))
    if overrides:
        apply_overrides(cfg, overrides)
    return cfg


def changes(saved: str | Path, cfg: "Config") -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, cfg's value)}`` for every key where ``cfg`` differs from the config file ``saved``."""
    old, new = flatten(load_config(saved).to_dict()), flatten(cfg.to_dict())
    return {k: (old.get(k), new[k]) for k in sorted(new) if old.get(k) != new[k]}


def _choose(key: str, value: Any, valid: tuple | list) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {key} {value!r}. Valid choices: {list(valid)}")


def _at_least(cfg: Config, keys: tuple[str, ...], low: int) -> None:
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < low:
            raise ValueError(f"{key} must be {'positive' if low == 1 else f'≥ {low}'}, got {value}")


def _check_registries(cfg: Config) -> None:
    """Names looked up in the registries of models, losses, gates and loaders (imported only here)."""
    from zoome_dist.models import BACKBONES, MODELS, model_options
    from zoome_dist.models.meta_embed import GATES
    from zoome_dist.pipeline import DEVICES, LOADERS
    from zoome_dist.train.losses import LOSSES

    _choose("model.name", cfg.model.name, sorted(MODELS))
    _choose("loss.name", cfg.loss.name, LOSSES)
    _choose("data.loader", cfg.data.loader, ("auto",) + LOADERS)
    _choose("data.device", cfg.data.device, DEVICES)
    if "backbone" in model_options(cfg.model.name):
        _choose("model.backbone", cfg.model.backbone, list(BACKBONES))
    _choose("model.meta_gate", cfg.model.meta_gate, sorted(GATES))


def _check_ranges(cfg: Config) -> None:
    _at_least(cfg, ("train.epochs", "train.global_batch_size", "train.micro_batch_size", "data.image_size",
                    "train.keep_checkpoints", "data.num_threads", "model.pool_size", "model.meta_hidden"), 1)
    for key in ("optim.lr", "optim.weight_decay", "optim.momentum", "optim.warmup_epochs", "optim.min_lr_ratio",
                "optim.clip_grad", "loss.alpha", "loss.gamma", "model.dropout", "model.rd_ratio", "optim.meta_lr_mult"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{key} must be a finite number ≥ 0, got {value}")
    for key in ("lr", "meta_lr_mult"):
        if getattr(cfg.optim, key) == 0:
            raise ValueError(f"optim.{key} must be positive, got 0")
    if cfg.train.patience < 0:
        raise ValueError(f"train.patience must be 0 (no early stopping) or a number of epochs, got "
                         f"{cfg.train.patience}")
    if not (math.isfinite(cfg.train.ema_decay) and 0 <= cfg.train.ema_decay < 1):
        raise ValueError(f"train.ema_decay must lie in [0, 1) (0: no EMA of the weights; e.g. 0.999), got "
                         f"{cfg.train.ema_decay}")
    if cfg.train.eval_batch_size < 0:
        raise ValueError(f"train.eval_batch_size must be 0 (the micro batch) or positive, got {cfg.train.eval_batch_size}")
    if len(cfg.data.zoom) != 2 or not 0 < cfg.data.zoom[0] <= cfg.data.zoom[1] <= 1:
        raise ValueError(f"data.zoom must be two numbers 0 < lo <= hi <= 1 (the crop's share of the side), got "
                         f"{cfg.data.zoom}")
    if not 0 <= cfg.data.rotate <= 180:
        raise ValueError(f"data.rotate must lie in [0, 180] degrees, got {cfg.data.rotate}")
    if not 0 <= cfg.data.flip <= 1:
        raise ValueError(f"data.flip must be a probability in [0, 1], got {cfg.data.flip}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    bias = cfg.model.zoom_se_gate_bias
    if bias is not None and not (math.isfinite(bias) and abs(bias) <= 10):
        raise ValueError(f"model.zoom_se_gate_bias must lie in -10..10 (or be null), got {bias}: beyond, the gates "
                         "saturate (sigmoid' ≈ 0) and Zoom-SE never trains; 3 starts every gate at 0.95")
    if cfg.monitor.flops_profile_step < 0:
        raise ValueError(f"monitor.flops_profile_step must be 0 (off) or a positive step, got "
                         f"{cfg.monitor.flops_profile_step}")
    if cfg.dist.timeout_s <= 0:
        raise ValueError(f"dist.timeout_s must be positive, got {cfg.dist.timeout_s}")


def _accelerator() -> str:
    from zoome_dist.train.engine import accelerator

    return accelerator()


def _cuda_reasons(cfg: Config) -> list[str]:
    """The keys of ``cfg`` that need a CUDA GPU, each as its error (``{device}``: what this node runs on)."""
    triton = cfg.model.zoom_se_impl == "triton" and os.environ.get("TRITON_INTERPRET") != "1"  # interpreter: CPU too
    reasons = [
        (triton, "model.zoom_se_impl triton needs a CUDA GPU; this runs on {device}: use auto (or TRITON_INTERPRET=1, "
                 "Triton's slow interpreter, to check the kernels on CPU)"),
        (cfg.train.cuda_graphs, "train.cuda_graphs needs a CUDA GPU (CUDA graphs replay GPU kernels); this runs on "
                                "{device}: set train.cuda_graphs false"),
        (cfg.model.sync_bn, "model.sync_bn needs CUDA GPUs (torch's SyncBatchNorm runs on GPUs only); this runs on "
                            "{device}: set model.sync_bn false"),
        (cfg.train.precision == "fp16", "train.precision fp16 needs a CUDA GPU; on CPU use bf16 or fp32"),
        (cfg.data.device == "gpu", "data.device gpu needs DeepSpeed's cuda accelerator; it runs on {device} "
                                   "(DS_ACCELERATOR): use data.device auto or cpu")]
    return [why for needed, why in reasons if needed]


def _check_machine(cfg: Config) -> None:
    """What this node must have: the accelerator (DeepSpeed's, ``DS_ACCELERATOR``: asked only where a key
    needs CUDA, since asking starts DeepSpeed's accelerator), files, packages."""
    if cfg.train.precision == "fp16" and cfg.train.zero_stage != 0:
        raise ValueError("train.precision fp16 (autocast + GradScaler) needs train.zero_stage 0; use bf16")
    if cfg.train.cuda_graphs and cfg.train.zero_stage != 0:
        raise ValueError("train.cuda_graphs needs train.zero_stage 0: ZeRO 1/2 reduce and partition gradients "
                         "inside the step, where a captured graph cannot follow; use zero_stage 0")
    if cfg.model.zoom_se_impl == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("model.zoom_se_impl triton needs the triton package (it comes with torch's CUDA build); "
                         "use auto")
    reasons = _cuda_reasons(cfg)
    if reasons and (device := _accelerator()) != "cuda":
        raise ValueError(reasons[0].format(device=device))
    if cfg.model.pretrained and not Path(cfg.model.pretrained).expanduser().is_file():
        raise ValueError(f"model.pretrained {cfg.model.pretrained!r}: no such file (seen from this node, as every rank "
                         f"will look). It is a torchvision ImageNet state dict you provide, e.g. for "
                         f"{cfg.model.backbone}: fetch it on a connected machine with torchvision.models.get_weight("
                         f"...).get_state_dict() (docs/real-data.md), copy it here, and give its path")
    for key, module in (("wandb_project", "wandb"), ("comet_project", "comet_ml")):
        if getattr(cfg.monitor, key) and importlib.util.find_spec(module) is None:
            raise ValueError(f"monitor.{key} needs the {module} package (pip install {module.replace('_', '-')}); "
                             f"or set monitor.{key} to ''")


def validate(cfg: Config) -> Config:
    """Every check of a config beyond its own choices (``choice`` fields, checked when a value is parsed):
    registry names, ranges, and what this node must have. Each names the bad value and the valid ones.
    Returns ``cfg``."""
    _check_registries(cfg)
    _check_ranges(cfg)
    _check_machine(cfg)
    return cfg
