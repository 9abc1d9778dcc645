"""The methods ``itae compare`` puts side by side: ITAE and its variants, test-time and trained registers.

A :class:`Method` is a record: its kind, and for ITAE the :class:`Variant` of the engine's switches
(:mod:`itae.engine`). :data:`METHODS` names the usual ones; :func:`parse_method` also reads any variant
written out, ``itae:detector=key,attenuation=mean,rows=all,blocks=2``. Importing this module loads
nothing heavy, so the command line can list the methods in ``--help`` before it has imported torch.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from itae.choices import ATTENUATIONS, DETECTORS, ROWS

__all__ = ["DEFAULT_METHODS", "KINDS", "METHODS", "Method", "Variant", "parse_method"]

KINDS = ("original", "itae", "test-time-registers", "trained-registers")
"""``original``: the unmodified model. ``itae``: the engine with a :class:`Variant`. ``test-time-registers``:
Jiang et al. 2025 (:mod:`itae.registers`). ``trained-registers``: the registry's ``*_reg`` model of the same
size (Darcet et al. 2024), a different set of weights."""

_ATTENUATION_WORDS = {"min": "row min", "remove": "−∞", "mean": "row mean", "scale": "weight ×{factor:g}"}


@dataclass(frozen=True)
class Variant:
    """One setting of the engine's switches; the defaults are the paper's ITAE.

    Attributes
    ----------
    detector : {"query", "key", "value", "output"}
        Which norm finds the artifacts (:func:`itae.engine.detector_norms`).
    attenuation : {"min", "remove", "mean", "scale"}
        What their logits become (:class:`itae.engine.Attenuation`).
    factor : float
        The weight factor of ``attenuation="scale"``.
    rows : {"cls", "all"}
        Eq. 6 or Eq. 5.
    blocks : int
        Attenuate in each of the last ``blocks`` blocks (1: the final block, the paper).
    """

    detector: str = "query"
    attenuation: str = "min"
    factor: float = 0.1
    rows: str = "cls"
    blocks: int = 1

    def __post_init__(self):
        for name, value, allowed in (("detector", self.detector, DETECTORS),
                                     ("attenuation", self.attenuation, ATTENUATIONS), ("rows", self.rows, ROWS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not (isinstance(self.factor, (int, float)) and math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor!r}")
        if not isinstance(self.blocks, int) or self.blocks < 1:
            raise ValueError(f"blocks must be a positive integer (1: the final block), got {self.blocks!r}")

    @property
    def needs_earlier_blocks(self) -> bool:
        """Whether the final-block cache cannot serve it: attenuating before the final block re-runs the backbone."""
        return self.blocks > 1

    def describe(self) -> str:
        """The switches in words, e.g. ``"query norm, row min, Eq. 6, final block"``."""
        where = "final block" if self.blocks == 1 else f"last {self.blocks} blocks"
        attenuation = _ATTENUATION_WORDS[self.attenuation].format(factor=self.factor)
        return f"{self.detector} norm, {attenuation}, Eq. {6 if self.rows == 'cls' else 5}, {where}"


@dataclass(frozen=True)
class Method:
    """One row of a comparison.

    Attributes
    ----------
    name : what the command line calls it, e.g. ``"itae-remove"``
    label : what the table calls it
    kind : one of :data:`KINDS`
    variant : the engine's switches, for ``kind="itae"`` only
    """

    name: str
    label: str
    kind: str
    variant: Variant | None = None

    @property
    def runs_the_backbone(self) -> bool:
        """Whether its features need one more pass of a model over the images (minutes on a CPU the first
        time, then cached): test-time registers (with their calibration), trained registers and ITAE in
        blocks before the final one. The others are read from the final-block cache in a blink."""
        if self.kind == "itae":
            return self.variant.needs_earlier_blocks
        return self.kind != "original"

    def identity(self) -> dict:
        """What makes this method's features differ from another's: part of the cache key of its features."""
        return {"kind": self.kind, "variant": None if self.variant is None else dataclasses.asdict(self.variant)}


def _itae(name: str, label: str, **switches) -> Method:
    return Method(name, label, "itae", Variant(**switches))


METHODS: dict[str, Method] = {
    method.name: method
    for method in [
        Method("original", "original", "original"),
        _itae("itae", "ITAE (the paper: query norm, row min, Eq. 6)"),
        _itae("itae-eq5", "ITAE, every row (Eq. 5)", rows="all"),
        _itae("itae-remove", "ITAE, removed from the softmax (−∞)", attenuation="remove"),
        _itae("itae-mean", "ITAE, row mean", attenuation="mean"),
        _itae("itae-scale", "ITAE, attention weight ×0.1", attenuation="scale", factor=0.1),
        _itae("key-norm", "key-norm detector", detector="key"),
        _itae("value-norm", "value-norm detector", detector="value"),
        _itae("output-norm", "output-norm detector (Darcet et al.)", detector="output"),
        _itae("itae-last2", "ITAE in the last 2 blocks (Eq. 6)", blocks=2),
        _itae("itae-last2-eq5", "ITAE in the last 2 blocks (Eq. 5)", rows="all", blocks=2),
        Method("test-time-registers", "test-time registers (Jiang et al.)", "test-time-registers"),
        Method("trained-registers", "trained registers (Darcet et al.)", "trained-registers"),
    ]
}
"""The named methods; any other ITAE variant can be written out (:func:`parse_method`)."""

DEFAULT_METHODS = ("original", "itae", "itae-eq5", "itae-remove", "key-norm", "output-norm",
                   "test-time-registers", "trained-registers")
"""What ``itae compare`` runs unless told otherwise."""


def parse_method(text: str) -> Method:
    """A method from its name in :data:`METHODS`, or an ITAE variant written out.

    Parameters
    ----------
    text : str
        ``"itae-remove"``, or ``"itae:"`` followed by comma-separated ``switch=value`` pairs of
        :class:`Variant` (``detector``, ``attenuation``, ``factor``, ``rows``, ``blocks``), the rest the
        paper's: ``"itae:detector=key,blocks=2"``.

    Returns
    -------
    Method
    """
    text = text.strip()
    if text in METHODS:
        return METHODS[text]
    if not text.startswith("itae:"):
        raise ValueError(f"unknown method {text!r}; known: {', '.join(METHODS)}, or itae:SWITCH=VALUE,... "
                         f"with switches {', '.join(field.name for field in dataclasses.fields(Variant))}")
    switches = {}
    types = {field.name: field.type for field in dataclasses.fields(Variant)}
    for pair in filter(None, text[len("itae:"):].split(",")):
        name, _, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if name not in types or not value:
            raise ValueError(f"{pair!r} in {text!r} is not SWITCH=VALUE with a switch of {', '.join(types)}")
        try:
            switches[name] = int(value) if types[name] == "int" else float(value) if types[name] == "float" else value
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r} in {text!r}") from None
    variant = Variant(**switches)
    return Method(text, f"ITAE ({variant.describe()})", "itae", variant)
