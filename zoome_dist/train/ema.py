"""An exponential moving average (EMA) of the model's weights (``train.ema_decay``), as timm's ``ModelEmaV3``.

The average lives in fp32 beside the model (whose weights may be bf16 under DeepSpeed), is updated after
every optimizer step with torch's own EMA update (``torch.optim.swa_utils.get_ema_multi_avg_fn``), and
with a warm-up, so short runs are not dominated by the initial weights: step ``n`` uses
``min(decay, (1 + n) / (10 + n))``. Floating-point buffers (BatchNorm statistics) are averaged too;
integer ones are copied. Validation, the model files and the best epoch then use the averaged weights
(``applied``); the average travels in the DeepSpeed checkpoint, so a resumed run continues it exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.optim.swa_utils import get_ema_multi_avg_fn

from zoome_dist.train.loop import average_over_ranks


class WeightEMA:
    """The EMA of ``model``'s state (parameters and buffers), in fp32."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay {decay}: must be in (0, 1), e.g. 0.999 (0 turns the EMA off)")
        self.decay = decay
        self.updates = 0
        self.buffers = {name for name, _ in model.named_buffers()}
        self.shadow = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
                       for k, v in model.state_dict().items()}

    def step_decay(self) -> float:
        """The decay of the next update (warm-up: small for the first steps, ``decay`` from ~10/(1-decay) on)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (after an optimizer step)."""
        state = model.state_dict()
        keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        get_ema_multi_avg_fn(self.step_decay())([self.shadow[k] for k in keys],
                                                [state[k].detach().float() for k in keys], None)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(state[k])
        self.updates += 1

    def average_over_ranks(self) -> None:
        """Floating-point buffers are per rank (no SyncBN): their averages are averaged over the ranks (the
        parameters are equal on every rank), so every rank evaluates, saves and resumes the same EMA."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            average_over_ranks(v for k, v in self.shadow.items() if k in self.buffers)

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block (rank-averaged first), its own after it."""
        self.average_over_ranks()
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()})
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = {k: v.device for k, v in self.shadow.items()}
        self.updates = int(state["updates"])
        self.shadow = {k: v.to(device[k]) for k, v in state["shadow"].items()}
