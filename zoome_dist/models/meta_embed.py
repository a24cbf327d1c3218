"""Metadata Embedding: metadata → two FC layers → a per-channel gate for the last feature map.

Xing et al., Sec. III-B (Eq. 4: ``o = t ⊗ x``). Hidden width, inner activation and the gate on ``t``
are not given in the paper; defaults (256, ReLU, sigmoid) are ours (see docs/paper.md).
"""
from __future__ import annotations

import torch
from torch import nn

GATES = {"sigmoid": nn.Sigmoid, "identity": nn.Identity}


class MetaEmbedding(nn.Module):
    def __init__(self, in_features: int = 12, channels: int = 2048, hidden: int = 256,
                 act_layer: type[nn.Module] = nn.ReLU, gate: str = "sigmoid") -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"Invalid meta_gate {gate!r}. Only {sorted(GATES)} are supported.")
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = GATES[gate]()

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        """(B, in_features) → (B, channels, 1, 1)."""
        return self.gate(self.fc2(self.act(self.fc1(meta))))[:, :, None, None]


class MetaFeatures(nn.Module):
    """Metadata → two FC layers with ReLU → ``hidden`` features concatenated to the pooled image
    features before the classifier (``model.meta_fusion: concat``): a direct, additive path from the
    metadata to the logit, like the metadata MLPs of the SIIM-ISIC 2020 winners (our option, not the
    paper's)."""

    def __init__(self, in_features: int = 12, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act = nn.ReLU(inplace=True)

    def forward(self, meta: torch.Tensor) -> torch.Tensor:
        """(B, in_features) → (B, hidden)."""
        return self.act(self.fc2(self.act(self.fc1(meta))))
