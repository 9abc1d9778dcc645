"""θ and the rule of this session: where they start, the widgets that move them, and when a move counts.

The pages compute with one θ and rule, ``current_theta()`` and ``current_rule()``. The slider, the
box for an exact θ beside it (a small form) and the rule picker live in a fragment: a change reruns only that fragment, which
draws the three widgets and computes nothing. The change counts, and the page reruns once with it, when
the widgets have held still for ``SETTLE_S``: a newer change arriving meanwhile (a held arrow key sends
one per step) stops the waiting run at its next Streamlit call, so only the last value is computed. Only a
user's change counts (a widget callback marks it pending): a page drawing the widgets for the first time
shows the current θ, never its widgets' defaults.

Where θ starts on a new extraction is the library's decision, ``itae.theta.decide_theta``; once θ or the rule
has moved, the pages compute with the θ as given, and ``decide_theta`` says what that attenuates and warns
where it cuts into tokens the norms do not show as artifacts. ``controls`` shows that decision under the
widgets on every page that computes with θ.
"""
from __future__ import annotations

import math
import time

import streamlit as st

from itae.choices import RULES
from itae.extract import Extraction
from itae.theta import ArtifactEvidence, ThetaDecision, decide_theta, examine_norms

__all__ = [
    "NUMBER",
    "RULE",
    "SETTLE_S",
    "SLIDER",
    "THETA_STEP",
    "controls",
    "current_decision",
    "current_rule",
    "current_theta",
    "decision",
    "ensure",
    "explain",
    "for_link",
    "request",
    "set_theta",
    "theta_range",
]

THETA_STEP = 0.01
SETTLE_S = 0.4
SLIDER, NUMBER, RULE = "theta_slider", "theta_number", "rule_radio"
PENDING = "theta_pending"  # a widget moved and the pages have not yet computed with it


@st.cache_data(max_entries=32, show_spinner="Looking for artifacts in the query norms…")
def _evidence(key: str, num_prefix_tokens: int, grid_size: tuple[int, int], _norms) -> ArtifactEvidence:
    return examine_norms(_norms, num_prefix_tokens=num_prefix_tokens, grid_size=grid_size)


def decision(extraction: Extraction, requested: float | None = None, rule: str = "minority") -> ThetaDecision:
    """``decide_theta`` on the extraction's query norms (None asks for ``"auto"``); the norms examined once."""
    info = extraction.info
    evidence = _evidence(info.key, info.num_prefix_tokens, info.grid_size, extraction.query_norms)
    return decide_theta(requested, extraction.query_norms, num_prefix_tokens=info.num_prefix_tokens,
                        grid_size=info.grid_size, paper_theta=info.default_theta, rule=rule, evidence=evidence)


def theta_range(extraction: Extraction) -> tuple[float, float]:
    """Slider bounds: the non-CLS query norms' span on the slider's grid, one step beyond each end.

    The model's starting θ widens it where it lies outside. Any θ beyond an end splits the tokens
    exactly as that end does, so a θ from a link is clamped to the range.
    """
    norms = extraction.query_norms[:, 1:]
    low = math.floor(float(norms.min()) / THETA_STEP) * THETA_STEP - THETA_STEP
    high = math.ceil(float(norms.max()) / THETA_STEP) * THETA_STEP + THETA_STEP
    start = decision(extraction).value
    if start is not None:
        low, high = min(low, start), max(high, start)
    return round(low, 2), round(high, 2)


def request(theta: float | None, rule: str | None) -> None:
    """Start the next extraction at this θ (None: where the library decides) and rule (None: minority)."""
    st.session_state.requested_theta = (theta, rule)


def for_link() -> tuple[float | None, str | None]:
    """θ and rule for the URL: the current ones, or before the first extraction what was requested."""
    if "theta_for" in st.session_state:
        return current_theta(), current_rule()
    return st.session_state.get("requested_theta", (None, None))


def ensure(extraction: Extraction) -> None:
    """On a new extraction, start θ and the rule where the library decides, or where a link asked."""
    key = extraction.info.key
    if st.session_state.get("theta_for") == key:
        return
    requested_theta, requested_rule = st.session_state.pop("requested_theta", (None, None))
    decided = decision(extraction, requested_theta, requested_rule or "minority")
    low, high = theta_range(extraction)
    # No θ means no attenuation: a θ below every norm selects nothing under the minority rule.
    start = low if decided.value is None else min(max(decided.value, low), high)
    st.session_state.theta_start = (decided, start)
    st.session_state.theta_for = key
    set_theta(start, requested_rule or "minority")


def current_theta() -> float:
    return float(st.session_state.get("theta", 3.0))


def current_rule() -> str:
    return st.session_state.get("rule", "minority")


def set_theta(theta: float, rule: str | None = None) -> None:
    """Set θ (and the rule) and the widgets with them; from a callback, or in a run before the widgets."""
    st.session_state.theta = round(float(theta), 2)
    if rule is not None:
        st.session_state.rule = rule
    st.session_state[SLIDER] = st.session_state[NUMBER] = current_theta()
    st.session_state[RULE] = current_rule()
    st.session_state[PENDING] = False


def current_decision(extraction: Extraction) -> tuple[ThetaDecision, str]:
    """The decision behind the current θ and rule, and its reason as the page shows it.

    While θ and the rule are where they started, that is the start's decision (the reason also says where
    the slider shows it); after a move, ``decide_theta`` of the current θ as given, with the current rule.
    """
    decided, start = st.session_state.theta_start
    if (current_theta(), current_rule()) == (round(start, 2), decided.rule):  # set_theta keeps θ on the slider's grid
        return decided, _start_reason(decided, start)
    moved = decision(extraction, current_theta(), current_rule())
    return moved, moved.reason


def explain(extraction: Extraction) -> None:
    """Show why the pages compute with this θ: the library's reason, and its warning as a warning."""
    decided, reason = current_decision(extraction)
    st.caption(reason)
    if decided.warning:
        st.warning(decided.warning)


def _start_reason(decided: ThetaDecision, start: float) -> str:
    if decided.value is None:
        return f"{decided.reason} The slider starts below every norm, which selects nothing."
    if start != decided.value:
        return f"{decided.reason} Shown as {start:.2f}, the slider's end, which splits the tokens the same way."
    return decided.reason


def controls(extraction: Extraction) -> tuple[float, str]:
    """The θ slider, number box and rule picker, and why θ is where it is; returns the θ and rule the page computes with."""
    _widgets(*theta_range(extraction))
    explain(extraction)
    return current_theta(), current_rule()


@st.fragment
def _widgets(low: float, high: float) -> None:
    # The widgets take their values from session state only. Unless the user has a move in flight, they are
    # set to the θ and rule the pages compute with (θ shown at the range's end where it lies beyond, which
    # splits the tokens alike), so that a page drawing them anew shows those; during a move they are left
    # alone, since writing them would send the browser back a value it has moved past.
    if not st.session_state.get(PENDING):
        st.session_state[SLIDER] = st.session_state[NUMBER] = min(max(current_theta(), low), high)
        st.session_state[RULE] = current_rule()
    left, middle, right = st.columns([4, 1, 3], vertical_alignment="bottom")
    left.slider(
        "θ (query-norm threshold)", min_value=low, max_value=high, step=THETA_STEP, key=SLIDER,
        on_change=_follow_slider, persist_state="session",
        help="Non-CLS tokens with query norm ≤ θ form L_a, the others L_b (Eq. 2).",
    )
    # The exact θ is typed into a form: a form sends its box only when submitted, so a value the browser
    # has not yet been sent back is never mistaken for the user's (a live box would send its last value
    # with every slider step, and one step behind it would undo the move).
    with middle.form("theta_exactly", border=False):
        st.number_input("θ exactly", min_value=low, max_value=high, step=THETA_STEP, format="%.2f", key=NUMBER)
        st.form_submit_button("Set θ", on_click=_typed)
    right.radio(
        "Artifact rule", RULES, key=RULE, horizontal=True, persist_state="session", on_change=_mark_pending,
        help="minority: the smaller of L_a and L_b (Eq. 3); below: L_a (the θ sweep of Sec. 5.2); above: L_b.",
    )
    if not st.session_state.get(PENDING):
        return
    time.sleep(SETTLE_S)
    st.empty()  # a Streamlit call: a change that arrived during the wait stops this run here
    st.session_state[PENDING] = False
    # the widgets already show it
    st.session_state.theta, st.session_state.rule = round(float(st.session_state[SLIDER]), 2), st.session_state[RULE]
    st.rerun(scope="app")


def _follow_slider() -> None:
    """Callback: the number box shows the slider's value (the slider itself is left alone: writing it would
    send the browser the value of this request back, undoing the steps taken since)."""
    st.session_state[NUMBER] = round(float(st.session_state[SLIDER]), 2)
    _mark_pending()


def _typed() -> None:
    """Callback of the form: the slider moves to the typed θ, on its grid."""
    st.session_state[SLIDER] = round(float(st.session_state[NUMBER]), 2)
    _mark_pending()


def _mark_pending() -> None:
    st.session_state[PENDING] = True
