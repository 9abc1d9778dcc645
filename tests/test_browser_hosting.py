"""Hosting for a class, in a real browser: a visitor reaches server folders only inside the allowed roots,
and the features of an upload leave with its session. Shares the server of tests/conftest.py and starts a
second one that allows one folder."""
import io
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from browser_pages import LIMIT, PAGES, assert_clean, run_after, screenshot, settle, wait_idle
from streamlit_server import Dashboard, running_dashboard

OUTSIDE = "outside the folders this server allows"
SESSION_END_S = 60  # the server notices a closed page within seconds; generous for a busy machine


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An allowed folder with pets/ (3 cats, 3 dogs, and a link to a secret image) beside a secret folder."""
    base = tmp_path_factory.mktemp("hosting")
    allowed, secret = base / "allowed", base / "secret"
    for index, name in enumerate(["pets/cat/c0.png", "pets/cat/c1.png", "pets/cat/c2.png", "pets/dog/d0.png",
                                  "pets/dog/d1.png", "pets/dog/d2.png"]):
        (allowed / name).parent.mkdir(parents=True, exist_ok=True)
        (allowed / name).write_bytes(png(index))
    (secret / "cat").mkdir(parents=True)
    (secret / "cat" / "private.png").write_bytes(png(99))
    (allowed / "pets" / "cat" / "linked.png").symlink_to(secret / "cat" / "private.png")
    (allowed / "escape").symlink_to(secret, target_is_directory=True)
    return allowed, secret


@pytest.fixture(scope="module")
def server_with_roots(dashboard_env, folders, tmp_path_factory):
    log = tmp_path_factory.mktemp("server-with-roots") / "streamlit.log"
    env = {**dashboard_env, "ITAE_ALLOWED_ROOTS": str(folders[0])}
    with running_dashboard(log, env) as url:
        yield Dashboard(url, Path(dashboard_env["ITAE_CACHE_DIR"]))


def choose_source(page, name: str) -> None:
    """Pick ``name`` in the Source box and wait for the run it starts.

    A click on an option can land while the list is still opening and select nothing (no run follows):
    the box is then opened again, until it shows the choice.
    """
    box = page.get_by_test_id("stSelectbox").filter(has_text="Source")
    chosen = box.get_by_role("combobox")
    for _ in range(3):
        box.click()
        option = page.get_by_role("option").filter(has_text=name)
        option.wait_for()
        option.click()
        try:
            expect(chosen).to_have_value(re.compile(re.escape(name)), timeout=10_000)
            break
        except AssertionError:
            continue
    expect(chosen).to_have_value(re.compile(re.escape(name)), timeout=1)
    page.wait_for_timeout(500)  # the run the choice asked for has begun
    wait_idle(page)


def metric(page, label: str) -> str:
    return page.get_by_test_id("stMetric").filter(has_text=label).inner_text().split()[-1]


def load_folder(page, typed: str) -> None:
    box = page.get_by_role("textbox", name="Folder or .zip on the server")
    box.fill(typed)
    run_after(page, lambda: box.press("Enter"))
    run_after(page, page.get_by_role("button", name="Load and extract").click)


def test_server_folders_are_refused_by_default(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url)
    settle(page, PAGES["Data & model"])
    assert page.get_by_text("ITAE_ALLOWED_ROOTS").count() > 0, "the page says how an operator allows folders"
    page.get_by_test_id("stSelectbox").filter(has_text="Source").click()
    offered = page.get_by_role("option").all_inner_texts()
    assert any("upload" in option for option in offered) and not any("on this server" in o for o in offered), offered
    page.keyboard.press("Escape")
    page.goto(f"{server.url}/?data=path&path=/etc")
    settle(page, PAGES["Data & model"])
    assert page.get_by_text("folders on this server are switched off").count() > 0
    assert metric(page, "Images") == str(LIMIT), "the link falls back to the demo"
    assert_clean(page, "a link to /etc")
    context.close()


def test_server_folders_work_only_inside_an_allowed_root(server_with_roots, browser, folders):
    allowed, secret = folders
    context = browser.new_context(viewport={"width": 1400, "height": 1800})
    page = context.new_page()
    page.goto(server_with_roots.url)
    settle(page, PAGES["Data & model"])
    choose_source(page, "on this server")
    load_folder(page, "pets")
    assert page.get_by_text("Loaded.").count() > 0
    assert (metric(page, "Images"), metric(page, "Skipped")) == ("6", "1"), "the linked secret image is skipped"
    screenshot(page, "8_server_folder")
    for typed in ["../secret", str(secret), "escape", "pets/../../secret"]:
        load_folder(page, typed)
        errors = " ".join(page.get_by_test_id("stAlertContentError").all_inner_texts())
        assert OUTSIDE in errors, f"{typed!r}: {errors}"
        assert str(secret) not in errors or typed == str(secret), "a link's target must not be shown"
        assert metric(page, "Images") == "6", f"{typed!r} must leave the current data in place"
        assert_clean(page, typed)
    context.close()


def test_uploaded_features_leave_with_the_session(server, browser):
    context = browser.new_context()
    page = context.new_page()
    page.goto(server.url)
    settle(page, PAGES["Data & model"])
    choose_source(page, "Upload images")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as members:
        for index in range(6):
            members.writestr(f"photos/p{index}.png", png(index))
    page.get_by_test_id("stFileUploaderDropzoneInput").first.set_input_files(
        files=[{"name": "photos.zip", "mimeType": "application/zip", "buffer": archive.getvalue()}])
    page.get_by_text("photos.zip").first.wait_for()
    run_after(page, page.get_by_role("button", name="Load and extract").click)
    assert metric(page, "Images") == "6"
    [features] = list((server.cache / "sessions").glob("*/features/*"))
    assert not (server.cache / "features" / features.name).exists(), "an upload's features must not be shared"
    context.close()
    deadline = time.monotonic() + SESSION_END_S
    while features.parent.parent.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not features.parent.parent.exists(), "the session's folder must go when its page is closed"
    assert not (server.cache / "features" / features.name).exists()
