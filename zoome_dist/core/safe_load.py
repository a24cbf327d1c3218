"""Loading ``.pt`` files as data only: ``torch.load(weights_only=True)`` with errors that say why.

Every checkpoint this project reads goes through ``safe_load``: DeepSpeed's (via
``train.safe_checkpoint``), ``model_best.pt`` in ``zoome predict/explain``, pretrained weights."""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to load code (a global outside the allow-list): tampering, never retried."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is not a readable torch checkpoint (truncated, garbage): an older one may do."""


def safe_load(path: str | Path, map_location=None, allowed: list | tuple = ()):
    """``torch.load(weights_only=True)`` (plus the ``allowed`` plain-data classes) that names the file
    and what it tried to load when it refuses."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e), re.IGNORECASE)  # "unsupported GLOBAL x" / "GLOBAL x was not allowed"
        if found:
            raise UnsafeCheckpointError(f"{path}: refused to load: it asks for {found.group(1)}, not tensors and plain "
                                        "data; it was not written by zoome_dist, or was tampered with") from None
        raise DamagedCheckpointError(f"{path}: not a readable checkpoint (refused by the safe loader)") from None
    except (RuntimeError, EOFError) as e:  # truncated or not a torch file at all
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DamagedCheckpointError(f"{path}: not a readable checkpoint ({first})") from None
