"""Load a torchvision ImageNet state dict (a local file, never a download) into a wrapped backbone.

Get the file once on a machine with internet access (the command: docs/real-data.md; torchvision's
``get_weight("ResNeXt50_32X4D_Weights.IMAGENET1K_V1").get_state_dict()`` saved with ``torch.save``), then
pass ``model.pretrained=/path/resnext50_32x4d_imagenet.pth``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from zoome_dist.core.safe_load import safe_load

_ATTN = re.compile(r"\.attn\.")
_HEAD = ("backbone.fc.", "backbone.classifier.6.")


@dataclass
class LoadReport:
    loaded: list[str]
    fresh: list[str]      # our parameters with no pretrained counterpart (Zoom-SE, metadata, head)
    ignored: list[str]    # pretrained keys with no place in the model (the 1000-class head)

    def summary(self) -> str:
        groups = sorted({k.split(".attn.")[0].split(".")[0] if ".attn." in k else k.rsplit(".", 1)[0]
                         for k in self.fresh})
        return (f"loaded {len(self.loaded)} pretrained tensors; {len(self.fresh)} start fresh "
                f"({', '.join(groups[:6])}{' ...' if len(groups) > 6 else ''}); ignored {self.ignored}")


def _tv_key(model_key: str) -> str:
    """Our key → torchvision's key (drop the ``backbone.`` prefix and the wrapper's ``.block``)."""
    key = model_key[len("backbone."):]
    return re.sub(r"^(layer\d+\.\d+)\.block\.", r"\1.", key)


def load_pretrained(model: nn.Module, path: str | Path) -> LoadReport:
    """Copy every backbone tensor from ``path``; strict on backbone keys, head and extras start fresh."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path} (zoome_dist never downloads; "
                                "see zoome_dist/models/pretrained.py for how to obtain it)")
    state = safe_load(path, map_location="cpu")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    ours = model.state_dict()
    backbone_keys = [k for k in ours if k.startswith("backbone.") and not _ATTN.search(k)
                     and not k.startswith(_HEAD)]
    wanted = {_tv_key(k): k for k in backbone_keys}
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise ValueError(f"{path}: not a state dict for this backbone; missing {len(missing)} key(s), "
                         f"e.g. {missing[:5]}")
    new = {}
    for tv_key, key in wanted.items():
        if state[tv_key].shape != ours[key].shape:
            raise ValueError(f"{path}: {tv_key} has shape {tuple(state[tv_key].shape)}, the model "
                             f"expects {tuple(ours[key].shape)} (wrong backbone?)")
        new[key] = state[tv_key]
    model.load_state_dict(new, strict=False)
    fresh = sorted(set(ours) - set(new))
    ignored = sorted(set(state) - set(wanted))
    return LoadReport(loaded=sorted(new), fresh=fresh, ignored=ignored)
