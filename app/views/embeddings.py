"""Embeddings: UMAP of the original and the ITAE features side by side, with box/lasso selection."""
import numpy as np
import plotly.graph_objects as go
import streamlit as st

import state
import threshold
from itae.embed import compile_umap, umap_embedding as compute_umap
from itae.evaluate import kmeans, l2_normalize

MIN_IMAGES = 5
SELECTED_SHOWN = 48
THUMBNAIL_SIDE = 80
COLOURINGS = ("true label", "K-Means cluster", "artifacts per image")


@st.cache_resource(show_spinner="Compiling UMAP the first time, ~30 s")
def umap_compiled() -> bool:
    """numba's compilation happens once, behind one message."""
    compile_umap()
    return True


@st.cache_data(max_entries=32, show_spinner="Computing the UMAP embedding…")
def umap_embedding(key: str, features_id: str, n_neighbors: int, min_dist: float, seed: int, _features: np.ndarray) -> np.ndarray:
    """(N, 2) UMAP; ``key`` and ``features_id`` name the features for the cache."""
    return compute_umap(_features, n_neighbors, min_dist, seed)


@st.cache_data(max_entries=64, show_spinner="Clustering…")
def clusters(key: str, features_id: str, n_clusters: int, seed: int, _features: np.ndarray) -> np.ndarray:
    return kmeans(l2_normalize(_features), n_clusters, seed=seed).labels_


def hover_texts(extraction) -> list[str]:
    names = extraction.class_names
    if extraction.labels is None or not names:
        return list(extraction.names)
    return [f"{name}<br>{names[label]}" for name, label in zip(extraction.names, extraction.labels, strict=True)]


def scatter(points: np.ndarray, colours: np.ndarray, categories: list[str] | None, hover: list[str], title: str):
    """A UMAP scatter: one trace per category (a legend), or one trace with a colour scale.

    Returns the figure and, per trace, the row of each of its points (selections come back per trace).
    """
    traces, rows_per_trace = [], []
    if categories is None:
        rows = np.arange(len(points))
        traces.append(go.Scattergl(
            x=points[:, 0], y=points[:, 1], mode="markers", text=hover, hovertemplate="%{text}<extra></extra>",
            marker=dict(color=colours, colorscale="Viridis", showscale=True, size=7, colorbar=dict(title="artifacts")),
        ))
        rows_per_trace.append(rows)
    else:
        for value, name in enumerate(categories):
            rows = np.flatnonzero(colours == value)
            if rows.size:
                traces.append(go.Scattergl(
                    x=points[rows, 0], y=points[rows, 1], mode="markers", name=name, marker=dict(size=7),
                    text=[hover[r] for r in rows], hovertemplate="%{text}<extra></extra>",
                ))
                rows_per_trace.append(rows)
    figure = go.Figure(traces)
    figure.update_layout(
        title=title, dragmode="lasso", height=480, margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(showticklabels=False), yaxis=dict(showticklabels=False), legend=dict(itemsizing="constant"),
    )
    return figure, rows_per_trace


def selected_rows(event, rows_per_trace: list[np.ndarray]) -> set[int]:
    points = (event or {}).get("selection", {}).get("points", []) if event else []
    chosen = set()
    for point in points:
        curve = point.get("curve_number", 0)
        index = point.get("point_index", point.get("point_number"))
        if index is not None and curve < len(rows_per_trace):
            chosen.add(int(rows_per_trace[curve][index]))
    return chosen


def colouring(extraction, result, how: str, n_clusters: int, seed: int, theta_id: str):
    """(colours for the original plot, colours for the ITAE plot, category names or None)."""
    key = extraction.info.key
    if how == "true label":
        return extraction.labels, extraction.labels, extraction.class_names
    if how == "K-Means cluster":
        original = clusters(key, "original", n_clusters, seed, extraction.features_original)
        itae = clusters(key, theta_id, n_clusters, seed, result.features)
        names = [f"cluster {k}" for k in range(n_clusters)]
        return original, itae, names
    counts = result.artifact_mask.sum(axis=1)
    return counts, counts, None


def show_selection(extraction, rows: set[int]) -> None:
    if not rows:
        st.caption("Draw a box or a lasso on either plot to see those images here.")
        return
    dataset = state.current_dataset()
    shown = sorted(rows)[:SELECTED_SHOWN]
    st.markdown(f"**{len(rows)} image(s) selected**" + (f", the first {SELECTED_SHOWN} shown" if len(rows) > SELECTED_SHOWN else ""))
    hover = hover_texts(extraction)
    images = [dataset.load(int(extraction.indices[r])).resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE)) for r in shown]
    st.image(images, caption=[hover[r].replace("<br>", " · ") for r in shown], width=THUMBNAIL_SIDE)


def main() -> None:
    st.title("Embeddings")
    st.caption("UMAP of the L2-normalised CLS features, original and with ITAE, with the same settings and seed.")
    extraction = state.current_extraction()
    if extraction is None:
        return
    if len(extraction) < MIN_IMAGES:
        st.warning(f"UMAP needs at least {MIN_IMAGES} images; this set has {len(extraction)}.")
        return
    theta, rule = threshold.controls(extraction)
    result = state.itae_result(extraction, theta, rule)
    options = COLOURINGS if extraction.labels is not None else COLOURINGS[1:]
    columns = st.columns(4)
    how = columns[0].selectbox("Colour by", options, key="emb_colour")
    default_k = state.default_clusters(extraction)
    n_clusters = int(columns[1].number_input("Clusters (K-Means)", 2, max(2, len(extraction) - 1), min(default_k, len(extraction) - 1), key="emb_k"))
    n_neighbors = int(columns[2].number_input("UMAP neighbours", 2, 200, 15, key="emb_neighbors"))
    min_dist = float(columns[3].number_input("UMAP min_dist", 0.0, 1.0, 0.1, step=0.05, key="emb_min_dist"))
    seed = 0
    umap_compiled()
    key, theta_id = extraction.info.key, f"itae θ={theta:.4f} {rule}"
    original = umap_embedding(key, "original", n_neighbors, min_dist, seed, extraction.features_original)
    attenuated = umap_embedding(key, theta_id, n_neighbors, min_dist, seed, result.features)
    colours_original, colours_itae, categories = colouring(extraction, result, how, n_clusters, seed, theta_id)
    hover = hover_texts(extraction)
    chosen = set()
    left, right = st.columns(2)
    for column, points, colours, title, chart_key in (
        (left, original, colours_original, "Original features", "umap_original"),
        (right, attenuated, colours_itae, f"ITAE features (θ = {theta:.2f}, {rule})", "umap_itae"),
    ):
        figure, rows_per_trace = scatter(points, colours, categories, hover, title)
        with column:
            event = st.plotly_chart(figure, key=chart_key, on_select="rerun", selection_mode=("box", "lasso"))
        chosen |= selected_rows(event, rows_per_trace)
    show_selection(extraction, chosen)


main()
