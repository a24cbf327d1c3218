"""Zoom-SE's gate MLP (squeezed channels → hidden ReLU layer → sigmoid gate) and its hand-written backward,
in float32: shared by the fused autograd function (``zoom_se.py``) and the Triton one (``zoom_se_triton.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def gate_mlp(s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """The gate from the squeezed channels ``s`` (B, C), in float32: ``(h, g)``, the hidden layer and the gate."""
    h = F.relu(F.linear(s, w1.float(), b1.float()))
    return h, torch.sigmoid(F.linear(h, w2.float(), b2.float()))


def gate_mlp_backward(dq: torch.Tensor, s: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """From the gradient ``dq`` (B, C) of the gate's pre-activation (``dg · g · (1 − g)``): the gradient of the
    squeeze ``s`` (the sum over the pooled cells; divide by P² for one cell's share) and of the MLP's weights,
    as ``(ds, dw1, db1, dw2, db2)``, the weights' in their dtype."""
    dw2, db2 = dq.t() @ h, dq.sum(0)
    dpre = (dq @ w2.float()) * (h > 0)
    dw1, db1 = dpre.t() @ s, dpre.sum(0)
    return dpre @ w1.float(), dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)
