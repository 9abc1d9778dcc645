"""Inference-Time Attention Engineering on a timm VisionTransformer: the paper's Eq. 1-6 in code.

Token layout (timm): index 0 is CLS, then the register tokens (DINOv2 ``reg4``: 4), then the patches.
Everything here happens in the FINAL block; blocks ``0 .. L-2`` run untouched, with timm's fused
attention. Shapes: ``B`` images, ``T`` tokens, ``C`` width, ``H`` heads, ``d`` = head_dim.

The final block is split so that a new θ never re-runs the backbone: :func:`final_block_state` keeps
what the CLS output depends on (CLS residual input, the CLS row of the logits, the values) and
:func:`cls_output` turns that state and an artifact mask into the CLS feature. ``cls_features`` and
the extraction cache both go through these two functions, so a cached re-evaluation IS a forward pass.

The paper's open design choices (Sec. 4.4) are parameters of the same functions, the paper's choice the
default: which norm finds the artifacts (``detector``: Eq. 4 on the queries, or on the keys or values, or
the output tokens' norm of Darcet et al.), what their logits become (:class:`Attenuation`: the row minimum
of Eq. 6, minus infinity, the row mean, or a scale factor), which rows (``rows``: Eq. 6 or Eq. 5) and where
(``blocks``: the final block, or each of the last k). The artifacts are always found in the final block of
the unmodified model, so that every variant reads the same norms and the same θ.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from itae.choices import ATTENUATIONS, DETECTORS, ROWS, RULES

__all__ = [
    "ATTENUATIONS",
    "DETECTORS",
    "PAPER_ATTENUATION",
    "ROWS",
    "RULES",
    "Attenuation",
    "FinalBlockState",
    "query_norms",
    "cls_features",
    "check_model",
    "block_input",
    "final_block_input",
    "final_block_qkv",
    "qkv_norms",
    "detector_norms",
    "split_artifacts",
    "attenuate_logits",
    "final_block_state",
    "final_block_forward",
    "cls_output",
    "keep_unattenuated",
    "block_tokens",
    "attenuated_cls_features",
]


@dataclass
class FinalBlockState:
    """What the final block's CLS output depends on, for a batch of images.

    Attributes
    ----------
    cls_input : Tensor of shape (B, C)
        The CLS token's residual stream entering the final block.
    cls_logits : Tensor of shape (B, H, T)
        The original (unattenuated) pre-softmax CLS row ``q_0 . k_j * scale`` of Eq. 1.
    values : Tensor of shape (B, H, T, d)
        The final block's value vectors.
    query_norms : Tensor of shape (B, T)
        Eq. 4 for every token, float32.
    key_norms : Tensor of shape (B, T) or None
        Eq. 4 on the keys, float32; None in a state rebuilt from an extraction cache, which keeps its
        key norms beside it (``Extraction.key_norms``).
    """

    cls_input: torch.Tensor
    cls_logits: torch.Tensor
    values: torch.Tensor
    query_norms: torch.Tensor
    key_norms: torch.Tensor | None = None


@dataclass(frozen=True)
class Attenuation:
    """What the pre-softmax logit ``l`` of an artifact becomes, in every attenuated row.

    Attributes
    ----------
    kind : {"min", "remove", "mean", "scale"}
        ``min``: the row's minimum over the non-CLS columns (Eq. 5-6, the paper). ``remove``: minus
        infinity, the artifact leaves the softmax. ``mean``: the row's mean over the non-CLS columns.
        ``scale``: ``l + log(factor)``, i.e. the artifact's unnormalised weight ``exp(l)`` times ``factor``
        before the softmax renormalises the row.
    factor : float
        The weight factor of ``scale``, > 0 (1 leaves the logit as it is); ignored by the other kinds.
    """

    kind: str = "min"
    factor: float = 0.1

    def __post_init__(self):
        if self.kind not in ATTENUATIONS:
            raise ValueError(f"attenuation kind must be one of {ATTENUATIONS}, got {self.kind!r}")
        if self.kind == "scale" and not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"the scale attenuation needs a finite factor > 0 (use kind='remove' for 0), "
                             f"got {self.factor!r}")


PAPER_ATTENUATION = Attenuation("min")
"""Eq. 6: an artifact's logit becomes the row minimum."""


def check_model(model: nn.Module) -> nn.Module:
    """Return the final block after checking the model is a timm ViT this engine understands."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed") or not hasattr(model, "norm"):
        raise TypeError(f"model must be a timm VisionTransformer, got {type(model).__name__}")
    block = blocks[-1]
    attn = getattr(block, "attn", None)
    if attn is None or not hasattr(attn, "qkv") or not all(hasattr(block, n) for n in ("norm1", "ls1", "norm2", "mlp", "ls2")):
        raise TypeError(
            f"the final block ({type(block).__name__}) is not a timm pre-norm Block with a fused-qkv Attention; "
            "ITAE supports DINOv2, CLIP, DeiT-III and other timm VisionTransformers built from timm's Block"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError("gated attention is not supported: Eq. 6 assumes plain softmax attention")
    if model.training:
        raise ValueError("model must be in eval mode (call model.eval()): dropout would make features random")
    return block


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape [B, 3, H, W], got {shape}")


def block_input(model: nn.Module, images: torch.Tensor, index: int) -> torch.Tensor:
    """Run the embeddings and blocks ``0 .. index-1`` unmodified (fused attention): ``(B, 3, H, W) -> (B, T, C)``."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    return model.blocks[:index](x)


def final_block_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the final block: the embeddings and blocks ``0 .. L-2``, ``(B, 3, H, W) -> (B, T, C)``."""
    return block_input(model, images, len(model.blocks) - 1)


def final_block_qkv(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final block's queries, keys and values, each ``(B, H, T, d)``, exactly as timm's Attention makes them."""
    attn = block.attn
    B, T, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def qkv_norms(patches: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``n_i = sqrt(sum_h sum_c (P[h, i, c] / sqrt(d_p))^2)``; ``(B, H, T, d) -> (B, T)``, float32.

    ``P`` is one of the QKV patches of a block: the paper uses the queries, and notes that the keys or the
    values would do too ("they differ only by a linear projection").
    """
    d_p = patches.shape[-1]
    return (patches.float() / d_p**0.5).square().sum(dim=(1, 3)).sqrt()


def detector_norms(detector: str, state: FinalBlockState, block_output: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token norm a detector splits at θ, ``(B, T)`` float32, CLS in column 0.

    Parameters
    ----------
    detector : {"query", "key", "value", "output"}
        ``query``: Eq. 4 on the final block's queries (the paper). ``key``, ``value``: Eq. 4 on its keys or
        values. ``output``: the L2 norm of the final block's output tokens in the residual stream, before
        the final norm: the high-norm criterion of Darcet et al. (2024). After the final LayerNorm those
        norms are evened out (on the planted teaching model the planted tokens' normed output norms sit
        inside the others' range, their residual norms 10x above it).
    state : FinalBlockState of the unmodified final block (with ``key_norms`` for ``"key"``)
    block_output : Tensor of shape (B, T, C)
        The unmodified final block's output tokens; needed by ``"output"`` only.
    """
    if detector == "query":
        return state.query_norms
    if detector == "key":
        if state.key_norms is None:
            raise ValueError("this FinalBlockState has no key norms: build it with final_block_state()")
        return state.key_norms
    if detector == "value":
        return qkv_norms(state.values)
    if detector == "output":
        if block_output is None:
            raise ValueError("the output detector needs the final block's output tokens (final_block_forward)")
        return block_output.float().norm(dim=-1)
    raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")


def split_artifacts(norms: torch.Tensor, theta: float, rule: str = "minority") -> torch.Tensor:
    """Eq. 2-3: the artifact mask ``A`` of each image from its query norms.

    ``L_a = {i : n_i <= θ}`` and ``L_b`` its complement, over the non-CLS tokens (registers included).
    ``minority`` (Eq. 3) takes the smaller group, ``L_a`` on a tie, so an empty group means no artifact;
    ``below`` takes ``L_a`` (the θ sweep of Sec. 5.2); ``above`` takes ``L_b``.

    Parameters
    ----------
    norms : Tensor of shape (B, T)
        Query norms with the CLS token in column 0.
    theta : float
    rule : {"minority", "below", "above"}

    Returns
    -------
    Tensor of bool, shape (B, T); column 0 (CLS) is always False.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    low = norms[:, 1:] <= theta  # L_a, Eq. 2
    if rule == "below":
        artifacts = low
    elif rule == "above":
        artifacts = ~low
    else:
        low_is_minority = low.sum(1, keepdim=True) <= (~low).sum(1, keepdim=True)  # Eq. 3, tie -> L_a
        artifacts = torch.where(low_is_minority, low, ~low)
    return F.pad(artifacts, (1, 0), value=False)


def attenuate_logits(
    logits: torch.Tensor, artifact_mask: torch.Tensor, attenuation: Attenuation = PAPER_ATTENUATION
) -> torch.Tensor:
    """Eq. 5 / Eq. 6: every artifact column of a logit row takes that row's minimum over the non-CLS columns.

    Other ``attenuation`` kinds put another value there (see :class:`Attenuation`); every kind reads the
    ORIGINAL row, so the order of the artifacts does not matter.

    Parameters
    ----------
    logits : Tensor of shape (B, H, R, T)
        Pre-softmax rows: R = 1 for the CLS row (Eq. 6), R = T for all rows (Eq. 5).
    artifact_mask : Tensor of bool, shape (B, T)
    attenuation : Attenuation

    Returns
    -------
    Tensor of shape (B, H, R, T)
    """
    others = logits[..., 1:]  # the CLS column never counts: attending to itself is not an artifact
    if attenuation.kind == "min":
        target = others.amin(dim=-1, keepdim=True)  # Eq. 5 / 6
    elif attenuation.kind == "mean":
        target = others.mean(dim=-1, keepdim=True)
    elif attenuation.kind == "remove":
        target = torch.full_like(logits[..., :1], -torch.inf)  # the CLS column stays finite: no row is empty
    else:
        target = logits + math.log(attenuation.factor)
    return torch.where(artifact_mask[:, None, None, :], target, logits)


def _block_output(block: nn.Module, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The rest of timm's Block after attention: ``x (B, R, C)``, ``heads (B, H, R, d)`` -> ``(B, R, C)``."""
    attn = block.attn
    B, H, R, d = heads.shape
    out = attn.proj(attn.norm(heads.transpose(1, 2).reshape(B, R, H * d)))
    x = x + block.ls1(out)
    return x + block.ls2(block.mlp(block.norm2(x)))


def _state(block: nn.Module, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> FinalBlockState:
    cls_logits = (q[:, :, :1] * block.attn.scale) @ k.transpose(-2, -1)  # Eq. 1, row 0 only: B, H, 1, T
    return FinalBlockState(
        cls_input=x[:, 0], cls_logits=cls_logits[:, :, 0], values=v, query_norms=qkv_norms(q), key_norms=qkv_norms(k)
    )


def _attend(block: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmodified attention for all rows, ``(B, H, T, d)``: fused or explicit, as timm's one switch says."""
    if block.attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v)
    return ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def final_block_state(block: nn.Module, x: torch.Tensor) -> FinalBlockState:
    """Everything the CLS output of the final block needs, from the block's input ``x (B, T, C)``."""
    return _state(block, x, *final_block_qkv(block, x))


def final_block_forward(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, FinalBlockState]:
    """The unmodified final block's output tokens ``(B, T, C)`` and the ITAE state, from one qkv projection."""
    q, k, v = final_block_qkv(block, x)
    return _block_output(block, x, _attend(block, q, k, v)), _state(block, x, q, k, v)


def cls_output(
    block: nn.Module, final_norm: nn.Module, state: FinalBlockState, artifact_mask: torch.Tensor,
    attenuation: Attenuation = PAPER_ATTENUATION,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-norm CLS output with the artifacts' logits attenuated (Eq. 6), and its attention row.

    Eq. 5 gives the same CLS output in the final block: only row 0 of the logits reaches it.

    Returns
    -------
    features : Tensor of shape (B, C)
        Not L2-normalised.
    attention : Tensor of shape (B, H, T)
        The softmax CLS row actually used.
    """
    logits = attenuate_logits(state.cls_logits[:, :, None], artifact_mask, attenuation)  # Eq. 6: B, H, 1, T
    attention = logits.softmax(dim=-1)
    heads = attention.to(state.values.dtype) @ state.values  # B, H, 1, d
    out = _block_output(block, state.cls_input[:, None], heads)
    return final_norm(out)[:, 0], attention[:, :, 0]


def keep_unattenuated(itae: torch.Tensor, original: torch.Tensor, artifact_mask: torch.Tensor) -> torch.Tensor:
    """An image without artifacts keeps its original output, bit for bit.

    With an empty ``A`` Eq. 6 changes no logit, so ITAE is the unmodified model. The explicit CLS row and
    the fused kernel still round differently (about 1e-7, enough to move a UMAP), so the original output is
    taken rather than recomputed.

    Parameters
    ----------
    itae, original : Tensor of shape (B, ...)
        The same output with and without attenuation.
    artifact_mask : Tensor of bool, shape (B, T)

    Returns
    -------
    Tensor of shape (B, ...): ``itae`` for the images with at least one artifact, ``original`` for the others.
    """
    attenuated = artifact_mask.any(dim=1).view(-1, *([1] * (itae.ndim - 1)))
    return torch.where(attenuated, itae, original)


def block_tokens(
    block: nn.Module, x: torch.Tensor, artifact_mask: torch.Tensor | None = None, rows: str = "cls",
    attenuation: Attenuation = PAPER_ATTENUATION,
) -> torch.Tensor:
    """A block's output for every token, ``(B, T, C)``, optionally with ITAE: the final block or one of the last k.

    Without a mask this is timm's block (fused or explicit attention, as ``block.attn.fused_attn`` says).
    ``rows="cls"`` (Eq. 6) computes every row as usual and overwrites row 0 with the attenuated CLS row;
    ``rows="all"`` (Eq. 5) attenuates the artifact columns of every row, explicitly. An image whose mask is
    empty gets timm's output unchanged (:func:`keep_unattenuated`).
    """
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    q, k, v = final_block_qkv(block, x)
    heads = _attend(block, q, k, v)  # B, H, T, d
    if artifact_mask is not None:
        scale = block.attn.scale
        if rows == "all":
            logits = attenuate_logits((q * scale) @ k.transpose(-2, -1), artifact_mask, attenuation)  # Eq. 5
            attenuated = logits.softmax(dim=-1).to(v.dtype) @ v
        else:
            cls_logits = attenuate_logits((q[:, :, :1] * scale) @ k.transpose(-2, -1), artifact_mask, attenuation)  # Eq. 6
            attenuated = torch.cat([cls_logits.softmax(dim=-1).to(v.dtype) @ v, heads[:, :, 1:]], dim=2)
        heads = keep_unattenuated(attenuated, heads, artifact_mask)
    return _block_output(block, x, heads)


def attenuated_cls_features(
    model: nn.Module, images: torch.Tensor, artifact_mask: torch.Tensor, attenuation: Attenuation = PAPER_ATTENUATION,
    rows: str = "cls", blocks: int = 1,
) -> torch.Tensor:
    """The final-norm CLS output with the given artifacts attenuated in each of the last ``blocks`` blocks.

    ``blocks=1`` is the paper (the final block, from its state: Eq. 5 and Eq. 6 agree on the CLS output
    there); with more, blocks ``L-blocks .. L-1`` each attenuate the same token columns of ``rows``.

    Parameters
    ----------
    model : timm VisionTransformer in eval mode
    images : Tensor of shape (B, 3, H, W), preprocessed
    artifact_mask : Tensor of bool, shape (B, T)
    attenuation : Attenuation
    rows : {"cls", "all"}
    blocks : int, 1 <= blocks <= depth

    Returns
    -------
    Tensor of shape (B, C), not L2-normalised
    """
    block = check_model(model)
    _check_where(model, rows, blocks)
    first = len(model.blocks) - blocks
    x = block_input(model, images, first)
    if blocks == 1:
        tokens, state = final_block_forward(block, x)
        return _final_cls_output(block, model.norm, tokens, state, artifact_mask, attenuation)
    return _attenuated_blocks(model, x, artifact_mask, attenuation, rows, blocks)


def _final_cls_output(
    block: nn.Module, final_norm: nn.Module, tokens: torch.Tensor, state: FinalBlockState,
    artifact_mask: torch.Tensor, attenuation: Attenuation,
) -> torch.Tensor:
    """The attenuated CLS output ``(B, C)`` of the final block; timm's own for an image without artifacts."""
    features = cls_output(block, final_norm, state, artifact_mask, attenuation)[0]
    return keep_unattenuated(features, final_norm(tokens)[:, 0], artifact_mask)


def _attenuated_blocks(
    model: nn.Module, x: torch.Tensor, artifact_mask: torch.Tensor, attenuation: Attenuation, rows: str, blocks: int
) -> torch.Tensor:
    """From the input ``x (B, T, C)`` of block ``L - blocks`` to the final-norm CLS output ``(B, C)``.

    Each block keeps timm's output for an image without artifacts (:func:`block_tokens`), so such an image
    ends with the unmodified model's CLS output, bit for bit.
    """
    for block in model.blocks[len(model.blocks) - blocks :]:
        x = block_tokens(block, x, artifact_mask, rows, attenuation)
    return model.norm(x)[:, 0]


def _check_where(model: nn.Module, rows: str, blocks: int) -> None:
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    depth = len(model.blocks)
    if not isinstance(blocks, int) or not 1 <= blocks <= depth:
        raise ValueError(f"blocks must be an integer from 1 (the final block) to the depth {depth}, got {blocks!r}")


@torch.inference_mode()
def query_norms(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Eq. 4 for every token of the final block.

    Parameters
    ----------
    model : timm VisionTransformer in eval mode
    images : Tensor of shape (B, 3, H, W), preprocessed

    Returns
    -------
    Tensor of shape (B, T), float32: CLS at index 0, registers next, then patches.
    """
    block = check_model(model)
    _check_images(images)
    q, _, _ = final_block_qkv(block, final_block_input(model, images))
    return qkv_norms(q)


@torch.inference_mode()
def cls_features(
    model: nn.Module, images: torch.Tensor, theta: float | None = None, rule: str = "minority", *,
    detector: str = "query", attenuation: Attenuation = PAPER_ATTENUATION, rows: str = "cls", blocks: int = 1,
) -> torch.Tensor:
    """The final-norm CLS output, with ITAE at threshold ``theta`` (Eq. 2-6), not yet L2-normalised.

    The defaults are the paper: query norms (Eq. 4), the row minimum (Eq. 6), the CLS row, the final
    block. The artifacts are found in the final block of the unmodified model whatever ``blocks`` is.

    Parameters
    ----------
    model : timm VisionTransformer in eval mode
    images : Tensor of shape (B, 3, H, W), preprocessed
    theta : float or None
        None gives the unmodified model; so does, image by image, a θ that selects no artifact.
    rule : {"minority", "below", "above"}
    detector : {"query", "key", "value", "output"}
        See :func:`detector_norms`.
    attenuation : Attenuation
    rows : {"cls", "all"}
        Eq. 6 or Eq. 5; the same CLS output when ``blocks=1``.
    blocks : int
        Attenuate in each of the last ``blocks`` blocks (1: the final block only).

    Returns
    -------
    Tensor of shape (B, C)
    """
    block = check_model(model)
    _check_images(images)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if detector not in DETECTORS:
        raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
    _check_where(model, rows, blocks)
    if theta is None:
        return model.forward_features(images)[:, 0]
    x = block_input(model, images, len(model.blocks) - blocks)
    final_input = model.blocks[len(model.blocks) - blocks : -1](x)  # unmodified: where the artifacts are found
    tokens, state = final_block_forward(block, final_input)
    mask = split_artifacts(detector_norms(detector, state, tokens), float(theta), rule)
    if blocks == 1:
        return _final_cls_output(block, model.norm, tokens, state, mask, attenuation)
    return _attenuated_blocks(model, x, mask, attenuation, rows, blocks)
