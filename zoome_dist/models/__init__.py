"""Model registry: every model takes ``(image, meta)`` and returns one logit per image."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

from torch import nn

from zoome_dist.models.meta_embed import MetaEmbedding
from zoome_dist.models.pretrained import load_pretrained
from zoome_dist.models.zoom_se import ZoomSE
from zoome_dist.models.zoome import BACKBONES, AlexNetMeta, ZooME

__all__ = ["create_model", "MODELS", "ZooME", "ZoomSE", "MetaEmbedding", "AlexNetMeta", "BACKBONES"]
log = logging.getLogger(__name__)

# name → (class, fixed options). Fixed options define the variant and cannot be overridden.
MODELS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "zoome": (ZooME, {"zoom_se": True, "meta": True}),
    "zoome_no_zoomse": (ZooME, {"zoom_se": False, "meta": True}),
    "zoome_no_meta": (ZooME, {"zoom_se": True, "meta": False}),
    "resnext50": (ZooME, {"zoom_se": False, "meta": False}),
    "resnet50": (ZooME, {"backbone": "resnet50", "zoom_se": False, "meta": False}),
    "resnet50_zoomse": (ZooME, {"backbone": "resnet50", "zoom_se": True, "meta": False}),
    "alexnet": (AlexNetMeta, {"meta": False}),
    "alexnet_meta": (AlexNetMeta, {"meta": True}),
}


def model_options(name: str) -> list[str]:
    """Options ``create_model(name, ...)`` accepts."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Valid models: {sorted(MODELS)}")
    cls, fixed = MODELS[name]
    return sorted(set(inspect.signature(cls).parameters) - set(fixed)) + ["pretrained"]


def create_model(name: str, pretrained: str | None = None, **options: Any) -> nn.Module:
    """Build a registered model; ``pretrained`` is a local torchvision ImageNet state-dict file."""
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for model {name!r}. Valid options: {valid}")
    cls, fixed = MODELS[name]
    model = cls(**{**options, **fixed})
    if pretrained:
        log.info("%s: %s", name, load_pretrained(model, pretrained).summary())
    return model
