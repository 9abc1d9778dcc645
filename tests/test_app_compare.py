"""The Compare methods page, headless (streamlit.testing AppTest), on the demo subset as tests/test_app.py sets it up.

The page must show the library's comparison (``itae.compare.compare`` run here on the same images with the same
protocol), start the methods that run a model again only from their button, and label and score the planted
teaching model.
"""

import huggingface_hub
import numpy as np
import pytest

import itae.compare
from itae.backbones import PLANTED_SUFFIX, load_backbone
from itae.compare import compare
from itae.data import balanced_subset, open_source
from itae.extract import extract_cached
from itae.methods import METHODS
from test_app import DEMO_LABEL, LIMIT, app_module, assert_clean, open_app, press, texts

PAGE = "views/compare.py"
SETS, RUNS = 2, 2
QUICK = ["original", "itae", "itae-eq5", "itae-remove", "key-norm", "output-norm"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("itae-cache")


@pytest.fixture(scope="module", autouse=True)
def environment(cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ITAE_APP_WEIGHTS", "demo")
        patch.setenv("ITAE_APP_LIMIT", str(LIMIT))
        patch.setenv("ITAE_CACHE_DIR", str(cache))
        patch.setenv("ITAE_APP_PLANTED", "0")  # the model as loaded, unless a test's link plants artifacts
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as offline as this machine, quickly
        yield


@pytest.fixture
def model_runs(monkeypatch):
    """Records every second pass over the images and every model load that itae.compare starts."""
    calls = []

    def recorded(name, real):
        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("preprocessed_batches", "calibrated_register_neurons", "load_backbone"):
        monkeypatch.setattr(itae.compare, name, recorded(name, getattr(itae.compare, name)))
    return calls


def compare_page(**link):
    at = open_app(**link)
    at.switch_page(PAGE).run()
    assert_clean(at, "Compare methods")
    return at


def apply(at, methods=None):
    """The quick protocol of these tests (and ``methods``), applied through the page's form."""
    at.number_input(key="compare_sets").set_value(SETS)
    at.number_input(key="compare_runs").set_value(RUNS)
    if methods is not None:
        at.multiselect(key="compare_methods").set_value(methods)
    at = press(at, "Apply")
    assert_clean(at, "Compare methods, applied")
    return at


def library_comparison(cache, methods, planted=False, seed=0):
    """The comparison itae.compare makes of the page's images (the demo subset the app opens), read from its caches."""
    backbone = load_backbone("dinov2_vits14", weights="demo", device="cpu", planted=planted)
    dataset = balanced_subset(open_source("demo"), LIMIT, seed=seed)
    extraction = extract_cached(backbone, dataset, cache)
    return compare(backbone, dataset, extraction, [METHODS[name] for name in methods], cache, sets=SETS, runs=RUNS,
                   n_clusters=10)


def cell(summary) -> str:
    return f"{100 * summary.mean:.2f} ± {100 * summary.se:.2f}"


def test_the_table_is_the_librarys_and_the_slow_methods_wait_for_their_button(cache, model_runs):
    at = apply(compare_page())
    assert DEMO_LABEL in texts(at), "the page names the demo weights honestly"
    table = at.dataframe[0].value
    expected = library_comparison(cache, QUICK)
    model_runs.clear()  # the test's own comparison above
    assert list(table.index) == [result.method.label for result in expected.results]
    for result in expected.results:
        row = table.loc[result.method.label]
        assert row["ACC"] == cell(result.clustering.summary()["acc"])
        assert row["ARI"] == cell(result.clustering.summary()["ari"])
    assert "θ, query norms: " + expected.thetas["query"].reason in texts(at), "the library's θ decision and its reason"
    assert [b.label for b in at.button if b.label.startswith("Run the")] == ["Run the 2 slow methods too"]
    assert "minutes on a CPU" in texts(at)
    assert any("Clustering of each method" in chart.proto.spec for chart in at.get("plotly_chart"))
    at.switch_page("views/metrics.py").run()
    at.switch_page(PAGE).run()
    assert model_runs == [], "nothing that runs a model again may start without the button"


def test_the_button_runs_the_slow_methods_with_a_progress_bar(cache, model_runs):
    # The planted model has artifacts to attenuate: ITAE in the last 2 blocks makes one more pass over the images.
    at = apply(compare_page(seed="5", planted="1"), ["itae", "itae-last2", "trained-registers"])
    assert model_runs == []
    at = press(at, "Run the 2 slow methods too")
    assert_clean(at, "after the slow methods")
    assert "preprocessed_batches" in model_runs and "load_backbone" in model_runs
    table = at.dataframe[0].value
    assert list(table.index) == ["original", METHODS["itae"].label, METHODS["itae-last2"].label,
                                 METHODS["trained-registers"].label]
    assert "re-ran blocks" in table.loc[METHODS["itae-last2"].label, "note"]
    assert "could not be loaded" in table.loc[METHODS["trained-registers"].label, "note"]
    assert [status.label for status in at.status] == ["Compared 4 methods"], "the progress box"
    assert [bar.proto.text for bar in at.get("progress")] == ["4/4 methods done · now: done"]
    assert not any(b.label.startswith("Run the") for b in at.button)


def test_movers_are_the_librarys(cache):
    at = apply(compare_page())
    expected = library_comparison(cache, QUICK)
    movers = expected.movers("itae", 0)
    assert f"**{movers.n_moved} of {LIMIT} images** change cluster" in texts(at)
    assert any("off the diagonal: movers" in chart.proto.spec for chart in at.get("plotly_chart"))
    shown = [m.value for m in at.markdown if " → " in m.value]
    assert len(shown) == min(4, movers.n_moved)
    for line, row in zip(shown, np.flatnonzero(movers.moved)):
        assert line.startswith(f"**{expected.extraction.names[row]}**")
    at.selectbox(key="compare_movers_method").set_value("key-norm").run()
    assert f"**{expected.movers('key-norm', 0).n_moved} of {LIMIT} images** change cluster" in texts(at)


def test_the_planted_model_is_labelled_and_its_detection_scored(cache):
    at = apply(compare_page(seed="5", planted="1"))
    assert PLANTED_SUFFIX.strip() in texts(at), "synthetic artifacts are said so"
    assert "Detection against the planted artifacts" in texts(at)
    expected = library_comparison(cache, QUICK, planted=True, seed=5)
    detection = at.dataframe[1].value.set_index("method")
    itae_row = expected.result("itae")
    assert detection.loc[itae_row.method.label, "precision"] == itae_row.detection.precision
    assert detection.loc[itae_row.method.label, "recall"] == itae_row.detection.recall
    assert any("Detector agreement" in chart.proto.spec for chart in at.get("plotly_chart"))
