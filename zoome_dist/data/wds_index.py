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


def read_index(path: str | os.PathLike, tar_size: int | None = None,
               sizes: dict[str, int] | None = None) -> list[dict[str, tuple[int, int]]]:
    """A DALI v1.2 ``.idx`` → per sample ``{ext: (offset, size)}``, checked before any reader trusts it:
    well-formed lines, every field inside the tar (``tar_size``), fixed-size fields of the expected size
    (``sizes``, e.g. ``{"label": 4}``). A bad entry is a ``ValueError`` naming the index and the line
    (DALI itself would read past the file or allocate what the entry claims)."""
    samples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2" or not header[1].isdigit():
            raise ValueError(f"{path}: not a DALI v1.2 WebDataset index")
        for n, line in enumerate(f, start=2):
            tok = line.split()
            if not tok or len(tok) % 4:
                raise ValueError(f"{path}:{n}: malformed index line")
            rec = {}
            for i in range(0, len(tok), 4):
                ext, off, size = tok[i], tok[i + 1], tok[i + 2]
                if not (off.isdigit() and size.isdigit()):
                    raise ValueError(f"{path}:{n}: field {ext!r} has a non-numeric offset or size")
                off, size = int(off), int(size)
                if tar_size is not None and off + size > tar_size:
                    raise ValueError(f"{path}:{n}: field {ext!r} spans bytes {off}..{off + size}, past the end of "
                                     f"its {tar_size}-byte tar (a damaged or altered index)")
                if sizes and ext in sizes and size != sizes[ext]:
                    raise ValueError(f"{path}:{n}: field {ext!r} is {size} bytes, expected {sizes[ext]}")
                rec[ext] = (off, size)
            samples.append(rec)
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header says {header[1]} samples, the index lists {len(samples)}")
    return samples
