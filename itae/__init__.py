"""ITAE Lab: Inference-Time Attention Engineering (Nakamura et al.) for pretrained Vision Transformers.

The public entry points: ``load_backbone`` loads a registry model, ``query_norms`` gives the final block's
query norms (Eq. 4), ``cls_features`` the CLS features with or without ITAE (Eq. 2-6).
"""
from itae.backbones import REGISTRY, Backbone, load_backbone
from itae.engine import cls_features, query_norms

__all__ = ["REGISTRY", "Backbone", "load_backbone", "query_norms", "cls_features"]
__version__ = "0.1.0"
