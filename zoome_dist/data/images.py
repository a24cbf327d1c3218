"""Turn one source image into the JPEG bytes stored in a shard, or say why it cannot be used."""
from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import warnings

import torch
from PIL import Image


class BadImage(Exception):
    """The file cannot be decoded into an image; the message is the reason recorded in the manifest."""


DAMAGE = ("Corrupt JPEG data: premature end", "Premature end of JPEG file", "Corrupt JPEG data: bad Huffman",
          "Invalid SOS parameters", "JPEG datastream contains no image")


def libjpeg_damage(raw: bytes) -> str | None:
    """Decode a JPEG fully with libjpeg (torchvision) and return its complaint, or None if clean.

    A JPEG truncated and re-terminated (``FF D9`` appended), or one whose header promises more rows
    than its data holds, decodes "successfully" in PIL and libjpeg alike, padded with grey: libjpeg
    only prints a warning ("Corrupt JPEG data: premature end of data segment") to the C stderr. We
    capture that stream for the one decode and treat any such warning as damage."""
    from torchvision.io import decode_jpeg

    with tempfile.TemporaryFile() as err:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's own deprecation notice
                decode_jpeg(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        except RuntimeError as e:
            return str(e).strip().splitlines()[0] if str(e).strip() else "libjpeg error"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        lines = [ln.strip() for ln in err.read().decode(errors="replace").splitlines()]
    # only libjpeg's damage reports count (not, e.g., "extraneous bytes before marker" or a stray line
    # that another thread of this process wrote to stderr meanwhile)
    damage = [ln for ln in lines if ln.startswith(DAMAGE)]
    return "; ".join(damage) if damage else None


def prepare_image(raw: bytes, name: str, max_side: int = 0, quality: int = 95) -> tuple[bytes, list[str], bool]:
    """Return ``(jpeg_bytes, conversion_notes, resized)`` for the image file ``name`` holding ``raw``.

    A baseline RGB JPEG that needs no resize is kept byte for byte; anything else that decodes
    (PNG or another format under ``.jpg``, grayscale, CMYK, palette, alpha) is converted to an RGB
    JPEG and described in ``conversion_notes``. ``max_side`` > 0 bounds the longer side (aspect kept).
    Every JPEG is also decoded in full by libjpeg, whose warnings (truncated data, a header promising
    more than the data holds) make it a ``BadImage``: damage is a skip, never a grey image.
    """
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
            damage = libjpeg_damage(raw) if fmt == "JPEG" else None
            if damage:
                raise BadImage(f"damaged JPEG {name}: {damage}")
            if fmt == "JPEG" and mode == "RGB" and scale == 1:
                return raw, notes, False
            if fmt != "JPEG":
                notes.append(f"{fmt} file{' under .jpg' if re.search(r'[.]jpe?g$', name, re.I) else ''}, "
                             "re-encoded as JPEG")
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
    except Image.UnidentifiedImageError:
        raise BadImage(f"cannot decode {name}: not an image format Pillow recognises") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # reasons go into the manifest: no object reprs (their addresses differ between builds)
        raise BadImage(f"cannot decode {name}: {re.sub(r'<[^<>]* at 0x[0-9a-fA-F]+>', 'the data', str(e))}") from None
