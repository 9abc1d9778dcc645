"""Norms & θ: the paper's Fig. 2 (query and output norms) and Fig. 3 (CLS attention of artifacts vs normal tokens)."""
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import state
import threshold
from itae.theta import ARTIFACTS, TOO_LITTLE_DATA

BINS = 80
PLANTED_COLOUR = "#e040fb"  # the planted tokens' colour on every page: the ground truth, not a detection
NO_ARTIFACT_ADVICE = (
    "**ITAE has nothing to remove in this model.** Its final-layer query norms form one group, with no separate "
    "artifact tokens (the paper, too, left DINOv2 ViT-S/14 without registers unmodified). Moving θ still shows "
    "what attenuating would do, but the tokens it picks are normal ones. To see artifacts, pick a DINOv2 "
    "ViT-B/14, ViT-L/14 or ViT-g/14 (`dinov2_vitb14`, "
    "`dinov2_vitl14`, `dinov2_vitg14`) or a model with registers (`dinov2_vits14_reg`, …) with hub weights on a "
    "networked machine, on the **Data & model** page, or plant artifacts whose positions are known there (the "
    "teaching model, one click)."
)


def bars(values: np.ndarray, edges: np.ndarray, name: str, color: str, share: bool = False) -> go.Bar:
    """One histogram as bars over fixed ``edges``; ``share`` draws each bin's fraction of ``values``."""
    counts, _ = np.histogram(values, bins=edges)
    heights = counts / max(values.size, 1) if share else counts
    return go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=heights, width=np.diff(edges), name=name, marker_color=color, opacity=0.7)


def split_tokens(norms: np.ndarray, num_prefix_tokens: int, planted: np.ndarray | None) -> dict[str, np.ndarray]:
    """The values of an (N, T) array by kind of token, CLS left out: patches, registers, and the planted
    patches apart from the others where the model has them (``planted``, bool (N, T))."""
    patches = norms[:, num_prefix_tokens:]
    registers = norms[:, 1:num_prefix_tokens].ravel()
    if planted is None:
        return {"patch tokens": patches.ravel(), "register tokens": registers}
    planted_patches = planted[:, num_prefix_tokens:]
    return {"other patch tokens": patches[~planted_patches], "register tokens": registers,
            "planted (ground truth)": patches[planted_patches]}


TOKEN_COLOURS = {"patch tokens": "#1f77b4", "other patch tokens": "#1f77b4", "register tokens": "#ff7f0e",
                 "planted (ground truth)": PLANTED_COLOUR}


def norms_figure(extraction, theta: float, log_y: bool) -> go.Figure:
    """Fig. 2: query norms (Eq. 4) with θ, and output token norms; registers and planted tokens as their own traces."""
    prefix = extraction.info.num_prefix_tokens
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Final-layer query norms (Eq. 4)", "Output token norms"))
    for col, norms in ((1, extraction.query_norms), (2, extraction.output_norms)):
        edges = np.histogram_bin_edges(norms[:, 1:], bins=BINS)
        for name, values in split_tokens(norms, prefix, extraction.planted_mask).items():
            if values.size:
                figure.add_trace(bars(values, edges, name, TOKEN_COLOURS[name]), row=1, col=col)
    figure.add_vline(x=theta, line_dash="dash", line_color="red", annotation_text=f"θ = {theta:.2f}", row=1, col=1)
    figure.update_traces(showlegend=False, selector=dict(xaxis="x2"))
    figure.update_layout(
        title=dict(text=extraction.info.label, font=dict(size=13)), barmode="overlay", height=400,
        margin=dict(l=10, r=10, t=70, b=10), legend=dict(orientation="h", y=-0.2),
    )
    figure.update_yaxes(type="log" if log_y else "linear", title_text="tokens")
    figure.update_xaxes(title_text="L2 norm")
    return figure


def attention_figure(extraction, mask: np.ndarray, itae_attention: np.ndarray, log_y: bool) -> go.Figure:
    """Fig. 3: CLS attention (every head) of the artifacts vs the normal tokens, and of the artifacts after ITAE."""
    before = extraction.attention_original[:, :, 1:]
    after = itae_attention[:, :, 1:]
    artifacts = np.broadcast_to(mask[:, None, 1:], before.shape)
    groups = [
        ("normal tokens", before[~artifacts], "#1f77b4"),
        ("artifacts", before[artifacts], "#e6b400"),
        ("artifacts after ITAE", after[artifacts], "#2ca02c"),
    ]
    logs = [(name, np.log10(np.maximum(values, 1e-12)), color) for name, values, color in groups]
    edges = np.histogram_bin_edges(np.concatenate([v for _, v, _ in logs]), bins=BINS)
    figure = go.Figure([bars(values, edges, name, color, share=True) for name, values, color in logs if values.size])
    figure.update_layout(
        barmode="overlay", height=360, margin=dict(l=10, r=10, t=60, b=10),
        title=f"CLS attention per head (Fig. 3), each group as a share of its tokens<br><sup>{extraction.info.label}</sup>",
        xaxis_title="log₁₀ attention of the CLS token to the token", yaxis_title="share of the group",
        legend=dict(orientation="h", y=-0.25),
    )
    figure.update_yaxes(type="log" if log_y else "linear")
    return figure


def show_counts(extraction, theta: float, rule: str, mask: np.ndarray) -> None:
    candidates = extraction.query_norms[:, 1:]
    below = int((candidates <= theta).sum())
    above = candidates.size - below
    per_image = mask.sum(axis=1)
    columns = st.columns(4)
    columns[0].metric("Tokens ≤ θ (L_a)", f"{below:,}", f"{below / candidates.size:.1%} of non-CLS tokens", delta_color="off", delta_arrow="off")
    columns[1].metric("Tokens > θ (L_b)", f"{above:,}", f"{above / candidates.size:.1%}", delta_color="off", delta_arrow="off")
    columns[2].metric("Artifacts per image", f"{per_image.mean():.2f}", f"min {per_image.min()}, max {per_image.max()}", delta_color="off", delta_arrow="off")
    columns[3].metric("Images with artifacts", f"{int((per_image > 0).sum())} / {len(per_image)}")
    st.markdown(f"**{int(per_image.sum()):,} artifact tokens** at θ = {theta:.2f} under the *{rule}* rule ({per_image.mean():.2f} per image).")


def score_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def show_detection(extraction, theta: float, rule: str, mask: np.ndarray) -> None:
    """How ITAE's artifacts at θ match the planted ones, on the teaching model only."""
    if extraction.planted_mask is None:
        return
    scores = extraction.detection_scores(mask)
    columns = st.columns(4)
    columns[0].metric("Detection precision", score_text(scores.precision), help="Artifacts at θ that are planted, over the artifacts at θ.")
    columns[1].metric("Detection recall", score_text(scores.recall), help="Planted tokens that are artifacts at θ, over the planted tokens.")
    columns[2].metric("Jaccard", score_text(scores.jaccard), help="Tokens in both, over tokens in either.")
    columns[3].metric("Planted tokens", f"{scores.planted:,}", f"{scores.both:,} found at θ", delta_color="off", delta_arrow="off")
    st.caption(
        f"The teaching model's ground truth: ITAE's artifacts at θ = {theta:.2f} (*{rule}* rule) against the tokens "
        "whose positions were planted. Move θ and watch what a threshold off the valley costs."
    )


def theta_area(extraction) -> None:
    """The θ controls, the counts, Fig. 2 and Fig. 3 at the θ and rule they settled on."""
    theta, rule = threshold.controls(extraction)
    log_y = st.toggle("Logarithmic y axis", key="norms_log_y")
    mask = extraction.artifact_mask(theta, rule)
    show_counts(extraction, theta, rule, mask)
    show_detection(extraction, theta, rule, mask)
    st.plotly_chart(norms_figure(extraction, theta, log_y), key="norms_histograms")
    if mask.any():
        result = state.itae_result(extraction, theta, rule)
        st.plotly_chart(attention_figure(extraction, mask, result.attention, log_y), key="norms_attention")
    else:
        st.info("No token is an artifact at this θ and rule, so ITAE leaves every feature unchanged (Fig. 3 needs artifacts).")


def show_verdict(extraction) -> None:
    """What the library concludes from the norms (``decide_theta``'s evidence), with a way to apply its θ."""
    evidence = threshold.decision(extraction).evidence
    if evidence.verdict == ARTIFACTS:
        st.success(evidence.reason)
        st.button(f"Apply the suggested θ = {evidence.theta:.2f} (minority rule)", on_click=threshold.set_theta,
                  args=(evidence.theta, "minority"))
    elif evidence.verdict == TOO_LITTLE_DATA:
        st.info(evidence.reason)
        st.button(f"Apply θ = {evidence.theta:.2f} anyway (minority rule)", on_click=threshold.set_theta,
                  args=(evidence.theta, "minority"))
    else:
        st.warning(NO_ARTIFACT_ADVICE)
    with st.expander("Details of the artifact test"):
        st.write(evidence.reason)
        details = {key: value for key, value in evidence.to_dict().items() if key not in ("reason", "image_fractions")}
        st.dataframe(pd.DataFrame({"value": [str(v) for v in details.values()]}, index=list(details)))


def main() -> None:
    st.title("Norms & θ")
    st.caption(
        "The paper's Fig. 2 and Fig. 3. Artifacts are the tokens whose final-layer query norm sits apart from the "
        "others; θ splits the non-CLS tokens and the rule says which side is attenuated."
    )
    extraction = state.current_extraction()
    if extraction is None:
        return
    show_verdict(extraction)
    theta_area(extraction)


main()
