"""What every page shares: the current selection, cached loaders, θ and rule, and the sidebar.

Heavy objects are shared read-only by all browser sessions: backbones and datasets behind
``st.cache_resource``, extractions in one locked store (itself a cache resource), ITAE results
per (extraction, θ, rule). What one user picked (source, subset, model, θ, rule) lives in
``st.session_state`` only, so sessions never see each other's choices.

Environment variables set the defaults (tests use them to stay fast); ``itae.settings`` reads them:
``ITAE_APP_WEIGHTS`` (default ``demo``), ``ITAE_APP_LIMIT`` (subset size, default 200),
``ITAE_CACHE_DIR`` (feature cache root, default ``~/.cache/itae``).
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import streamlit as st
from streamlit.errors import StreamlitAPIException

from itae import settings
from itae.backbones import Backbone, load_backbone
from itae.choices import RULES
from itae.data import ImageDataset, balanced_subset, open_source, open_uploads
from itae.errors import USER_ERRORS, DataSourceError
from itae.extract import Extraction, ItaeResult, extract_cached
from itae.registry import REGISTRY
from itae.theta import BimodalityVerdict, suggest_theta

__all__ = [
    "LIBRARY_ERRORS",
    "SIDEBAR_FRAGMENT",
    "Selection",
    "commit_selection",
    "current_dataset",
    "current_extraction",
    "current_rule",
    "current_selection",
    "current_theta",
    "default_clusters",
    "get_backbone",
    "itae_result",
    "register_upload",
    "set_theta",
    "sidebar_status",
    "theta_controls",
    "theta_range",
    "verdict",
]

# What pages catch and show as a message, so that no traceback ever reaches the page: the library's
# user errors, as the command line catches them, and a device failing (torch raises RuntimeError, for
# running out of memory too).
LIBRARY_ERRORS = (*USER_ERRORS, RuntimeError)

THETA_STEP = 0.01
STORE_CAPACITY = 4  # extractions kept in memory across sessions; the disk cache keeps the rest
SIDEBAR_FRAGMENT = "sidebar-status"


@dataclass(frozen=True)
class Selection:
    """What to extract: the data, the subset and the model. Hashable, so it keys the caches.

    Attributes
    ----------
    source : a key of ``itae.data.SOURCES``, ``"path"`` (a folder or zip on the server) or ``"upload"``
    root : folder of the built-in datasets ("" for the default)
    path : the folder or zip when ``source == "path"``
    labels_csv : a labels CSV on the server for ``source == "path"`` ("" for none)
    split : "test" or "train"
    download : let torchvision download a built-in dataset into ``root``
    upload_id : digest of the uploaded files when ``source == "upload"``
    limit : subset size (class-balanced, seeded)
    seed : subset seed
    model : a registry name
    weights : "demo", "hub", "random" or a checkpoint path
    device : "auto", "cpu", "cuda" or "mps"
    batch_size : images per forward pass
    """

    source: str = "demo"
    root: str = ""
    path: str = ""
    labels_csv: str = ""
    split: str = "test"
    download: bool = False
    upload_id: str = ""
    limit: int = settings.DEFAULT_APP_SUBSET_SIZE
    seed: int = 0
    model: str = settings.DEFAULT_MODEL
    weights: str = settings.default_weights(settings.DEFAULT_MODEL)
    device: str = "auto"
    batch_size: int = 32


def default_selection() -> Selection:
    """The selection a fresh session opens on: the embedded demo with the offline demo weights."""
    return Selection(weights=settings.app_weights(), limit=settings.app_subset_size())


def current_selection() -> Selection:
    if "selection" not in st.session_state:
        st.session_state.selection = default_selection()
    return st.session_state.selection


# Loaders ----------------------------------------------------------------------------------------


@st.cache_resource(show_spinner="Loading the model…", max_entries=3)
def get_backbone(model: str, weights: str, device: str) -> Backbone:
    """A loaded registry model, shared by all sessions; raises BackboneError with advice."""
    return load_backbone(model, weights=weights, device=device)


@st.cache_resource(show_spinner="Opening the data…", max_entries=8)
def _open_source(source: str, root: str, path: str, labels_csv: str, split: str, download: bool) -> ImageDataset:
    if source == "path":
        return open_source(path, labels_csv=labels_csv or None, split=split)
    return open_source(source, root=root or None, split=split, download=download)


def register_upload(files: list[tuple[str, bytes]], labels_csv: bytes | None) -> str:
    """Open uploaded files (raises DataSourceError) and keep them in this session; returns their id."""
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest.update(hashlib.sha256(labels_csv or b"").digest())
    upload_id = digest.hexdigest()[:16]
    uploads = st.session_state.setdefault("uploads", {})
    if upload_id not in uploads:
        uploads.clear()  # one upload per session is enough; a new one replaces it
        uploads[upload_id] = open_uploads(files, labels_csv)
    return upload_id


def open_dataset(selection: Selection) -> ImageDataset:
    """The whole source of ``selection``, before the subset; raises DataSourceError."""
    if selection.source == "upload":
        uploads = st.session_state.get("uploads", {})
        if selection.upload_id not in uploads:
            raise DataSourceError("the uploaded files are gone (a new browser session?); upload them again")
        return uploads[selection.upload_id]
    return _open_source(selection.source, selection.root, selection.path, selection.labels_csv, selection.split, selection.download)


def subset_of(selection: Selection) -> ImageDataset:
    return balanced_subset(open_dataset(selection), selection.limit, seed=selection.seed)


def current_dataset() -> ImageDataset:
    """The images of the current extraction: ``extraction.indices`` index into this."""
    return subset_of(current_selection())


# Extractions ------------------------------------------------------------------------------------


class _ExtractionStore:
    """Extractions by selection, least recently used dropped first; one extraction per key at a time."""

    def __init__(self, capacity: int):
        self._items: OrderedDict[Selection, Extraction] = OrderedDict()
        self._key_locks: dict[Selection, threading.Lock] = {}
        self._lock = threading.Lock()
        self._capacity = capacity

    def get(self, key: Selection) -> Extraction | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: Selection, extraction: Extraction) -> None:
        with self._lock:
            self._items[key] = extraction
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def key_lock(self, key: Selection) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())


@st.cache_resource(show_spinner=False)
def _store() -> _ExtractionStore:
    return _ExtractionStore(STORE_CAPACITY)


def _extract_with_progress(backbone: Backbone, dataset: ImageDataset, batch_size: int) -> Extraction:
    total = len(dataset)
    bar = st.progress(0.0, text=f"0/{total} images · reading the disk cache or starting the model…")
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        left = (time.monotonic() - start) / max(done, 1) * (total - done)
        bar.progress(done / total, text=f"{done}/{total} images · ~{left:.0f} s left")

    try:
        return extract_cached(backbone, dataset, settings.cache_dir(), batch_size=batch_size, progress=progress)
    finally:
        bar.empty()


def _extraction_for(selection: Selection) -> Extraction:
    store = _store()
    found = store.get(selection)
    if found is not None:
        return found
    dataset = subset_of(selection)
    backbone = get_backbone(selection.model, selection.weights, selection.device)
    with store.key_lock(selection):  # a second session asking for the same waits, then reuses it
        found = store.get(selection)
        if found is None:
            found = _extract_with_progress(backbone, dataset, selection.batch_size)
            store.put(selection, found)
    return found


def commit_selection(selection: Selection) -> Extraction | None:
    """Extract ``selection`` (with a progress bar) and make it current; on failure keep the old one."""
    try:
        extraction = _extraction_for(selection)
    except LIBRARY_ERRORS as error:
        st.error(f"Could not use this selection: {error}")
        return None
    st.session_state.selection = selection
    return extraction


def current_extraction() -> Extraction | None:
    """The extraction of the current selection, extracting it on first use; None (and a message) on failure."""
    selection = current_selection()
    failed = st.session_state.get("failed_selection")
    if failed and failed[0] == selection:
        st.error(f"{failed[1]} Pick other data or another model on the **Data & model** page.")
        return None
    try:
        extraction = _extraction_for(selection)
    except LIBRARY_ERRORS as error:
        st.session_state.failed_selection = (selection, f"Could not load the data or model: {error}.")
        st.error(f"Could not load the data or model: {error}. Pick others on the **Data & model** page.")
        return None
    _ensure_theta(extraction)
    return extraction


def peek_extraction() -> Extraction | None:
    """The current extraction if it is already in memory; never extracts."""
    return _store().get(current_selection())


@st.cache_resource(max_entries=48, show_spinner=False)
def _itae(key: str, theta: float, rule: str, _extraction: Extraction) -> ItaeResult:
    return _extraction.itae(theta, rule)


def itae_result(extraction: Extraction, theta: float | None = None, rule: str | None = None) -> ItaeResult:
    """ITAE features and attention at θ and rule (the current ones by default), from the cache, shared."""
    theta = current_theta() if theta is None else theta
    rule = current_rule() if rule is None else rule
    return _itae(extraction.info.key, round(float(theta), 4), rule, extraction)


@st.cache_data(max_entries=16, show_spinner="Testing the norms for bimodality…")
def _verdict(key: str, _norms: np.ndarray) -> BimodalityVerdict:
    return suggest_theta(_norms)


def verdict(extraction: Extraction) -> BimodalityVerdict:
    """``suggest_theta`` on the query norms without the CLS column (registers stay in)."""
    return _verdict(extraction.info.key, extraction.query_norms[:, 1:])


def default_clusters(extraction: Extraction) -> int:
    """K to start with: the number of classes, or for unlabelled images 10 at most and half the images."""
    if extraction.class_names:
        return len(extraction.class_names)
    return min(10, max(2, len(extraction) // 2))


# θ and rule -------------------------------------------------------------------------------------


def theta_range(extraction: Extraction) -> tuple[float, float]:
    """Slider bounds: the non-CLS query norms' span on the slider's grid, one step beyond each end."""
    norms = extraction.query_norms[:, 1:]
    low = math.floor(float(norms.min()) / THETA_STEP) * THETA_STEP - THETA_STEP
    high = math.ceil(float(norms.max()) / THETA_STEP) * THETA_STEP + THETA_STEP
    return round(low, 2), round(high, 2)


def _initial_theta(extraction: Extraction) -> float:
    """The paper's θ or the suggestion where the norms are bimodal; else a θ that selects nothing.

    Below every norm the minority rule finds no artifact, so a unimodal model starts unmodified
    instead of having half of every picture attenuated.
    """
    found = verdict(extraction)
    if found.bimodal:
        default = extraction.info.default_theta
        return float(default if default is not None else found.theta)
    return theta_range(extraction)[0]


def _ensure_theta(extraction: Extraction) -> None:
    key = extraction.info.key
    if st.session_state.get("theta_for") != key:
        st.session_state.theta = round(_initial_theta(extraction), 2)
        st.session_state.rule = "minority"
        st.session_state.theta_for = key
        _forget_theta_widgets()


def current_theta() -> float:
    return float(st.session_state.get("theta", 3.0))


def current_rule() -> str:
    return st.session_state.get("rule", "minority")


def _forget_theta_widgets() -> None:
    for name in [k for k in st.session_state if str(k).startswith(("theta_w_", "rule_w_"))]:
        del st.session_state[name]


def set_theta(theta: float, rule: str | None = None) -> None:
    """Set θ (and the rule) for this session; a widget callback, so every θ widget follows."""
    st.session_state.theta = round(float(theta), 2)
    if rule is not None:
        st.session_state.rule = rule
    _forget_theta_widgets()


def _copy_widget(widget_key: str, target: str, rerun: list[str] | None) -> None:
    """Callback: the widget's value becomes this session's θ or rule; the other pages' widgets follow."""
    st.session_state[target] = st.session_state[widget_key]
    prefix = widget_key.split("_w_")[0] + "_w_"
    for name in [k for k in st.session_state if str(k).startswith(prefix) and k != widget_key]:
        del st.session_state[name]
    if rerun:
        try:
            st.rerun(rerun)
        except StreamlitAPIException:  # one of the fragments was not drawn in this session's last run
            st.rerun()


def theta_controls(extraction: Extraction, where: str, rerun: list[str] | None = None) -> tuple[float, str]:
    """θ slider and rule picker bound to this session's θ and rule; returns (θ, rule).

    ``where`` names the page (widget keys must be unique); ``rerun`` lists fragment keys to rerun
    on a change instead of the whole app (the Norms page reruns its θ area and the sidebar).
    """
    theta = current_theta()
    low, high = theta_range(extraction)
    low, high = min(low, theta), max(high, theta)  # the paper's θ may lie outside this model's norms
    theta_key, rule_key = f"theta_w_{where}", f"rule_w_{where}"
    st.session_state.setdefault(theta_key, theta)
    st.session_state.setdefault(rule_key, current_rule())
    left, right = st.columns([3, 2])
    left.slider(
        "θ (query-norm threshold)", min_value=low, max_value=high, step=THETA_STEP, key=theta_key,
        on_change=_copy_widget, args=(theta_key, "theta", rerun),
        help="Non-CLS tokens with query norm ≤ θ form L_a, the others L_b (Eq. 2).",
    )
    right.radio(
        "Artifact rule", RULES, key=rule_key, horizontal=True,
        on_change=_copy_widget, args=(rule_key, "rule", rerun),
        help="minority: the smaller of L_a and L_b (Eq. 3); below: L_a (the θ sweep of Sec. 5.2); above: L_b.",
    )
    return current_theta(), current_rule()


# Sidebar ----------------------------------------------------------------------------------------


@st.fragment(key=SIDEBAR_FRAGMENT)
def sidebar_status() -> None:
    """Model, data, number of images, θ and rule of this session; rerun alone when θ moves."""
    selection = current_selection()
    extraction = peek_extraction()
    if extraction is None:
        spec = REGISTRY.get(selection.model)
        st.caption(f"**Model** {spec.label if spec else selection.model} ({selection.weights} weights)")
        st.caption(f"**Data** {selection.source}, subset of {selection.limit}")
        st.caption("Not extracted yet.")
        return
    st.caption(f"**Model** {extraction.info.label}")
    st.caption(f"**Data** {extraction.info.data}")
    st.caption(f"**Images** {len(extraction)}" + (f" ({len(extraction.skipped)} skipped)" if extraction.skipped else ""))
    st.caption(f"**θ** {current_theta():.2f} · **rule** {current_rule()}")
