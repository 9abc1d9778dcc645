"""Metrics: K-Means ACC/NMI/ARI of the original vs the ITAE features, k-NN accuracy, the θ sweep (Fig. 5), downloads."""
import io
import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

import state
import threshold
from itae.choices import LOWER_IS_BETTER, METRICS, RULES, SUPERVISED_METRICS, UNSUPERVISED_METRICS, metric_label
from itae.evaluate import cluster_protocol, knn_classify, stratified_split
from itae.reports import detection_text
from itae.theta import parse_theta_range, theta_sweep

SWEEP_POINTS = 12
DELTA_DECIMALS = 4


@st.cache_data(max_entries=64, show_spinner="Running K-Means…")
def protocol(key: str, features_id: str, n_clusters: int, sets: int, runs: int, seed: int, device: str, _features, _labels) -> dict:
    """``cluster_protocol(...).to_dict()`` of one feature set on ``device``; ``key`` and ``features_id`` name it for the cache."""
    return cluster_protocol(_features, labels=_labels, n_clusters=n_clusters, sets=sets, runs=runs, seed=seed, device=device).to_dict()


@st.cache_data(max_entries=64, show_spinner="Running k-NN…")
def knn(key: str, features_id: str, k: int, seed: int, _features, _labels) -> float:
    train, test = stratified_split(_labels, test_fraction=0.5, seed=seed)
    return knn_classify(_features[train], _labels[train], _features[test], _labels[test], k=k)


def metric_names(result: dict) -> list[str]:
    return [name for name in METRICS if isinstance(result.get(name), dict)]


def number(value: float | None) -> str:
    """A score for the table; the spread of a single set is undefined (None)."""
    return "—" if value is None else f"{value:.4f}"


def better_direction(metric: str) -> str:
    return "lower" if metric in LOWER_IS_BETTER else "higher"


def delta_text(before: float, after: float) -> str:
    """ITAE minus original, signed; exactly 0 when equal, and a difference too small for the table in full."""
    delta = after - before
    if delta == 0:
        return "0"
    if abs(delta) < 0.5 * 10**-DELTA_DECIMALS:  # would read +0.0000, as if equal
        return f"{delta:+.1e}"
    return f"{delta:+.{DELTA_DECIMALS}f}"


def comparison(metric: str, before: float, after: float) -> str:
    """Whether ITAE's score is better, worse or equal, in the metric's own direction."""
    if after == before:
        return "equal"
    improved = after < before if metric in LOWER_IS_BETTER else after > before
    return "better" if improved else "worse"


def results_table(original: dict, itae: dict) -> pd.DataFrame:
    """One row per metric: which way is better, mean ± SE of both feature sets, and the difference of the means."""
    rows = []
    for name in metric_names(original):
        a, b = original[name], itae[name]
        known = None not in (a["mean"], b["mean"])
        rows.append({
            "metric": metric_label(name),
            "better": better_direction(name),
            "original (mean ± SE)": f"{number(a['mean'])} ± {number(a['se'])}",
            "ITAE (mean ± SE)": f"{number(b['mean'])} ± {number(b['se'])}",
            "Δ mean (ITAE − original)": delta_text(a["mean"], b["mean"]) if known else "—",
            "ITAE is": comparison(name, a["mean"], b["mean"]) if known else "—",
            "original std": number(a["std"]),
            "ITAE std": number(b["std"]),
        })
    return pd.DataFrame(rows)


def flat_results(original: dict, itae: dict, settings: dict) -> pd.DataFrame:
    """Long form for the CSV: one row per (feature set, metric) with mean, std and SE, then ``settings`` as columns."""
    rows = []
    for features, result in (("original", original), ("itae", itae)):
        for name in metric_names(result):
            rows.append({"features": features, "metric": name, **{k: result[name][k] for k in ("mean", "std", "se")}, **settings})
    return pd.DataFrame(rows)


def show_knn(scores: dict) -> None:
    """The two k-NN accuracies; the difference gets a colour and an arrow only where it is one (higher is better)."""
    left, right = st.columns(2)
    left.metric("Original", f"{scores['original']:.4f}")
    delta = scores["itae"] - scores["original"]
    changed = "normal" if delta else "off"
    right.metric("ITAE", f"{scores['itae']:.4f}", delta_text(scores["original"], scores["itae"]),
                 delta_color=changed, delta_arrow="auto" if delta else "off")
    st.caption("A stratified half of the images is the training set, the other half is classified (cosine, weighted "
               "votes). Accuracy: higher is better.")


def show_detection(extraction, result) -> dict | None:
    """On the teaching model, ITAE's artifacts at θ scored against the planted ones; returns the scores for the exports."""
    if extraction.planted_mask is None:
        return None
    scores = extraction.detection_scores(result.artifact_mask).to_dict()
    st.caption(
        f"The artifacts ITAE attenuated at θ = {result.theta:.2f}, {detection_text(scores)}: the teaching model's ground "
        "truth. Its clustering is no sign of the paper's gain: on the demo weights the planted tokens make K-Means "
        "better and ITAE takes most of that back (*About the method* gives the full protocol's figures)."
    )
    return scores


def default_range(extraction) -> str:
    low, high = threshold.theta_range(extraction)
    step = max(round((high - low) / SWEEP_POINTS, 2), 0.01)
    return f"{low:.2f}:{high:.2f}:{step:.2f}"


def sweep_metrics(extraction) -> tuple[str, ...]:
    return METRICS if extraction.labels is not None else UNSUPERVISED_METRICS


def run_sweep(extraction, thetas, rule: str, metric: str, n_clusters: int, sets: int, runs: int, seed: int):
    """The sweep with a progress bar; each θ reads the final-block cache, never the backbone.

    A metric against the labels clusters with them; inertia and silhouette cluster without, as ``itae sweep``
    does (the protocol scores the silhouette only then).
    """
    bar = st.progress(0.0, text=f"0/{len(thetas)} θ values")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total, text=f"{done}/{total} θ values")

    labels = extraction.labels if metric in SUPERVISED_METRICS else None
    device = state.clustering_device()

    def score(features):
        return cluster_protocol(features, labels=labels, n_clusters=n_clusters, sets=sets, runs=runs, seed=seed, device=device).summary()

    original = score(extraction.features_original)
    settings = {"model": extraction.info.label, "data": extraction.info.data, "n_clusters": n_clusters, "sets": sets,
                "runs": runs, "seed": seed}
    try:
        return theta_sweep(
            extraction.query_norms, features_at=lambda theta, rule: state.itae_result(extraction, theta, rule).features,
            score=score, thetas=thetas, rule=rule, num_prefix_tokens=extraction.info.num_prefix_tokens,
            original_score=original, progress=progress, settings=settings,
        )
    finally:
        bar.empty()


@st.cache_data(max_entries=16, show_spinner=False)
def sweep_png(sweep, metric: str) -> bytes:
    """The library's sweep figure of ``metric`` as PNG: what the page shows is the file it offers."""
    buffer = io.BytesIO()
    sweep.plot_png(buffer, metric=metric)
    return buffer.getvalue()


def npz_of(extraction, result) -> bytes:
    """Everything of the extraction plus the ITAE features at the current θ, as ``Extraction.save`` writes it."""
    with tempfile.TemporaryDirectory() as folder:
        path = extraction.save(Path(folder) / "features.npz", itae=result, include_cache=False)
        return path.read_bytes()


def sweep_section(extraction, n_clusters: int, sets: int, runs: int, seed: int) -> None:
    st.subheader("θ sweep (Fig. 5)")
    st.caption("The paper's ablation: attenuate L_a (rule *below*) at each θ and cluster again, with the K, sets, runs "
               "and seed above. Uses the cached final block only.")
    left, middle, right = st.columns([3, 1, 1])
    text = left.text_input("θ values (start:stop:step, or a list a,b,c)", default_range(extraction), key="sweep_range")
    rule = middle.selectbox("Rule", RULES, index=RULES.index("below"), key="sweep_rule")
    choices = sweep_metrics(extraction)
    metric = right.selectbox("Metric", choices, format_func=lambda name: f"{metric_label(name)} ({better_direction(name)} is better)",
                             key="sweep_metric")
    if st.button("Run the sweep", key="sweep_run"):
        try:
            thetas = parse_theta_range(text)
            st.session_state.sweep = (extraction.info.key, run_sweep(extraction, thetas, rule, metric, n_clusters, sets, runs, seed))
        except state.LIBRARY_ERRORS as error:
            st.warning(f"The sweep could not run: {error}")
    stored = st.session_state.get("sweep")
    if not stored or stored[0] != extraction.info.key:
        return
    sweep = stored[1]
    if metric not in sweep.metrics:
        st.info(f"The last sweep scored {', '.join(metric_label(m) for m in sweep.metrics)}; run it again for "
                f"{metric_label(metric)}.")
        return
    png = sweep_png(sweep, metric)
    st.image(png, caption=f"{metric_label(metric)} against θ ({better_direction(metric)} is better); the dotted line "
                          "is the original features' score, the dashed one the share of tokens attenuated.")
    frame = sweep.to_frame()
    with st.expander("Sweep table"):
        st.dataframe(frame, hide_index=True)
    left, right = st.columns(2)
    left.download_button("Sweep as CSV", frame.to_csv(index=False), "itae_sweep.csv", "text/csv", on_click="ignore")
    right.download_button("Sweep as PNG", png, f"itae_sweep_{metric}.png", "image/png", on_click="ignore")


def main() -> None:
    st.title("Metrics")
    st.caption("K-Means on the L2-normalised CLS features, the paper's protocol: `sets` repetitions of K-Means with `runs` initialisations each, mean ± standard error over the sets.")
    extraction = state.current_extraction()
    if extraction is None:
        return
    theta, rule = threshold.controls(extraction)
    result = state.itae_result(extraction, theta, rule)
    columns = st.columns(4)
    default_k = state.default_clusters(extraction)
    n_clusters = int(columns[0].number_input("Clusters K", 2, 10_000, default_k, key="metrics_k"))
    sets = int(columns[1].number_input("Sets", 1, 100, 5, key="metrics_sets", help="The paper: 20"))
    runs = int(columns[2].number_input("Runs (initialisations) per set", 1, 100, 10, key="metrics_runs", help="The paper: 25"))
    seed = int(columns[3].number_input("Seed", 0, 2**31 - 1, 0, key="metrics_seed"))
    key, theta_id, device = extraction.info.key, f"itae θ={theta:.4f} {rule}", state.clustering_device()
    try:
        original = protocol(key, "original", n_clusters, sets, runs, seed, device, extraction.features_original, extraction.labels)
        itae = protocol(key, theta_id, n_clusters, sets, runs, seed, device, result.features, extraction.labels)
    except state.LIBRARY_ERRORS as error:
        st.warning(f"K-Means cannot run on this data: {error}")
        return
    st.subheader("Clustering")
    st.table(results_table(original, itae).set_index("metric"))
    st.caption(f"K-Means ran on {device}.")
    settings = {"theta": theta, "rule": rule, "n_clusters": n_clusters, "sets": sets, "runs": runs, "seed": seed,
                "kmeans_device": device, "model": extraction.info.label, "data": extraction.info.data}
    detection = show_detection(extraction, result)
    report = {"settings": settings, "original": original, "itae": itae, "planted_detection": detection}
    if extraction.labels is not None:
        st.subheader("k-NN accuracy")
        k = int(st.columns(4)[0].number_input("k (neighbours)", 1, 200, 10, key="metrics_knn_k"))
        try:
            scores = {"original": knn(key, "original", k, seed, extraction.features_original, extraction.labels),
                      "itae": knn(key, theta_id, k, seed, result.features, extraction.labels)}
        except state.LIBRARY_ERRORS as error:
            st.warning(f"k-NN cannot run on this data: {error}")
        else:
            show_knn(scores)
            report["knn"] = {"k": k, **scores}
    st.subheader("Downloads")
    columns = st.columns(3)
    detection_columns = {f"planted_{name}": value for name, value in (detection or {}).items()}
    columns[0].download_button("Results as CSV", flat_results(original, itae, settings | detection_columns).to_csv(index=False), "itae_results.csv", "text/csv", on_click="ignore")
    columns[1].download_button("Results as JSON", json.dumps(report, indent=2, default=float), "itae_results.json", "application/json", on_click="ignore")
    columns[2].download_button("Features as .npz", lambda: npz_of(extraction, result), "itae_features.npz", "application/octet-stream", on_click="ignore")
    sweep_section(extraction, n_clusters, sets, runs, seed)


main()
