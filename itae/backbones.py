"""Loading a registry model's weights from the hub, a file or the offline demo, and feeding it images.

The records of the models live in :mod:`itae.registry`. Preprocessing is derived from the timm model's own
``pretrained_cfg`` (mean, std); the input size follows the paper (a plain 224×224 resize).

Hub weights go through huggingface_hub, as timm's own downloads do, so its endpoint (``HF_ENDPOINT``),
proxies (``HTTPS_PROXY``, ...), token, cache (``HF_HOME``, ``HF_HUB_CACHE``), timeout
(``HF_HUB_ETAG_TIMEOUT``) and offline mode (``HF_HUB_OFFLINE``) all apply. One difference: where timm
retries an unreachable hub for about 46 s, this asks once and then falls back to the cache, and fails
within seconds with a message that names the alternatives.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from PIL import Image
from timm.data import resolve_model_data_config
from timm.models import get_pretrained_cfg
from torch import nn
from torchvision.transforms import v2

from itae.checkpoints import DEMO_LABEL, demo_weights_file, read_checkpoint, to_timm_state_dict
from itae import settings
from itae.data.dataset import digest
from itae.devices import resolve_device
from itae.errors import BackboneError, CheckpointError
from itae.planted import PLANTING_VERSION, Planting, plant_artifacts, planted_mask
from itae.registry import REGISTRY, BackboneSpec, get_spec

__all__ = ["PLANTED_SUFFIX", "Backbone", "load_backbone", "make_preprocess"]

PLANTED_SUFFIX = " + planted artifacts"
"""Ends the label of every model with planted artifacts, so that no output passes them off as real ones."""
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weight files timm publishes on the hub, in the order timm prefers them."""


@dataclass
class Backbone:
    """A loaded model and everything needed to feed it.

    Attributes
    ----------
    spec : BackboneSpec
    model : timm VisionTransformer in eval mode, on ``device``
    preprocess : callable, PIL image -> float tensor of shape (3, img_size, img_size)
    weights : where the weights came from (``"hub"``, ``"demo"``, a file path, or ``"random"``)
    label : honest name for outputs (the demo weights and planted artifacts say so)
    device : torch.device
    planting : the planted register neuron (:mod:`itae.planted`), or None for the model as loaded
    """

    spec: BackboneSpec
    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    weights: str
    label: str
    device: torch.device
    planting: Planting | None = None

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
        identity = {
            "model": self.spec.name,
            "timm_id": self.spec.timm_id,
            "weights": _weights_identity(self.weights),
            "img_size": self.spec.img_size,
            "mean": list(config["mean"]),
            "std": list(config["std"]),
            "interpolation": "bicubic",
        }
        if self.planting is not None:
            identity["planted"] = self.planting.identity()
        return identity

    def planted_mask(self, images: torch.Tensor) -> torch.Tensor:
        """The planted artifacts of a preprocessed batch ``(B, 3, H, W)``: bool ``(B, T)``, CLS column False.

        Raises
        ------
        BackboneError
            If this backbone was loaded without ``planted=True``.
        """
        if self.planting is None:
            raise BackboneError(f"{self.label} has no planted artifacts: load it with planted=True (--planted)")
        return planted_mask(self.model, images.to(self.device))


def _weights_identity(weights: str) -> str:
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return weights


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


def _hub_hint(spec: BackboneSpec) -> str:
    demo = " or weights='demo' (the offline DINOv2-S/14-initialised demo)" if spec.demo_weights else ""
    return (
        f"download the weights on a networked machine (timm id {spec.timm_id}) and pass the file as weights=PATH "
        f"(--weights PATH): official DINOv2 .pth, timm or Hugging Face Dinov2Model layouts all load{demo}"
    )


def _hub_weights_file(spec: BackboneSpec) -> str:
    """The local path of ``spec``'s hub weights: downloaded, or found in huggingface_hub's cache."""
    repo = get_pretrained_cfg(spec.timm_id).hf_hub_id
    if not repo:
        raise BackboneError(f"{spec.timm_id} has no weights on the Hugging Face hub: {_hub_hint(spec)}")
    if constants.HF_HUB_OFFLINE:
        return _cached_hub_file(repo, spec, "the Hugging Face hub is switched off (HF_HUB_OFFLINE)")
    for filename in HUB_FILES:
        try:
            # One request, no retries: huggingface_hub's own quick check before it falls back to its cache.
            get_hf_file_metadata(hf_hub_url(repo, filename), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        except EntryNotFoundError:  # the hub has no such file in this repository: try the next
            continue
        except HfHubHTTPError as error:  # the hub answered but refused: gated, private, or down
            return _cached_hub_file(repo, spec, f"the hub refused {repo}/{filename} ({error})")
        except Exception:  # connection failures: their types belong to huggingface_hub's HTTP library of the day
            return _cached_hub_file(repo, spec, "the model hub is unreachable")
        try:
            return hf_hub_download(repo, filename, library_name="itae")
        except Exception as error:  # a download can fail in as many ways as the network
            raise BackboneError(f"downloading {repo}/{filename} failed ({error}); {_hub_hint(spec)}") from error
    raise BackboneError(f"{repo} on the hub holds none of {', '.join(HUB_FILES)}; {_hub_hint(spec)}")


def _cached_hub_file(repo: str, spec: BackboneSpec, why: str) -> str:
    """A weight file of ``repo`` in huggingface_hub's cache, or an error saying ``why`` the hub cannot help."""
    for filename in HUB_FILES:
        path = try_to_load_from_cache(repo, filename)
        if isinstance(path, str):  # it also answers "known to be missing" with a sentinel object
            return path
    raise BackboneError(f"{why} and {spec.name} ({repo}) is not in the local hub cache: {_hub_hint(spec)}")


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
    name: str, weights: str | Path | None = None, device: str | torch.device | None = None, planted: bool = False
) -> Backbone:
    """Load a registry model in eval mode.

    Parameters
    ----------
    name : a registry name, e.g. ``"dinov2_vits14"``, ``"dinov2_vitb14_reg"`` (see ``REGISTRY``)
    weights : None or ``"hub"`` (timm's weights on the Hugging Face hub, or in its cache), a checkpoint
        file path, ``"demo"`` (offline, DINOv2-S/14 only) or ``"random"`` (random initialisation, for
        tests and timing)
    device : None or ``"auto"`` picks CUDA, then MPS, then CPU (:func:`itae.devices.resolve_device`)
    planted : plant synthetic artifacts whose positions are known (:func:`itae.planted.plant_artifacts`,
        seed 0): a teaching and testing model, labelled as such

    Returns
    -------
    Backbone

    Raises
    ------
    BackboneError
        If the model is unknown, or its weights are missing, unreachable or do not fit; the message
        names the alternatives.
    DeviceError
        If ``device`` is missing from this machine.
    """
    spec = get_spec(name)
    target = resolve_device(device)
    if weights == "random":
        # Seeded, so that "random" names one model and features cached under that name stay valid.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, source, label = _create(spec, initialise=True), "random", f"{spec.label} (random weights)"
    else:
        source, path = _weights_file(spec, weights)
        model = _load_from_file(spec, _create(spec, initialise=False), path)
        label = DEMO_LABEL if source == "demo" else spec.label
    model = model.eval().to(target)
    preprocess = make_preprocess(model, spec.img_size)
    planting = plant_artifacts(model, preprocess, cache_file=_planting_file(spec, source, model)) if planted else None
    if planted:
        label += PLANTED_SUFFIX
    return Backbone(spec, model, preprocess, source, label, target, planting)


def _planting_file(spec: BackboneSpec, weights: str, model: nn.Module) -> Path:
    """Where the planted neuron of these weights is kept: named after the architecture, the weights, torch and
    the planting version (so that two versions sharing a cache folder do not overwrite each other's)."""
    key = digest(spec.timm_id, _weights_identity(weights), tuple(model.patch_embed.grid_size), torch.__version__,
                 PLANTING_VERSION)
    return settings.cache_dir() / "planted" / f"{spec.name}-{key}.pt"


def _create(spec: BackboneSpec, initialise: bool) -> nn.Module:
    # A file overwrites every weight: skipping timm's random init saves seconds on the big models.
    extra = {} if initialise else {"weight_init": "skip"}
    return timm.create_model(spec.timm_id, pretrained=False, img_size=spec.img_size, **extra)


def _weights_file(spec: BackboneSpec, weights: str | Path | None) -> tuple[str, str | Path]:
    """(where the weights come from, their file) for the hub, the demo or a file; found before any model is built."""
    if weights is None or weights == "hub":
        return "hub", _hub_weights_file(spec)
    if weights == "demo":
        if not spec.demo_weights:
            demos = [s.name for s in REGISTRY.values() if s.demo_weights]
            raise BackboneError(f"weights='demo' exists only for {', '.join(demos)}, not {spec.name}")
        try:
            return "demo", demo_weights_file()
        except CheckpointError as error:
            raise BackboneError(str(error)) from error
    return str(weights), weights
