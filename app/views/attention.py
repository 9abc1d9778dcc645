"""Attention maps: the paper's Fig. 4, the CLS attention over the patches before and after ITAE."""
import hashlib

import numpy as np
import pandas as pd
import streamlit as st
from matplotlib import colormaps
from PIL import Image, ImageDraw

import state
from itae.data import open_uploads
from itae.extract import extract

SIDE = 224  # the model sees a plain 224×224 resize; the maps are drawn on that
ALPHA = 0.6
MARK = (0, 255, 255)
GALLERY_DEFAULT = 4


def head_map(attention: np.ndarray, head: int | None, prefix: int, grid: tuple[int, int]) -> np.ndarray:
    """(H, T) CLS attention -> (rows, cols) map of the patches: one head, or the mean over heads."""
    row = attention.mean(axis=0) if head is None else attention[head]
    return row[prefix:].reshape(grid)


def colour(values: np.ndarray, cmap: str) -> Image.Image:
    """Values in [0, 1] of shape (rows, cols) -> an RGB image of the colour map, one cell per patch."""
    rgb = colormaps[cmap](np.clip(values, 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.NEAREST)


def mark_artifacts(image: Image.Image, artifact_mask: np.ndarray, prefix: int, grid: tuple[int, int]) -> Image.Image:
    """Outline the patch cells whose tokens are artifacts."""
    rows, cols = grid
    draw = ImageDraw.Draw(image)
    cell_w, cell_h = SIDE / cols, SIDE / rows
    for patch in np.flatnonzero(artifact_mask[prefix:]):
        r, c = divmod(int(patch), cols)
        draw.rectangle([c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1], outline=MARK, width=2)
    return image


def panels(image: Image.Image, before: np.ndarray, after: np.ndarray, artifact_mask: np.ndarray, prefix: int, grid) -> list[Image.Image]:
    """Input, original map, ITAE map (one shared scale) and their difference, overlaid on the input."""
    base = image.resize((SIDE, SIDE), Image.BICUBIC)
    scale = max(float(before.max()), float(after.max()), 1e-12)
    difference = after - before
    spread = max(float(np.abs(difference).max()), 1e-12)
    original = Image.blend(base, colour(before / scale, "inferno"), ALPHA)
    attenuated = Image.blend(base, colour(after / scale, "inferno"), ALPHA)
    changed = Image.blend(base, colour(difference / (2 * spread) + 0.5, "RdBu_r"), ALPHA)
    return [
        mark_artifacts(base.copy(), artifact_mask, prefix, grid),
        original,
        attenuated,
        changed,
    ]


def register_table(query_norms, mask, before, after, registers: int) -> pd.DataFrame:
    tokens = range(1, registers + 1)
    return pd.DataFrame(
        {
            "register": [f"r{t - 1}" for t in tokens],
            "query norm": [float(query_norms[t]) for t in tokens],
            "artifact": [bool(mask[t]) for t in tokens],
            "CLS attention before": [float(before[:, t].mean()) for t in tokens],
            "CLS attention after": [float(after[:, t].mean()) for t in tokens],
        }
    )


def show_image(title: str, image: Image.Image, extraction, result, row: int, head: int | None) -> None:
    info = extraction.info
    prefix, grid = info.num_prefix_tokens, info.grid_size
    before = head_map(extraction.attention_original[row], head, prefix, grid)
    after = head_map(result.attention[row], head, prefix, grid)
    mask = result.artifact_mask[row]
    count = int(mask.sum())
    st.markdown(f"**{title}** · {count} artifact token(s) (outlined)")
    captions = ["input (artifacts outlined)", "original CLS attention", "ITAE CLS attention", "difference ITAE − original (blue: less)"]
    st.image(panels(image, before, after, mask, prefix, grid), caption=captions, width=SIDE)
    if info.num_registers:
        st.caption("Registers are not in the maps; their values (mean over heads):")
        table = register_table(extraction.query_norms[row], mask, extraction.attention_original[row], result.attention[row], info.num_registers)
        st.dataframe(table, hide_index=True)


@st.cache_resource(max_entries=8, show_spinner="Running the model on the uploaded image…")
def extract_upload(model: str, weights: str, device: str, digest: str, _name: str, _data: bytes):
    """(dataset, extraction) of one uploaded picture with the current model, shared by content."""
    dataset = open_uploads([(_name, _data)])
    return dataset, extract(state.get_backbone(model, weights, device), dataset)


def label_of(extraction, row: int) -> str:
    if extraction.labels is None or not extraction.class_names:
        return extraction.names[row]
    return f"{extraction.names[row]} ({extraction.class_names[extraction.labels[row]]})"


def gallery(extraction, theta: float, rule: str, head: int | None) -> None:
    dataset = state.current_dataset()
    result = state.itae_result(extraction, theta, rule)
    rows = st.multiselect(
        "Images", range(len(extraction)), default=list(range(min(GALLERY_DEFAULT, len(extraction)))),
        format_func=lambda r: label_of(extraction, r), key="maps_rows",
    )
    for row in rows:
        show_image(label_of(extraction, row), dataset.load(int(extraction.indices[row])), extraction, result, row, head)


def uploaded(theta: float, rule: str, head: int | None) -> None:
    file = st.file_uploader("Or look at your own image", type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"], key="maps_upload")
    if file is None:
        return
    data = file.getvalue()
    selection = state.current_selection()
    try:
        dataset, single = extract_upload(selection.model, selection.weights, selection.device, hashlib.sha256(data).hexdigest(), file.name, data)
        image = dataset.load(0)
    except state.LIBRARY_ERRORS as error:
        st.error(f"This image cannot be used: {error}")
        return
    result = state.itae_result(single, theta, rule)
    show_image(file.name, image, single, result, 0, head)


def main() -> None:
    st.title("Attention maps")
    st.caption(
        "The paper's Fig. 4: how much the CLS token attends to each patch in the final block, before and after ITAE. "
        "Patch tokens only, on the model's 224×224 input; original and ITAE share one colour scale."
    )
    extraction = state.current_extraction()
    if extraction is None:
        return
    theta, rule = state.theta_controls(extraction, "maps")
    heads = extraction.attention_original.shape[1]
    choice = st.selectbox("Head", ["mean over heads"] + [f"head {h}" for h in range(heads)], key="maps_head")
    head = None if choice.startswith("mean") else int(choice.split()[1])
    uploaded(theta, rule, head)
    gallery(extraction, theta, rule, head)


main()
