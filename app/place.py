"""The user's place in the URL: data, model, weights, planting, θ and rule, so that a reload or a shared link restores them.

A new session reads its link once (``restore``); every full run writes the place back (``write``). A
link is what someone typed: each value is checked, one that cannot be used leaves a note on the page
and the default in its place, and a path on the server must lie inside the allowed roots (the loaders
check it again when they open it). Device, batch size and downloads are the visitor's machine and
choice, not part of a place, and stay out of links.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import streamlit as st

import state
import threshold
from itae import settings
from itae.choices import RULES, SPLITS
from itae.data import SOURCES
from itae.errors import PathNotAllowedError
from itae.registry import REGISTRY

__all__ = ["Link", "params_of", "read_link", "restore", "show_notes", "write"]


@dataclass
class Link:
    """What a link asks for, checked: the selection, θ and the rule (None where it names none), and notes."""

    selection: state.Selection
    theta: float | None = None
    rule: str | None = None
    notes: list[str] = field(default_factory=list)


def read_link(params: Mapping[str, str]) -> Link:
    """Check a link's query parameters; what cannot be used is replaced by the default, with a note."""
    default = state.default_selection()
    link = Link(default)
    model = params.get("model", default.model)
    if model not in REGISTRY:
        link.notes.append(f"the model {model!r} is unknown, so the default {default.model} is used")
        model = default.model
    data = _data(params, link.notes)
    limit = _whole(params, "limit", default.limit, 1, state.MAX_SUBSET_SIZE, link.notes)
    seed = _whole(params, "seed", default.seed, 0, state.MAX_SEED, link.notes)
    weights = _weights(params.get("weights"), model, default, link.notes)
    planted = _planted(params.get("planted"), default.planted and (model, weights) == (default.model, default.weights), link.notes)
    link.selection = replace(default, model=model, weights=weights, planted=planted, limit=limit, seed=seed, **data)
    link.theta = _theta(params.get("theta"), link.notes)
    link.rule = params.get("rule")
    if link.rule is not None and link.rule not in RULES:
        link.notes.append(f"the rule {link.rule!r} is unknown (one of {', '.join(RULES)}), so the minority rule is used")
        link.rule = None
    return link


def _data(params: Mapping[str, str], notes: list[str]) -> dict[str, str]:
    """The data fields of a Selection: source, path, labels_csv, root and split."""
    source = params.get("data", "demo")
    fields = {"source": source}
    if source == "upload":
        notes.append("uploaded images cannot come from a link: upload them again on the Data & model page")
        return {"source": "demo"}
    if source == "path":
        try:
            settings.resolve_allowed_path(params.get("path", ""))
            if params.get("labels"):
                settings.resolve_allowed_path(params["labels"])
        except PathNotAllowedError as error:
            notes.append(f"the folder on this server cannot be opened: {error}")
            return {"source": "demo"}
        fields |= {"path": params.get("path", ""), "labels_csv": params.get("labels", "")}
    elif source not in SOURCES:
        notes.append(f"the data {source!r} is unknown, so the demo is used")
        return {"source": "demo"}
    elif SOURCES[source].needs_root and params.get("root"):
        try:
            settings.resolve_allowed_path(params["root"])
            fields["root"] = params["root"]
        except PathNotAllowedError as error:
            notes.append(f"the data folder cannot be used, so the server's own is: {error}")
    split = params.get("split", "test")
    has_train = source == "path" or SOURCES[source].has_train_split
    if split not in SPLITS or (split == "train" and not has_train):
        notes.append(f"the split {split!r} does not exist for this data, so 'test' is used")
        split = "test"
    return fields | {"split": split}


def _weights(text: str | None, model: str, default: state.Selection, notes: list[str]) -> str:
    fallback = default.weights if model == default.model else settings.default_weights(model)
    if text is None:
        return fallback
    if text == "demo" and not REGISTRY[model].demo_weights:
        notes.append(f"{model} has no offline demo weights, so {fallback!r} weights are used")
        return fallback
    if text in state.NAMED_WEIGHTS or text == settings.app_weights():
        return text
    try:
        settings.resolve_allowed_path(text)
    except PathNotAllowedError as error:
        notes.append(f"the checkpoint file cannot be used, so {fallback!r} weights are: {error}")
        return fallback
    return text


def _planted(text: str | None, fallback: bool, notes: list[str]) -> bool:
    """``planted=1`` or ``0``. Without it only the default model and weights are planted, as a new session's:
    a link written before the teaching model existed named any other model as loaded."""
    if text is None:
        return fallback
    if text in ("0", "1"):
        return text == "1"
    notes.append(f"planted must be 1 or 0, not {text!r}, so {int(fallback)} is used")
    return fallback


def _whole(params: Mapping[str, str], name: str, fallback: int, low: int, high: int, notes: list[str]) -> int:
    text = params.get(name)
    if text is None:
        return fallback
    if text.strip().isdigit() and low <= int(text) <= high:
        return int(text)
    notes.append(f"{name} must be a whole number from {low} to {high:,}, not {text!r}, so {fallback} is used")
    return fallback


def _theta(text: str | None, notes: list[str]) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value):
        return value
    notes.append(f"θ must be a number, not {text!r}, so θ starts where the model's norms suggest")
    return None


def params_of(selection: state.Selection, theta: float | None, rule: str | None) -> dict[str, str]:
    """The query parameters that name this place; ``read_link`` reads them back."""
    params = {"data": selection.source}
    if selection.source == "path":
        params["path"] = selection.path
        if selection.labels_csv:
            params["labels"] = selection.labels_csv
    if selection.root:
        params["root"] = selection.root
    if selection.split != "test":
        params["split"] = selection.split
    params |= {"limit": str(selection.limit), "seed": str(selection.seed), "model": selection.model, "weights": selection.weights,
               "planted": str(int(selection.planted))}
    if theta is not None:
        params["theta"] = f"{theta:.2f}"
    if rule is not None:
        params["rule"] = rule
    return params


def restore() -> None:
    """In a new session, take the selection, θ and rule from the link it was opened with."""
    if "selection" in st.session_state:
        return
    link = read_link(st.query_params.to_dict())
    st.session_state.selection = link.selection
    if link.theta is not None or link.rule is not None:
        threshold.request(link.theta, link.rule)
    st.session_state.link_notes = (link.selection, link.notes)


def show_notes() -> None:
    """What the link asked for that could not be used, while the data and model it opened are current."""
    selection, notes = st.session_state.get("link_notes", (None, []))
    if notes and selection == state.current_selection():
        st.warning("This link could not be followed in full:\n" + "\n".join(f"- {note}" for note in notes))


def write() -> None:
    """Put the current place in the URL, so that a reload or a copied link comes back to it."""
    wanted = params_of(state.current_selection(), *threshold.for_link())
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)
