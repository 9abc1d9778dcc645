"""The dashboard's Embeddings and Metrics pages, its counts and its θ reasons, headless (AppTest), and that it
reaches the numbers of ``itae eval``.

Same set-up as tests/test_app.py (its module fixture and helpers): a 20-image demo subset, the offline demo
weights and a temporary cache. Downloads are read from Streamlit's media file manager, where a download
button leaves its file (see ``downloads``).
"""
import io
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.proto.Metric_pb2 import Metric
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

import itae.extract
import itae.theta
from itae import cli
from itae.backbones import load_backbone
from itae.data import balanced_subset, open_source
from test_app import DEMO_LABEL, LIMIT, app_module, artifact_line, assert_clean, environment, open_app, png, press, texts  # noqa: F401

THETA_PAGES = ("views/norms.py", "views/attention.py", "views/embeddings.py", "views/metrics.py", "views/about.py")
"""The pages that compute with θ."""
SUPERVISED = ("acc", "nmi", "ari")


@pytest.fixture(scope="module", autouse=True)
def model_as_loaded(environment):
    """These pages are checked on the demo weights as loaded (no planted artifacts), where θ = none is the start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITAE_APP_PLANTED", "0")
        yield


@pytest.fixture
def downloads(monkeypatch) -> dict:
    """What the download buttons of the runs offer, by file name: a function that returns the file's bytes.

    Streamlit hands a button's data (or, for data made on click, the function that makes it) to the runtime's
    media file manager, which AppTest does not expose; the file the browser would receive is taken there.
    """
    offered = {}
    real_add, real_add_deferred = MediaFileManager.add, MediaFileManager.add_deferred

    def add(self, data, mimetype, coordinates, file_name=None, is_for_static_download=False):
        offered[file_name] = lambda: data
        return real_add(self, data, mimetype, coordinates, file_name, is_for_static_download)

    def add_deferred(self, make, mimetype, coordinates, file_name=None, **options):
        offered[file_name] = make
        return real_add_deferred(self, make, mimetype, coordinates, file_name, **options)

    monkeypatch.setattr(MediaFileManager, "add", add)
    monkeypatch.setattr(MediaFileManager, "add_deferred", add_deferred)
    return offered


def captions_and_warnings(at: AppTest) -> tuple[str, str]:
    return "\n".join(c.value for c in at.caption), "\n".join(w.value for w in at.warning)


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def upload(at: AppTest, files: list[tuple[str, bytes, str]]) -> AppTest:
    at.selectbox(key="data_source").set_value("upload").run()
    at.file_uploader[0].set_value(files).run()
    press(at, "Load and extract")
    assert_clean(at, "an upload")
    assert at.session_state.selection.source == "upload"
    return at


def six_photos() -> list[tuple[str, bytes, str]]:
    return [(f"photo{i}.png", png(i), "image/png") for i in range(6)]


def test_every_count_is_the_extractions_own():
    # A JPEG cut in half opens (its header is whole) but does not decode: only the extraction finds it out.
    cut = jpeg(9)
    bad = [("cut.jpg", cut[: len(cut) // 2], "image/jpeg"), ("notes.txt", b"hello", "text/plain"),
           ("empty.png", b"", "image/png")]
    at = upload(open_app(), six_photos() + bad)
    metrics = {metric.label: metric.value for metric in at.metric}
    assert (metrics["Images"], metrics["Skipped"]) == ("6", "3")
    sidebar = texts(at.sidebar)
    assert "6 images" in sidebar and "3 skipped" in sidebar, sidebar
    for page in ("views/data_model.py", "views/metrics.py"):
        at.switch_page(page).run()
        assert "7 images" not in texts(at) + texts(at.sidebar) and "2 skipped" not in texts(at) + texts(at.sidebar)


def test_without_attenuation_every_score_is_equal_and_each_says_which_way_is_better():
    at = open_app()
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics")
    table = at.table[0].value
    assert list(table.index) == ["ACC", "NMI", "ARI", "inertia"]
    assert list(table["better"]) == ["higher", "higher", "higher", "lower"]
    assert set(table["Δ mean (ITAE − original)"]) == {"0"} and set(table["ITAE is"]) == {"equal"}
    knn = next(metric for metric in at.metric if metric.label == "ITAE")
    assert knn.proto.delta == "0", "an equal k-NN accuracy is a difference of 0, not +0.0000"
    assert (knn.proto.direction, knn.proto.color) == (Metric.MetricDirection.NONE, Metric.MetricColor.GRAY)


def test_the_dashboard_and_itae_eval_agree_at_a_theta_that_attenuates(downloads, tmp_path):
    # The median non-CLS norm with rule 'below' attenuates half of the tokens: the demo weights' features change
    # (random weights barely move under attenuation). The page's own JSON download and table are compared with
    # `itae eval --json` on the same model, data, θ, rule, K, sets, runs and seed.
    cache = os.environ["ITAE_CACHE_DIR"]
    dataset = balanced_subset(open_source("demo"), LIMIT, seed=0)
    extraction = itae.extract.extract_cached(load_backbone("dinov2_vits14", weights="demo"), dataset, cache)
    theta = round(float(np.median(extraction.query_norms[:, 1:])), 2)
    assert not np.array_equal(extraction.itae(theta, "below").features, extraction.features_original)

    at = open_app(theta=f"{theta:.2f}", rule="below")
    at.switch_page("views/metrics.py").run()
    assert_clean(at, "Metrics at a θ from a link")
    page = json.loads(downloads["itae_results.json"]())
    command_json = tmp_path / "eval.json"
    status = cli.main(["eval", "--model", "dinov2_vits14", "--weights", "demo", "--data", "demo", "--limit", str(LIMIT),
                       "--seed", "0", "--theta", str(theta), "--rule", "below", "--sets", "5", "--runs", "10",
                       "--cache-dir", cache, "--json", str(command_json)])
    assert status == 0
    command = json.loads(command_json.read_text())

    assert command["theta"] == page["settings"]["theta"] == at.session_state.theta == theta
    assert command["theta_decision"]["attenuated_fraction"] == pytest.approx(0.5, abs=0.05)
    assert (command["n_clusters"], command["kmeans_device"]) == (page["settings"]["n_clusters"], page["settings"]["kmeans_device"])
    for features in ("original", "itae"):
        for metric in SUPERVISED:
            assert page[features][metric]["mean"] == pytest.approx(command[features][metric]["mean"], rel=0, abs=1e-12)
    assert any(page["itae"][m]["mean"] != page["original"][m]["mean"] for m in SUPERVISED), "ITAE must change a score"

    table = at.table[0].value
    for metric in SUPERVISED:
        row, before, after = table.loc[metric.upper()], page["original"][metric]["mean"], page["itae"][metric]["mean"]
        assert row["original (mean ± SE)"].startswith(f"{before:.4f} ± ")
        assert row["ITAE (mean ± SE)"].startswith(f"{after:.4f} ± ")
        assert float(row["Δ mean (ITAE − original)"]) == pytest.approx(after - before, abs=5e-5)
        assert row["ITAE is"] == ("better" if after > before else "worse" if after < before else "equal")
    knn = next(metric for metric in at.metric if metric.label == "ITAE")
    assert float(knn.proto.delta) == pytest.approx(page["knn"]["itae"] - page["knn"]["original"], abs=5e-5)


def test_every_page_that_computes_with_theta_says_why():
    at = open_app()
    for page in THETA_PAGES:
        at.switch_page(page).run()
        assert_clean(at, page)
        assert "θ = none, ITAE = original" in captions_and_warnings(at)[0], f"{page} must say why θ starts there"
    at.switch_page("views/norms.py").run()
    slider = at.slider(key="theta_slider")
    theta = round((slider.min + slider.max) / 2, 2)
    slider.set_value(theta).run()
    for page in THETA_PAGES:
        at.switch_page(page).run()
        assert_clean(at, page)
        captions, warnings = captions_and_warnings(at)
        assert f"θ = {theta:g} as given, rule minority: attenuates" in captions, f"{page}: {captions}"
        assert "which the query norms do not show as artifacts" in warnings, f"{page} must warn: {warnings}"


@pytest.fixture
def norms_with_artifacts(monkeypatch):
    """The θ policy sees every 50th token of each image (isolated: rows of 16 patches) far below the others."""
    threshold = app_module("threshold")
    real_examine = itae.theta.examine_norms

    def as_if_with_artifacts(norms, **layout):
        planted = np.array(norms, dtype=np.float64)
        planted[:, 1::50] = planted[:, 1:].min() - 1.0
        return real_examine(planted, **layout)

    monkeypatch.setattr(threshold, "examine_norms", as_if_with_artifacts)
    threshold._evidence.clear()
    yield
    threshold._evidence.clear()


def test_too_little_data_attenuates_nothing_and_offers_its_theta_anyway(norms_with_artifacts):
    at = open_app(limit="4")  # fewer images than the policy needs to call isolated low tokens artifacts
    at.switch_page("views/norms.py").run()
    assert_clean(at, "Norms of four images")
    assert artifact_line(at).startswith("**0 artifact tokens**")
    (anyway,) = [b.label for b in at.button if b.label.startswith("Apply θ = ") and "anyway" in b.label]
    press(at, anyway)
    theta = float(anyway.split("= ")[1].split()[0])
    assert at.session_state.theta == round(theta, 2)
    assert f"θ = {round(theta, 2):g} as given" in captions_and_warnings(at)[0]


def test_the_sweep_takes_a_list_plots_the_chosen_metric_and_carries_its_settings(downloads, monkeypatch):
    plotted = []
    real_figure = itae.theta.SweepResult.figure
    monkeypatch.setattr(itae.theta.SweepResult, "figure", lambda sweep, metric=None: plotted.append(metric) or real_figure(sweep, metric))
    at = open_app()
    at.switch_page("views/metrics.py").run()
    at.text_input(key="sweep_range").input("2.5, 3, 3.5").run()
    at.selectbox(key="sweep_metric").set_value("nmi").run()
    press(at, "Run the sweep")
    assert_clean(at, "a sweep over a list")
    sweep = at.session_state.sweep[1]
    assert list(sweep.thetas) == [2.5, 3.0, 3.5]
    assert plotted == ["nmi"] and at.get("image")
    assert downloads["itae_sweep_nmi.png"]().startswith(b"\x89PNG")
    frame = pd.read_csv(io.BytesIO(downloads["itae_sweep.csv"]()))
    settings = frame[["model", "rule", "n_clusters", "sets", "runs", "seed"]].drop_duplicates().to_dict("records")
    assert settings == [{"model": DEMO_LABEL, "rule": "below", "n_clusters": 10, "sets": 5, "runs": 10, "seed": 0}]
    assert frame["data"].str.contains("balanced subset of 20").all() and list(frame["theta"]) == [2.5, 3.0, 3.5]
    at.selectbox(key="sweep_metric").set_value("silhouette").run()
    assert "run it again for silhouette" in texts(at), "silhouette is scored without the labels, in a sweep of its own"


def test_the_sweep_on_unlabelled_images_offers_inertia_and_silhouette_as_png(downloads):
    at = upload(open_app(), six_photos())
    at.switch_page("views/metrics.py").run()
    assert at.selectbox(key="sweep_metric").value == "inertia"
    press(at, "Run the sweep")
    assert_clean(at, "a sweep without labels")
    assert downloads["itae_sweep_inertia.png"]().startswith(b"\x89PNG")
    at.selectbox(key="sweep_metric").set_value("silhouette").run()
    assert downloads["itae_sweep_silhouette.png"]().startswith(b"\x89PNG"), "one unlabelled sweep scores both"


def test_embeddings_share_one_space_and_say_how_far_images_moved():
    at = open_app()
    at.switch_page("views/embeddings.py").run()
    assert_clean(at, "Embeddings")
    assert "every image has one place, the same in both plots" in texts(at)
    original, itae_plot = (json.loads(chart.proto.spec)["data"] for chart in at.get("plotly_chart"))
    assert original == itae_plot, "without attenuation both plots are one layout, point for point"
    slider = at.slider(key="theta_slider")
    slider.set_value(round((slider.min + slider.max) / 2, 2)).run()
    at.toggle(key="emb_arrows").set_value(True).run()
    assert_clean(at, "Embeddings with arrows")
    changed = re.search(r"ITAE changed the features of (\d+) of 20 images", texts(at))
    assert changed and int(changed.group(1)) > 0
    itae_traces = json.loads(at.get("plotly_chart")[1].proto.spec)["data"]
    assert itae_traces[-1]["name"] == "moved (original → ITAE)"
