"""Turn one source image into the JPEG bytes stored in a shard, or say why it cannot be used."""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


class BadImage(Exception):
    """The file cannot be decoded into an image; the message is the reason recorded in the manifest."""


def prepare_image(path: Path, max_side: int = 0, quality: int = 95) -> tuple[bytes, list[str], bool]:
    """Return ``(jpeg_bytes, conversion_notes, resized)``.

    A baseline RGB JPEG that needs no resize is kept byte for byte; anything else that decodes
    (PNG or another format under ``.jpg``, grayscale, CMYK, palette, alpha) is converted to an RGB
    JPEG and described in ``conversion_notes``. ``max_side`` > 0 bounds the longer side (aspect kept).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadImage(f"missing image file {path}") from None
    except OSError as e:
        raise BadImage(f"unreadable image file {path}: {e}") from None
    notes: list[str] = []
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, mode = im.format, im.mode
            w, h = im.size
            scale = max_side / max(w, h) if max_side and max(w, h) > max_side else 1.0
            target = (max(1, round(w * scale)), max(1, round(h * scale)))
            if scale < 1 and fmt == "JPEG":
                im.draft("RGB", target)  # DCT-domain downscale: decodes far fewer pixels
            im.load()  # full decode: raises on truncated or corrupt data
            if fmt == "JPEG" and mode == "RGB" and scale == 1:
                return raw, notes, False
            if fmt != "JPEG":
                notes.append(f"{fmt} file under .jpg, re-encoded as JPEG")
            if im.mode != "RGB":
                notes.append(f"{mode} image converted to RGB")
                im = im.convert("RGB")
            if im.size != target:
                im = im.resize(target, Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=quality)
            return buf.getvalue(), notes, scale < 1
    except BadImage:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"cannot decode {path.name}: {e}") from None
