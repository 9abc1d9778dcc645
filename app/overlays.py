"""Token marks on an image as the model sees it: the artifacts ITAE detects and, on the teaching model, the planted ones.

Two styles that stay apart where they meet: a planted token (the ground truth) is outlined along its patch's
edge, a detected artifact by a smaller square inside the patch, so that a correct detection is one square
inside the other. The planted colour is the planted tokens' colour on every page.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["DETECTED", "PLANTED", "SIDE", "legend", "mark_tokens"]

SIDE = 224
"""The model sees a plain 224×224 resize; images and maps are drawn on that."""
DETECTED = "#00ffff"
PLANTED = "#e040fb"
LINE = 2
INSET = 3  # pixels between a patch's edge and the detected square: room for the planted outline around it
LEGEND_HEIGHT = 22
LEGEND_FONT = 13
LEGEND_BACKGROUND = "#262730"  # dark, as the marks are bright: they are drawn for photographs


def _box(patch: int, grid: tuple[int, int], inset: int) -> list[float]:
    rows, cols = grid
    width, height = SIDE / cols, SIDE / rows
    row, col = divmod(patch, cols)
    return [col * width + inset, row * height + inset, (col + 1) * width - 1 - inset, (row + 1) * height - 1 - inset]


def mark_tokens(image: Image.Image, prefix: int, grid: tuple[int, int], detected: np.ndarray | None = None,
                planted: np.ndarray | None = None) -> Image.Image:
    """Draw on ``image`` (SIDE × SIDE) the patches whose tokens are detected or planted.

    Parameters
    ----------
    image : PIL image of SIDE × SIDE pixels, drawn on in place
    prefix : CLS plus registers, the tokens before the patches
    grid : (rows, cols) of the patches
    detected, planted : bool arrays of shape (T,), one image's tokens; None draws nothing of that kind

    Returns
    -------
    The same image.
    """
    draw = ImageDraw.Draw(image)
    for mask, colour, inset in ((planted, PLANTED, 0), (detected, DETECTED, INSET)):
        if mask is not None:
            for patch in np.flatnonzero(mask[prefix:]):
                draw.rectangle(_box(int(patch), grid, inset), outline=colour, width=LINE)
    return image


def legend(planted: bool) -> Image.Image:
    """A dark strip naming the marks, each drawn as on a patch: the planted tokens where ``planted``, the detected artifacts."""
    entries = [(PLANTED, 0, "planted (ground truth)")] if planted else []
    entries.append((DETECTED, INSET, "detected by ITAE"))
    font = ImageFont.load_default(size=LEGEND_FONT)
    cell = LEGEND_HEIGHT - 4
    widths = [cell + 6 + int(font.getlength(text)) + 18 for _, _, text in entries]
    strip = Image.new("RGB", (sum(widths), LEGEND_HEIGHT), LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(strip)
    x = 4
    for (colour, inset, text), width in zip(entries, widths, strict=True):
        draw.rectangle([x + inset, 2 + inset, x + cell - 1 - inset, 2 + cell - 1 - inset], outline=colour, width=LINE)
        draw.text((x + cell + 6, LEGEND_HEIGHT / 2), text, fill="white", font=font, anchor="lm")
        x += width
    return strip
