"""ITAE Lab: Inference-Time Attention Engineering (Nakamura et al.) for pretrained Vision Transformers.

The public entry points: ``load_backbone`` loads a registry model, ``query_norms`` gives the final block's
query norms (Eq. 4), ``cls_features`` the CLS features with or without ITAE (Eq. 2-6).

They are imported on first use (PEP 562), so that ``import itae.cli`` or ``import itae.settings`` does not
load torch: ``itae --help`` answers at once.
"""
import importlib

__all__ = ["REGISTRY", "Backbone", "load_backbone", "query_norms", "cls_features"]
__version__ = "0.1.0"

_HOMES = {
    "REGISTRY": "itae.registry",
    "Backbone": "itae.backbones",
    "load_backbone": "itae.backbones",
    "query_norms": "itae.engine",
    "cls_features": "itae.engine",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module 'itae' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__():
    return sorted([*globals(), *__all__])
