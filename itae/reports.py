"""Text reports for a terminal: aligned tables, an ASCII histogram of query norms, and the reports of the
``itae`` subcommands. They only format what the library computed; nothing here computes a result.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from itae.choices import LOWER_IS_BETTER, SUPERVISED_METRICS, metric_label

if TYPE_CHECKING:
    from itae.data import SourceSpec
    from itae.extract import Extraction
    from itae.registry import BackboneSpec
    from itae.theta import SweepResult, ThetaDecision

__all__ = [
    "ALGORITHM_TEXT",
    "ascii_histogram",
    "compare_report",
    "compare_rows",
    "eval_report",
    "extract_summary",
    "knn_report",
    "models_table",
    "percent",
    "sources_markdown",
    "sources_table",
    "sweep_report",
    "table",
    "theta_marks",
    "theta_text",
    "verdict_report",
]

ALGORITHM_TEXT = {"kmeans": "K-Means", "spectral": "spectral clustering", "agglomerative": "agglomerative (Ward)",
                  "gmm": "Gaussian mixture", "hdbscan": "HDBSCAN"}
"""How reports name the clustering algorithms (:data:`itae.choices.ALGORITHMS`)."""


def table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Align ``rows`` (the first is the header) in columns; indices in ``right`` are right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _plain(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _scale(metric: str):
    """How a metric is printed: ACC, NMI and ARI in %, the others as plain numbers."""
    return percent if metric in SUPERVISED_METRICS else _plain


def theta_text(theta: float | None) -> str:
    return "none" if theta is None else f"{theta:g}"


def _delta(before: float | None, after: float | None, scale) -> str:
    if before is None or after is None:
        return "n/a"
    return ("+" if after >= before else "-") + scale(abs(after - before))


def models_table(specs: list[BackboneSpec]) -> str:
    """The model registry, one row per model."""
    rows = [["name", "timm id", "registers", "default θ", "demo weights", "label"]]
    for spec in specs:
        rows.append([spec.name, spec.timm_id, str(spec.num_registers), theta_text(spec.default_theta),
                     "yes" if spec.demo_weights else "no", spec.label])
    return table(rows, right={2})


def _source_rows(sources: list[SourceSpec]) -> list[list[str]]:
    rows = [["name", "what", "needs --root", "train split"]]
    for source in sources:
        rows.append([source.name, source.description, "yes" if source.needs_root else "no",
                     "yes" if source.has_train_split else "no"])
    return rows


def sources_table(sources: list[SourceSpec]) -> str:
    """The built-in data sources, one row per source."""
    return table(_source_rows(sources))


def sources_markdown(sources: list[SourceSpec]) -> str:
    """The built-in data sources as a Markdown table: the README's table."""
    header, *body = _source_rows(sources)
    # Markdown would take "<root>" for an HTML tag and hide it.
    body = [[f"`{name}`", description.replace("<", "&lt;").replace(">", "&gt;"), *flags]
            for name, description, *flags in body]
    lines = [header, ["---"] * len(header), *body]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def extract_summary(extraction: Extraction, device: str, theta_line: str, path: Path) -> str:
    """The paragraph ``itae extract`` prints: what was extracted, skipped and written."""
    info = extraction.info
    rows, cols = info.grid_size
    n_tokens = extraction.query_norms.shape[1]
    skipped = extraction.skipped
    reasons = "".join(f" {s.name}: {s.reason};" for s in skipped[:5]).rstrip(";")
    more = f" ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    labels = "" if extraction.labels is not None else ", no labels"
    return (
        f"Extracted {len(extraction):,} images ({info.data}{labels}) with {info.label} "
        f"[weights {info.weights}] on {device}. "
        f"Skipped {len(skipped)}{':' + reasons + more if skipped else ''}. "
        f"Each image gives a {extraction.features_original.shape[1]}-d CLS feature and {n_tokens} tokens "
        f"(CLS, {info.num_registers} registers, {rows}×{cols} patches). {theta_line} "
        f"Wrote {path} ({path.stat().st_size / 1e6:.1f} MB): features_original, features_itae, "
        f"{'labels, ' if extraction.labels is not None else ''}query_norms, artifact_mask, attention and "
        f"the final-block cache."
    )


def eval_report(reports: list[dict], rule: str, sets: int, runs: int, seed: int) -> str:
    """The table of ``itae eval``: every model's metrics, original vs ITAE, from its JSON report."""
    first = reports[0]
    rows = [["model", "θ", "metric", "original", "ITAE", "Δ"]]
    for report in reports:
        label = report["label"]
        theta = theta_text(report["theta"])
        for name, original in report["original"].items():
            itae = report["itae"][name]
            scale = _scale(name)
            rows.append([label, theta, metric_label(name),
                         f"{scale(original['mean'])} ± {scale(original['se'])}",
                         f"{scale(itae['mean'])} ± {scale(itae['se'])}",
                         _delta(original["mean"], itae["mean"], scale)])
            label = theta = ""
    header = [
        f"Zero-shot {ALGORITHM_TEXT[first['algorithm']]} clustering, original vs ITAE (rule {rule})",
        f"data:   {first['data']}",
        f"images: {first['n_images']:,} used ({first['n_skipped']} skipped); K = {first['n_clusters']}; "
        f"{_protocol_text(first['algorithm'], sets, runs, seed)}",
    ]
    percents = " (ACC, NMI, ARI in %)" if "acc" in first["original"] else ""
    footer = [f"mean ± SE over the {sets} sets{percents}; SE = std / √{sets}; --json also gives the std."]
    if any(report["theta"] is None for report in reports):
        footer.append("θ = none: nothing is attenuated, ITAE = original (the θ line above says why).")
    for report in reports:
        if report["planted_detection"] is not None:
            footer.append(f"{report['label']}: the tokens ITAE attenuated at θ = {theta_text(report['theta'])}, "
                          f"{detection_text(report['planted_detection'])}.")
    return "\n".join([*header, "", table(rows, right={3, 4, 5}), "", *footer])


def _protocol_text(algorithm: str, sets: int, runs: int, seed: int) -> str:
    if algorithm in ("agglomerative", "hdbscan"):
        return f"{ALGORITHM_TEXT[algorithm]}, deterministic: one run"
    return f"{sets} sets × {runs} {ALGORITHM_TEXT[algorithm]} runs (seed {seed})"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def compare_report(report: dict) -> str:
    """The table of ``itae compare``, from ``Comparison.to_dict()``: one row per method, then notes,
    detection against planted artifacts and the detectors' agreement."""
    methods = report["methods"]
    metrics = next((list(m["clustering"]) for m in methods if m["clustering"]), [])
    names = [name for name in SUPERVISED_METRICS if name in metrics] or ["inertia", "silhouette"]
    rows = [["method", "θ", "tokens/img", *[name.upper() if name in SUPERVISED_METRICS else name for name in names],
             "extra ms/img"]]
    notes = []
    for method in methods:
        clustering = method["clustering"]
        cells = []
        for name in names:
            summary = clustering.get(name) if clustering else None
            scale = _scale(name)
            cells.append("n/a" if summary is None else f"{scale(summary['mean'])} ± {scale(summary['se'])}")
        tokens = method["tokens_per_image"]
        seconds = method["seconds_per_image"]
        rows.append([method["label"], "—" if method["theta"] is None else f"{method['theta']:.3g}",
                     "—" if tokens is None else f"{tokens:.2f}", *cells,
                     "—" if seconds is None else f"{1000 * seconds:.2f}"])
        said = [text for text in (method["note"], method["same_as"] and f"same features as {method['same_as']}") if text]
        if said or not method["available"]:
            notes.append(f"  {method['label']}: {'; '.join(said) or 'not available'}")
    lines = [
        f"Methods side by side: {report['label']} [weights {report['weights']}] on {report['data']}",
        f"{report['n_images']:,} images; K = {report['n_clusters']}; "
        f"{_protocol_text(report['algorithm'], report['sets'], report['runs'], report['seed'])}, "
        "the same seeds for every method",
        *_theta_lines(report["theta_decisions"]),
        "",
        table(rows, right=set(range(1, len(rows[0])))),
        "",
        f"mean ± SE over the sets{' (ACC, NMI, ARI in %)' if names[0] == 'acc' else ''}; tokens/img: attenuated "
        "per image; extra ms/img: compute beyond the shared extraction (cached re-runs: as measured then).",
        *(["notes:", *notes] if notes else []),
    ]
    detected = [m for m in methods if m["detection"] is not None]
    if detected:
        planted = detected[0]["detection"]["planted"]
        rows = [["method", "detector", "θ", "precision", "recall", "Jaccard", "detected"]]
        for method in detected:
            scores = method["detection"]
            rows.append([method["label"], method["variant"]["detector"],
                         "—" if method["theta"] is None else f"{method['theta']:.3g}",
                         _number(scores["precision"]), _number(scores["recall"]), _number(scores["jaccard"]),
                         f"{scores['detected']:,}"])
        lines += ["", f"Detection against the {planted:,} planted artifact tokens (pooled over all images):", "",
                  table(rows, right={2, 3, 4, 5, 6})]
    agreement = report["detector_agreement"]
    if agreement is not None:
        rows = [["", *agreement["names"]]]
        rows += [[name, *(_number(value) for value in row)] for name, row in zip(agreement["names"], agreement["jaccard"])]
        lines += ["", "Detector agreement: Jaccard of the artifact sets, all tokens pooled (n/a: both empty)", "",
                  table(rows, right=set(range(1, len(rows[0]))))]
    return "\n".join(lines)


def _theta_lines(decisions: dict) -> list[str]:
    """θ of each detector (one policy, :func:`itae.theta.decide_theta`): its reason, and its warning if any."""
    lines = ["θ, decided by one policy for every detector:"] if decisions else []
    for detector, decision in decisions.items():
        lines.append(f"  {detector} norms: {decision['reason']}")
        if decision["warning"]:
            lines.append(f"    warning: {decision['warning']}")
    return lines


def compare_rows(report: dict) -> list[dict]:
    """``itae compare --csv``: one flat row per method, from ``Comparison.to_dict()``."""
    rows = []
    for method in report["methods"]:
        variant = method["variant"] or {}
        clustering = method["clustering"] or {}
        detection = method["detection"] or {}
        row = {
            "method": method["method"], "label": method["label"], "kind": method["kind"],
            **{name: variant.get(name) for name in ("detector", "attenuation", "factor", "rows", "blocks")},
            "theta": method["theta"], "theta_origin": method["theta_origin"],
            "tokens_per_image": method["tokens_per_image"], "seconds_per_image": method["seconds_per_image"],
            "algorithm": report["algorithm"], "sets": clustering.get("sets"),
        }
        for name in (*SUPERVISED_METRICS, "inertia", "silhouette"):
            for statistic in ("mean", "std", "se"):
                row[f"{name}_{statistic}"] = (clustering.get(name) or {}).get(statistic)
        row.update({f"detection_{name}": detection.get(name) for name in ("precision", "recall", "jaccard")})
        row.update(same_as=method["same_as"], note=method["note"])
        rows.append(row)
    return rows


def sweep_report(result: SweepResult, metric: str) -> str:
    """The table of ``itae sweep``: ``metric`` and the attenuated share at every θ of the grid."""
    column, scale, name = f"{metric}_mean", _scale(metric), metric_label(metric)
    original = result.original[column]
    rows = [["θ", "attenuated %", "per image", name, "Δ vs original"]]
    for row in result.rows:
        rows.append([f"{row['theta']:g}", f"{100 * row['artifact_fraction']:.2f}",
                     f"{row['mean_artifacts_per_image']:.1f}",
                     f"{scale(row[column])} ± {scale(row.get(f'{metric}_se'))}",
                     _delta(original, row[column], scale)])
    pick = min if metric in LOWER_IS_BETTER else max
    best = pick(result.rows, key=lambda row: row[column])
    units = " in %" if metric in SUPERVISED_METRICS else ""
    return "\n".join([
        result.title().replace("\n", "; "),
        f"original {name} {scale(original)} ± {scale(result.original.get(f'{metric}_se'))}",
        "",
        table(rows, right={0, 1, 2, 3, 4}),
        "",
        f"best: {name} {scale(best[column])} ± {scale(best.get(f'{metric}_se'))} at θ = {best['theta']:g} "
        f"({name}{units}, mean ± SE over the sets)",
    ])


def theta_marks(decisions: list[ThetaDecision]) -> dict[float, str]:
    """The θ values to mark on a histogram: each decision's value, and the valley where auto applies none."""
    marks = {}
    for decision in decisions:
        if decision.value is not None:
            marks.setdefault(decision.value, f"θ = {decision.value:g} ({decision.origin})")
        elif decision.origin == "auto" and decision.evidence.theta is not None:
            marks.setdefault(decision.evidence.theta,
                             f"valley θ = {decision.evidence.theta:.2f} (not applied: {decision.verdict})")
    return marks


def verdict_report(decisions: list[ThetaDecision], extraction: Extraction) -> str:
    """What ``itae suggest-theta`` prints: the evidence of the query norms, then each decision's reason."""
    evidence = decisions[0].evidence
    bimodality = evidence.bimodality
    n_images, n_tokens = extraction.query_norms.shape
    lines = [
        f"{extraction.info.label} on {extraction.info.data}: query norms of {n_images * (n_tokens - 1):,} "
        f"non-CLS tokens ({n_images:,} images × {n_tokens - 1})",
        f"verdict: {evidence.verdict}   valley θ: {theta_text(evidence.theta)}   two-mode test: ΔBIC "
        f"{bimodality.delta_bic:.1f}, Ashman's D {bimodality.ashman_d:.2f}, valley depth {bimodality.strength:.2f}",
    ]
    if evidence.image_fractions is not None:
        low, median, high = np.percentile(evidence.image_fractions, [0, 50, 100])
        lines.append(
            f"{evidence.side} the valley (its modes: ΔBIC {evidence.delta_bic:.1f}, Ashman's D {evidence.ashman_d:.2f}, "
            f"depth {evidence.valley_depth:.2f}): {percent(evidence.pooled_fraction)} % of the tokens; per image "
            f"{percent(low)}-{percent(high)} % (median {percent(median)} %); {percent(evidence.typical_share)} % "
            f"of the images within the per-image limit; {percent(evidence.region_share)} % of these patches in "
            f"connected regions (largest {evidence.largest_region})"
        )
    registers = extraction.info.num_registers
    for decision in decisions:
        line = decision.reason
        if decision.value is not None:
            mask = extraction.artifact_mask(decision.value, decision.rule)
            if registers:
                line += f" ({mask[:, 1:1 + registers].sum(axis=1).mean():.2f} of the {registers} registers per image)"
            if extraction.planted_mask is not None:
                line += f" The attenuated tokens, {detection_text(extraction.detection_scores(mask).to_dict())}."
        lines.append(line)
        if decision.warning is not None:
            lines.append(f"  warning: {decision.warning}")
    return "\n".join(lines)


def detection_text(scores: dict) -> str:
    """A detection against the planted artifacts in words, from ``DetectionScores.to_dict()``."""
    def score(name: str) -> str:
        return "n/a" if scores[name] is None else f"{scores[name]:.3f}"

    return (f"against the {scores['planted']:,} planted artifact tokens: precision {score('precision')}, "
            f"recall {score('recall')}, Jaccard {score('jaccard')}")


def ascii_histogram(patch_norms, register_norms=None, bins: int = 30, width: int = 50,
                    marks: dict[float, str] | None = None) -> list[str]:
    """A horizontal histogram of query norms for a terminal, registers stacked apart.

    Parameters
    ----------
    patch_norms : array-like, any shape
        Query norms of the patch tokens.
    register_norms : array-like, any shape, optional
        Query norms of the register tokens, drawn with ``R`` after the patches' ``#``.
    bins : int
        Number of equal-width bins over the range of all norms.
    width : int
        Characters of the longest bar.
    marks : dict of float to str, optional
        Values (θ) to mark with a line of text between the bins around them.

    Returns
    -------
    list of str, one per line
    """
    patches = np.asarray(patch_norms, dtype=np.float64).ravel()
    registers = np.asarray(register_norms if register_norms is not None else [], dtype=np.float64).ravel()
    edges = np.histogram_bin_edges(np.concatenate([patches, registers]), bins=bins)
    patch_counts, _ = np.histogram(patches, edges)
    register_counts, _ = np.histogram(registers, edges)
    scale = width / max(int((patch_counts + register_counts).max()), 1)
    pending = sorted((marks or {}).items())
    legend = "# patch tokens" + (", R register tokens" if registers.size else "")
    lines = [f"{'query norm':>17} | {legend}"]
    for low, high, n_patches, n_registers in zip(edges[:-1], edges[1:], patch_counts, register_counts):
        while pending and pending[0][0] < (low + high) / 2:
            lines.append(f"{'':>17} +--- {pending.pop(0)[1]} ---")
        bar = _bar(n_patches, scale, "#") + _bar(n_registers, scale, "R")
        count = f"{n_patches + n_registers:,}" + (f" ({n_registers:,} R)" if n_registers else "")
        lines.append(f"{low:8.3f}-{high:<8.3f} | {bar:<{width}} {count}")
    lines += [f"{'':>17} +--- {text} ---" for _, text in pending]
    return lines


def _bar(count: int, scale: float, char: str) -> str:
    # A non-empty bin always shows: a few artifacts among 10^5 tokens is exactly what one looks for.
    return char * (max(1, round(count * scale)) if count else 0)


def knn_report(report: dict) -> str:
    """The table of ``itae knn``, from its JSON report."""
    bank, queries, accuracy = report["memory_bank"], report["queries"], report["accuracy"]
    rows = [["model", "θ", "original", "ITAE", "Δ"],
            [report["label"], theta_text(report["theta"]), percent(accuracy["original"]),
             percent(accuracy["itae"]), f"{100 * (accuracy['itae'] - accuracy['original']):+.2f}"]]
    return "\n".join([
        f"k-NN classification (k = {report['k']}, temperature {report['temperature']:g}, rule {report['rule']}), "
        "accuracy in %",
        f"memory bank: {bank['data']}, {bank['n_images']:,} images; queries: {queries['data']}, "
        f"{queries['n_images']:,} images",
        "",
        table(rows, right={2, 3, 4}),
    ])
