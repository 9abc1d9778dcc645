"""The user's place in a real browser: no widget resets itself, links and reloads restore the place, a held
arrow key computes one θ, and the sidebar never shows file names. Shares the server of tests/conftest.py."""
import re
from urllib.parse import parse_qs, urlsplit

from browser_pages import LIMIT, PAGES, assert_clean, move_theta, number_box, settle, sidebar_text, slider_theta, thetas_shown
from streamlit_server import running_dashboard

EARLY_CLICK_TRIES = 3  # the race needs the click to land while the first run is drawn; it did in 3 of 3 tries
ARROW_PRESSES = 100
PRESS_GAP_MS = 150
"""Slower than a key's auto-repeat, so that a page computing every step it receives would compute many
(the dashboard before the debounce computed 14 of the 100 here), yet well inside threshold.SETTLE_S."""
MOST_THETAS_COMPUTED = 4
"""Besides the last: where a busy machine paused the presses for longer than threshold.SETTLE_S."""

RECORD_COMPUTED_THETAS = """
window.computedThetas = new Set();
new MutationObserver(() => {
  for (const line of document.querySelectorAll('[data-testid="stMarkdownContainer"]')) {
    const found = line.innerText.match(/artifact tokens at θ = ([-\\d.]+)/);
    if (found) window.computedThetas.add(found[1]);
  }
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""
RECORD_NAVIGATION = """
window.navigationTexts = new Set();
new MutationObserver(() => {
  for (const link of document.querySelectorAll('[data-testid="stSidebarNavLink"]')) {
    window.navigationTexts.add(link.innerText.split('\\n').pop());
  }
}).observe(document, {subtree: true, childList: true, characterData: true});
"""


def link_of(page) -> dict[str, str]:
    return {name: values[-1] for name, values in parse_qs(urlsplit(page.url).query).items()}


def test_an_early_click_on_data_and_model_keeps_every_value(server, browser):
    for attempt in range(EARLY_CLICK_TRIES):
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url)
        page.get_by_test_id("stSidebarNavLink").filter(has_text="Data & model").click()  # as soon as it is painted
        settle(page, PAGES["Data & model"])
        values = {label: number_box(page, label).input_value() for label in ("Subset size", "Subset seed", "Batch size")}
        assert values == {"Subset size": str(LIMIT), "Subset seed": "0", "Batch size": "32"}, f"try {attempt + 1}: {values}"
        assert page.get_by_test_id("stMetric").filter(has_text="Images").inner_text().split()[-1] == str(LIMIT)
        assert_clean(page, "an early click")
        context.close()


def test_a_link_and_a_reload_restore_the_model_theta_and_rule(server, browser):
    context = browser.new_context()
    page = context.new_page()
    place = "model=dinov2_vits14_reg&weights=random&limit=12&rule=above"
    page.goto(f"{server.url}/norms?{place}")
    settle(page, PAGES["Norms & θ"])
    assert_clean(page, "a link")
    assert "DINOv2 ViT-S/14 with registers (random weights)" in sidebar_text(page)
    assert re.search(r"Images\s*12", sidebar_text(page)) and "rule above" in sidebar_text(page)
    theta = move_theta(page, 7)
    assert link_of(page)["theta"] == theta, "the URL follows θ"
    assert {"model": "dinov2_vits14_reg", "weights": "random", "limit": "12", "rule": "above"}.items() <= link_of(page).items()
    page.reload()
    settle(page, PAGES["Norms & θ"])
    assert thetas_shown(page) == {theta} and "rule above" in sidebar_text(page), "a reload keeps θ and the rule"
    shared = context.browser.new_context().new_page()
    shared.goto(page.url)
    settle(shared, PAGES["Norms & θ"])
    assert thetas_shown(shared) == {theta} and "rule above" in sidebar_text(shared), "a shared link opens the same place"
    assert f"θ = {float(theta):g} as given" in shared.inner_text("body"), "the page says where θ came from"
    shared.context.close()
    context.close()


def test_holding_an_arrow_key_computes_only_the_last_theta(server, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    page = context.new_page()
    page.goto(f"{server.url}/norms")
    settle(page, PAGES["Norms & θ"])
    start = slider_theta(page)
    page.evaluate(RECORD_COMPUTED_THETAS)
    last = move_theta(page, ARROW_PRESSES, PRESS_GAP_MS)  # waits, generously, until the page shows one θ
    assert float(last) > float(start)
    assert thetas_shown(page) == {last}
    computed = set(page.evaluate("[...window.computedThetas]")) - {start, last}
    assert len(computed) <= MOST_THETAS_COMPUTED, f"{len(computed)} θ values computed on the way: {sorted(computed)}"
    assert_clean(page, "a held arrow key")
    context.close()


def test_the_sidebar_shows_page_titles_from_the_first_paint(dashboard_env, browser, tmp_path):
    # A server of its own: once st.navigation has run, a server sends later sessions the titles at once,
    # so only the first session of a fresh server could see the file names.
    with running_dashboard(tmp_path / "streamlit.log", dashboard_env) as url:
        context = browser.new_context()
        page = context.new_page()
        page.add_init_script(RECORD_NAVIGATION)
        page.goto(url)
        settle(page, PAGES["Data & model"])
        assert set(page.evaluate("[...window.navigationTexts]")) == set(PAGES), "only the page titles, never file names"
        context.close()
