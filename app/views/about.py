"""About the method: what an artifact is, the teaching model, the equations, the pages, and a worked example."""
import numpy as np
import pandas as pd
import streamlit as st
from PIL import Image

import overlays
import state
import threshold
from itae import settings
from itae.data import open_source

TOP_TOKENS = 5
# (source, image name): a photo and a Fashion-MNIST image whose planted tokens sit on flat background. Comments,
# not docstrings, in a page: Streamlit writes a page's bare strings onto the page.
PLANTED_EXAMPLES = (("demo-photos", "camera"), ("demo", "test/39"))
EXAMPLE_WIDTH = 300

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

TEACHING_MODEL = """
The dashboard opens on a **teaching model**, the counterpart for artifacts of scikit-learn's `make_blobs`: the
offline demo ViT (DINOv2-S/14 weights), which has no artifacts of its own, with artifacts **planted** at known
positions. One *register neuron* is added to the MLP of its 8th of 12 blocks, as Jiang et al. found a few MLP neurons
in the middle layers create artifacts in real ViTs. On every image it fires on about five isolated, flat patches
(low-information background, where Darcet et al. find artifacts) and writes one large, fixed vector into their
residual stream, a massive activation that turns them into attention sinks (Sun et al.). From there on they behave
as artifacts: about 10× the norm of the other tokens, about 44 % of the final block's CLS attention, and, as in
DINOv2, a final-block query norm below everyone else's. The **Norms & θ** histogram has two modes, θ starts in the
valley, and ITAE there finds every planted token and nothing else (precision and recall 1.000). The badge at the
top of every page says when the model is planted: nothing it shows is a real artifact finding.

**What it does not reproduce.** Real artifacts hold global information about their image (Darcet et al.); a planted
token holds the same constant in every image, and which of an image's flat patches it takes is decided by a fixed
order of positions, so on Fashion-MNIST, whose images share one layout, the same few positions recur. The
neuron's constants are calibrated on synthetic images (flat colours, noise, simple shapes), never on the data being
evaluated; one rule was measured on the demo images, the margin that keeps the planted positions in place under
bf16; and the planting was not tuned to any clustering result.
"""

# Measured by bench/bench_planted.py: the paper's K-Means protocol on the 1,000 demo Fashion-MNIST images.
PROTOCOL = pd.DataFrame(
    {"model": ["demo weights as loaded", "planted", "planted + ITAE at the suggested θ"], "ACC (%)": ["30.21 ± 0.07", "35.23 ± 0.05", "31.41 ± 0.23"]}
)

PROTOCOL_READING = """
On this backbone the planted sink makes clustering **better**, and ITAE takes most of that change back. The same
happens when every patch token of the unmodified model is attenuated: the demo backbone's final-block attention to
the patches does not help Fashion-MNIST clustering. So the teaching model shows ITAE *finding and removing*
artifacts; it does **not** show the paper's clustering gain, which needs a model whose own artifacts hurt its
features (DINOv2 ViT-B/14, ViT-L/14 or ViT-g/14 with hub weights).
"""

REFERENCES = """
- T. Darcet, M. Oquab, J. Mairal, P. Bojanowski. *Vision Transformers Need Registers.* ICLR 2024 (arXiv:2309.16588).
- M. Sun, X. Chen, J. Z. Kolter, Z. Liu. *Massive Activations in Large Language Models.* 2024 (arXiv:2402.17762).
- N. Jiang, A. Dravid, A. Efros, Y. Gandelsman. *Vision Transformers Don't Need Trained Registers.* NeurIPS 2025 (arXiv:2506.08010).
"""

PAGES = """
- **Data & model**: choose images (demo, built-in datasets, a folder, uploads) and a backbone; features are extracted once and cached.
- **Norms & θ**: Fig. 2, the histograms of query and output norms, with θ, the rule and a bimodality test; Fig. 3, the CLS attention of artifacts vs normal tokens.
- **Attention maps**: Fig. 4, the CLS attention over the patches before and after ITAE, with the artifacts (and the planted tokens) marked.
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


@st.cache_data(max_entries=len(PLANTED_EXAMPLES), show_spinner="Finding the planted tokens…")
def planted_example(source: str, name: str, _backbone) -> tuple[np.ndarray, int]:
    """One embedded image as the model sees it with its planted tokens outlined, and how many there are."""
    dataset = open_source(source)
    image = dataset.load(dataset.names.index(name)).convert("RGB")
    planted = _backbone.planted_mask(_backbone.preprocess(image)[None])[0].cpu().numpy()
    marked = overlays.mark_tokens(image.resize((overlays.SIDE, overlays.SIDE), Image.BICUBIC), _backbone.num_prefix_tokens,
                                  _backbone.grid_size, planted=planted)
    return np.asarray(marked), int(planted.sum())


def teaching_model() -> None:
    st.markdown(TEACHING_MODEL)
    try:
        backbone = state.get_backbone(settings.DEFAULT_MODEL, "demo", state.current_selection().device, planted=True)
        examples = [(name, *planted_example(source, name, backbone)) for source, name in PLANTED_EXAMPLES]
    except state.LIBRARY_ERRORS as error:
        st.warning(f"The planted examples cannot be shown here: {error}")
    else:
        st.image([image for _, image, _ in examples], width=EXAMPLE_WIDTH, output_format="PNG",  # JPEG blurs the outlines
                 caption=[f"{name}: {count} planted tokens (outlined)" for name, _, count in examples])
    st.markdown("**Measured on the 1,000 demo Fashion-MNIST images** (the paper's K-Means protocol, 20 sets × 25 runs, "
                "mean ± SE; `bench/bench_planted.py`):")
    st.table(PROTOCOL.set_index("model"))
    st.markdown(PROTOCOL_READING)
    st.markdown("**References**" + REFERENCES)


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
    if extraction.planted_mask is not None:
        table.insert(3, "planted", extraction.planted_mask[row][top])
    st.markdown(f"The {TOP_TOKENS} tokens the CLS token attends to most (mean over heads), before and after ITAE:")
    st.dataframe(table, hide_index=True)
    st.caption("Change θ and the rule on the **Norms & θ** page and come back: the numbers follow.")


def main() -> None:
    st.title("About the method")
    st.markdown(INTRODUCTION)
    st.subheader("The teaching model: planted artifacts")
    teaching_model()
    st.subheader("The equations")
    equations()
    st.subheader("What each page shows")
    st.markdown(PAGES)
    st.subheader("A worked example on the current data")
    extraction = state.current_extraction()
    if extraction is not None:
        worked_example(extraction)


main()
