"""The backbone registry: one record per model, the single source of truth for it.

Each :class:`BackboneSpec` holds a model's timm id, registers, the paper's default θ, its input size and
its label; loading its weights is :func:`itae.backbones.load_backbone`'s job. Importing this module loads
nothing heavy, so the command line can check a model name before it imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from itae.errors import BackboneError

__all__ = ["BackboneSpec", "REGISTRY", "get_spec"]


@dataclass(frozen=True)
class BackboneSpec:
    """One model of the registry.

    Attributes
    ----------
    name : the registry name, e.g. ``"dinov2_vitb14_reg"``
    timm_id : timm architecture and pretrained tag, e.g. ``"vit_base_patch14_reg4_dinov2.lvd142m"``
    label : what outputs call it
    num_registers : register tokens after CLS
    default_theta : the paper's θ (Sec. 4.2), or None where the paper applied no ITAE or gave no θ
    img_size : square input side; the paper resizes every image to 224×224
    demo_weights : whether ``weights="demo"`` exists for it
    """

    name: str
    timm_id: str
    label: str
    num_registers: int
    default_theta: float | None
    img_size: int = 224
    demo_weights: bool = False

    @property
    def architecture(self) -> str:
        return self.timm_id.split(".")[0]


def _dinov2(size: str, arch: str, theta: float | None, registers: bool, demo: bool = False) -> BackboneSpec:
    reg = "_reg4" if registers else ""
    return BackboneSpec(
        name=f"dinov2_vit{size}14{'_reg' if registers else ''}",
        timm_id=f"vit_{arch}_patch14{reg}_dinov2.lvd142m",
        label=f"DINOv2 ViT-{size.upper()}/14{' with registers' if registers else ''}",
        num_registers=4 if registers else 0,
        default_theta=theta,
        demo_weights=demo,
    )


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        # ViT-S without registers: the paper applied no ITAE (no bimodality), hence no θ.
        _dinov2("s", "small", None, registers=False, demo=True),
        _dinov2("b", "base", 3.0, registers=False),
        _dinov2("l", "large", 3.0, registers=False),
        _dinov2("g", "giant", 3.0, registers=False),
        _dinov2("s", "small", 2.0, registers=True),
        _dinov2("b", "base", 3.0, registers=True),
        _dinov2("l", "large", 3.0, registers=True),
        _dinov2("g", "giant", 3.0, registers=True),
        # The paper names CLIP and DeiT III among ViTs with artifacts but gives them no θ.
        BackboneSpec("clip_vitb16", "vit_base_patch16_clip_224.openai", "CLIP ViT-B/16 (OpenAI)", 0, None),
        BackboneSpec("deit3_vitb16", "deit3_base_patch16_224.fb_in22k_ft_in1k", "DeiT III ViT-B/16", 0, None),
    ]
}


def get_spec(name: str) -> BackboneSpec:
    """The registry record for ``name``; a clear error listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None
