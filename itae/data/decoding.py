"""Decoding one image: refusing bombs and huge sizes, turning any mode upright into 8-bit RGB, and saying
in plain words why a file cannot be used."""
from __future__ import annotations

import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["MAX_IMAGE_PIXELS", "to_rgb"]

MAX_IMAGE_PIXELS = 50_000_000
"""Images with more pixels than this are refused (Pillow's own bomb limit is higher)."""
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


class Refused(Exception):
    """An image whose header is readable but which we decline to decode."""


def to_rgb(image):
    """Turn any PIL image upright and into 8-bit RGB.

    EXIF orientation is applied, 16-bit greyscale is scaled (not clipped) to 8 bits and
    transparent pixels are composited onto white.

    Parameters
    ----------
    image : PIL.Image.Image

    Returns
    -------
    PIL.Image.Image
        Mode "RGB".
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _sixteen_to_eight_bits(image)
    if image.has_transparency_data:
        image = _flatten_on_white(image)
    return image.convert("RGB")


def _sixteen_to_eight_bits(image):
    """Scale a 16-bit greyscale image (mode I;16* or I) to mode L; convert() would clip."""
    values = np.clip(np.asarray(image.convert("I")), 0, 65535)
    return Image.fromarray(np.rint(values / 257).astype(np.uint8))


def _flatten_on_white(image):
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)


def open_image(fp):
    """Open an image lazily (header only), refusing decompression bombs and huge sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(fp)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise Refused(f"refused: {image.width}x{image.height} is "
                       f"{image.width * image.height / 1e6:.1f} megapixels, over the "
                       f"{MAX_IMAGE_PIXELS / 1e6:g} megapixel limit")
    return image


def skip_reason(err):
    """Why a file cannot be used, in plain words: never a Python type name or an object's repr."""
    if isinstance(err, Refused):
        return str(err)
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"refused as a possible decompression bomb ({_plain(err)})"
    if isinstance(err, UnidentifiedImageError):
        return "not an image file (Pillow cannot identify it)"
    return f"not a readable image ({_plain(err) or 'the decoder gave no reason'})"


def _plain(err):
    # Pillow names the file it read from, and for an upload that is "<_io.BytesIO object at 0x7f...>".
    return _OBJECT_REPR.sub("the file", str(err)).strip()
