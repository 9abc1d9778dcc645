"""Compare methods: ITAE beside its variants, test-time and trained registers, on the current model and images.

A thin view over :func:`itae.compare.compare`: its table, a bar chart with SE bars, detection against
planted artifacts, the detectors' agreement, and the images a method moves to another cluster with their
CLS attention before and after. The methods that run a model again (``Method.runs_the_backbone``: minutes
on a CPU the first time) run only when their button is pressed; the others come from the final-block cache
at once. Comparisons are kept for all sessions in a small store, as extractions are.
"""
import json
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import maps
import state
import threshold
from itae import reports, settings
from itae.choices import ALGORITHMS, SUPERVISED_METRICS, metric_label
from itae.clustering import DETERMINISTIC, UNMATCHED
from itae.compare import Comparison, compare
from itae.methods import DEFAULT_METHODS, METHODS

STORE_CAPACITY = 4
MOVERS_SHOWN = 4
AUTO = "auto"
ALGORITHM_NAMES = {name: reports.ALGORITHM_TEXT[name] for name in ALGORITHMS}


@dataclass(frozen=True)
class Request:
    """One comparison: the extraction, the methods and the protocol. Hashable: it keys the store."""

    extraction: str
    methods: tuple[str, ...]
    theta: float | str
    rule: str
    algorithm: str
    n_clusters: int
    sets: int
    runs: int
    seed: int


@st.cache_resource(show_spinner=False)
def _store() -> state.SharedStore[Request, Comparison]:
    """Comparisons by request, shared read-only by all sessions."""
    return state.SharedStore(STORE_CAPACITY)


def run(request: Request, extraction) -> Comparison:
    """The comparison of ``request``, computed with a progress bar unless the store has it."""
    found = _store().get(request)
    if found is not None:
        return found
    with st.status(f"Comparing {len(request.methods)} methods…", expanded=True) as status:
        bar = st.progress(0.0, text="starting")

        def progress(done: int, total: int, message: str) -> None:
            bar.progress(done / total, text=f"{done}/{total} methods done · now: {message}")

        comparison = compare(
            state.current_backbone(), state.current_dataset(), extraction, [METHODS[name] for name in request.methods],
            settings.cache_dir(), theta=request.theta, rule=request.rule, algorithm=request.algorithm,
            sets=request.sets, runs=request.runs, seed=request.seed, n_clusters=request.n_clusters,
            batch_size=state.current_selection().batch_size, progress=progress,
        )
        status.update(label=f"Compared {len(request.methods)} methods", state="complete", expanded=False)
    _store().put(request, comparison)
    return comparison


def settings_form(extraction) -> tuple[Request, tuple[str, ...]]:
    """The methods and the protocol; nothing changes until **Apply** is pressed. Returns the request of every
    method chosen, and those of them that run a model again."""
    with st.form("compare_settings"):
        chosen = st.multiselect(
            "Methods (the original model is always the first row: the reference)", [n for n in METHODS if n != "original"],
            default=[n for n in DEFAULT_METHODS if n != "original"], format_func=lambda n: METHODS[n].label,
            key="compare_methods",
            help="Test-time registers, trained registers and ITAE in earlier blocks run a model over the images "
            "again, minutes on a CPU the first time (then cached): they run only when you press their button below.",
        )
        columns = st.columns(5)
        algorithm = columns[0].selectbox("Clustering", ALGORITHMS, format_func=ALGORITHM_NAMES.get, key="compare_algorithm",
                                         help="K-Means is the paper's protocol; the others are its Sec. 3.4 candidates.")
        n_clusters = int(columns[1].number_input("Clusters K", 2, 10_000, state.default_clusters(extraction), key="compare_k"))
        sets = int(columns[2].number_input("Sets", 1, 100, 5, key="compare_sets", help="The paper: 20"))
        runs = int(columns[3].number_input("Runs per set", 1, 100, 10, key="compare_runs", help="The paper: 25"))
        seed = int(columns[4].number_input("Seed", 0, state.MAX_SEED, 0, key="compare_seed"))
        session_theta = f"this session's θ = {threshold.current_theta():.2f}, rule {threshold.current_rule()}"
        theta_choice = st.radio(
            "θ of the query-norm detector", [AUTO, "session"], horizontal=True, key="compare_theta",
            format_func=lambda c: "decided by the library (auto)" if c == AUTO else session_theta,
            help="The other detectors (key, value, output norm) always take the library's automatic θ on their own norms.",
        )
        st.form_submit_button("Apply")
    methods = ("original", *[n for n in METHODS if n in chosen])
    theta, rule = (AUTO, "minority") if theta_choice == AUTO else (threshold.current_theta(), threshold.current_rule())
    request = Request(extraction.info.key, methods, theta, rule, algorithm, n_clusters, sets, runs, seed)
    return request, tuple(n for n in methods if METHODS[n].runs_the_backbone)


def score_text(summary: dict | None, metric: str) -> str:
    if summary is None or summary["mean"] is None:
        return "—"
    scale = 100 if metric in SUPERVISED_METRICS else 1
    se = "" if summary["se"] is None else f" ± {scale * summary['se']:.2f}"
    return f"{scale * summary['mean']:.2f}{se}"


def metrics_of(report: dict) -> list[str]:
    clustered = next((m["clustering"] for m in report["methods"] if m["clustering"]), {})
    return [name for name in (*SUPERVISED_METRICS, "inertia", "silhouette") if name in clustered][:3]


def results_table(report: dict) -> pd.DataFrame:
    rows = []
    for method in report["methods"]:
        clustering = method["clustering"] or {}
        seconds, tokens = method["seconds_per_image"], method["tokens_per_image"]
        rows.append({
            "method": method["label"],
            "θ": "—" if method["theta"] is None else f"{method['theta']:.3g}",
            "tokens attenuated / image": "—" if tokens is None else f"{tokens:.2f}",
            **{metric_label(name): score_text(clustering.get(name), name) for name in metrics_of(report)},
            "extra ms / image": "—" if seconds is None else f"{1000 * seconds:.2f}",
            "note": "; ".join(t for t in (method["note"], method["same_as"] and f"same features as {method['same_as']}") if t),
        })
    return pd.DataFrame(rows).set_index("method")


def bar_chart(report: dict) -> go.Figure:
    figure = go.Figure()
    shown = [m for m in report["methods"] if m["clustering"]]
    for name in metrics_of(report):
        scale = 100 if name in SUPERVISED_METRICS else 1
        summaries = [m["clustering"][name] for m in shown]
        figure.add_bar(
            x=[m["label"] for m in shown], y=[scale * s["mean"] for s in summaries], name=metric_label(name),
            error_y=dict(array=[scale * (s["se"] or 0) for s in summaries]),
        )
    units = " (%)" if metrics_of(report)[0] in SUPERVISED_METRICS else ""
    figure.update_layout(barmode="group", height=420, margin=dict(l=10, r=10, t=40, b=10),
                         title=f"Clustering of each method's features, mean ± SE over the sets{units}",
                         legend=dict(orientation="h", y=1.02, x=1, xanchor="right", yanchor="bottom"))
    figure.update_xaxes(tickangle=-25)
    return figure


def heatmap(z, x, y, title: str, zmax=None, axes: tuple[str, str] = ("", "")) -> go.Figure:
    values = np.asarray(z, dtype=float)
    text = [["n/a" if np.isnan(v) else (f"{v:.2f}" if zmax == 1 else f"{v:g}") for v in row] for row in values]
    figure = go.Figure(go.Heatmap(z=values, x=x, y=y, text=text, texttemplate="%{text}", colorscale="Blues",
                                  zmin=0, zmax=zmax, showscale=False))
    figure.update_layout(title=title, height=160 + 40 * len(y), margin=dict(l=10, r=10, t=40, b=10))
    figure.update_yaxes(autorange="reversed", title_text=axes[1])
    figure.update_xaxes(title_text=axes[0])
    return figure


def detection_section(report: dict, comparison: Comparison) -> None:
    detected = [m for m in report["methods"] if m["detection"] is not None]
    if not detected:
        return
    st.subheader("Detection against the planted artifacts")
    st.caption(
        f"The model has **synthetic, planted artifacts** ({detected[0]['detection']['planted']:,} tokens whose positions "
        "are known): each detector's artifact set scored against them, all tokens of all images pooled."
    )
    st.dataframe(pd.DataFrame([{
        "method": m["label"], "detector": m["variant"]["detector"],
        "θ": "—" if m["theta"] is None else f"{m['theta']:.3g}",
        **{name: m["detection"][name] for name in ("precision", "recall", "jaccard")},
        "detected tokens": m["detection"]["detected"],
    } for m in detected]), hide_index=True)
    agreement = comparison.agreement
    if agreement is not None:
        st.plotly_chart(heatmap(agreement.jaccard, agreement.names, agreement.names,
                                "Detector agreement: Jaccard of their artifact sets (n/a: both empty)", zmax=1),
                        key="compare_agreement")


def cluster_name(movers, cluster: int) -> str:
    if cluster == UNMATCHED:
        return "a new cluster (matched to no original one)"
    index = int(np.flatnonzero(movers.before_clusters == cluster)[0])
    return f"cluster {index}" + (f" (mostly {movers.majority[index]})" if movers.majority else "")


def movers_section(comparison: Comparison, extraction) -> None:
    st.subheader("Cluster movers")
    st.caption("The images a method puts in another cluster than the original features do, in one set of the protocol "
               "(the same seed for both). Cluster numbers are arbitrary, so the method's clusters are first matched "
               "to the original's, keeping the most images together.")
    names = [r.method.name for r in comparison.results if r.available and r.method.name != "original"]
    if not names:
        st.info("Choose at least one method besides the original.")
        return
    left, right = st.columns([3, 1])
    name = left.selectbox("Method", names, format_func=lambda n: METHODS[n].label, key="compare_movers_method")
    sets = 1 if comparison.algorithm in DETERMINISTIC else comparison.sets
    set_index = int(right.number_input("Set", 0, sets - 1, 0, key="compare_movers_set",
                                       help="Which set of the protocol (its seed); each set clusters anew."))
    try:
        movers = comparison.movers(name, set_index)
    except state.LIBRARY_ERRORS as error:
        st.warning(f"The clusters cannot be compared: {error}")
        return
    result = comparison.result(name)
    st.markdown(f"**{movers.n_moved} of {len(movers.moved)} images** change cluster with {result.method.label}.")
    columns = [f"→ {cluster_name(movers, int(c))}" if c != UNMATCHED else f"→ unmatched ({i})"
               for i, c in enumerate(movers.column_match)]
    rows = [cluster_name(movers, int(c)) for c in movers.before_clusters]
    st.plotly_chart(heatmap(movers.contingency, columns, rows, "Images per pair of clusters; off the diagonal: movers",
                            axes=("the method's cluster, matched", "original cluster")),
                    key="compare_contingency")
    moved = np.flatnonzero(movers.moved)
    if not len(moved):
        return
    shown = len(moved)
    if len(moved) > MOVERS_SHOWN:
        shown = int(st.columns(4)[0].number_input(f"Movers shown (of {len(moved)})", 1, len(moved), MOVERS_SHOWN,
                                                  key="compare_movers_shown"))
    dataset = state.current_dataset()
    for row in moved[:shown]:
        mover(extraction, dataset, result, movers, int(row))


def mover(extraction, dataset, result, movers, row: int) -> None:
    info = extraction.info
    prefix, grid = info.num_prefix_tokens, info.grid_size
    label = "" if extraction.labels is None else f" ({extraction.class_names[extraction.labels[row]]})"
    st.markdown(f"**{extraction.names[row]}**{label} · {cluster_name(movers, int(movers.before[row]))} → "
                f"{cluster_name(movers, int(movers.matched[row]))}")
    before = maps.head_map(extraction.attention_original[row], None, prefix, grid)
    same_layout = result.attention is not None and result.attention.shape[1:] == extraction.attention_original.shape[1:]
    after = maps.head_map(result.attention[row], None, prefix, grid) if same_layout else before
    mask = result.artifact_mask[row] if result.artifact_mask is not None else np.zeros(extraction.query_norms.shape[1], bool)
    image = dataset.load(int(extraction.indices[row]))
    planted = None if extraction.planted_mask is None else extraction.planted_mask[row]
    marked, original, attenuated, _ = maps.panels(image, before, after, mask, planted, prefix, grid)
    columns = st.columns(4)
    columns[0].image(marked, caption=f"input ({int(mask.sum())} attenuated tokens outlined)", width=maps.SIDE)
    columns[1].image(original, caption="original CLS attention (mean over heads)", width=maps.SIDE)
    if same_layout:
        columns[2].image(attenuated, caption=f"CLS attention with {result.method.label}", width=maps.SIDE)
        top, _ = maps.scales(before, after)
        columns[3].image(maps.colour_bar(maps.ATTENTION_MAP, 0.0, top, "CLS attention (both maps)"), width=maps.SIDE)
    else:
        columns[2].caption("No final-block attention map kept for this method: it re-runs earlier blocks or another model.")


def downloads(report: dict) -> None:
    left, right = st.columns(2)
    left.download_button("Table as CSV", pd.DataFrame(reports.compare_rows(report)).to_csv(index=False),
                         "itae_compare.csv", "text/csv", on_click="ignore")
    right.download_button("Comparison as JSON", json.dumps(report, indent=2, default=float), "itae_compare.json",
                          "application/json", on_click="ignore")


def main() -> None:
    st.title("Compare methods")
    st.caption(
        "ITAE beside its open-question variants (which norm detects, what the logits become, which rows, which "
        "blocks), test-time registers (Jiang et al. 2025) and trained registers (Darcet et al. 2024): the same "
        "model, the same images, the same clustering seeds."
    )
    extraction = state.current_extraction()
    if extraction is None:
        return
    info = extraction.info
    st.markdown(f"**Model** {info.label} [weights {info.weights}] · **Data** {info.data} · {len(extraction):,} images")
    request, slow = settings_form(extraction)
    quick = replace(request, methods=tuple(n for n in request.methods if n not in slow))
    comparison = _store().get(request) if slow else None
    if slow and comparison is None:
        waiting = st.empty()  # the notice and its button go once the slow methods are done
        with waiting.container():
            st.info(", ".join(METHODS[n].label for n in slow) + ": these run a model over the images again, "
                    "minutes on a CPU the first time (then cached on disk). The table below leaves them out until then.",
                    icon=":material/hourglass_top:")
            pressed = st.button(f"Run the {len(slow)} slow method{'s' * (len(slow) > 1)} too", key="compare_run_slow",
                                type="primary")
        if pressed:
            comparison = computed(request, extraction)
            if comparison is not None:
                waiting.empty()
    if comparison is None:
        comparison = computed(quick, extraction)
    if comparison is None:
        return
    report = comparison.to_dict()
    st.subheader("Methods side by side")
    for detector, decision in report["theta_decisions"].items():
        st.caption(f"θ, {detector} norms: {decision['reason']}" + (f" **{decision['warning']}**" if decision["warning"] else ""))
    if all(not m["tokens_per_image"] for m in report["methods"] if m["kind"] == "itae"):
        st.info("No ITAE row attenuates anything here: the θ policy found no artifacts in this model's norms (the "
                "reasons above), so every ITAE variant gives the original features. To see the variants differ, pick "
                "a model with artifacts on the **Data & model** page, or set θ yourself (the θ slider of the **Norms & "
                "θ** page) and choose *this session's θ* above.", icon=":material/info:")
    st.dataframe(results_table(report))
    protocol = reports.ALGORITHM_TEXT[comparison.algorithm]
    st.caption(f"{protocol}, K = {report['n_clusters']}, mean ± SE over the sets (ACC, NMI, ARI in %); tokens attenuated "
               "per image; extra ms / image: the compute beyond the shared extraction (as measured when first computed).")
    st.plotly_chart(bar_chart(report), key="compare_chart")
    detection_section(report, comparison)
    movers_section(comparison, extraction)
    st.subheader("Downloads")
    downloads(report)


def computed(request: Request, extraction) -> Comparison | None:
    try:
        return run(request, extraction)
    except state.LIBRARY_ERRORS as error:
        st.error(f"The comparison could not run: {error}")
        return None


main()
