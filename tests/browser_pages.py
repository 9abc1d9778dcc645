"""Reading and driving the dashboard's pages in Playwright, for the browser tests."""
import re
import time
from pathlib import Path

from playwright.sync_api import Page

SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "browser"
LIMIT = 20
"""The demo subset the test servers start with."""
RUN_S = 240  # the first run extracts the demo subset; the Embeddings page compiles UMAP once (~30 s)
PAGES = {
    "Data & model": "Images per class",
    "Norms & θ": "artifact tokens",
    "Attention maps": "original CLS attention",
    "Embeddings": "Original features",
    "Metrics": "Clustering",
    "Compare methods": "Cluster movers",
    "About the method": "tokens the CLS token attends to most",
}
"""Text each page shows once its script has finished."""


def screenshot(page: Page, name: str) -> None:
    """A full-page screenshot under test-output/browser/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SHOTS / f"{name}.png", full_page=True)


def settle(page: Page, text: str, timeout_s: float = RUN_S) -> None:
    """Wait until ``text`` shows (or an exception box) and the script has stopped running."""
    page.get_by_text(text).first.or_(page.get_by_test_id("stException").first).wait_for(timeout=timeout_s * 1000)
    wait_idle(page, timeout_s)


def wait_idle(page: Page, timeout_s: float = RUN_S) -> None:
    """Wait until no script run is going."""
    # The text can show while the run that draws it is still going (the sidebar is drawn after the page):
    # wait for the app's own script state, which the status widget only shows after a delay.
    page.wait_for_function(
        """() => document.querySelector('[data-testid="stApp"]').dataset.testScriptState === 'notRunning'
                 && !document.querySelector('[data-testid="stStatusWidget"]')""",
        timeout=timeout_s * 1000, polling=250,
    )
    page.wait_for_timeout(500)


WATCH_RUNS = """() => {
  const app = document.querySelector('[data-testid="stApp"]');
  if (window.scriptRuns === undefined) {
    window.scriptRuns = 0;
    new MutationObserver(() => { if (app.dataset.testScriptState !== 'notRunning') window.scriptRuns += 1; })
      .observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
  }
  return window.scriptRuns;
}"""


def run_after(page: Page, action, timeout_s: float = RUN_S) -> None:
    """Do ``action`` (a click, a key) and wait until the script run it asked for has finished.

    The app root's script state leaves "notRunning" as soon as the browser asks for a run, however short
    the run: counting those changes tells a finished run from one that has not begun.
    """
    before = page.evaluate(WATCH_RUNS)
    action()
    page.wait_for_function(
        f"""() => window.scriptRuns > {before}
            && document.querySelector('[data-testid="stApp"]').dataset.testScriptState === 'notRunning'""",
        timeout=timeout_s * 1000, polling=100,
    )
    page.wait_for_timeout(300)


def assert_clean(page: Page, where: str) -> None:
    """No exception box and no traceback anywhere on the page."""
    assert page.get_by_test_id("stException").count() == 0, f"{where}: an exception box is on the page"
    assert "Traceback" not in page.inner_text("body"), f"{where}: a traceback is on the page"


def open_page(page: Page, title: str) -> None:
    page.get_by_test_id("stSidebarNavLink").filter(has_text=title).click()
    settle(page, PAGES[title])


def sidebar_text(page: Page) -> str:
    return page.get_by_test_id("stSidebarUserContent").inner_text()


def sidebar_theta(page: Page) -> str:
    return re.search(r"θ\s*([-\d.]+)", sidebar_text(page)).group(1)


def artifact_line(page: Page) -> str:
    return page.get_by_text(re.compile(r"artifact tokens at θ")).first.inner_text()


def slider_theta(page: Page) -> str:
    return f"{float(page.get_by_test_id('stSliderThumbValue').first.inner_text()):.2f}"


def number_box(page: Page, label: str):
    return page.get_by_test_id("stNumberInput").filter(has_text=label).locator("input")


def thetas_shown(page: Page) -> set[str]:
    """Every θ the page shows: the slider, the number box, the artifact count and the sidebar.

    While a run is drawing, the browser can still show the previous run's widgets beside the new ones
    (Streamlit clears stale elements when a run completes); every copy counts, so that the set holds a
    single value only on a page that has settled on it.
    """
    line = re.search(r"at θ = ([-\d.]+)", artifact_line(page)).group(1)
    numbers = number_box(page, "θ exactly").evaluate_all("boxes => boxes.map(box => box.value)")
    sliders = page.get_by_test_id("stSliderThumbValue").all_inner_texts()
    return {f"{float(value):.2f}" for value in numbers + sliders} | {line, sidebar_theta(page)}


def move_theta(page: Page, steps: int, gap_ms: int = 0) -> str:
    """Press → on the focused θ slider ``steps`` times, ``gap_ms`` apart; returns θ once the page shows it alone."""
    thumb = page.get_by_test_id("stSlider").get_by_role("slider").first
    thumb.focus()
    for _ in range(steps):
        thumb.press("ArrowRight")
        page.wait_for_timeout(gap_ms)
    target = slider_theta(page)
    deadline = time.monotonic() + RUN_S
    while (shown := thetas_shown(page)) != {target} and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    assert shown == {target}, f"after {steps} steps the slider shows {target} but the page shows {sorted(shown)}"
    settle(page, "artifact tokens")
    return target
