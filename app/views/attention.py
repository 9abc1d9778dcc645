"""Attention maps: the paper's Fig. 4, the CLS attention over the patches before and after ITAE."""
import hashlib

import pandas as pd
import streamlit as st
from PIL import Image

import overlays
import state
import threshold
from itae.data import open_uploads
from itae.extract import extract
from maps import ATTENTION_MAP, DIFFERENCE_MAP, SIDE, colour_bar, head_map, panels, scales

GALLERY_DEFAULT = 4


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
    planted = None if extraction.planted_mask is None else extraction.planted_mask[row]
    found = f" · {int(planted.sum())} planted" if planted is not None else ""
    st.markdown(f"**{title}** · {int(mask.sum())} artifact token(s){found} (marked)")
    captions = ["input, tokens marked", "original CLS attention", "ITAE CLS attention", "difference ITAE − original (blue: less)"]
    top, spread = scales(before, after)
    shared = colour_bar(ATTENTION_MAP, 0.0, top, "CLS attention")
    bars = [None, shared, shared, colour_bar(DIFFERENCE_MAP, -spread, spread, "change in CLS attention")]
    # The marked input as PNG: JPEG's colour subsampling washes out the thin outlines; the maps stay JPEG.
    formats = ["PNG", "auto", "auto", "auto"]
    for column, panel, caption, bar, format in zip(st.columns(4), panels(image, before, after, mask, planted, prefix, grid), captions, bars,
                                                   formats, strict=True):
        column.image(panel, caption=caption, width=SIDE, output_format=format)
        if bar is not None:
            column.image(bar, width=SIDE)
    if info.num_registers:
        st.caption("Registers are not in the maps; their values (mean over heads):")
        table = register_table(extraction.query_norms[row], mask, extraction.attention_original[row], result.attention[row], info.num_registers)
        st.dataframe(table, hide_index=True)


@st.cache_resource(max_entries=8, show_spinner="Running the model on the uploaded image…")
def extract_upload(model: str, weights: str, device: str, planted: bool, digest: str, _name: str, _data: bytes, _backbone):
    """(dataset, extraction) of one uploaded picture with the current model (``_backbone``), shared by content."""
    dataset = open_uploads([(_name, _data)])
    return dataset, extract(_backbone, dataset)


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
        backbone = state.get_backbone(selection.model, selection.weights, selection.device, selection.planted)
        dataset, single = extract_upload(selection.model, selection.weights, selection.device, selection.planted,
                                         hashlib.sha256(data).hexdigest(), file.name, data, backbone)
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
        "Patch tokens only, on the model's 224×224 input; original and ITAE share one colour scale, the difference "
        "has its own, centred on zero. The bars give the attention itself (a share of the CLS token's attention)."
    )
    extraction = state.current_extraction()
    if extraction is None:
        return
    st.caption(f"{extraction.info.label} on {extraction.info.data}")
    theta, rule = threshold.controls(extraction)
    heads = extraction.attention_original.shape[1]
    choice = st.selectbox("Head", ["mean over heads"] + [f"head {h}" for h in range(heads)], key="maps_head")
    head = None if choice.startswith("mean") else int(choice.split()[1])
    st.image(overlays.legend(extraction.planted_mask is not None))
    uploaded(theta, rule, head)
    gallery(extraction, theta, rule, head)


main()
