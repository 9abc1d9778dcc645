"""The backbone registry: one record per model, and loading its weights from the hub, a file or the demo.

Each :class:`BackboneSpec` is the single source of truth for a model: its timm id, registers, the paper's
default θ, its input size and its label. Preprocessing is derived from the timm model's own
``pretrained_cfg`` (mean, std); the input size follows the paper (a plain 224×224 resize).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.transforms import v2

from itae.checkpoints import DEMO_LABEL, CheckpointError, demo_weights_file, read_checkpoint, to_timm_state_dict

__all__ = ["BackboneSpec", "Backbone", "BackboneError", "REGISTRY", "load_backbone", "resolve_device", "get_spec"]


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message says what to do instead."""


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


@dataclass
class Backbone:
    """A loaded model and everything needed to feed it.

    Attributes
    ----------
    spec : BackboneSpec
    model : timm VisionTransformer in eval mode, on ``device``
    preprocess : callable, PIL image -> float tensor of shape (3, img_size, img_size)
    weights : where the weights came from (``"hub"``, ``"demo"``, a file path, or ``"random"``)
    label : honest name for outputs (the demo weights say so)
    device : torch.device
    """

    spec: BackboneSpec
    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    weights: str
    label: str
    device: torch.device

    @property
    def default_theta(self) -> float | None:
        return self.spec.default_theta

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus registers."""
        return self.model.num_prefix_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols) of the attention maps."""
        return tuple(self.model.patch_embed.grid_size)

    def identity(self) -> dict:
        """What makes this backbone's features differ from another's: used to key feature caches."""
        config = resolve_model_data_config(self.model)
        return {
            "model": self.spec.name,
            "timm_id": self.spec.timm_id,
            "weights": _weights_identity(self.weights),
            "img_size": self.spec.img_size,
            "mean": list(config["mean"]),
            "std": list(config["std"]),
            "interpolation": "bicubic",
        }


def _weights_identity(weights: str) -> str:
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return weights


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA, then Apple MPS, then CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackboneError(f"device {device} was asked for but CUDA is not available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_preprocess(model: nn.Module, img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised float tensor (3, img_size, img_size): the paper's plain resize, the model's mean/std."""
    config = resolve_model_data_config(model)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((img_size, img_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config["mean"]), std=list(config["std"])),
        ]
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all: timm's own retries take close to a minute offline."""
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hub_hint(spec: BackboneSpec) -> str:
    demo = " or weights='demo' (the offline DINOv2-S/14-initialised demo)" if spec.demo_weights else ""
    return (
        f"download the weights on a networked machine (timm id {spec.timm_id}) and pass the file as weights=PATH "
        f"(--weights PATH): official DINOv2 .pth, timm or Hugging Face Dinov2Model layouts all load{demo}"
    )


def _load_from_hub(spec: BackboneSpec, create: Callable[..., nn.Module]) -> nn.Module:
    if not _hub_reachable():
        cached = _cached_hub_file(get_pretrained_cfg(spec.timm_id).hf_hub_id)
        if cached is None:
            raise BackboneError(f"the model hub is unreachable and {spec.name} is not in the local cache: {_hub_hint(spec)}")
        return _load_from_file(spec, create(pretrained=False, init=False), cached)
    try:
        return create(pretrained=True)
    except Exception as error:  # timm/huggingface_hub raise many types for a failed download
        raise BackboneError(f"downloading {spec.timm_id} failed ({error}); {_hub_hint(spec)}") from error


def _cached_hub_file(repo: str | None) -> str | None:
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):
            return path
    return None


def _load_from_file(spec: BackboneSpec, model: nn.Module, path: str | Path) -> nn.Module:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"weights file {str(path)!r} does not exist; give a checkpoint file, 'demo' or None (hub)")
    try:
        state = to_timm_state_dict(read_checkpoint(path), model)
        model.load_state_dict(state, strict=True)
    except (CheckpointError, RuntimeError) as error:
        raise BackboneError(f"{path} does not fit {spec.name} ({spec.timm_id}): {error}") from error
    return model


def load_backbone(
    name: str, weights: str | Path | None = None, device: str | torch.device | None = None
) -> Backbone:
    """Load a registry model in eval mode.

    Parameters
    ----------
    name : a registry name, e.g. ``"dinov2_vits14"``, ``"dinov2_vitb14_reg"`` (see ``REGISTRY``)
    weights : None (the timm hub), a checkpoint file path, ``"demo"`` (offline, DINOv2-S/14 only)
        or ``"random"`` (random initialisation, for tests and timing)
    device : None picks CUDA, then MPS, then CPU

    Returns
    -------
    Backbone
    """
    spec = get_spec(name)
    target = resolve_device(device)

    def create(pretrained: bool, init: bool = True) -> nn.Module:
        # A file overwrites every weight: skipping timm's random init saves seconds on the big models.
        extra = {} if init else {"weight_init": "skip"}
        return timm.create_model(spec.timm_id, pretrained=pretrained, img_size=spec.img_size, **extra)

    label = spec.label
    if weights is None or weights == "hub":
        model, source = _load_from_hub(spec, create), "hub"
    elif weights == "random":
        # Seeded, so that "random" names one model and features cached under that name stay valid.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, source, label = create(pretrained=False), "random", f"{spec.label} (random weights)"
    elif weights == "demo":
        if not spec.demo_weights:
            demos = [s.name for s in REGISTRY.values() if s.demo_weights]
            raise BackboneError(f"weights='demo' exists only for {', '.join(demos)}, not {name}")
        try:
            path = demo_weights_file()
        except CheckpointError as error:
            raise BackboneError(str(error)) from error
        model, source, label = _load_from_file(spec, create(pretrained=False, init=False), path), "demo", DEMO_LABEL
    else:
        model, source = _load_from_file(spec, create(pretrained=False, init=False), weights), str(weights)
    model = model.eval().to(target)
    return Backbone(spec, model, make_preprocess(model, spec.img_size), source, label, target)
