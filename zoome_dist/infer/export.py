"""``zoome export``: one model or a fold ensemble → one TorchScript or ONNX file for deployment.

The exported graph takes ``image`` (B, 3, S, S) float32 RGB in [0, 1] at the training size S (resized
as ``zoome predict`` does: the whole image to S×S) and ``metadata`` (B, dim) float32, the vector of
the checkpoint's metadata encoding, and returns ``prob`` (B,): the mean over members of P(melanoma)
(through each member's out-of-fold temperature with ``--calibrate``). ImageNet normalisation is
inside the graph. ``FILE.json`` beside it says all of that (size, encoding, threshold, members, and
``files``: what to ship, i.e. the model file and, for ONNX weights over 1 GiB, ``FILE.data``).
Zoom-SE runs its reference path with the adaptive max pool as explicit window maxima (ONNX has no
adaptive max pool); the outputs are checked against PyTorch before the file is kept.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from zoome_dist.eval.calibration import apply_temperature
from zoome_dist.infer.predict import Member, check_ensemble
from zoome_dist.models.zoom_se import SlicedAdaptiveMaxPool2d, ZoomSE
from zoome_dist.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

FORMATS = ("torchscript", "onnx")


class Ensemble(nn.Module):
    """``(image in [0, 1], metadata) → mean P(melanoma)`` of ``models``, each logit divided by its
    temperature first."""

    def __init__(self, models: list[nn.Module], temperatures: list[float]) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(temperatures, dtype=torch.float32))

    def forward(self, image: torch.Tensor, metadata: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        probs = [torch.sigmoid(m(x, metadata) / self.temperature[k]) for k, m in enumerate(self.models)]
        return torch.stack(probs, 0).mean(0)


def exportable(model: nn.Module) -> nn.Module:
    """The model with every Zoom-SE on its reference path and an explicit adaptive max pool."""
    for mod in model.modules():
        if isinstance(mod, ZoomSE):
            mod.impl = "plain"
            mod.pool = SlicedAdaptiveMaxPool2d(mod.pool_size)
    return model.float().to(memory_format=torch.contiguous_format).eval()


def build_ensemble(members: list[Member], calibrate: bool = False) -> Ensemble:
    check_ensemble(members, calibrate)
    temps = [float(m.calibration["temperature"]) if calibrate else 1.0 for m in members]
    net = Ensemble([exportable(m.model.cpu()) for m in members], temps).eval()
    return net.requires_grad_(False)  # an inference graph: no autograd in the exported file


ONNX_INLINE_LIMIT = 1 << 30  # weights above 1 GiB go to one external file (protobuf's limit is 2 GiB)


def _torchscript(net: nn.Module, example: tuple, check: tuple, path: Path) -> np.ndarray:
    with torch.no_grad():
        torch.jit.trace(net, example).save(str(path))
    return torch.jit.load(str(path))(*check).detach().numpy()


def _onnx(net: nn.Module, example: tuple, check: tuple, path: Path) -> np.ndarray:
    """One self-contained ``.onnx`` file; a model whose weights exceed ``ONNX_INLINE_LIMIT`` keeps them in
    ``<name>.data`` beside it (referenced by that name: ship both files together)."""
    import onnxruntime

    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    torch.onnx.export(net, example, str(path), input_names=["image", "metadata"], output_names=["prob"],
                      dynamic_shapes={"image": {0: "batch"}, "metadata": {0: "batch"}}, dynamo=True,
                      external_data=weights > ONNX_INLINE_LIMIT, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": check[0].numpy(), "metadata": check[1].numpy()})[0]


def export(members: list[Member], fmt: str, out: Path, calibrate: bool = False, batch: int = 2) -> dict:
    """Write ``out`` (+ ``out.json``) and return the description; raises if the exported file's outputs
    differ from PyTorch's by more than 1e-4 on random inputs."""
    if fmt not in FORMATS:
        raise ValueError(f"Invalid --format {fmt!r}. Valid: {list(FORMATS)}")
    net = build_ensemble(members, calibrate)
    enc, size = check_ensemble(members)
    gen = torch.Generator().manual_seed(0)
    example = (torch.rand(batch, 3, size, size, generator=gen), torch.rand(batch, enc.dim, generator=gen))
    check = (torch.rand(batch + 1, 3, size, size, generator=gen), torch.rand(batch + 1, enc.dim, generator=gen))
    with torch.no_grad():
        expect = net(*check).numpy()
    # written under its final name into a hidden folder beside ``out``, checked there, then moved: an ONNX
    # file's external weights are referenced by name, so they must never be written under a temporary one
    stage = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice, tracer notes on fixed shapes
            got = (_torchscript if fmt == "torchscript" else _onnx)(net, example, check, stage / out.name)
        err = float(np.abs(got - expect).max())
        if not err <= 1e-4:
            raise RuntimeError(f"exported {fmt} model differs from PyTorch by {err:.3g} (> 1e-4); nothing written")
        files = sorted(stage.iterdir(), key=lambda p: p.name == out.name)  # the model file last
        for f in files:
            f.replace(out.with_name(f.name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    thresholds = {m.calibration.get("threshold") for m in members}
    info = {"format": fmt, "file": out.name, "files": [f.name for f in files],
            "members": [str(m.path) for m in members],
            "inputs": {"image": f"float32 (B, 3, {size}, {size}) RGB in [0, 1], the whole image resized",
                       "metadata": f"float32 (B, {enc.dim}): {enc.names}"},
            "output": "prob: float32 (B,), mean P(melanoma) over members", "image_size": size,
            "normalisation": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "inside_graph": True},
            "metadata_encoding": enc.to_dict(), "calibrated": calibrate,
            "threshold": thresholds.pop() if len(thresholds) == 1 else None, "max_abs_diff_vs_pytorch": err}
    if calibrate and info["threshold"] is not None:  # the stored threshold is on uncalibrated probabilities
        info["threshold_uncalibrated"] = info["threshold"]
        # one member: the same decision on the calibrated scale; an ensemble's mean of calibrated
        # probabilities is no monotone function of the uncalibrated mean: no exact threshold exists
        info["threshold"] = (float(apply_temperature(np.array([info["threshold"]]), members[0].calibration["temperature"])[0])
                             if len(members) == 1 else None)
    out.with_name(out.name + ".json").write_text(json.dumps(info, indent=1))
    return info
