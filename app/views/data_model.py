"""Data & model: pick the images and the backbone, extract once, and see what was loaded."""
from dataclasses import replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import state
from itae import settings
from itae.choices import SPLITS
from itae.data import SOURCES
from itae.devices import available_devices
from itae.registry import REGISTRY

WEIGHTS = {"demo": "offline demo", "hub": "download from the hub", "file": "local checkpoint file", "random": "random (no training)"}
SERVER_FOLDERS_OFF = (
    "Folders on this server are switched off. Whoever runs the server can allow some with the "
    f"`{settings.ALLOWED_ROOTS_VARIABLE}` environment variable (the README's *Hosting* section says how)."
)
TEACHING_MODEL = (
    "**The teaching model.** One register neuron added to this model plants artifacts on a few flat patches "
    "of every image, at known positions, so that there is something for ITAE to find and a ground truth to "
    "score it against (*About the method* says how, and what it does not reproduce)."
)
MODEL_AS_LOADED = "**The model as loaded**, no artifacts planted. The teaching model plants some, at known positions."
DEMO_AS_LOADED = (
    "**The model as loaded**, no artifacts planted. The offline demo weights have none of their own, so ITAE finds "
    "nothing to remove; the teaching model plants some, at known positions."
)
PLANTED_KEY = "model_planted"
THUMBNAILS = 30
THUMBNAIL_SIDE = 96

# Each widget starts at the applied selection's value through its own value=/index=, never through a
# session-state write before it exists: the browser redraws a page's widgets from their own defaults
# when a navigation lands while it is still drawing them, and a number box whose default was its
# minimum showed 1 while the selection said 200. persist_state keeps an edit until it is applied,
# also across pages.
KEEP_EDITS = "session"


def device_options() -> list[str]:
    return ["auto", *available_devices()]


def index_of(options: list[str], value: str, fallback: int = 0) -> int:
    return options.index(value) if value in options else fallback


def source_options() -> dict[str, str]:
    """Source name -> description: the built-in sources, server folders where the operator allows them, uploads."""
    options = {name: source.description for name, source in SOURCES.items()}
    if settings.allowed_roots():
        options["path"] = "A folder or .zip on this server"
    options["upload"] = "Upload images or one .zip"
    return options


def inside(roots) -> str:
    return " or ".join(f"`{root}`" for root in roots)


def source_widgets(current: state.Selection) -> dict:
    labels, roots = source_options(), settings.allowed_roots()
    names = list(labels)
    source = st.selectbox(
        "Source", names, index=index_of(names, current.source), format_func=lambda k: f"{k} — {labels[k]}",
        key="data_source", persist_state=KEEP_EDITS,
    )
    if not roots:
        st.caption(SERVER_FOLDERS_OFF)
    choice = {"source": source}
    built_in = SOURCES.get(source)
    if built_in is not None and built_in.needs_root:
        if roots:
            choice["root"] = st.text_input(
                "Root folder (empty: the server's data folder)", value=current.root, key="data_root", persist_state=KEEP_EDITS,
                help=f"Where the dataset lives or is downloaded to, inside {inside(roots)}.",
            )
        choice["download"] = st.checkbox(
            "Download if missing (needs a network)", value=current.download, key="data_download", persist_state=KEEP_EDITS,
        )
    if source == "path":
        choice["path"] = st.text_input(
            "Folder or .zip on the server", value=current.path, key="data_path", persist_state=KEEP_EDITS,
            help=f"Inside {inside(roots)}; a relative path starts in `{roots[0]}`. One subfolder per class, or flat with a labels CSV.",
        )
        choice["labels_csv"] = st.text_input(
            "Labels CSV on the server (optional: filename,label rows)", value=current.labels_csv, key="data_labels_csv", persist_state=KEEP_EDITS,
        )
    if source == "upload":
        st.file_uploader("Images, or one .zip of images", accept_multiple_files=True, key="data_files")
        # Any file type: the library refuses what is not a labels CSV with a message, instead of the
        # upload widget dropping it unnoticed.
        st.file_uploader("Labels CSV (optional: filename,label rows)", key="data_labels_file")
    if source == "path" or (built_in is not None and built_in.has_train_split):
        choice["split"] = st.radio(
            "Split", SPLITS, index=index_of(list(SPLITS), current.split), key="data_split", horizontal=True, persist_state=KEEP_EDITS,
        )
    left, right = st.columns(2)
    choice["limit"] = int(left.number_input(
        "Subset size (class-balanced)", min_value=1, max_value=state.MAX_SUBSET_SIZE, value=current.limit, step=50,
        key="data_limit", persist_state=KEEP_EDITS,
    ))
    choice["seed"] = int(right.number_input(
        "Subset seed", min_value=0, max_value=state.MAX_SEED, value=current.seed, step=1, key="data_seed", persist_state=KEEP_EDITS,
    ))
    return choice


def weight_options(model: str, current: state.Selection) -> list[str]:
    """Demo weights where the model has them; a checkpoint file where server folders are allowed (or the operator set one)."""
    files = bool(settings.allowed_roots()) or current.weights not in state.NAMED_WEIGHTS
    return [w for w in WEIGHTS if (w != "demo" or REGISTRY[model].demo_weights) and (w != "file" or files)]


def model_widgets(current: state.Selection) -> dict:
    names = list(REGISTRY)
    model = st.selectbox(
        "Model", names, index=index_of(names, current.model), format_func=lambda name: f"{name} — {REGISTRY[name].label}",
        key="model_name", persist_state=KEEP_EDITS,
    )
    options = weight_options(model, current)
    applied = current.weights if current.weights in state.NAMED_WEIGHTS else "file"
    weights = st.radio(
        "Weights", options, index=index_of(options, applied, options.index("hub")), format_func=WEIGHTS.get,
        key="model_weights", horizontal=True, persist_state=KEEP_EDITS,
    )
    if weights == "file":
        weights = st.text_input(
            "Checkpoint file (official DINOv2 .pth, timm or Hugging Face layout)", key="model_weights_path", persist_state=KEEP_EDITS,
            value="" if current.weights in state.NAMED_WEIGHTS else current.weights,
        ).strip()
    planted = st.checkbox(
        "Plant artifacts (the teaching model: synthetic, positions known)", value=current.planted, key=PLANTED_KEY,
        persist_state=KEEP_EDITS, help="One added register neuron makes a few flat patches per image artifacts (itae.planted).",
    )
    devices = device_options()
    left, right = st.columns(2)
    device = left.selectbox("Device", devices, index=index_of(devices, current.device), key="model_device", persist_state=KEEP_EDITS)
    batch_size = int(right.number_input(
        "Batch size", min_value=1, max_value=1024, value=current.batch_size, key="model_batch", persist_state=KEEP_EDITS,
    ))
    return {"model": model, "weights": weights, "planted": planted, "device": device, "batch_size": batch_size}


def uploaded_files() -> tuple[list[tuple[str, bytes]], bytes | None]:
    files = [(f.name, f.getvalue()) for f in st.session_state.get("data_files") or []]
    labels = st.session_state.get("data_labels_file")
    return files, labels.getvalue() if labels is not None else None


def apply(current: state.Selection, choice: dict) -> None:
    """Turn the widgets into a selection and extract it; a bad choice leaves the current one in place."""
    if choice["source"] == "path" and not choice.get("path"):
        st.warning("Type the folder or .zip path first.")
        return
    if not choice["weights"]:
        st.warning("Type the checkpoint file path first.")
        return
    if choice["source"] == "upload":
        files, labels = uploaded_files()
        try:
            choice["upload_id"] = state.register_upload(files, labels)
        except state.LIBRARY_ERRORS as error:
            st.error(f"The upload cannot be used: {error}")
            return
    defaults = state.Selection()
    selection = state.Selection(**{**{f: getattr(defaults, f) for f in ("root", "path", "labels_csv", "split", "download", "upload_id")}, **choice})
    if state.commit_selection(selection) is not None:
        st.success("Loaded. The other pages now use this data and model.")


def teaching_switch(current: state.Selection) -> None:
    """One click between the teaching model and the same model as loaded, applied at once."""
    with st.container(border=True):
        text, right = st.columns([3, 1], vertical_alignment="center")
        text.markdown(TEACHING_MODEL if current.planted else DEMO_AS_LOADED if current.weights == "demo" else MODEL_AS_LOADED)
        label = "Remove the planted artifacts" if current.planted else "Plant artifacts"
        if not right.button(label, key="planted_switch", icon=":material/science:", width="stretch"):
            return
    switched = replace(current, planted=not current.planted)
    if state.commit_selection(switched) is not None:
        # Before the checkbox below exists in this run, so that it is sent the applied value.
        st.session_state[PLANTED_KEY] = switched.planted
        st.rerun()  # the badge, this switch and the widgets all show the new model


def show_counts(extraction) -> None:
    if extraction.labels is None:
        st.caption("No labels: clustering scores will use inertia and silhouette only.")
        return
    names = extraction.class_names or [str(k) for k in range(int(extraction.labels.max()) + 1)]
    counts = np.bincount(extraction.labels, minlength=len(names))
    figure = go.Figure(go.Bar(x=names, y=counts))
    figure.update_layout(title="Images per class", height=300, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="images")
    st.plotly_chart(figure, key="class_counts")


@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(fingerprint: str, index: int, _dataset) -> np.ndarray:
    image = _dataset.load(index)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    return np.asarray(image)


def show_thumbnails(extraction) -> None:
    dataset = state.current_dataset()
    rows = range(min(THUMBNAILS, len(extraction)))
    names = extraction.class_names
    images, captions = [], []
    for row in rows:
        images.append(thumbnail(dataset.fingerprint, int(extraction.indices[row]), dataset))
        label = names[extraction.labels[row]] if extraction.labels is not None and names else ""
        captions.append(f"{label} · {extraction.names[row]}" if label else extraction.names[row])
    st.image(images, caption=captions, width=THUMBNAIL_SIDE)


def show_skipped(extraction) -> None:
    if not extraction.skipped:
        st.caption("No file was skipped.")
        return
    st.warning(f"{len(extraction.skipped)} file(s) were skipped; see why below.")
    with st.expander("Skipped files"):
        st.dataframe(pd.DataFrame(extraction.skipped, columns=["file", "reason"]), hide_index=True)


def main() -> None:
    st.title("Data & model")
    current = state.current_selection()
    teaching_switch(current)
    with st.expander("Choose data and model", expanded=True):
        data_column, model_column = st.columns(2)
        with data_column:
            st.subheader("Data")
            choice = source_widgets(current)
        with model_column:
            st.subheader("Model")
            choice.update(model_widgets(current))
        if st.button("Load and extract", type="primary"):
            apply(current, choice)
    st.subheader("Current data")
    extraction = state.current_extraction()
    if extraction is None:
        return
    info = extraction.info
    columns = st.columns(4)
    columns[0].metric("Images", len(extraction))
    columns[1].metric("Classes", len(extraction.class_names) if extraction.class_names else "none")
    columns[2].metric("Skipped", len(extraction.skipped))
    columns[3].metric("Tokens per image", extraction.query_norms.shape[1], help=f"CLS + {info.num_registers} registers + {info.grid_size[0]}×{info.grid_size[1]} patches")
    st.caption(f"{info.data} · {info.label} · weights: {info.weights} · {state.precision_line(extraction)} · cache key {info.key}")
    show_counts(extraction)
    st.markdown(f"**The first {min(THUMBNAILS, len(extraction))} images**")
    show_thumbnails(extraction)
    show_skipped(extraction)


main()
