"""Paths and defaults from the environment, and the folders a server may open for its visitors."""
import os
from pathlib import Path

import pytest

from itae import settings
from itae.errors import ItaeError, PathNotAllowedError


@pytest.fixture
def allowed(tmp_path, monkeypatch):
    """Two allowed roots, a folder beside them that is not allowed, and the variable naming the roots."""
    images, datasets, private = tmp_path / "images", tmp_path / "datasets", tmp_path / "private"
    for folder in (images / "pets", datasets, private):
        folder.mkdir(parents=True)
    (private / "secret.csv").write_text("a.png,cat\n")
    monkeypatch.setenv(settings.ALLOWED_ROOTS_VARIABLE, os.pathsep.join([str(images), str(datasets)]))
    return images, datasets, private


def test_server_folders_are_refused_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(settings.ALLOWED_ROOTS_VARIABLE, raising=False)
    assert settings.allowed_roots() == ()
    with pytest.raises(PathNotAllowedError, match="switched off.*ITAE_ALLOWED_ROOTS"):
        settings.resolve_allowed_path(tmp_path)
    monkeypatch.setenv(settings.ALLOWED_ROOTS_VARIABLE, "")
    with pytest.raises(PathNotAllowedError, match="switched off"):
        settings.resolve_allowed_path(tmp_path)


def test_paths_inside_an_allowed_root_are_resolved(allowed):
    images, datasets, _ = allowed
    assert settings.allowed_roots() == (images.resolve(), datasets.resolve())
    assert settings.resolve_allowed_path(images / "pets") == (images / "pets").resolve()
    assert settings.resolve_allowed_path(str(datasets)) == datasets.resolve()
    assert settings.resolve_allowed_path("pets") == (images / "pets").resolve()  # relative to the first root
    assert settings.resolve_allowed_path(images / "pets" / ".." / "pets") == (images / "pets").resolve()
    assert settings.resolve_allowed_path(images / "not-yet.zip") == (images / "not-yet.zip").resolve()


@pytest.mark.parametrize("attempt", [
    lambda images, private: "../private",
    lambda images, private: str(images / ".." / "private" / "secret.csv"),
    lambda images, private: str(private),
    lambda images, private: "/etc",
    lambda images, private: "~",
], ids=["dot-dot", "dot-dot-inside-a-root", "absolute-outside", "etc", "home"])
def test_paths_outside_every_root_are_refused(allowed, attempt):
    images, _, private = allowed
    with pytest.raises(PathNotAllowedError, match="outside the folders this server allows") as error:
        settings.resolve_allowed_path(attempt(images, private))
    assert str(images.resolve()) in str(error.value)  # the message says where to look instead


def test_a_symlink_pointing_outside_is_refused_without_naming_its_target(allowed):
    images, _, private = allowed
    (images / "shortcut").symlink_to(private)
    (images / "pets" / "labels.csv").symlink_to(private / "secret.csv")
    for path in (images / "shortcut", images / "shortcut" / "secret.csv", images / "pets" / "labels.csv", "shortcut"):
        with pytest.raises(PathNotAllowedError, match="symlinks") as error:
            settings.resolve_allowed_path(path)
        assert "private" not in str(error.value).replace(str(path), "")
    (images / "inside").symlink_to(images / "pets")
    assert settings.resolve_allowed_path(images / "inside") == (images / "pets").resolve()


def test_an_empty_path_is_refused(allowed):
    with pytest.raises(PathNotAllowedError, match="no path was given"):
        settings.resolve_allowed_path("  ")


def test_the_refusal_is_an_itae_error_that_front_ends_catch():
    assert issubclass(PathNotAllowedError, ItaeError)


def test_cache_and_data_roots_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(settings.CACHE_DIR_VARIABLE, raising=False)
    monkeypatch.delenv(settings.DATA_ROOT_VARIABLE, raising=False)
    assert settings.cache_dir() == Path.home() / ".cache" / "itae"
    monkeypatch.setenv(settings.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    assert settings.cache_dir() == tmp_path / "cache"
    assert settings.data_root() == tmp_path / "cache" / "datasets"
    assert settings.cache_dir(tmp_path / "given") == tmp_path / "given"  # --cache-dir wins
    monkeypatch.setenv(settings.DATA_ROOT_VARIABLE, str(tmp_path / "data"))
    assert settings.data_root() == tmp_path / "data"
    assert settings.data_root("~/x") == Path.home() / "x"


def test_defaults_of_the_front_ends(monkeypatch):
    monkeypatch.delenv(settings.APP_WEIGHTS_VARIABLE, raising=False)
    monkeypatch.delenv(settings.APP_SUBSET_SIZE_VARIABLE, raising=False)
    monkeypatch.delenv(settings.KEEP_UPLOAD_FEATURES_VARIABLE, raising=False)
    assert settings.default_weights(settings.DEFAULT_MODEL) == "demo" == settings.app_weights()
    assert settings.default_weights("dinov2_vitb14") == "hub"
    assert settings.app_subset_size() == settings.DEFAULT_APP_SUBSET_SIZE
    assert settings.keep_upload_features() is False
    monkeypatch.setenv(settings.KEEP_UPLOAD_FEATURES_VARIABLE, "yes")
    assert settings.keep_upload_features() is True
    monkeypatch.setenv(settings.APP_SUBSET_SIZE_VARIABLE, "ten")
    with pytest.raises(ValueError, match="ITAE_APP_LIMIT"):
        settings.app_subset_size()


def test_the_dashboard_opens_on_the_teaching_model_unless_told_not_to(monkeypatch):
    monkeypatch.delenv(settings.APP_PLANTED_VARIABLE, raising=False)
    assert settings.app_planted() is True
    for text, planted in [("", True), ("1", True), (" Yes ", True), ("0", False), ("off", False), ("FALSE", False)]:
        monkeypatch.setenv(settings.APP_PLANTED_VARIABLE, text)
        assert settings.app_planted() is planted, text
    monkeypatch.setenv(settings.APP_PLANTED_VARIABLE, "maybe")
    with pytest.raises(ValueError, match="ITAE_APP_PLANTED"):
        settings.app_planted()
