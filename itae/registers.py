"""Test-time registers (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers"), batched.

A sparse set of MLP *register neurons* in the middle blocks writes the high-norm outlier tokens of a ViT.
Test-time registers move that writing out of the image: one extra token is appended to every image,
initialised to the mean of its patch tokens; in every block that holds register neurons, those neurons'
activations are zeroed on the patch tokens and set, on the extra token, to their largest activation over
the image's tokens. The outliers then form on the extra token, which no output reads, instead of on patches.

Two steps, as in the authors' code (``nickjiang2378/test-time-registers``):

1. :func:`find_register_neurons` on a calibration set. A token is an outlier where its residual norm
   leaving ``outlier_block`` (default: the second-to-last block, the authors' DINOv2 setting) exceeds
   ``outlier_ratio`` (5) times the median token norm there. The authors use an absolute norm (150 for
   DINOv2-L), which does not carry over between models; Darcet et al. put artifacts at about 10 times the
   others' norm, and on the planted teaching model normal tokens reach 1.7 times the median, planted ones
   43 times. (The bimodality test of :mod:`itae.theta` was tried: a 1 % minority next to a bulk that is
   itself two-humped, flat and textured patches, made it fit the bulk and refuse.) No outliers, no register
   neurons. Every MLP unit of blocks ``0 .. outlier_block`` is
   scored by its mean ``|activation|`` at the outlier tokens of an image, averaged over the images that have
   outliers; the ``top_k`` best are kept (the authors: 10 for OpenCLIP ViT-B, 50 for DINOv2-L), here only
   those scoring at least ``min_score_fraction`` of the best: on the planted teaching model the register
   neuron scores 437 and the next unit 4.2, and silencing nine ordinary units on every patch would measure
   the cut, not the method. The result is cached per model, weights and calibration set
   (:func:`calibrated_register_neurons`).
2. :func:`features_with_test_time_register`, batched (the authors' code runs one image at a time) and for both
   MLP kinds of timm's ViTs: ``Mlp`` (GELU) and the SwiGLU ``GluMlp`` (DINOv2 ViT-g), whose "neuron" is the
   gated unit ``act(gate) * value`` that ``fc2`` reads (their code skipped SwiGLU).

The extra token is appended after the patches, so CLS, trained registers and patches keep their indices.
It starts as the mean of the patch tokens (the authors' DINOv2 code starts it at zero, without a position
embedding; the mean puts it among the tokens the first block expects). A model without register neurons
is run unmodified, without the extra token.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, SwiGLU
from torch import nn

from itae import engine
from itae.backbones import Backbone
from itae.data import ImageDataset, balanced_subset, open_source
from itae.extract import preprocessed_batches
from itae.fileio import atomic_path

__all__ = [
    "REGISTERS_VERSION",
    "RegisterNeurons",
    "calibrated_register_neurons",
    "default_calibration_set",
    "find_register_neurons",
    "mlp_readout",
    "neuron_activations",
    "features_with_test_time_register",
    "tokens_with_test_time_register",
]

REGISTERS_VERSION = 1
"""Changes whenever the calibration does, so that cached register neurons of an older one are not reused."""
CALIBRATION_IMAGES = 64
"""Images of the default calibration set (the authors use about 500 ImageNet images; a CPU wants fewer)."""
OUTLIER_RATIO = 5.0
"""A token is an outlier where its residual norm exceeds this many times the median token norm."""


@dataclass(frozen=True)
class RegisterNeurons:
    """The register neurons of one model, found on a calibration set.

    Attributes
    ----------
    units : tuple of (block, unit) pairs
        The register neurons, the strongest first; ``unit`` indexes the MLP's hidden units (what ``fc2`` reads).
    scores : tuple of float
        Each unit's mean ``|activation|`` at the outlier tokens.
    outlier_block : int
        The block whose output norms mark the outliers.
    outlier_threshold : float
        The residual norm above which a token is an outlier.
    calibration_images : int
    outlier_tokens : int
        Outlier tokens found on the calibration images.
    """

    units: tuple[tuple[int, int], ...]
    scores: tuple[float, ...]
    outlier_block: int
    outlier_threshold: float
    calibration_images: int
    outlier_tokens: int

    def by_block(self) -> dict[int, list[int]]:
        """Block index -> the register units of its MLP."""
        blocks: dict[int, list[int]] = {}
        for block, unit in self.units:
            blocks.setdefault(block, []).append(unit)
        return blocks

    def describe(self) -> str:
        """One line: how many neurons, in which blocks, found from how many outliers."""
        if not self.units:
            return (f"no register neurons: no high-norm outlier tokens leaving block {self.outlier_block} on "
                    f"{self.calibration_images} calibration images")
        blocks = ", ".join(f"{block}: {len(units)}" for block, units in sorted(self.by_block().items()))
        return (f"{len(self.units)} register neuron(s) (block: count {blocks}) from {self.outlier_tokens} outlier "
                f"tokens on {self.calibration_images} calibration images")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict) -> "RegisterNeurons":
        return cls(**{**fields, "units": tuple(tuple(unit) for unit in fields["units"]),
                      "scores": tuple(fields["scores"])})


# --------------------------------------------------------------------------------------------------
# The MLP's hidden units, for both kinds of timm MLP


def neuron_activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden units, what its output projection reads (before dropout and norm): ``(B, T, C) -> (B, T, hidden)``.

    ``Mlp``: ``act(fc1(x))``. ``GluMlp``: ``act(gate) * value`` from the two halves of ``fc1`` (SwiGLU with
    SiLU; ``gate_last`` says which half gates). ``SwiGLU``: ``act(fc1_g(x)) * fc1_x(x)``.
    """
    if isinstance(mlp, GluMlp):
        first, second = mlp.fc1(x).chunk(2, dim=-1)
        return first * mlp.act(second) if mlp.gate_last else mlp.act(first) * second
    if isinstance(mlp, SwiGLU):
        return mlp.act(mlp.fc1_g(x)) * mlp.fc1_x(x)
    if isinstance(mlp, Mlp):
        return mlp.act(mlp.fc1(x))
    raise TypeError(f"test-time registers need a timm Mlp, GluMlp or SwiGLU, got {type(mlp).__name__}")


def mlp_readout(mlp: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The rest of the MLP from its hidden units: ``(B, T, hidden) -> (B, T, C)``; ``mlp(x) == mlp_readout(mlp, neuron_activations(mlp, x))``."""
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))


def _attention_half(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's Block up to its MLP: ``x + ls1(attn(norm1(x)))`` (eval mode: no drop path)."""
    return x + block.ls1(block.attn(block.norm1(x)))


# --------------------------------------------------------------------------------------------------
# Step 1: finding the register neurons


def _outlier_norms(model: nn.Module, images: torch.Tensor, outlier_block: int) -> torch.Tensor:
    """Residual norm of every token leaving block ``outlier_block``, ``(B, T)`` float32."""
    return engine.block_input(model, images, outlier_block + 1).float().norm(dim=-1)


def _unit_scores(model: nn.Module, images: torch.Tensor, outliers: torch.Tensor, outlier_block: int) -> torch.Tensor:
    """Per image, each unit's mean ``|activation|`` at its outlier tokens: ``(B, blocks, hidden)``.

    Blocks with fewer units (a planted neuron makes one block wider) are padded with scores of 0.
    """
    blocks = model.blocks[: outlier_block + 1]
    width = max(block.mlp.fc2.in_features for block in blocks)
    x = engine.block_input(model, images, 0)
    counts = outliers.sum(1).clamp(min=1)[:, None].float()  # B, 1
    weights = outliers[..., None].to(x.dtype)  # B, T, 1
    scores = []
    for block in blocks:
        x = _attention_half(block, x)
        hidden = neuron_activations(block.mlp, block.norm2(x))
        per_unit = (hidden.abs() * weights).sum(1).float() / counts  # B, hidden
        scores.append(F.pad(per_unit, (0, width - per_unit.shape[1])))
        x = x + block.ls2(mlp_readout(block.mlp, hidden))
    return torch.stack(scores, dim=1)


@torch.inference_mode()
def find_register_neurons(
    model: nn.Module, batches: Iterable[torch.Tensor], top_k: int = 50, min_score_fraction: float = 0.1,
    outlier_block: int | None = None, outlier_ratio: float = OUTLIER_RATIO,
) -> RegisterNeurons:
    """Find a model's register neurons on calibration images (Jiang et al. 2025, with a relative cut).

    Parameters
    ----------
    model : timm VisionTransformer in eval mode
    batches : iterable of Tensor of shape (B, 3, H, W)
        Preprocessed calibration images; iterated twice (outliers first, then the units' scores).
    top_k : int
        Most register neurons kept.
    min_score_fraction : float in (0, 1]
        Units scoring below this fraction of the best unit are not kept.
    outlier_block : int, optional
        The block whose output norms mark the outliers; default the second-to-last.
    outlier_ratio : float
        A token is an outlier where its norm there exceeds this many times the median non-CLS token norm.

    Returns
    -------
    RegisterNeurons
    """
    engine.check_model(model)
    depth = len(model.blocks)
    outlier_block = depth - 2 if outlier_block is None else outlier_block
    if not 0 <= outlier_block < depth:
        raise ValueError(f"outlier_block must index a block (0 to {depth - 1}), got {outlier_block}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not outlier_ratio > 1:
        raise ValueError(f"outlier_ratio must be above 1, got {outlier_ratio!r}")
    if not 0 < min_score_fraction <= 1:
        raise ValueError(f"min_score_fraction must lie in (0, 1], got {min_score_fraction!r}")
    batches = list(batches)
    norms = torch.cat([_outlier_norms(model, images, outlier_block) for images in batches])
    threshold = outlier_ratio * float(norms[:, 1:].median())
    outliers = norms > threshold
    outliers[:, 0] = False  # the CLS token is never an outlier patch
    if not outliers.any():
        return RegisterNeurons((), (), outlier_block, threshold, len(norms), 0)
    totals, images_with_outliers, start = None, 0, 0
    for images in batches:
        rows = outliers[start : start + len(images)]
        start += len(images)
        if not rows.any():
            continue
        per_image = _unit_scores(model, images, rows, outlier_block)[rows.any(1)]
        totals = per_image.sum(0) if totals is None else totals + per_image.sum(0)
        images_with_outliers += len(per_image)
    scores = (totals / images_with_outliers).flatten()  # blocks * hidden
    best = scores.topk(min(top_k, len(scores)))
    keep = best.values >= min_score_fraction * best.values[0]
    hidden = totals.shape[1]
    units = tuple((int(i) // hidden, int(i) % hidden) for i in best.indices[keep])
    return RegisterNeurons(units, tuple(float(v) for v in best.values[keep]), outlier_block, threshold, len(norms),
                           int(outliers.sum()))


def default_calibration_set() -> ImageDataset:
    """The calibration images used unless others are given: a seeded, class-balanced 64 of the embedded demo set.

    Embedded, so that a model's register neurons are the same on every machine, offline too; Fashion-MNIST's
    flat backgrounds are the redundant patches where outliers form (Darcet et al.).
    """
    return balanced_subset(open_source("demo"), CALIBRATION_IMAGES, seed=0)


def calibrated_register_neurons(
    backbone: Backbone, cache_dir: str | Path, calibration: ImageDataset | None = None, batch_size: int = 32,
    top_k: int = 50, min_score_fraction: float = 0.1,
) -> RegisterNeurons:
    """:func:`find_register_neurons` of ``backbone``, cached in ``<cache_dir>/registers/<key>.json``.

    The key covers the model, weights and preprocessing (``backbone.identity()``), the calibration set and
    the parameters, so a calibration runs once per model and weights.
    """
    calibration = calibration if calibration is not None else default_calibration_set()
    key = hashlib.sha256(json.dumps({
        "backbone": backbone.identity(), "calibration": calibration.fingerprint, "top_k": top_k,
        "min_score_fraction": min_score_fraction, "outlier_ratio": OUTLIER_RATIO, "version": REGISTERS_VERSION,
    }, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / "registers" / f"{key}.json"
    if path.is_file():
        try:
            return RegisterNeurons.from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: calibrate again
    batches = (images for _, images in preprocessed_batches(backbone, calibration, range(len(calibration)), batch_size))
    neurons = find_register_neurons(backbone.model, batches, top_k, min_score_fraction)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(neurons.to_json(), indent=1))
    return neurons


# --------------------------------------------------------------------------------------------------
# Step 2: the forward pass with a test-time register


def _block_with_register(block: nn.Module, x: torch.Tensor, units: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """One block whose register ``units`` fire on the extra (last) token only: ``(B, T+1, C) -> (B, T+1, C)``."""
    x = _attention_half(block, x)
    hidden = neuron_activations(block.mlp, block.norm2(x))
    peak = hidden[:, :, units].amax(dim=1)  # B, units: the largest activation over the image's tokens
    hidden[:, num_prefix_tokens:-1, units] = 0  # off on the patches
    hidden[:, -1, units] = peak  # on the test-time register
    return x + block.ls2(mlp_readout(block.mlp, hidden))


@torch.inference_mode()
def tokens_with_test_time_register(model: nn.Module, images: torch.Tensor, neurons: RegisterNeurons) -> torch.Tensor:
    """The final-norm output tokens with one test-time register, ``(B, T+1, C)``: the register is the last token.

    Without register neurons, the unmodified model's ``(B, T, C)`` (no extra token).
    """
    engine.check_model(model)
    if not neurons.units:
        return model.forward_features(images)
    x = engine.block_input(model, images, 0)
    prefix = model.num_prefix_tokens
    register = x[:, prefix:].mean(dim=1, keepdim=True)  # the mean of the patch tokens
    x = torch.cat([x, register], dim=1)
    by_block = {block: torch.tensor(units, device=x.device) for block, units in neurons.by_block().items()}
    for index, block in enumerate(model.blocks):
        x = _block_with_register(block, x, by_block[index], prefix) if index in by_block else block(x)
    return model.norm(x)


def features_with_test_time_register(model: nn.Module, images: torch.Tensor, neurons: RegisterNeurons) -> torch.Tensor:
    """The final-norm CLS output with a test-time register, ``(B, 3, H, W) -> (B, C)``, not L2-normalised."""
    return tokens_with_test_time_register(model, images, neurons)[:, 0]

