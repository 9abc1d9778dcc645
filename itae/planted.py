"""Planted artifacts: a ViT whose artifact tokens are known, to see, teach and test ITAE offline.

scikit-learn's ``make_blobs`` gives clustering data whose truth is known; this module does the same for ViT
artifacts. :func:`plant_artifacts` adds one *register neuron* to the MLP of a middle block of a real
pretrained timm ViT. On every image the neuron fires on a few redundant (flat) patches and writes a large
vector into their residual stream; from that block on these tokens behave as the artifacts of the
literature, and every tool downstream meets them as it would meet real ones. Which tokens fired is the
ground truth (:func:`planted_mask`). Everything here is synthetic and every output says so.

What is reproduced, and from where
----------------------------------
- **Where artifacts sit** (Darcet et al. 2024, "Vision Transformers Need Registers"): in redundant,
  low-information patches, a few per image (about 2 % of the tokens). The neuron's input weights are the
  difference between the block's mean MLP input on flat images and on noise images: it responds to flat
  patches. Lateral inhibition keeps the patches it fires on isolated and few: the *candidates* are the
  patches whose response is positive and at least ``1 - MARGIN`` (half) of the image's largest; among
  them a fixed priority per position, drawn once from ``seed``, decides: a candidate fires where no
  candidate of its 3×3 neighbourhood has a higher priority, and only the ``per_image`` highest do. That
  competition stands in for the one training creates; real models do not say which of many identical
  background patches becomes an artifact either. The wide margin keeps the planted positions where they
  are under bf16 autocast: eight bf16 blocks move the responses by about 0.3 % of the image's largest
  (2 % for one patch in a hundred), enough to reorder near-equal flat patches (firing on the largest
  moved 12 % of the planted tokens of 300 Fashion-MNIST images) but seldom enough to carry a patch
  across half the largest response (bench/README.md, section 1c). The price: in images with a similar
  layout, such as Fashion-MNIST's, the planted tokens take the same few positions.
- **How they arise** (Jiang et al. 2025, "Vision Transformers Don't Need Trained Registers"): a sparse set
  of MLP "register neurons" in the middle layers (layers 12-17 of DINOv2-L's 24) creates them. The planted
  neuron sits in the block at two thirds of the depth (the 8th of 12 blocks for ViT-S/14) and its
  activation is as large as theirs, so that their calibration finds it.
- **What they are** (Sun et al. 2024, "Massive Activations in Large Language Models", ViTs included): a
  huge, input-independent activation that turns the token into an attention sink, a fixed bias. The
  neuron writes ``magnitude`` times one fixed unit vector; after LayerNorm every planted token looks the
  same to the later blocks, so its query, key and value are the same constant in every image.
- **What ITAE sees** (the paper's Fig. 2, 3, 5; Darcet et al.): norms about 10x the others' in the
  residual stream, a large share of the CLS attention in the final block, and, for DINOv2, query norms
  BELOW the normal tokens'. ``magnitude`` is 10 times the median norm of the normal tokens leaving the
  final block; the direction is chosen so that the planted tokens' final-block query norm is half the 1st
  percentile of the normal tokens' and they take half of the CLS attention (averaged over heads and
  calibration images). Half: well above the 30 % the checks ask for, and far from a total capture that
  would leave the CLS nothing from the other patches.

What is not reproduced: real artifacts hold global information about the image (Darcet et al.); planted
tokens hold a constant. All constants are calibrated on synthetic images drawn from ``seed`` (flat colours,
noise, shapes on plain backgrounds), never on the data a user evaluates, and the planting was not tuned to
any clustering result. One constant was chosen on real images: ``MARGIN``, for the stability of the planted
positions under bf16 on demo Fashion-MNIST images and photos (bench/README.md, section 1c).
"""
from __future__ import annotations

import dataclasses
import math
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.layers import GluMlp, Mlp
from torch import nn

from itae import engine
from itae.fileio import atomic_path

__all__ = [
    "PLANTING_VERSION",
    "Planting",
    "DetectionScores",
    "RegisterNeuron",
    "detection_scores",
    "fired_tokens",
    "plant_artifacts",
    "planted_mask",
    "planting_of",
]

PLANTING_VERSION = 2
"""Changes whenever the mechanism does, so that features cached from an older planting are not reused.

1: the neuron fired on the largest responses (local maxima); 2: on candidates within ``MARGIN``, by priority.
"""
DEPTH = 2 / 3
"""Where the register neuron sits, as a fraction of the blocks (Jiang et al.: the middle layers)."""
ARTIFACT_SHARE = 0.02
"""Planted tokens per image as a share of the patches, at most (Darcet et al.: about 2 %)."""
NORM_RATIO = 10.0
"""Residual norm of a planted token over the median normal token's, leaving the final block (Darcet et al.)."""
CLS_ATTENTION = 0.5
"""Share of the final block's CLS attention the planted tokens take on the calibration images."""
MARGIN = 0.5
"""Patches whose response is within this fraction of the image's largest compete on priority, not response.

Half: the planted masks under bf16 autocast and float32 agreed on 99.83-99.90 % of the tokens with margins of
0.1 to 0.3 and on 99.94-99.97 % with 0.4 to 0.6 (the demo's Fashion-MNIST images: the 300 of bench_fidelity.py
and the 700 others); 0.8 and 1 put fewer of the planted tokens on flat patches (45-51 %, against 62 %).
"""
QUERY_NORM_SCALE = 0.5
"""Planted final-block query norm, as a fraction of the normal tokens' 1st percentile: apart, on the low side."""
CALIBRATION_IMAGES = 16
OPTIMISER_STEPS = 300


@dataclass(frozen=True)
class Planting:
    """The register neuron planted into a model, and what it was calibrated to.

    Attributes
    ----------
    seed : seeds the calibration images, the direction's starting point and the patches' priority
    block : index of the block whose MLP holds the neuron
    per_image : most planted tokens per image
    magnitude : the neuron's activation where it fires; it writes ``magnitude`` times a unit vector
    calibration_query_norm : the planted tokens' final-block query norm (Eq. 4) on the calibration images
    calibration_cls_attention : their share of the final block's CLS attention there
    """

    seed: int
    block: int
    per_image: int
    magnitude: float
    calibration_query_norm: float
    calibration_cls_attention: float

    def identity(self) -> dict:
        """What makes features of this planting differ from another's: part of the feature-cache key."""
        return {"version": PLANTING_VERSION, "seed": self.seed, "block": self.block, "per_image": self.per_image}


@dataclass(frozen=True)
class DetectionScores:
    """An artifact mask scored against the planted one, pooled over all tokens of a dataset.

    Attributes
    ----------
    precision : detected tokens that are planted, over detected tokens (NaN when none is detected)
    recall : planted tokens that are detected, over planted tokens (NaN when none is planted)
    jaccard : intersection over union of the two masks (NaN when both are empty)
    detected, planted, both : token counts
    """

    precision: float
    recall: float
    jaccard: float
    detected: int
    planted: int
    both: int

    def to_dict(self) -> dict:
        """JSON-ready: the fields by name, an undefined score (NaN) as None."""
        return {name: None if isinstance(value, float) and math.isnan(value) else value
                for name, value in dataclasses.asdict(self).items()}


def detection_scores(detected, planted) -> DetectionScores:
    """Score a detected artifact mask against the planted mask.

    Parameters
    ----------
    detected : array-like of bool, shape (n_images, n_tokens)
    planted : array-like of bool, shape (n_images, n_tokens)

    Returns
    -------
    DetectionScores
    """
    detected, planted = np.asarray(detected, dtype=bool), np.asarray(planted, dtype=bool)
    if detected.shape != planted.shape:
        raise ValueError(f"the masks must have the same shape, got {detected.shape} and {planted.shape}")
    both = int((detected & planted).sum())
    n_detected, n_planted = int(detected.sum()), int(planted.sum())
    union = n_detected + n_planted - both
    return DetectionScores(
        precision=both / n_detected if n_detected else math.nan,
        recall=both / n_planted if n_planted else math.nan,
        jaccard=both / union if union else math.nan,
        detected=n_detected,
        planted=n_planted,
        both=both,
    )


class RegisterNeuron(nn.Module):
    """A block's MLP activation with one planted register neuron as its last hidden unit.

    The first ``hidden`` units go through the block's own activation, unchanged. The last unit is the
    register neuron: ``magnitude`` on the tokens :func:`lateral_inhibition` lets fire (``priority``: one
    value per patch), 0 elsewhere. The tokens of the latest forward pass in this thread are kept for
    :func:`fired_tokens`.
    """

    def __init__(self, activation: nn.Module, hidden: int, num_prefix_tokens: int, grid_size: tuple[int, int],
                 per_image: int, magnitude: float, priority: torch.Tensor):
        super().__init__()
        self.activation, self.hidden = activation, hidden
        self.num_prefix_tokens, self.grid_size = num_prefix_tokens, tuple(grid_size)
        self.per_image, self.magnitude = per_image, magnitude
        # A buffer, so that it follows the model to its device; not in the state dict: the seed makes it.
        self.register_buffer("priority", priority, persistent=False)
        # One model serves several dashboard sessions at once: each thread keeps its own last mask.
        self._latest = threading.local()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, T, hidden + 1
        fired = lateral_inhibition(x[..., self.hidden], self.num_prefix_tokens, self.grid_size, self.per_image,
                                   self.priority)
        self._latest.fired = fired
        neuron = (fired * self.magnitude).to(x.dtype)[..., None]
        return torch.cat([self.activation(x[..., : self.hidden]), neuron], dim=-1)

    def latest(self) -> torch.Tensor | None:
        """The tokens the neuron fired on in this thread's latest forward pass, bool (B, T)."""
        return getattr(self._latest, "fired", None)


def lateral_inhibition(response: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int],
                       per_image: int, priority: torch.Tensor) -> torch.Tensor:
    """Which patches fire: the candidates of highest priority, no two neighbours, at most ``per_image``.

    A patch is a candidate where its response is positive and at least ``1 - MARGIN`` of the image's
    largest response. Among candidates the response no longer counts, only ``priority``: a candidate fires
    where it has the highest priority of the candidates in its 3×3 neighbourhood and is among the image's
    ``per_image`` highest such. Rounding that moves the responses by less than the margin (bf16 autocast:
    about 0.3 % of the largest) changes which patches fire only where it carries one across the margin.

    Parameters
    ----------
    response : Tensor of shape (B, T), the neuron's pre-activation; CLS and registers first
    num_prefix_tokens, grid_size : the token layout
    per_image : most tokens that fire in one image
    priority : Tensor of shape (grid_size[0] * grid_size[1],), one distinct value per patch, row by row;
        the same for every image

    Returns
    -------
    Tensor of bool, shape (B, T); CLS, registers and tokens appended after the patch grid (test-time
    registers, :mod:`itae.registers`) never fire.
    """
    B, T = response.shape
    n_patches = grid_size[0] * grid_size[1]
    patches = response[:, num_prefix_tokens : num_prefix_tokens + n_patches].float()  # B, n_patches
    largest = patches.amax(dim=1, keepdim=True)
    candidate = (patches > 0) & (patches >= (1 - MARGIN) * largest)
    rank = torch.where(candidate, priority.float(), -torch.inf).reshape(B, 1, *grid_size)
    isolated = (rank >= F.max_pool2d(rank, 3, stride=1, padding=1)).flatten(1)
    score = torch.where(candidate & isolated, rank.flatten(1), -torch.inf)
    top = score.topk(min(per_image, n_patches), dim=1)
    fired = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top.indices, torch.isfinite(top.values))
    return F.pad(fired, (num_prefix_tokens, T - num_prefix_tokens - n_patches), value=False)


def planting_of(model: nn.Module) -> Planting | None:
    """The planting of ``model``, or None for an unmodified model."""
    return getattr(model, "itae_planting", None)


def _neuron(model: nn.Module) -> RegisterNeuron:
    planting = planting_of(model)
    if planting is None:
        raise ValueError("this model has no planted artifacts: plant them with plant_artifacts() "
                         "(or load_backbone(..., planted=True))")
    return model.blocks[planting.block].mlp.act


def fired_tokens(model: nn.Module) -> torch.Tensor | None:
    """The planted tokens of this thread's latest forward pass through ``model``, or None if it has no planting."""
    return _neuron(model).latest() if planting_of(model) is not None else None


@torch.inference_mode()
def planted_mask(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ground truth: which tokens of each image carry a planted artifact.

    Parameters
    ----------
    model : timm VisionTransformer with a planting
    images : Tensor of shape (B, 3, H, W), preprocessed

    Returns
    -------
    Tensor of bool, shape (B, T), the token layout of ``itae.query_norms``; CLS and registers are False.
    """
    neuron = _neuron(model)
    engine.block_input(model, images, planting_of(model).block + 1)
    return neuron.latest()


def _calibration_images(seed: int, count: int, size: int = 224) -> dict[str, list[Image.Image]]:
    """Synthetic images drawn from ``seed``: flat colours, uniform noise, and shapes on plain backgrounds."""
    rng = np.random.default_rng(seed)

    def colour() -> tuple[int, int, int]:
        return tuple(int(c) for c in rng.integers(0, 256, 3))

    scenes = []
    for index in range(count):
        image = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.integers(0, size * 3 // 4, 2)
            w, h = rng.integers(size // 6, size // 2, 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([int(x), int(y), int(x + w), int(y + h)], fill=colour())
        pixels = np.asarray(image, dtype=np.float32)
        if index % 2:  # half of them textured, so that not every background is flat
            pixels = pixels + rng.normal(0, 25, pixels.shape)
        scenes.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return {
        "flat": [Image.new("RGB", (size, size), colour()) for _ in range(count // 2)],
        "noise": [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count // 2)],
        "scenes": scenes,
    }


def _mlp_input(model: nn.Module, images: torch.Tensor, index: int) -> torch.Tensor:
    """What block ``index``'s MLP reads: ``norm2(x + ls1(attn(norm1(x))))``, (B, T, C)."""
    block = model.blocks[index]
    x = engine.block_input(model, images, index)
    return block.norm2(x + block.ls1(block.attn(block.norm1(x))))


def _readout(model: nn.Module, batches: dict[str, torch.Tensor], index: int) -> tuple[torch.Tensor, float]:
    """The neuron's input weights and bias: flat-minus-noise mean MLP input, zero half-way between the two.

    A linear discriminant fitted on patches labelled flat or not inside the calibration scenes was tried
    too: on the demo weights it fired on no patch at all in a third of the Fashion-MNIST images, and on
    fewer flat patches than this plain difference of means.
    """
    prefix = model.num_prefix_tokens
    flat = _mlp_input(model, batches["flat"], index)[:, prefix:].flatten(0, 1).mean(0)
    noise = _mlp_input(model, batches["noise"], index)[:, prefix:].flatten(0, 1).mean(0)
    weight = flat - noise
    return weight, -float((flat + noise) @ weight) / 2


def _direction(block: nn.Module, cls_queries: torch.Tensor, log_partition: torch.Tensor, per_image: int,
               query_norm: float, start: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """The unit vector the neuron writes, chosen in the final block's terms.

    A planted token's residual is dominated by ``magnitude`` times the direction, so the final block's
    ``norm1`` sees the direction standardised, whatever the image. Adam finds a direction whose query norm
    (Eq. 4) is at most ``query_norm`` and whose key takes ``CLS_ATTENTION`` of the CLS attention when
    ``per_image`` such tokens join the normal ones (``log_partition``: the log-sum-exp of the normal CLS
    logits, (B, H); ``cls_queries``: (B, H, d)), starting from ``start`` (C,).

    Returns (direction (C,), its query norm, its CLS attention share).
    """
    attn, norm = block.attn, block.norm1
    raw = start.clone().requires_grad_()
    optimiser = torch.optim.Adam([raw], lr=0.05)

    def evaluate(raw):
        standardised = (raw - raw.mean()) / raw.std(unbiased=False)
        q, k, _ = attn.qkv(norm.weight * standardised + norm.bias).reshape(3, attn.num_heads, attn.head_dim)
        q, k = attn.q_norm(q), attn.k_norm(k)
        norm_q = engine.qkv_norms(q[None, :, None])[0, 0]
        logit = (cls_queries * k).sum(-1) * attn.scale + math.log(per_image)  # B, H: all planted tokens at once
        share = torch.sigmoid(logit - log_partition).mean()
        return norm_q, share

    with torch.enable_grad():
        for _ in range(OPTIMISER_STEPS):
            norm_q, share = evaluate(raw)
            loss = 100 * (share - CLS_ATTENTION) ** 2 + 10 * F.relu(norm_q - query_norm) ** 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    direction = (raw - raw.mean()).detach()
    norm_q, share = evaluate(direction)
    return direction / direction.norm(), float(norm_q), float(share)


def _fc2_column(block: nn.Module, write: torch.Tensor) -> torch.Tensor:
    """The fc2 column that makes the block add ``write`` to the residual: the block scales by LayerScale."""
    gamma = getattr(block.ls2, "gamma", None)
    return write / gamma if gamma is not None else write


def _rewrite(model: nn.Module, index: int, write: torch.Tensor) -> None:
    """Point the installed neuron of block ``index`` at a new direction."""
    block = model.blocks[index]
    block.mlp.fc2.weight[:, -1] = _fc2_column(block, write)


def _install(model: nn.Module, neuron: _Neuron) -> None:
    """Append the neuron to its block's MLP: a row of fc1, a column of fc2, the activation wrapped."""
    block = model.blocks[neuron.block]
    mlp = block.mlp
    weight, bias = neuron.weight, neuron.bias
    column = _fc2_column(block, neuron.write)
    fc1, fc2 = mlp.fc1, mlp.fc2
    if isinstance(mlp, GluMlp) and not mlp.gate_last:
        # act(gate) * value: the neuron is the last gate unit, its value unit a constant 1.
        gate_w, value_w = fc1.weight.chunk(2)
        gate_b, value_b = fc1.bias.chunk(2)
        new_weight = torch.cat([gate_w, weight[None], value_w, torch.zeros_like(weight)[None]])
        new_bias = torch.cat([gate_b, gate_b.new_tensor([bias]), value_b, value_b.new_tensor([1.0])])
        hidden = gate_w.shape[0]
    elif type(mlp) is Mlp:
        new_weight = torch.cat([fc1.weight, weight[None]])
        new_bias = torch.cat([fc1.bias, fc1.bias.new_tensor([bias])])
        hidden = fc1.out_features
    else:
        raise TypeError(f"planting needs a timm Mlp or SwiGLU (GluMlp) MLP, got {type(mlp).__name__}")
    grown_fc1 = nn.Linear(fc1.in_features, new_weight.shape[0]).to(fc1.weight)
    grown_fc2 = nn.Linear(fc2.in_features + 1, fc2.out_features).to(fc2.weight)
    with torch.no_grad():
        grown_fc1.weight.copy_(new_weight)
        grown_fc1.bias.copy_(new_bias)
        grown_fc2.weight.copy_(torch.cat([fc2.weight, column[:, None]], dim=1))
        grown_fc2.bias.copy_(fc2.bias)
    mlp.fc1, mlp.fc2 = grown_fc1, grown_fc2
    mlp.act = RegisterNeuron(mlp.act, hidden, num_prefix_tokens=neuron.num_prefix_tokens, grid_size=neuron.grid_size,
                             per_image=neuron.per_image, magnitude=neuron.magnitude, priority=neuron.priority)


@torch.no_grad()  # not inference_mode: choosing the direction needs autograd on these tensors
def plant_artifacts(model: nn.Module, preprocess, seed: int = 0, cache_file: str | Path | None = None) -> Planting:
    """Plant a register neuron into ``model`` (in place) and return what was planted.

    Parameters
    ----------
    model : timm VisionTransformer in eval mode, unplanted
    preprocess : callable, PIL image -> Tensor (3, H, W), the model's own preprocessing
    seed : int
        Seeds the synthetic calibration images, the direction's starting point and the priority among
        candidate patches: the same model, weights and seed give the same planting.
    cache_file : path, optional
        Where the calibrated neuron of this model, weights and seed is kept: calibrating takes seconds
        to tens of seconds on a CPU, reading it back a millisecond. The caller names the file after what
        it depends on (:func:`itae.backbones.load_backbone` does).

    Returns
    -------
    Planting
    """
    engine.check_model(model)
    if planting_of(model) is not None:
        raise ValueError("this model already has planted artifacts")
    device = next(model.parameters()).device
    neuron = _read_neuron(cache_file, device) if cache_file else None
    if neuron is None:
        neuron = _calibrate(model, preprocess, seed)
        if cache_file:
            _write_neuron(neuron, cache_file)
    else:
        _install(model, neuron)
    planting = Planting(seed, neuron.block, neuron.per_image, neuron.magnitude, neuron.query_norm, neuron.cls_attention)
    model.itae_planting = planting
    return planting


@dataclass(frozen=True)
class _Neuron:
    """A calibrated register neuron: what :func:`_install` needs, and what it was calibrated to."""

    block: int
    weight: torch.Tensor  # (C,) fc1 row: the readout of low-information patches
    bias: float
    write: torch.Tensor  # (C,) unit vector it writes into the residual stream
    magnitude: float
    per_image: int
    priority: torch.Tensor  # (n_patches,) which candidate patch fires first (lateral_inhibition)
    num_prefix_tokens: int
    grid_size: tuple[int, int]
    query_norm: float
    cls_attention: float


_NEURON_FIELDS = tuple(field.name for field in dataclasses.fields(_Neuron))


def _calibrate(model: nn.Module, preprocess, seed: int) -> _Neuron:
    """Find the neuron on synthetic calibration images and install it in ``model``."""
    final = model.blocks[-1]
    device = next(model.parameters()).device
    batches = {name: torch.stack([preprocess(image) for image in images]).to(device)
               for name, images in _calibration_images(seed, CALIBRATION_IMAGES).items()}
    prefix, grid = model.num_prefix_tokens, tuple(model.patch_embed.grid_size)
    index = round(DEPTH * len(model.blocks)) - 1
    per_image = max(1, round(ARTIFACT_SHARE * grid[0] * grid[1]))
    # Which candidate patch fires first: drawn once, the same in every image (lateral_inhibition).
    priority = torch.randperm(grid[0] * grid[1], generator=torch.Generator().manual_seed(seed)).to(device)

    weight, bias = _readout(model, batches, index)
    x = engine.final_block_input(model, batches["scenes"])
    tokens, state = engine.final_block_forward(final, x)
    magnitude = NORM_RATIO * float(tokens[:, prefix:].norm(dim=-1).median())
    query_norm = QUERY_NORM_SCALE * float(torch.quantile(state.query_norms[:, prefix:].flatten().float(), 0.01))
    start = torch.randn(model.embed_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    cls_queries = engine.final_block_qkv(final, x)[0][:, :, 0]
    write, _, _ = _direction(final, cls_queries, state.cls_logits.logsumexp(dim=-1), per_image, query_norm, start)
    first = _Neuron(index, weight, bias, write, magnitude, per_image, priority, prefix, grid, math.nan, math.nan)
    _install(model, first)

    # The planted tokens change what the CLS asks for in the final block: choose the direction again,
    # against the planted model's CLS queries and among its normal tokens.
    x = engine.final_block_input(model, batches["scenes"])
    fired = model.blocks[index].mlp.act.latest()
    normal_logits = engine.final_block_state(final, x).cls_logits.masked_fill(fired[:, None], -torch.inf)
    cls_queries = engine.final_block_qkv(final, x)[0][:, :, 0]
    write, norm_q, share = _direction(final, cls_queries, normal_logits.logsumexp(dim=-1), per_image, query_norm, write)
    _rewrite(model, index, write)
    return dataclasses.replace(first, write=write, query_norm=norm_q, cls_attention=share)


def _write_neuron(neuron: _Neuron, cache_file: str | Path) -> None:
    fields = {name: getattr(neuron, name) for name in _NEURON_FIELDS}
    fields = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in fields.items()}
    with atomic_path(cache_file) as part:
        torch.save({"version": PLANTING_VERSION, **fields}, part)


def _read_neuron(cache_file: str | Path, device: torch.device) -> _Neuron | None:
    """The neuron kept in ``cache_file``, or None where there is none of this planting version (or it is unreadable)."""
    try:
        saved = torch.load(cache_file, map_location=device, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    if not isinstance(saved, dict) or saved.get("version") != PLANTING_VERSION or set(_NEURON_FIELDS) - set(saved):
        return None
    fields = {name: saved[name] for name in _NEURON_FIELDS}
    fields["grid_size"] = tuple(fields["grid_size"])
    return _Neuron(**fields)
