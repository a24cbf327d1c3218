"""DALI WebDataset index files (``.idx``): DALI's own ``wds2idx`` where DALI is installed, else the
same v1.2 format from Python's ``tarfile`` (hosts without the DALI wheel, e.g. another CUDA major).
The two give byte-identical files (tested)."""
from __future__ import annotations

import os
import tarfile

try:
    from wds2idx import IndexCreator
except ImportError:  # DALI not installed
    IndexCreator = None


def _split_name(name: str) -> tuple[str, str]:
    """``dir/key.ext.more`` → ``("dir/key", "ext.more")``, as ``wds2idx``."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


def index_lines(tar_path: str | os.PathLike) -> list[str]:
    """The v1.2 index of a tar: header, then per sample ``ext offset size name`` per component."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if m.type != tarfile.REGTYPE:
                continue
            base, ext = _split_name(m.name)
            if not base or base.endswith("/"):
                continue
            part = f"{ext} {m.offset_data} {m.size} {m.name}"
            if base != last:
                samples.append([part])
                last = base
            else:
                samples[-1].append(part)
    if not samples:
        raise ValueError("Webdataset Tar File empty")
    return [f"v1.2 {len(samples)}"] + [" ".join(s) for s in samples]


def create_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
    """Write the DALI index of ``tar_path`` to ``idx_path``; ValueError for an empty tar."""
    if IndexCreator is not None:
        with IndexCreator(str(tar_path), str(idx_path), verbose=False) as ic:
            ic.create_index()
        return
    lines = index_lines(tar_path)
    with open(idx_path, "w") as f:
        f.write("\n".join(lines) + "\n")
