"""Inference-Time Attention Engineering on a timm VisionTransformer: the paper's Eq. 1-6 in code.

Token layout (timm): index 0 is CLS, then the register tokens (DINOv2 ``reg4``: 4), then the patches.
Everything here happens in the FINAL block; blocks ``0 .. L-2`` run untouched, with timm's fused
attention. Shapes: ``B`` images, ``T`` tokens, ``C`` width, ``H`` heads, ``d`` = head_dim.

The final block is split so that a new θ never re-runs the backbone: :func:`final_block_state` keeps
what the CLS output depends on (CLS residual input, the CLS row of the logits, the values) and
:func:`cls_output` turns that state and an artifact mask into the CLS feature. ``cls_features`` and
the extraction cache both go through these two functions, so a cached re-evaluation IS a forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from itae.choices import RULES

__all__ = [
    "RULES",
    "FinalBlockState",
    "query_norms",
    "cls_features",
    "check_model",
    "block_input",
    "final_block_input",
    "final_block_qkv",
    "query_norms_from_queries",
    "split_artifacts",
    "attenuate_logits",
    "final_block_state",
    "final_block_forward",
    "cls_output",
    "keep_unattenuated",
    "final_block_tokens",
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
    """

    cls_input: torch.Tensor
    cls_logits: torch.Tensor
    values: torch.Tensor
    query_norms: torch.Tensor


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


def query_norms_from_queries(q: torch.Tensor) -> torch.Tensor:
    """Eq. 4: ``n_i = sqrt(sum_h sum_c (q[h, i, c] / sqrt(d_p))^2)``; ``(B, H, T, d) -> (B, T)``, float32."""
    d_p = q.shape[-1]
    return (q.float() / d_p**0.5).square().sum(dim=(1, 3)).sqrt()


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


def attenuate_logits(logits: torch.Tensor, artifact_mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5 / Eq. 6: every artifact column of a logit row takes that row's minimum over the non-CLS columns.

    Parameters
    ----------
    logits : Tensor of shape (B, H, R, T)
        Pre-softmax rows: R = 1 for the CLS row (Eq. 6), R = T for all rows (Eq. 5).
    artifact_mask : Tensor of bool, shape (B, T)

    Returns
    -------
    Tensor of shape (B, H, R, T)
    """
    row_min = logits[..., 1:].amin(dim=-1, keepdim=True)  # min of the ORIGINAL row, CLS column excluded
    return torch.where(artifact_mask[:, None, None, :], row_min, logits)


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
        cls_input=x[:, 0], cls_logits=cls_logits[:, :, 0], values=v, query_norms=query_norms_from_queries(q)
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
    block: nn.Module, final_norm: nn.Module, state: FinalBlockState, artifact_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The final-norm CLS output with the artifacts' logits attenuated (Eq. 6), and its attention row.

    Returns
    -------
    features : Tensor of shape (B, C)
        Not L2-normalised.
    attention : Tensor of shape (B, H, T)
        The softmax CLS row actually used.
    """
    logits = attenuate_logits(state.cls_logits[:, :, None], artifact_mask)  # Eq. 6: B, H, 1, T
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


def final_block_tokens(
    block: nn.Module, x: torch.Tensor, artifact_mask: torch.Tensor | None = None, rows: str = "cls"
) -> torch.Tensor:
    """The final block's output for every token, ``(B, T, C)``, optionally with ITAE.

    Without a mask this is timm's block (fused or explicit attention, as ``block.attn.fused_attn`` says).
    ``rows="cls"`` (Eq. 6) computes every row as usual and overwrites row 0 with the attenuated CLS row;
    ``rows="all"`` (Eq. 5) attenuates the artifact columns of every row, explicitly. An image whose mask is
    empty gets timm's output unchanged (:func:`keep_unattenuated`).
    """
    if rows not in ("cls", "all"):
        raise ValueError(f"rows must be 'cls' or 'all', got {rows!r}")
    q, k, v = final_block_qkv(block, x)
    heads = _attend(block, q, k, v)  # B, H, T, d
    if artifact_mask is not None:
        scale = block.attn.scale
        if rows == "all":
            logits = attenuate_logits((q * scale) @ k.transpose(-2, -1), artifact_mask)  # Eq. 5: B, H, T, T
            attenuated = logits.softmax(dim=-1).to(v.dtype) @ v
        else:
            cls_logits = attenuate_logits((q[:, :, :1] * scale) @ k.transpose(-2, -1), artifact_mask)  # Eq. 6
            attenuated = torch.cat([cls_logits.softmax(dim=-1).to(v.dtype) @ v, heads[:, :, 1:]], dim=2)
        heads = keep_unattenuated(attenuated, heads, artifact_mask)
    return _block_output(block, x, heads)


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
    return query_norms_from_queries(q)


@torch.inference_mode()
def cls_features(
    model: nn.Module, images: torch.Tensor, theta: float | None = None, rule: str = "minority"
) -> torch.Tensor:
    """The final-norm CLS output, with ITAE at threshold ``theta`` (Eq. 2-6), not yet L2-normalised.

    Parameters
    ----------
    model : timm VisionTransformer in eval mode
    images : Tensor of shape (B, 3, H, W), preprocessed
    theta : float or None
        None gives the unmodified model; so does, image by image, a θ that selects no artifact.
    rule : {"minority", "below", "above"}

    Returns
    -------
    Tensor of shape (B, C)
    """
    block = check_model(model)
    _check_images(images)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if theta is None:
        return model.forward_features(images)[:, 0]
    tokens, state = final_block_forward(block, final_block_input(model, images))
    mask = split_artifacts(state.query_norms, float(theta), rule)
    features = cls_output(block, model.norm, state, mask)[0]
    return keep_unattenuated(features, model.norm(tokens)[:, 0], mask)
