"""Embeddings: the original and the ITAE features in one UMAP space, side by side, with linked box/lasso selections.

Both plots come from one UMAP fit (``itae.embed.shared_umap``): the original features together with the ITAE
features of the images ITAE changed. Two separate fits would have unrelated coordinates; in one space an
image that ITAE leaves unchanged sits at the same place in both plots, and the distance between an image's
two places is how far ITAE moved it. The module docstring of ``itae.embed`` says why this, and not placing
the ITAE features into the original layout.

A selection drawn on either plot is kept in the session with the plot it was drawn on, and highlighted on
both: the plots are redrawn with it, which gives their widgets new identities, so it cannot live in theirs.
"""
from functools import partial

import numpy as np
import plotly.graph_objects as go
import streamlit as st

import state
import threshold
from itae.embed import SharedEmbedding, shared_umap
from itae.evaluate import kmeans, l2_normalize

MIN_IMAGES = 5
SELECTED_SHOWN = 48
THUMBNAIL_SIDE = 80
COLOURINGS = ("true label", "K-Means cluster", "artifacts per image", "distance moved")
# Each plot's widget key, and the name the selection list gives it.
PLOT_NAMES = {"umap_original": "original", "umap_itae": "ITAE"}
SELECTION = "emb_selection"
PADDING = 0.05  # of the layout's extent, around the points, so that no marker sits on the frame


@st.cache_data(max_entries=32, show_spinner="Computing the shared UMAP embedding…")
def shared_layout(key: str, features_id: str, n_neighbors: int, min_dist: float, seed: int, _original: np.ndarray,
                  _itae: np.ndarray) -> SharedEmbedding:
    """``shared_umap`` of the original and the ITAE features; ``key`` and ``features_id`` name them for the cache."""
    return shared_umap(_original, _itae, n_neighbors, min_dist, seed)


@st.cache_data(max_entries=64, show_spinner="Clustering…")
def clusters(key: str, features_id: str, n_clusters: int, seed: int, device: str, _features: np.ndarray) -> np.ndarray:
    return kmeans(l2_normalize(_features), n_clusters, seed=seed, device=device).labels_


def hover_texts(extraction, layout: SharedEmbedding) -> list[str]:
    """Name, class where known, and how far ITAE moved the image."""
    names = extraction.class_names
    texts = list(extraction.names)
    if extraction.labels is not None and names:
        texts = [f"{text}<br>{names[label]}" for text, label in zip(texts, extraction.labels, strict=True)]
    return [f"{text}<br>{f'moved {moved:.2f}' if changed else 'unchanged by ITAE'}"
            for text, moved, changed in zip(texts, layout.moved, layout.changed, strict=True)]


def axis_ranges(layout: SharedEmbedding) -> tuple[list[float], list[float]]:
    """One x and one y range for both plots, so that a place means the same in each."""
    points = np.concatenate([layout.original, layout.itae])
    low, high = points.min(axis=0), points.max(axis=0)
    margin = PADDING * (high - low).max()
    return [low[0] - margin, high[0] + margin], [low[1] - margin, high[1] + margin]


def scatter(points, colours, categories, colour_title, hover, title, ranges, selected) -> go.Figure:
    """A UMAP scatter: one trace per category (a legend), or one trace with a colour scale.

    Every point carries its row as ``customdata``, which comes back with a selection. ``selected`` (rows,
    or None) is highlighted: the other points fade.
    """
    groups = [(None, np.arange(len(points)))] if categories is None else [
        (name, np.flatnonzero(colours == value)) for value, name in enumerate(categories)
    ]
    figure = go.Figure()
    for name, rows in groups:
        if not rows.size:
            continue
        marker = dict(size=7)
        if categories is None:
            marker |= dict(color=colours, colorscale="Viridis", showscale=True, colorbar=dict(title=colour_title))
        figure.add_trace(go.Scattergl(
            x=points[rows, 0], y=points[rows, 1], mode="markers", name=name, marker=marker, customdata=rows,
            text=[hover[r] for r in rows], hovertemplate="%{text}<extra></extra>",
            selectedpoints=None if selected is None else np.flatnonzero(np.isin(rows, list(selected))),
            selected=dict(marker=dict(size=10)), unselected=dict(marker=dict(opacity=0.15)),
        ))
    figure.update_layout(
        title=title, dragmode="lasso", height=480, margin=dict(l=10, r=10, t=60, b=10), legend=dict(itemsizing="constant"),
        xaxis=dict(showticklabels=False, range=ranges[0]),
        yaxis=dict(showticklabels=False, range=ranges[1], scaleanchor="x", scaleratio=1),
    )
    return figure


def movement_trace(layout: SharedEmbedding) -> go.Scatter:
    """An arrow from each changed image's original place to its ITAE place; no hover, nothing to select."""
    rows = np.flatnonzero(layout.changed)
    gap = np.full(len(rows), np.nan)  # ends one arrow before the next begins
    x = np.column_stack([layout.original[rows, 0], layout.itae[rows, 0], gap]).ravel()
    y = np.column_stack([layout.original[rows, 1], layout.itae[rows, 1], gap]).ravel()
    heads = np.tile([0, 9, 0], len(rows))  # an arrowhead at the ITAE end only
    return go.Scatter(
        x=x, y=y, mode="lines+markers", name="moved (original → ITAE)", hoverinfo="skip",
        line=dict(color="rgba(90, 90, 90, 0.45)", width=1),
        marker=dict(symbol="arrow", angleref="previous", size=heads, color="rgba(90, 90, 90, 0.7)"),
    )


def colouring(extraction, result, layout: SharedEmbedding, how: str, n_clusters: int, seed: int, theta_id: str):
    """(colours for the original plot, colours for the ITAE plot, category names or None, colour bar title)."""
    key = extraction.info.key
    if how == "true label":
        return extraction.labels, extraction.labels, extraction.class_names, None
    if how == "K-Means cluster":
        device = state.clustering_device()
        original = clusters(key, "original", n_clusters, seed, device, extraction.features_original)
        itae = clusters(key, theta_id, n_clusters, seed, device, result.features)
        return original, itae, [f"cluster {k}" for k in range(n_clusters)], None
    if how == "distance moved":
        return layout.moved, layout.moved, None, "moved"
    counts = result.artifact_mask.sum(axis=1)
    return counts, counts, None, "artifacts"


def remember_selection(chart_key: str, extraction_key: str) -> None:
    """Callback of a plot's selection: keep its rows and the plot's name; an emptied selection clears it."""
    points = st.session_state[chart_key]["selection"]["points"]
    # customdata is the row (a list where plotly wraps it); the arrows carry none and are not images.
    rows = sorted({int(np.ravel(point["customdata"])[0]) for point in points if "customdata" in point})
    if rows:
        st.session_state[SELECTION] = (extraction_key, PLOT_NAMES[chart_key], rows)
    else:
        st.session_state.pop(SELECTION, None)


def current_selection(extraction) -> tuple[str, list[int]] | None:
    """(the plot it was drawn on, rows) of this extraction's selection; None without one."""
    stored = st.session_state.get(SELECTION)
    if stored is None or stored[0] != extraction.info.key:
        return None
    return stored[1], stored[2]


def show_selection(extraction, hover: list[str], selection) -> None:
    if selection is None:
        st.caption("Draw a box or a lasso on either plot: the images show here and are highlighted on both plots.")
        return
    plot, rows = selection
    more = f", the first {SELECTED_SHOWN} shown" if len(rows) > SELECTED_SHOWN else ""
    st.markdown(f"**{len(rows)} image(s) selected on the {plot} plot**, highlighted on both{more}")
    st.button("Clear the selection", key="emb_clear", on_click=st.session_state.pop, args=(SELECTION, None))
    dataset = state.current_dataset()
    shown = rows[:SELECTED_SHOWN]
    images = [dataset.load(int(extraction.indices[r])).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE)) for r in shown]
    st.image(images, caption=[hover[r].replace("<br>", " · ") for r in shown], width=THUMBNAIL_SIDE)


def movement_summary(layout: SharedEmbedding, theta: float, rule: str) -> str:
    changed = int(layout.changed.sum())
    if not changed:
        return (f"At θ = {theta:.2f} ({rule}) ITAE leaves every feature unchanged, bit for bit: every image has one "
                "place, the same in both plots.")
    moved = layout.moved[layout.changed]
    width = float(np.ptp(np.concatenate([layout.original, layout.itae]), axis=0).max())
    return (f"At θ = {theta:.2f} ({rule}) ITAE changed the features of {changed} of {len(layout.changed)} images; they "
            f"moved a median {np.median(moved):.2f} and at most {moved.max():.2f} in the shared space ({width:.1f} "
            f"across). The {len(layout.changed) - changed} others keep their place in both plots.")


def main() -> None:
    st.title("Embeddings")
    st.caption(
        "UMAP of the L2-normalised CLS features, original and with ITAE, in **one shared space**: UMAP is fitted once, "
        "on the original features together with the ITAE features of the images ITAE changed. So an image ITAE "
        "leaves unchanged sits at the same place in both plots, and the way between an image's two places is how far "
        "ITAE moved it; two separate fits would have unrelated coordinates. The original plot's layout therefore "
        "also changes with θ."
    )
    extraction = state.current_extraction()
    if extraction is None:
        return
    if len(extraction) < MIN_IMAGES:
        st.warning(f"UMAP needs at least {MIN_IMAGES} images; this set has {len(extraction)}.")
        return
    theta, rule = threshold.controls(extraction)
    result = state.itae_result(extraction, theta, rule)
    options = COLOURINGS if extraction.labels is not None else COLOURINGS[1:]
    columns = st.columns([2, 2, 2, 2, 3], vertical_alignment="bottom")
    how = columns[0].selectbox("Colour by", options, key="emb_colour")
    default_k = state.default_clusters(extraction)
    n_clusters = int(columns[1].number_input("Clusters (K-Means)", 2, max(2, len(extraction) - 1), min(default_k, len(extraction) - 1), key="emb_k"))
    n_neighbors = int(columns[2].number_input("UMAP neighbours", 2, 200, 15, key="emb_neighbors"))
    min_dist = float(columns[3].number_input("UMAP min_dist", 0.0, 1.0, 0.1, step=0.05, key="emb_min_dist"))
    arrows = columns[4].toggle("Arrows: how far each image moved", key="emb_arrows",
                               help="On the ITAE plot, an arrow from each changed image's original place to its ITAE place.")
    seed = 0
    warm_up = state.umap_warm_up()
    if warm_up.is_alive():
        with st.spinner("Compiling UMAP (the first time on this machine: ~30-40 s; later runs read it from disk)…"):
            warm_up.join()
    key, theta_id = extraction.info.key, f"itae θ={theta:.4f} {rule}"
    layout = shared_layout(key, theta_id, n_neighbors, min_dist, seed, extraction.features_original, result.features)
    st.caption(movement_summary(layout, theta, rule))
    colours_original, colours_itae, categories, colour_title = colouring(extraction, result, layout, how, n_clusters, seed, theta_id)
    hover = hover_texts(extraction, layout)
    ranges = axis_ranges(layout)
    selection = current_selection(extraction)
    selected = None if selection is None else set(selection[1])
    left, right = st.columns(2)
    label = f"<br><sup>{extraction.info.label}</sup>"
    for column, points, colours, title, chart_key in (
        (left, layout.original, colours_original, "Original features" + label, "umap_original"),
        (right, layout.itae, colours_itae, f"ITAE features (θ = {theta:.2f}, {rule})" + label, "umap_itae"),
    ):
        figure = scatter(points, colours, categories, colour_title, hover, title, ranges, selected)
        if arrows and chart_key == "umap_itae" and layout.changed.any():
            figure.add_trace(movement_trace(layout))
        with column:
            st.plotly_chart(figure, key=chart_key, on_select=partial(remember_selection, chart_key, key),
                            selection_mode=("box", "lasso"))
    show_selection(extraction, hover, selection)


main()
