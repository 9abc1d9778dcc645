"""What every page shares: the current selection, cached loaders, extractions, θ and rule, the sidebar and the
badge of the teaching model.

Heavy objects are shared read-only by all browser sessions: backbones and datasets behind
``st.cache_resource``, extractions in one locked store (itself a cache resource), ITAE results
per (extraction, θ, rule). What one user picked (source, subset, model, θ, rule) lives in
``st.session_state`` (and in the URL, see ``place.py``), so sessions never see each other's choices.
Uploaded images are a session's own: their dataset and extraction stay in its ``st.session_state`` and
their features on disk in its own folder (``session_files.py``), unless the operator keeps them.

``itae.settings`` reads the environment: ``ITAE_APP_WEIGHTS``, ``ITAE_APP_LIMIT`` and ``ITAE_APP_PLANTED`` (a
new session's weights, subset size and whether its model has planted artifacts), ``ITAE_CACHE_DIR`` (the feature cache), ``ITAE_ALLOWED_ROOTS`` (the server
folders a visitor may open) and ``ITAE_KEEP_UPLOAD_FEATURES``.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from typing import Generic, TypeVar
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

import session_files
import threshold
from itae import settings
from itae.backbones import PLANTED_SUFFIX, Backbone, load_backbone
from itae.data import ImageDataset, balanced_subset, open_source, open_uploads
from itae.devices import kmeans_device, resolve_device
from itae.embed import compile_umap
from itae.errors import USER_ERRORS, DataSourceError
from itae.extract import Extraction, ItaeResult, extract_cached, precision_path
from itae.registry import REGISTRY

__all__ = [
    "LIBRARY_ERRORS",
    "MAX_SEED",
    "MAX_SUBSET_SIZE",
    "NAMED_WEIGHTS",
    "SESSIONS_FOLDER",
    "Selection",
    "SharedStore",
    "clustering_device",
    "commit_selection",
    "current_backbone",
    "current_dataset",
    "current_extraction",
    "current_selection",
    "default_clusters",
    "default_selection",
    "get_backbone",
    "itae_result",
    "planted_badge",
    "register_upload",
    "sidebar_status",
]

K = TypeVar("K")
V = TypeVar("V")

# What pages catch and show as a message, so that no traceback ever reaches the page: the library's
# user errors, as the command line catches them, and a device failing (torch raises RuntimeError, for
# running out of memory too).
LIBRARY_ERRORS = (*USER_ERRORS, RuntimeError)

STORE_CAPACITY = 4  # extractions kept in memory across sessions; the disk cache keeps the rest
MAX_SUBSET_SIZE = 100_000
MAX_SEED = 2**31 - 1
NAMED_WEIGHTS = ("demo", "hub", "random")
"""What ``load_backbone`` takes by name; any other weights are a checkpoint file."""
SESSIONS_FOLDER = "sessions"
"""Under the cache root: one folder per browser session for the features of its uploads."""


@dataclass(frozen=True)
class Selection:
    """What to extract: the data, the subset and the model. Hashable, so it keys the caches.

    Attributes
    ----------
    source : a key of ``itae.data.SOURCES``, ``"path"`` (a folder or zip on the server) or ``"upload"``
    root : folder of the built-in datasets ("" for the server's data root)
    path : the folder or zip when ``source == "path"``
    labels_csv : a labels CSV on the server for ``source == "path"`` ("" for none)
    split : "test" or "train"
    download : let torchvision download a built-in dataset into ``root``
    upload_id : digest of the uploaded files when ``source == "upload"``
    limit : subset size (class-balanced, seeded)
    seed : subset seed
    model : a registry name
    weights : "demo", "hub", "random" or a checkpoint path
    planted : the model with planted artifacts (``itae.planted``), the teaching model whose artifacts are known
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
    planted: bool = False
    device: str = "auto"
    batch_size: int = 32


def default_selection() -> Selection:
    """The selection a fresh session opens on: the embedded demo, the offline demo weights, artifacts planted."""
    return Selection(weights=settings.app_weights(), limit=settings.app_subset_size(), planted=settings.app_planted())


def current_selection() -> Selection:
    if "selection" not in st.session_state:
        st.session_state.selection = default_selection()
    return st.session_state.selection


# Loaders ----------------------------------------------------------------------------------------


def get_backbone(model: str, weights: str, device: str, planted: bool) -> Backbone:
    """A loaded registry model, with planted artifacts if asked, shared by all sessions; raises BackboneError with advice.

    A checkpoint file a visitor typed (or a link carried) must lie inside the allowed roots
    (PathNotAllowedError otherwise); the operator's own default weights are trusted.
    """
    # A spinner of its own rather than the cache's: planting adds several seconds, worth saying why.
    with st.spinner("Loading the model and planting its artifacts…" if planted else "Loading the model…"):
        return _loaded_backbone(model, weights, device, planted)


@st.cache_resource(show_spinner=False, max_entries=3)
def _loaded_backbone(model: str, weights: str, device: str, planted: bool) -> Backbone:
    if weights not in NAMED_WEIGHTS and weights != settings.app_weights():
        weights = str(settings.resolve_allowed_path(weights))
    return load_backbone(model, weights=weights, device=device, planted=planted)


@st.cache_resource(show_spinner="Opening the data…", max_entries=8)
def _open_source(source: str, root: str, path: str, labels_csv: str, split: str, download: bool) -> ImageDataset:
    # Every path here came from a visitor or a link: the library refuses those outside the allowed roots.
    allowed = settings.allowed_roots()
    if source == "path":
        return open_source(path, labels_csv=labels_csv or None, split=split, allowed_roots=allowed)
    return open_source(source, root=root or None, split=split, download=download, allowed_roots=allowed)


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


def current_backbone() -> Backbone:
    """The model of the current selection, shared and loaded once; raises BackboneError with advice."""
    selection = current_selection()
    return get_backbone(selection.model, selection.weights, selection.device, selection.planted)


def subset_of(selection: Selection) -> ImageDataset:
    return balanced_subset(open_dataset(selection), selection.limit, seed=selection.seed)


def current_dataset() -> ImageDataset:
    """The images of the current extraction: ``extraction.indices`` index into this."""
    return subset_of(current_selection())


# Extractions ------------------------------------------------------------------------------------


class SharedStore(Generic[K, V]):
    """Values by key (extractions by selection, comparisons by request), least recently used dropped first;
    one computation per key at a time (``key_lock``). Thread-safe: sessions share it."""

    def __init__(self, capacity: int):
        self._items: OrderedDict[K, V] = OrderedDict()
        self._key_locks: dict[K, threading.Lock] = {}
        self._lock = threading.Lock()
        self._capacity = capacity

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)

    def key_lock(self, key: K) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())


@st.cache_resource(show_spinner=False)
def _shared_store() -> SharedStore[Selection, Extraction]:
    return SharedStore(STORE_CAPACITY)


def _store_for(selection: Selection) -> SharedStore[Selection, Extraction]:
    """Uploads stay with their session; everything else is shared by all sessions."""
    if selection.source == "upload":
        return st.session_state.setdefault("upload_extractions", SharedStore(1))
    return _shared_store()


def _features_root(selection: Selection) -> Path:
    """Where ``extract_cached`` keeps the features: the shared cache, or this session's folder for uploads."""
    if selection.source == "upload" and not settings.keep_upload_features():
        return session_files.session_folder(str(settings.cache_dir() / SESSIONS_FOLDER)).path
    return settings.cache_dir()


def _extract_with_progress(backbone: Backbone, dataset: ImageDataset, batch_size: int, root: Path) -> Extraction:
    total = len(dataset)
    bar = st.progress(0.0, text=f"0/{total} images · reading the disk cache or starting the model…")
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        left = (time.monotonic() - start) / max(done, 1) * (total - done)
        bar.progress(done / total, text=f"{done}/{total} images · ~{left:.0f} s left")

    try:
        return extract_cached(backbone, dataset, root, batch_size=batch_size, progress=progress)
    finally:
        bar.empty()


def _extraction_for(selection: Selection) -> Extraction:
    store = _store_for(selection)
    found = store.get(selection)
    if found is not None:
        return found
    dataset = subset_of(selection)
    backbone = get_backbone(selection.model, selection.weights, selection.device, selection.planted)
    with store.key_lock(selection):  # a second session asking for the same waits, then reuses it
        found = store.get(selection)
        if found is None:
            found = _extract_with_progress(backbone, dataset, selection.batch_size, _features_root(selection))
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


@st.cache_resource(show_spinner=False)
def umap_warm_up() -> threading.Thread:
    """Compile UMAP in the background, once per server, from the first page view on.

    numba's compilation takes 30-40 s on 2 cores the first time and a few seconds once it is on disk
    (:func:`itae.embed.import_umap`); meanwhile every page stays usable, and the Embeddings page waits for
    it only if it is opened before the compilation ends.
    """
    thread = threading.Thread(target=compile_umap, name="itae-umap-warm-up", daemon=True)
    thread.start()
    return thread


def precision_line(extraction: Extraction) -> str:
    """The path the current extraction ran (bf16 autocast or float32) and why, as the command line prints it."""
    return precision_path(extraction.info.precision, current_backbone().device)


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
    threshold.ensure(extraction)
    return extraction


def peek_extraction() -> Extraction | None:
    """The current extraction if it is already in memory; never extracts."""
    selection = current_selection()
    return _store_for(selection).get(selection)


@st.cache_resource(max_entries=48, show_spinner=False)
def _itae(key: str, theta: float, rule: str, _extraction: Extraction) -> ItaeResult:
    return _extraction.itae(theta, rule)


def itae_result(extraction: Extraction, theta: float | None = None, rule: str | None = None) -> ItaeResult:
    """ITAE features and attention at θ and rule (the current ones by default), from the cache, shared."""
    theta = threshold.current_theta() if theta is None else theta
    rule = threshold.current_rule() if rule is None else rule
    return _itae(extraction.info.key, round(float(theta), 4), rule, extraction)


def clustering_device() -> str:
    """Where the pages run K-Means, as a string that keys their caches.

    ``itae.devices.kmeans_device`` of the default backend beside this selection's backbone, as the command
    line decides it: on CUDA beside a CUDA backbone, on the CPU beside an MPS one.
    """
    return str(kmeans_device("auto", resolve_device(current_selection().device)))


def default_clusters(extraction: Extraction) -> int:
    """K to start with: the number of classes, or for unlabelled images 10 at most and half the images."""
    if extraction.class_names:
        return len(extraction.class_names)
    return min(10, max(2, len(extraction) // 2))


# Labels -----------------------------------------------------------------------------------------

PLANTED_BADGE = "Planted artifacts · a synthetic teaching model · their positions are known"
PLANTED_HELP = (
    "One register neuron added to a middle block makes a few flat patches per image behave as artifacts "
    "(Darcet et al. 2024; Jiang et al. 2025). They are planted, not found: nothing shown here is a real "
    "artifact finding. The About page says more; the Data & model page switches back to the model as loaded."
)


def planted_badge(slot) -> None:
    """Fill ``slot`` (an ``st.empty``) with the badge while the current model has planted artifacts, else clear it."""
    if current_selection().planted:
        slot.badge(PLANTED_BADGE, icon=":material/science:", color="orange", help=PLANTED_HELP)
    else:
        slot.empty()


def sidebar_status() -> None:
    """Model, data, number of images, θ and rule of this session."""
    selection = current_selection()
    extraction = peek_extraction()
    if extraction is None:
        spec = REGISTRY.get(selection.model)
        planted = PLANTED_SUFFIX if selection.planted else ""
        st.caption(f"**Model** {spec.label if spec else selection.model} ({selection.weights} weights){planted}")
        st.caption(f"**Data** {selection.source}, subset of {selection.limit}")
        st.caption("Not extracted yet.")
        return
    st.caption(f"**Model** {extraction.info.label}")
    st.caption(f"**Data** {extraction.info.data}")
    st.caption(f"**Images** {len(extraction)}" + (f" ({len(extraction.skipped)} skipped)" if extraction.skipped else ""))
    st.caption(f"**θ** {threshold.current_theta():.2f} · **rule** {threshold.current_rule()}")
