"""Fixtures of the browser tests: Debian's Chromium through Playwright, and one dashboard server they share."""
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from browser_pages import LIMIT
from streamlit_server import Dashboard, running_dashboard

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def dashboard_env(tmp_path_factory) -> dict[str, str]:
    """A small demo subset, the offline demo weights and a temporary cache, shared by every test server."""
    cache = tmp_path_factory.mktemp("dashboard-cache")
    return {"ITAE_APP_WEIGHTS": "demo", "ITAE_APP_LIMIT": str(LIMIT), "ITAE_CACHE_DIR": str(cache)}


@pytest.fixture(scope="session")
def server(dashboard_env, tmp_path_factory) -> Dashboard:
    """The dashboard as an operator starts it with no settings: no server folders, uploads kept per session."""
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    with running_dashboard(log, dashboard_env) as url:
        yield Dashboard(url, Path(dashboard_env["ITAE_CACHE_DIR"]))


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-packages` (Debian's chromium) before the browser tests")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
