"""The engine against an explicit, loop-by-loop computation of the paper's Eq. 2-6 written here."""
import math

import pytest
import timm
import torch

from itae import cls_features, query_norms
from itae.choices import DETECTORS, ROWS
from itae.engine import (
    PAPER_ATTENUATION,
    Attenuation,
    attenuate_logits,
    block_input,
    block_tokens,
    cls_output,
    detector_norms,
    final_block_forward,
    final_block_input,
    final_block_qkv,
    final_block_state,
    split_artifacts,
)


def tiny_vit(registers: int = 0, layer_scale: float | None = 0.5, seed: int = 0):
    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(
        img_size=28, patch_size=7, embed_dim=32, depth=3, num_heads=4, reg_tokens=registers,
        init_values=layer_scale, num_classes=0,
    )
    return model.eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def set_fused(model, fused: bool) -> None:
    for block in model.blocks:
        block.attn.fused_attn = fused


def explicit_qkv(block, x):
    """The final block's queries, keys and values, ``(B, T, C)`` each, heads side by side."""
    C = block.attn.num_heads * block.attn.head_dim
    qkv = block.norm1(x) @ block.attn.qkv.weight.T + block.attn.qkv.bias
    return qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]


def explicit_row_logits(block, q_row, k, h):
    """Pre-softmax logits of one query row in head ``h``, one key at a time: ``(T,)``."""
    d = block.attn.head_dim
    heads = slice(h * d, (h + 1) * d)
    return torch.stack([(q_row[heads] * d**-0.5) @ k[j, heads] for j in range(len(k))])


def explicit_attenuated_head(logits, values, artifacts):
    """Eq. 5 / 6 on one row of one head, then softmax and the weighted sum of the values, step by step.

    ``logits`` (T,), ``values`` (T, d); every artifact column takes the smallest logit of the original row
    over the columns 1..T-1: the CLS column (0) never counts.
    """
    minimum = min(float(logits[j]) for j in range(1, len(logits)))
    attenuated = torch.tensor([minimum if j in artifacts else float(logits[j]) for j in range(len(logits))])
    weights = torch.softmax(attenuated, dim=0)
    return sum(weights[j] * values[j] for j in range(len(logits)))


def explicit_block_output(block, x_row, head_outputs):
    """The rest of the block for one token: projection, LayerScale, residual, MLP; ``(C,)``."""
    attended = torch.cat(head_outputs) @ block.attn.proj.weight.T + block.attn.proj.bias
    out = x_row + block.ls1(attended)
    return out + block.ls2(block.mlp(block.norm2(out)))


def explicit_final_block(model, x, theta, rule):
    """Eq. 2-6 one image, one head, one token at a time: the reference the engine must match."""
    block = model.blocks[-1]
    heads, d = block.attn.num_heads, block.attn.head_dim
    q, k, v = explicit_qkv(block, x)
    B, T, C = q.shape
    norms = torch.zeros(B, T)
    features = []
    for b in range(B):
        for i in range(T):  # Eq. 4
            norms[b, i] = math.sqrt(sum(float(q[b, i, c] / math.sqrt(d)) ** 2 for c in range(C)))
        low = [i for i in range(1, T) if norms[b, i] <= theta]  # Eq. 2 (CLS excluded)
        high = [i for i in range(1, T) if norms[b, i] > theta]
        if rule == "below":
            artifacts = low
        elif rule == "above":
            artifacts = high
        else:  # Eq. 3: the minority, L_a on a tie
            artifacts = low if len(low) <= len(high) else high
        head_outputs = [  # Eq. 6: row 0 only
            explicit_attenuated_head(explicit_row_logits(block, q[b, 0], k[b], h), v[b, :, h * d:(h + 1) * d], artifacts)
            for h in range(heads)
        ]
        features.append(model.norm(explicit_block_output(block, x[b, 0], head_outputs)))
    return norms, torch.stack(features)


def explicit_all_rows(block, x, artifact_mask):
    """Eq. 5: every row of the final block attenuated, one image, row and head at a time; ``(B, T, C)``."""
    heads, d = block.attn.num_heads, block.attn.head_dim
    q, k, v = explicit_qkv(block, x)
    B, T, _ = q.shape
    tokens = torch.zeros_like(x)
    for b in range(B):
        artifacts = torch.nonzero(artifact_mask[b]).flatten().tolist()
        for i in range(T):
            head_outputs = [
                explicit_attenuated_head(explicit_row_logits(block, q[b, i], k[b], h), v[b, :, h * d:(h + 1) * d],
                                         artifacts)
                for h in range(heads)
            ]
            tokens[b, i] = explicit_block_output(block, x[b, i], head_outputs)
    return tokens


def cls_column_gap(logits):
    """How far the CLS column (0) lies below the other columns of each row: ``min_{j>=1} l_j - l_0``."""
    return logits[..., 1:].amin(dim=-1) - logits[..., 0]


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("fused", [True, False])
def test_no_artifact_reproduces_the_unmodified_model_bit_for_bit(registers, fused):
    model, batch = tiny_vit(registers), images()
    set_fused(model, fused)
    with torch.no_grad():
        plain = model.forward_features(batch)[:, 0]
        for theta, rule in [(-1.0, "below"), (1e9, "above"), (-1.0, "minority"), (1e9, "minority"), (None, "minority")]:
            assert torch.equal(cls_features(model, batch, theta, rule), plain), (theta, rule)
        x = final_block_input(model, batch)
        no_artifact = torch.zeros(x.shape[:2], dtype=torch.bool)
        for rows in ("cls", "all"):
            assert torch.equal(block_tokens(model.blocks[-1], x, no_artifact, rows), model.blocks[-1](x))


def test_only_the_images_with_artifacts_change():
    model, batch = tiny_vit(), images(4)
    with torch.no_grad():
        norms = query_norms(model, batch)
        theta = float(norms[0, 1:].min())  # rule "below": the lowest token of image 0, and of no other image
        assert (norms[1:, 1:] > theta).all()
        plain = model.forward_features(batch)[:, 0]
        itae = cls_features(model, batch, theta, "below")
    assert torch.equal(itae[1:], plain[1:])
    assert not torch.equal(itae[0], plain[0])


@pytest.mark.parametrize("registers,layer_scale", [(0, 0.5), (4, 0.5), (2, None)])
@pytest.mark.parametrize("rule", ["minority", "below", "above"])
def test_matches_the_explicit_final_block(registers, layer_scale, rule):
    model, batch = tiny_vit(registers, layer_scale), images()
    with torch.no_grad():
        x = final_block_input(model, batch)
        norms = query_norms(model, batch)
        for quantile in (0.1, 0.5, 0.8):
            theta = float(norms[:, 1:].quantile(quantile))
            ref_norms, ref_features = explicit_final_block(model, x, theta, rule)
            torch.testing.assert_close(norms, ref_norms, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(cls_features(model, batch, theta, rule), ref_features, atol=1e-4, rtol=1e-4)


def test_attenuation_changes_the_features():
    model, batch = tiny_vit(), images()
    theta = float(query_norms(model, batch)[:, 1:].median())
    assert (cls_features(model, batch, theta, "below") - cls_features(model, batch)).abs().max() > 1e-3


def test_split_rules_ties_and_empty_groups():
    # Column 0 is CLS and never an artifact, whatever its norm.
    norms = torch.tensor(
        [
            [0.0, 1.0, 5.0, 5.0, 5.0],  # L_a = {1}: the minority
            [9.0, 1.0, 1.0, 5.0, 5.0],  # tie 2-2: L_a wins
            [0.0, 5.0, 5.0, 5.0, 1.0],  # L_a = {4}
            [0.0, 5.0, 5.0, 5.0, 5.0],  # L_a empty: no artifacts
            [0.0, 1.0, 1.0, 1.0, 1.0],  # L_b empty: no artifacts
            [0.0, 1.0, 1.0, 1.0, 5.0],  # L_b = {4}: the minority is above θ
            [0.0, 5.0, 2.0, 5.0, 5.0],  # a norm equal to θ is in L_a (Eq. 2: n_i <= θ)
        ]
    )
    minority = split_artifacts(norms, 2.0, "minority")
    assert minority.tolist() == [
        [False, True, False, False, False],
        [False, True, True, False, False],
        [False, False, False, False, True],
        [False] * 5,
        [False] * 5,
        [False, False, False, False, True],
        [False, False, True, False, False],
    ]
    assert split_artifacts(norms, 2.0, "below")[:, 1:].tolist() == (norms[:, 1:] <= 2.0).tolist()
    assert split_artifacts(norms, 2.0, "above")[:, 1:].tolist() == (norms[:, 1:] > 2.0).tolist()
    assert not split_artifacts(norms, 100.0, "below")[:, 0].any()


def test_registers_can_be_artifacts():
    model, batch = tiny_vit(registers=4), images()
    norms = query_norms(model, batch)
    theta = float(norms[:, 1:5].max()) + 1e-4  # every register is in L_a
    mask = split_artifacts(norms, theta, "below")
    assert mask[:, 1:5].all()
    with torch.no_grad():
        _, reference = explicit_final_block(model, final_block_input(model, batch), theta, "below")
    torch.testing.assert_close(cls_features(model, batch, theta, "below"), reference, atol=1e-4, rtol=1e-4)


def test_attenuate_logits_uses_the_row_minimum_without_cls():
    logits = torch.tensor([[[[-9.0, 3.0, 1.0, 2.0]]]])  # CLS column is the smallest: it must not count
    mask = torch.tensor([[False, True, False, False]])
    assert attenuate_logits(logits, mask).tolist() == [[[[-9.0, 1.0, 1.0, 2.0]]]]


@pytest.mark.parametrize("fused", [True, False])
def test_all_rows_variant_matches_an_explicit_eq5(fused):
    model, batch = tiny_vit(registers=4), images()
    set_fused(model, fused)
    block = model.blocks[-1]
    with torch.no_grad():
        block.attn.qkv.weight.mul_(4)  # peaky attention, so that attenuation visibly moves every row
        x = final_block_input(model, batch)
        torch.testing.assert_close(block_tokens(block, x), block(x), atol=1e-5, rtol=0)
        norms = query_norms(model, batch)
        mask = split_artifacts(norms, float(norms[:, 1:].median()), "minority")
        assert mask.any(dim=1).all()
        q, k, _ = final_block_qkv(block, x)
        # The case a minimum over the whole row gets wrong: rows whose CLS column is their smallest logit.
        assert cls_column_gap((q * block.attn.scale) @ k.transpose(-2, -1)).max() > 0.1
        all_rows = block_tokens(block, x, mask, rows="all")
        torch.testing.assert_close(all_rows, explicit_all_rows(block, x, mask), atol=1e-5, rtol=1e-5)
        # Row 0 is the same under Eq. 5 and Eq. 6; the other rows change only under Eq. 5.
        cls_only = block_tokens(block, x, mask, rows="cls")
        torch.testing.assert_close(all_rows[:, 0], cls_only[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(cls_only[:, 1:], block(x)[:, 1:], atol=1e-5, rtol=0)
        theta = float(norms[:, 1:].median())
        features = model.norm(cls_only)[:, 0]
        torch.testing.assert_close(features, cls_features(model, batch, theta, "minority"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule", ["below", "minority"])
def test_eq6_ignores_a_cls_self_logit_that_is_the_row_minimum(rule):
    # The final-block state of real images, with the CLS row's own column made its smallest logit: the
    # artifacts must take the smallest of the OTHER columns (Eq. 6, 1 <= j <= N).
    model, batch = tiny_vit(registers=2), images(4)
    block = model.blocks[-1]
    with torch.no_grad():
        state = final_block_state(block, final_block_input(model, batch))
        state.cls_logits[:, :, 0] = state.cls_logits.amin(dim=-1) - 2.0
        assert (cls_column_gap(state.cls_logits) > 1.9).all()
        mask = split_artifacts(state.query_norms, float(state.query_norms[:, 1:].median()), rule)
        assert mask.any(dim=1).all()
        features, attention = cls_output(block, model.norm, state, mask)
        heads, d = block.attn.num_heads, block.attn.head_dim
        for b in range(len(batch)):
            artifacts = torch.nonzero(mask[b]).flatten().tolist()
            values = state.values[b].transpose(0, 1).reshape(-1, heads * d)  # T, C: heads side by side
            head_outputs = [
                explicit_attenuated_head(state.cls_logits[b, h], values[:, h * d:(h + 1) * d], artifacts)
                for h in range(heads)
            ]
            reference = model.norm(explicit_block_output(block, state.cls_input[b], head_outputs))
            torch.testing.assert_close(features[b], reference, atol=1e-5, rtol=1e-5)


def test_a_theta_equal_to_a_tokens_norm_attenuates_that_token():
    model, batch = tiny_vit(), images()
    with torch.no_grad():
        norms = query_norms(model, batch)
        lowest = norms[0, 1:].min()  # float32, as the engine compares
        theta = float(lowest)  # exactly the norm of image 0's lowest token
        just_below = float(torch.nextafter(lowest, torch.tensor(-math.inf)))  # the float32 just under it
        at, below = cls_features(model, batch, theta, "below"), cls_features(model, batch, just_below, "below")
    assert split_artifacts(norms, theta, "below")[0, 1:].sum() == 1
    assert not split_artifacts(norms, just_below, "below").any()
    assert (at[0] - below[0]).abs().max() > 1e-5  # the token at θ is in L_a: image 0 changes
    assert torch.equal(at[1:], below[1:])


def test_boundary_validation():
    model = tiny_vit()
    with pytest.raises(ValueError, match="rule must be one of"):
        cls_features(model, images(), 1.0, "middle")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        cls_features(model, torch.zeros(3, 28, 28))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        query_norms(torch.nn.Linear(2, 2), images())
    with pytest.raises(ValueError, match="eval mode"):
        cls_features(model.train(), images(), 1.0)


# ---------------------------------------------------------------------------------------------------
# The variants: detectors, attenuations, rows and blocks, against explicit step-by-step computations


def explicit_qkv(block, x):
    C = block.attn.num_heads * block.attn.head_dim
    qkv = block.norm1(x) @ block.attn.qkv.weight.T + block.attn.qkv.bias
    return qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]


def explicit_block(block, x, artifacts, rows, attenuation):
    """Every token of one block, one image, head and row at a time; ``artifacts[b]`` lists image b's artifact columns.

    ``rows`` says which rows are attenuated ("cls": row 0 only, Eq. 6; "all": every row, Eq. 5).
    """
    heads, d = block.attn.num_heads, block.attn.head_dim
    q, k, v = explicit_qkv(block, x)
    B, T, _ = x.shape
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(T):
            head_outputs = []
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                original = torch.stack([(q[b, i, sl] * d**-0.5) @ k[b, j, sl] for j in range(T)])
                logits = original.clone()
                if i == 0 or rows == "all":
                    for j in artifacts[b]:
                        if attenuation.kind == "min":
                            logits[j] = original[1:].min()
                        elif attenuation.kind == "mean":
                            logits[j] = original[1:].mean()
                        elif attenuation.kind == "remove":
                            logits[j] = -math.inf
                        else:
                            logits[j] = original[j] + math.log(attenuation.factor)
                weights = torch.softmax(logits, dim=0)
                head_outputs.append(sum(weights[j] * v[b, j, sl] for j in range(T)))
            attended = torch.cat(head_outputs) @ block.attn.proj.weight.T + block.attn.proj.bias
            token = x[b, i] + block.ls1(attended)
            out[b, i] = token + block.ls2(block.mlp(block.norm2(token)))
    return out


def explicit_norms(model, x, detector):
    """The norm each detector splits, token by token: Eq. 4 on q, k or v, or the final block's output norm."""
    block = model.blocks[-1]
    d = block.attn.head_dim
    q, k, v = explicit_qkv(block, x)
    if detector == "output":
        tokens = explicit_block(block, x, [[] for _ in range(len(x))], "cls", PAPER_ATTENUATION)
        return torch.stack([torch.stack([tokens[b, i].square().sum().sqrt() for i in range(x.shape[1])])
                            for b in range(len(x))])
    patches = {"query": q, "key": k, "value": v}[detector]
    B, T, C = patches.shape
    return torch.tensor([[math.sqrt(sum(float(patches[b, i, c] / math.sqrt(d)) ** 2 for c in range(C)))
                          for i in range(T)] for b in range(B)])


def explicit_variant(model, batch, theta, rule, detector, attenuation, rows, blocks):
    """The CLS feature of a variant: artifacts from the unmodified final block, attenuated in the last ``blocks``."""
    depth = len(model.blocks)
    norms = explicit_norms(model, final_block_input(model, batch), detector)
    artifacts = []
    for b in range(len(batch)):
        low = [i for i in range(1, norms.shape[1]) if norms[b, i] <= theta]  # Eq. 2
        high = [i for i in range(1, norms.shape[1]) if norms[b, i] > theta]
        artifacts.append({"below": low, "above": high}.get(rule, low if len(low) <= len(high) else high))  # Eq. 3
    x = block_input(model, batch, depth - blocks)
    for block in model.blocks[depth - blocks :]:
        x = explicit_block(block, x, artifacts, rows, attenuation)
    return model.norm(x)[:, 0], norms


ATTENUATION_KINDS = [Attenuation("min"), Attenuation("remove"), Attenuation("mean"), Attenuation("scale", 0.25)]


@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("detector", DETECTORS)
def test_detector_norms_match_the_explicit_norms(registers, detector):
    model, batch = tiny_vit(registers), images(2)
    with torch.no_grad():
        x = final_block_input(model, batch)
        tokens, state = final_block_forward(model.blocks[-1], x)
        torch.testing.assert_close(detector_norms(detector, state, tokens), explicit_norms(model, x, detector),
                                   atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("detector,attenuation,rows,blocks", [
    *[("query", attenuation, "cls", 1) for attenuation in ATTENUATION_KINDS],
    *[(detector, Attenuation("min"), "cls", 1) for detector in ("key", "value", "output")],
    ("query", Attenuation("min"), "all", 1),
    ("query", Attenuation("min"), "cls", 2),
    ("query", Attenuation("min"), "all", 2),
    ("key", Attenuation("mean"), "all", 3),
    ("output", Attenuation("remove"), "cls", 2),
])
def test_every_variant_matches_the_explicit_computation(detector, attenuation, rows, blocks):
    model, batch = tiny_vit(registers=2), images()
    with torch.no_grad():
        model.blocks[-1].attn.qkv.weight.mul_(3)  # peaky attention: every attenuation moves the features
        norms = explicit_norms(model, final_block_input(model, batch), detector)
        for quantile in (0.2, 0.6):
            theta = float(norms[:, 1:].quantile(quantile))
            reference, _ = explicit_variant(model, batch, theta, "minority", detector, attenuation, rows, blocks)
            features = cls_features(model, batch, theta, "minority", detector=detector, attenuation=attenuation,
                                    rows=rows, blocks=blocks)
            torch.testing.assert_close(features, reference, atol=1e-4, rtol=1e-4)
        assert (features - cls_features(model, batch)).abs().max() > 1e-3, "the variant changed nothing"


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("detector", DETECTORS)
@pytest.mark.parametrize("rows,blocks", [("cls", 1), ("all", 1), ("cls", 2), ("all", 3)])
def test_every_variant_selecting_nothing_reproduces_the_unmodified_model(fused, detector, rows, blocks):
    model, batch = tiny_vit(registers=2), images()
    set_fused(model, fused)
    plain = model.forward_features(batch)[:, 0]
    results = [cls_features(model, batch, -1.0, "below", detector=detector, attenuation=attenuation, rows=rows,
                            blocks=blocks) for attenuation in ATTENUATION_KINDS]
    for features in results:
        assert torch.equal(features, plain), "an image with nothing attenuated keeps its features bit for bit"


@pytest.mark.parametrize("attenuation", ATTENUATION_KINDS)
def test_attenuations_on_one_row(attenuation):
    logits = torch.tensor([[[[-9.0, 3.0, 1.0, 2.0]]]])  # the CLS column counts in no row statistic
    mask = torch.tensor([[False, True, False, False]])
    expected = {"min": 1.0, "mean": 2.0, "remove": -math.inf, "scale": 3.0 + math.log(0.25)}[attenuation.kind]
    torch.testing.assert_close(attenuate_logits(logits, mask, attenuation), torch.tensor([[[[-9.0, expected, 1.0, 2.0]]]]))


@pytest.mark.parametrize("fused", [True, False])
def test_an_empty_mask_leaves_every_block_bit_for_bit_unmodified(fused):
    model, batch = tiny_vit(registers=2), images()
    set_fused(model, fused)
    block = model.blocks[-1]
    with torch.no_grad():
        x = final_block_input(model, batch)
        empty = torch.zeros(x.shape[:2], dtype=torch.bool)
        for rows in ROWS:
            for attenuation in ATTENUATION_KINDS:
                assert torch.equal(block_tokens(block, x, empty, rows, attenuation), block(x))


def test_variant_validation():
    model = tiny_vit()
    with pytest.raises(ValueError, match="attenuation kind"):
        Attenuation("median")
    with pytest.raises(ValueError, match="factor > 0"):
        Attenuation("scale", 0.0)
    with pytest.raises(ValueError, match="detector must be one of"):
        cls_features(model, images(), 1.0, detector="attention")
    with pytest.raises(ValueError, match="blocks must be an integer from 1"):
        cls_features(model, images(), 1.0, blocks=4)
    with pytest.raises(ValueError, match="rows must be one of"):
        cls_features(model, images(), 1.0, rows="some")
