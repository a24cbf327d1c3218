"""fp16 at ZeRO 0: DeepSpeed's GradScaler, made resumable and kind to the LR schedule.

With ``torch_autocast`` fp16 and no ZeRO, DeepSpeed steps the optimizer through a
``torch.amp.GradScaler`` (``engine.torch_autocast_z0_gradscaler``). Two gaps closed here:

- its state (scale, growth tracker) is not in DeepSpeed's checkpoint: ``scaler_state`` /
  ``restore_scaler`` carry it in the client state, so a resumed run continues with the same scale;
- a step the scaler skips (inf/NaN gradients) still advances the LR scheduler, because DeepSpeed
  reads ``optimizer.overflow``, which a plain torch optimizer lacks. ``OverflowFlag`` sets it to
  True before each step and an optimizer post-step hook clears it when the step really ran; DeepSpeed
  then counts a skipped step (``engine.skipped_steps``) and leaves the scheduler where it was. A fused
  optimizer (training on CUDA) is always stepped: the scaler hands it ``found_inf`` and the kernel skips the
  update, so there the hook reads that flag.
"""
from __future__ import annotations

from typing import Any

import torch


def grad_scaler(engine) -> torch.amp.GradScaler | None:
    """The engine's fp16 GradScaler, or None (bf16/fp32, or ZeRO ≥ 1 with its own loss scaler)."""
    return getattr(engine, "torch_autocast_z0_gradscaler", None)


def scaler_state(engine) -> dict[str, Any] | None:
    scaler = grad_scaler(engine)
    return None if scaler is None else scaler.state_dict()


def restore_scaler(engine, state: dict[str, Any] | None) -> None:
    scaler = grad_scaler(engine)
    if scaler is None:
        return
    if not state:
        raise ValueError("the checkpoint holds no fp16 GradScaler state: it was written by a run with another "
                         "precision; resume it with that train.precision")
    scaler.load_state_dict(state)


class OverflowFlag:
    """Marks a GradScaler-skipped optimizer step as an overflow for DeepSpeed (see module doc)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        optimizer.overflow = False
        optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, *_: Any) -> None:
        found_inf = getattr(self.optimizer, "found_inf", None)  # set by GradScaler around a fused step only
        self.optimizer.overflow = bool(found_inf is not None and found_inf.item())

    def arm(self) -> None:
        """Call right before ``engine.step()``."""
        self.optimizer.overflow = True
