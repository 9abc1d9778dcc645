"""About the method: what an artifact is, the equations, the pages, and a worked example on the current data."""
import numpy as np
import pandas as pd
import streamlit as st

import state
import threshold

TOP_TOKENS = 5

INTRODUCTION = """
A Vision Transformer cuts an image into patches and turns each into a **token**; a **CLS** token (and, in some
models, a few **register** tokens) joins them. In the final block the CLS token gathers information from every
token through attention, and its output is the image's feature.

Large DINOv2 models (and CLIP, DeiT III) grow **artifacts**: a few tokens, usually on dull background, that carry
little about their patch but take a large share of the CLS token's attention. They show up as a separate group in
the final block's **query norms**. ITAE (*Inference-Time Attention Engineering*, Nakamura et al.) finds them with
a threshold θ on those norms and lowers the CLS token's attention to them, at inference time, in the final block
only: no training, no change to the weights. The paper reports better zero-shot K-Means clustering of the CLS
features on models that have artifacts.
"""

PAGES = """
- **Data & model**: choose images (demo, built-in datasets, a folder, uploads) and a backbone; features are extracted once and cached.
- **Norms & θ**: Fig. 2, the histograms of query and output norms, with θ, the rule and a bimodality test; Fig. 3, the CLS attention of artifacts vs normal tokens.
- **Attention maps**: Fig. 4, the CLS attention over the patches before and after ITAE, with the artifacts outlined.
- **Embeddings**: UMAP of the original and ITAE features, coloured by label or K-Means cluster.
- **Metrics**: ACC/NMI/ARI of K-Means on both feature sets, k-NN accuracy, the θ sweep of Fig. 5, and downloads.
"""


def equations() -> None:
    st.markdown("**Query norms (Eq. 4).** For token *i* of the final block, with *H* heads of *d_p* channels:")
    st.latex(r"\mathrm{L2norm}(P)_i = \Big(\sum_{h=1}^{H}\sum_{j=1}^{d_p}\Big(\frac{P^h_{ij}}{\sqrt{d_p}}\Big)^2\Big)^{1/2}")
    st.markdown("**Split (Eq. 2-3).** θ splits the non-CLS tokens; with the *minority* rule the smaller group is the artifact set *A*:")
    st.latex(r"L_a = \{\, i \mid \mathrm{L2norm}(P)_i \le \theta \,\},\quad L_b = \overline{L_a},\qquad A = \operatorname*{argmin}_{L_m,\ m\in\{a,b\}} |L_m|")
    st.markdown("**Attenuation (Eq. 6).** In every head, the CLS row's logit of each artifact *k* drops to the row's minimum before the softmax:")
    st.latex(r"(QK^\top)'_{0k} = \min_{1 \le j \le N} (QK^\top)_{0j} \qquad (k \in A)")


def token_name(token: int, registers: int, cols: int) -> str:
    if token == 0:
        return "CLS"
    if token <= registers:
        return f"register r{token - 1}"
    row, col = divmod(token - 1 - registers, cols)
    return f"patch (row {row}, col {col})"


def worked_example(extraction) -> None:
    info = extraction.info
    registers, (rows, cols) = info.num_registers, info.grid_size
    theta, rule = threshold.current_theta(), threshold.current_rule()
    row = st.selectbox("Image", range(len(extraction)), format_func=lambda r: extraction.names[r], key="about_row")
    norms = extraction.query_norms[row, 1:]
    result = state.itae_result(extraction, theta, rule)
    mask = result.artifact_mask[row]
    st.markdown(
        f"Image **{extraction.names[row]}** becomes **{extraction.query_norms.shape[1]} tokens**: 1 CLS, {registers} "
        f"register(s) and {rows}×{cols} = {rows * cols} patches. Its non-CLS query norms run from "
        f"**{norms.min():.2f}** (median **{np.median(norms):.2f}**) to **{norms.max():.2f}**. At θ = {theta:.2f} "
        f"under the *{rule}* rule, ITAE attenuates **{int(mask.sum())}** of them."
    )
    threshold.explain(extraction)
    before = extraction.attention_original[row].mean(axis=0)
    after = result.attention[row].mean(axis=0)
    top = np.argsort(before[1:])[::-1][:TOP_TOKENS] + 1
    table = pd.DataFrame(
        {
            "token": [token_name(int(t), registers, cols) for t in top],
            "query norm": norms[top - 1],
            "artifact": mask[top],
            "CLS attention before": before[top],
            "CLS attention after": after[top],
        }
    )
    st.markdown(f"The {TOP_TOKENS} tokens the CLS token attends to most (mean over heads), before and after ITAE:")
    st.dataframe(table, hide_index=True)
    st.caption("Change θ and the rule on the **Norms & θ** page and come back: the numbers follow.")


def main() -> None:
    st.title("About the method")
    st.markdown(INTRODUCTION)
    equations()
    st.subheader("What each page shows")
    st.markdown(PAGES)
    st.subheader("A worked example on the current data")
    extraction = state.current_extraction()
    if extraction is not None:
        worked_example(extraction)


main()
