"""ZooME on a torchvision ResNet/ResNeXt backbone, and its ablations (Tables I and II).

The backbone is torchvision's own module: each residual block is wrapped with its Zoom-SE
(``layerK.i.block`` + ``layerK.i.attn``) and ``fc`` becomes the one-logit head, so the backbone's
state-dict keys map one-to-one onto torchvision's pretrained weights (``backbone.`` prefix, and
``.block`` inside wrapped blocks).
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from zoome_dist.models.meta_embed import MetaEmbedding, MetaFeatures
from zoome_dist.models.zoom_se import AttnBlock, ResidualAttnBlock, ZoomSE

BACKBONES = ("resnext50_32x4d", "resnet50", "resnet18")
PLACEMENTS = {"output": AttnBlock, "residual": ResidualAttnBlock}
FUSIONS = ("gate", "concat", "both")  # gate: the paper's o = t ⊗ x; concat: MetaFeatures; both


def _block_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


class ZooME(nn.Module):
    """``forward(image, meta) -> logits (B,)``; Zoom-SE and metadata embedding can each be turned off."""

    def __init__(self, backbone: str = "resnext50_32x4d", zoom_se: bool = True, pool_size: int = 4,
                 rd_ratio: float = 1 / 16, meta: bool = True, meta_dim: int = 12, meta_hidden: int = 256,
                 meta_gate: str = "sigmoid", dropout: float = 0.0, zoom_se_placement: str = "output",
                 zoom_se_gate_bias: float | None = None, meta_fusion: str = "gate", zoom_se_impl: str = "auto") -> None:
        super().__init__()
        if meta_fusion not in FUSIONS:
            raise ValueError(f"Invalid meta_fusion {meta_fusion!r}. Valid: {list(FUSIONS)}")
        if backbone not in BACKBONES:
            raise ValueError(f"Invalid backbone {backbone!r}. Only {list(BACKBONES)} are supported.")
        if zoom_se_placement not in PLACEMENTS:
            raise ValueError(f"Invalid zoom_se_placement {zoom_se_placement!r}. Valid: {sorted(PLACEMENTS)}")
        net = getattr(torchvision.models, backbone)(weights=None)
        if zoom_se:
            wrap = PLACEMENTS[zoom_se_placement]
            for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
                for i, block in enumerate(stage):
                    stage[i] = wrap(block, ZoomSE(_block_channels(block), pool_size, rd_ratio,
                                                  gate_bias=zoom_se_gate_bias, impl=zoom_se_impl))
        channels = net.fc.in_features
        concat = meta and meta_fusion in ("concat", "both")
        net.fc = nn.Linear(channels + (meta_hidden if concat else 0), 1)
        self.backbone = net
        self.meta = (MetaEmbedding(meta_dim, channels, meta_hidden, gate=meta_gate)
                     if meta and meta_fusion in ("gate", "both") else None)
        self.meta_features = MetaFeatures(meta_dim, meta_hidden) if concat else None
        self.drop = nn.Dropout(dropout)
        self.meta_dim = meta_dim

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map ``x`` (B, C, h, w)."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(image))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def head(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        if self.meta is not None:
            x = x * self.meta(meta)  # o = t ⊗ x
        x = torch.flatten(self.backbone.avgpool(x), 1)
        if self.meta_features is not None:
            x = torch.cat([x, self.meta_features(meta).to(x.dtype)], 1)
        return self.backbone.fc(self.drop(x)).squeeze(1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image), meta)


class AlexNetMeta(nn.Module):
    """AlexNet baseline (Table I/II), optionally with the metadata embedding on its last conv map."""

    def __init__(self, meta: bool = False, meta_dim: int = 12, meta_hidden: int = 256,
                 meta_gate: str = "sigmoid", dropout: float = 0.5) -> None:
        super().__init__()
        net = torchvision.models.alexnet(weights=None, dropout=dropout)
        net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, 1)
        self.backbone = net
        channels = net.features[-3].out_channels
        self.meta = MetaEmbedding(meta_dim, channels, meta_hidden, gate=meta_gate) if meta else None
        self.meta_dim = meta_dim

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.backbone.features(image)

    def head(self, x: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        if self.meta is not None:
            x = x * self.meta(meta)
        x = torch.flatten(self.backbone.avgpool(x), 1)
        return self.backbone.classifier(x).squeeze(1)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image), meta)
