"""Training losses on one logit per image: focal (the paper's) or plain BCE."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

LOSSES = ("focal", "bce")


def make_loss(name: str = "focal", alpha: float = 0.25, gamma: float = 2.0
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean loss over the batch. Focal: α weights the positive class (Lin et al.)."""
    if name == "focal":
        return lambda logits, target: sigmoid_focal_loss(logits.float(), target.float(), alpha=alpha,
                                                         gamma=gamma, reduction="mean")
    if name == "bce":
        return lambda logits, target: F.binary_cross_entropy_with_logits(logits.float(), target.float())
    raise ValueError(f"Invalid loss {name!r}. Only {list(LOSSES)} are supported.")
