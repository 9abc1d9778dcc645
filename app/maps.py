"""How the pages draw CLS attention over the patches: one map per head or their mean, on the model's input.

Shared by the Attention maps page (the paper's Fig. 4) and the Compare methods page (the cluster movers).
"""
import io

import numpy as np
import streamlit as st
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from PIL import Image

import overlays
from overlays import SIDE

ALPHA = 0.6
ATTENTION_MAP, DIFFERENCE_MAP = "inferno", "RdBu_r"
BAR_DPI = 200
BAR_TICKS = 3


def head_map(attention: np.ndarray, head: int | None, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(H, T) CLS attention -> (rows, cols) map of the patches: one head, or the mean over heads."""
    row = attention.mean(axis=0) if head is None else attention[head]
    return row[prefix:].reshape(grid)


def colour(values: np.ndarray, cmap: str) -> Image.Image:
    """Values in [0, 1] of shape (rows, cols) -> an RGB image of the colour map, one cell per patch."""
    rgb = colormaps[cmap](np.clip(values, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.NEAREST)


def scales(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    """(top of the shared attention scale, half-width of the difference's symmetric scale).

    Where ITAE changed nothing the difference is drawn on the attention's own scale, all white, rather
    than on a scale of rounding noise.
    """
    top = max(float(before.max()), float(after.max()), 1e-12)
    spread = float(np.abs(after - before).max())
    return top, spread if spread > 0 else top


def panels(image: Image.Image, before: np.ndarray, after: np.ndarray, artifact_mask: np.ndarray, planted: np.ndarray | None,
           prefix: int, grid) -> list[Image.Image]:
    """Input with its artifacts (and planted tokens) marked, original map, ITAE map (one shared scale) and their
    difference, overlaid on the input."""
    base = image.resize((SIDE, SIDE), Image.BICUBIC)
    top, spread = scales(before, after)
    original = Image.blend(base, colour(before / top, ATTENTION_MAP), ALPHA)
    attenuated = Image.blend(base, colour(after / top, ATTENTION_MAP), ALPHA)
    changed = Image.blend(base, colour((after - before) / (2 * spread) + 0.5, DIFFERENCE_MAP), ALPHA)
    return [
        overlays.mark_tokens(base.copy(), prefix, grid, detected=artifact_mask, planted=planted),
        original,
        attenuated,
        changed,
    ]


@st.cache_data(max_entries=256, show_spinner=False)
def colour_bar(cmap: str, low: float, high: float, label: str) -> bytes:
    """A horizontal colour bar as wide as a map, from ``low`` to ``high`` with a few ticks, as PNG bytes."""
    figure = Figure(figsize=(SIDE / 100, 0.5), dpi=BAR_DPI)
    axis = figure.add_axes((0.1, 0.55, 0.8, 0.38))  # room below for the ticks and label, beside for the end ticks
    bar = figure.colorbar(ScalarMappable(Normalize(low, high), cmap), cax=axis, orientation="horizontal")
    bar.set_ticks(np.linspace(low, high, BAR_TICKS))
    bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    bar.ax.tick_params(labelsize=6, length=2, pad=1)
    bar.set_label(label, fontsize=6, labelpad=1)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=BAR_DPI)
    return buffer.getvalue()
