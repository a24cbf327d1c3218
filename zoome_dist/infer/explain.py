"""Why the model said what it said, for one image: Grad-CAM, Zoom-SE cells, metadata effect.

- **Grad-CAM** on the last stage's feature map ``x`` (the map the metadata gate multiplies), for the
  predicted class: melanoma evidence when the probability reaches the decision ``threshold`` (the
  out-of-fold threshold ``zoome cv`` stored in the model file, else the epoch's training-set Youden
  threshold), benign evidence (the negated logit) otherwise.
- **Zoom-SE cells**: for each of the last Zoom-SE blocks, the first-order contribution of each of
  the P×P max-pooled cells to the logit through the gate: ``Σ_c ∂y/∂s_c · z_c(i, j) / P²`` (the
  squeeze ``s`` is the mean of the cells ``z``), i.e. which cells drove the gate, with sign.
- **Metadata effect**: the logit with the patient's metadata minus the logit with the
  all-unknown metadata vector (missing age, unknown sex and site).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.eval.plots import figure
from zoome_dist.models.zoom_se import ZoomSE


@dataclass
class Explanation:
    prob: float
    gradcam: np.ndarray              # (H, W) in [0, 1], image resolution
    cam_class: str                   # "melanoma" or "benign": the class the Grad-CAM explains
    zoom_cells: list[np.ndarray]     # per explained Zoom-SE block: (P, P) signed contributions
    meta_logit_delta: float | None   # logit(meta) − logit(unknown meta); None without a metadata branch
    prob_without_meta: float | None


def _last_zoomse(model: torch.nn.Module, k: int) -> list[ZoomSE]:
    return [m for m in model.modules() if isinstance(m, ZoomSE)][-k:] if k > 0 else []


def explain(model: torch.nn.Module, image: torch.Tensor, meta: torch.Tensor, enc: MetadataEncoding,
            zoom_blocks: int = 2, threshold: float = 0.5) -> Explanation:
    """``image`` (1, 3, H, W) normalised, ``meta`` (1, D); the model is put in eval mode."""
    model.eval()
    blocks = _last_zoomse(model, zoom_blocks)
    cells: list[torch.Tensor] = []
    saved = [(b, b.impl) for b in blocks]
    hooks = []
    for b in blocks:
        b.impl = "plain"  # the reference path exposes the pooled cells z as a graph node
        hooks.append(b.pool.register_forward_hook(lambda _m, _i, z: (z.retain_grad(), cells.append(z))[1]))
    try:
        with torch.enable_grad():
            feats = model.features(image)
            feats.retain_grad()
            logit = model.head(feats, meta)
            model.zero_grad(set_to_none=True)
            logit.sum().backward()
    finally:
        for h in hooks:
            h.remove()
        for b, impl in saved:
            b.impl = impl
    prob = float(torch.sigmoid(logit.detach()))
    sign = 1.0 if prob >= threshold else -1.0
    weights = sign * feats.grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * feats).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = (cam / cam.max()).detach() if cam.max() > 0 else cam.detach()
    zoom = [(z.grad * z).sum(1)[0].detach().cpu().numpy() for z in cells]
    delta = p0 = None
    if getattr(model, "meta", None) is not None:
        unknown = torch.from_numpy(enc.encode(None, None, None))[None].to(meta)
        with torch.no_grad():
            base = model(image, unknown)
        delta, p0 = float(logit.detach() - base), float(torch.sigmoid(base))
    return Explanation(prob, cam.cpu().numpy(), "melanoma" if sign > 0 else "benign", zoom, delta, p0)


def render(items: list[tuple[str, np.ndarray, Explanation]], out: str | Path) -> None:
    """One row per image: the image, Grad-CAM overlay, Zoom-SE cell maps; metadata effect in titles."""

    n_zoom = max(len(e.zoom_cells) for _, _, e in items)
    cols = 2 + n_zoom
    with figure(out, len(items), cols, figsize=(2.6 * cols, 2.8 * len(items)), dpi=110, squeeze=False) as (fig, axes):
        for row, (name, rgb, e) in zip(axes, items):
            meta = ("" if e.meta_logit_delta is None else
                    f"\nmetadata: logit {e.meta_logit_delta:+.2f} (p {e.prob_without_meta:.2f}→{e.prob:.2f})")
            row[0].imshow(rgb)
            row[0].set_title(f"{name}\nP(melanoma) = {e.prob:.3f}{meta}", fontsize=7)
            row[1].imshow(rgb)
            cam = row[1].imshow(e.gradcam, cmap="jet", alpha=0.45, extent=(0, rgb.shape[1], rgb.shape[0], 0))
            row[1].set_title(f"Grad-CAM, {e.cam_class} evidence", fontsize=7)
            fig.colorbar(cam, ax=row[1], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
            for j, cell in enumerate(e.zoom_cells):
                lim = float(np.abs(cell).max()) or 1.0
                row[2 + j].imshow(rgb, alpha=0.5)
                cells = row[2 + j].imshow(cell, cmap="coolwarm", vmin=-lim, vmax=lim, alpha=0.6,
                                          extent=(0, rgb.shape[1], rgb.shape[0], 0), interpolation="nearest")
                fig.colorbar(cells, ax=row[2 + j], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
                row[2 + j].set_title(f"Zoom-SE cells, block −{len(e.zoom_cells) - j}\n(red: pushed toward melanoma)",
                                     fontsize=7)
            for ax in row:
                ax.axis("off")
