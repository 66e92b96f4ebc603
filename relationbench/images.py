"""The one image reader: every reference, generated and training image goes through `read_image`.

A file becomes an upright, 8-bit-per-channel RGB picture the same way everywhere, so a score
cannot depend on how a photo happened to be stored:

- the EXIF Orientation tag is applied (phones store pixels sideways and set the tag);
- 16-bit greyscale (PIL modes I;16, I;16B, I;16L, I;16N, and I holding 0..65535) is scaled by
  1/257 and rounded (PIL's own convert clips these values to 255: an all-white picture);
  float images (F) must hold 0..1 and are scaled by 255;
- alpha (LA, PA, RGBA, a tRNS colour, premultiplied La/RGBa) is flattened onto `BACKGROUND`;
- palette, 1-bit, greyscale, CMYK (Adobe-inverted CMYK JPEGs are un-inverted by PIL) and
  YCbCr go through PIL's conversion to RGB. Embedded ICC profiles are not applied.
- 16-bit colour PNGs: PIL keeps the high byte of each sample (at most one level off rounding).

A file that cannot be read raises UserError naming it (the CLI prints it and exits 2), a
truncated one included: the pixel data is decoded whole, and a PNG is read on to its end
chunk, so one cut after its last pixel row is refused too.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

# White: a photo with an alpha channel is almost always a cut-out object, and cut-outs are
# product shots on white; a fixed colour also keeps the result independent of the colours
# a file stores (invisibly) under alpha 0. Black would turn every soft edge into a dark rim.
BACKGROUND = 255

# What the reader accepts: the raster formats a subject photo or a generated image comes in.
# Anything else (EPS, PDF, PSD, ...) is refused before a decoder runs.
FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF", "PPM")  # JPEG includes MPO (phones)

# Bump when read_image returns other pixels for some file: embeddings cached by file hash
# (metrics/cache.py) are then computed again.
READER_VERSION = 2

_HIGH_DEPTH_GREY = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = {"LA": False, "PA": False, "RGBA": False, "La": True, "RGBa": True}  # mode -> premultiplied
_VIA_PIL = ("1", "L", "P", "RGB", "CMYK", "YCbCr")
_FIX = "save it again as an 8-bit RGB PNG or JPEG, or replace it"


def read_image(source: str | os.PathLike | bytes, *, name: str | os.PathLike | None = None) -> Image.Image:
    """A file (path or its bytes) -> a fully decoded, upright RGB image with 8 bits per channel.

    `name` is the file named in errors (default: the path). Raises UserError for a missing,
    empty, truncated or damaged file, a format outside FORMATS, or an unsupported pixel mode.
    """
    if isinstance(source, bytes):
        data, where = source, name
    else:
        where = name if name is not None else source
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read the image file ({exc.strerror or exc})", path=where,
                            hint="check the path: it must be a readable image file") from None
    if not data:
        raise UserError("the image file is empty (0 bytes)", path=where, hint=_FIX)
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise UserError(f"not an image PIL can read (or not one of {', '.join(FORMATS)}), or its header is "
                        "damaged", path=where, hint=_FIX) from None
    except Image.DecompressionBombError as exc:
        raise UserError(f"too many pixels to decode safely ({exc})", path=where, hint="scale the image down") from None
    except Exception as exc:  # PIL raises many types for a damaged header
        raise UserError(f"a damaged image header ({type(exc).__name__}: {exc})", path=where, hint=_FIX) from None
    try:
        if image.format == "PNG":  # load() stops at the last pixel row; verify() reads on to IEND (CRCs)
            Image.open(io.BytesIO(data), formats=("PNG",)).verify()
        image.load()  # the whole pixel data: a truncated file fails here, not in a later step
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # OSError ("image file is truncated"), SyntaxError, ValueError, ...
        raise UserError(f"truncated or damaged image data ({type(exc).__name__}: {exc})", path=where,
                        hint=_FIX) from None
    return to_rgb(image, name=where)


def to_rgb(image: Image.Image, *, name: str | os.PathLike | None = None) -> Image.Image:
    """Any supported PIL mode -> RGB, 8 bits per channel (the rules in the module docstring).

    An RGB image is returned as it is. `name` is the file named in errors.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _HIGH_DEPTH_GREY:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserError(f"a {mode} image with values outside 0..65535: no known scale to 8 bits",
                            path=name, hint=_FIX)
        grey = ((values + 128) // 257).astype(np.uint8)  # round(v / 257): 65535 -> 255
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):  # a PNG tRNS grey value, in 16-bit units
            alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
            return _flatten(grey[..., None], alpha, premultiplied=False)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise UserError("a floating-point image with values outside 0..1 (or NaN): no known scale to 8 bits",
                            path=name, hint=_FIX)
        return Image.fromarray(np.rint(values * 255).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA or (mode in _VIA_PIL and "transparency" in image.info):
        premultiplied = _ALPHA.get(mode, False)
        pixels = np.asarray(image if mode in _ALPHA else image.convert("RGBA"))
        return _flatten(pixels[..., :-1], pixels[..., -1], premultiplied=premultiplied)
    if mode in _VIA_PIL:
        return image.convert("RGB")
    raise UserError(f"pixel mode {mode} is not supported", path=name, hint=_FIX)


def _flatten(colour: np.ndarray, alpha: np.ndarray, *, premultiplied: bool) -> Image.Image:
    """Composite (H, W, C) uint8 colour with (H, W) uint8 alpha onto BACKGROUND -> RGB.

    Straight alpha: c*a/255 + B*(255-a)/255, rounded to nearest (no ties: 255 is odd).
    Premultiplied colour already holds c*a/255, so B*(255-a)/255 is added, i.e. B - a for white.
    """
    c = colour.astype(np.int32)
    a = alpha.astype(np.int32)[..., None]
    if premultiplied:
        out = c + (BACKGROUND * (255 - a) + 127) // 255
    else:
        out = (c * a + BACKGROUND * (255 - a) + 127) // 255
    out = np.clip(out, 0, 255).astype(np.uint8)
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(out), "RGB")
