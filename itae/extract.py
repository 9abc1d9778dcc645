"""Batched extraction: images -> original features, norms, attention, and a final-block cache for any θ.

One pass over the data runs the backbone once. What the final block's CLS output depends on is kept
(:class:`FinalBlockCache`), so features at a new θ or rule are recomputed by :meth:`Extraction.itae`
with the same engine functions as a full forward pass, without touching the backbone. Beside it, every
token's norm under each detector (:data:`itae.choices.DETECTORS`: query, key and value norms, Eq. 4, and
the final block's output norm) is kept, so every final-block variant of the engine is served by the same
cache: the key norms need the keys, which the cache does not keep, and the output norms the block's output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from itae import devices, engine
from itae.backbones import Backbone
from itae.choices import DETECTORS, PRECISIONS, RULES
from itae.data import ImageDataset, SkippedImage
from itae.data.dataset import describe
from itae.errors import StaleCacheError, UnreadableImage
from itae.fileio import atomic_directory, atomic_path
from itae.planted import DetectionScores, detection_scores, fired_tokens

__all__ = [
    "PRECISIONS",
    "Extraction",
    "ExtractionInfo",
    "FinalBlockCache",
    "ItaeResult",
    "autocast",
    "cache_key",
    "extract",
    "extract_cached",
    "precision_path",
    "preprocessed_batches",
    "resolve_precision",
]

# 2: the precision is part of the cache key; 3: key, value and final-block output norms; 4: the cache is a
# folder of .npy files
FORMAT_VERSION = 4
META_FILE = "meta.json"  # the ExtractionInfo and the file bookkeeping of a saved folder
SPILL_BYTES = 2 * 1024**3  # final-block values beyond this go to a memory-mapped file


@dataclass(frozen=True)
class ExtractionInfo:
    """What an extraction was made from and how: saved with it as JSON, and the key of its cache.

    Attributes
    ----------
    model : the registry name, e.g. ``"dinov2_vits14"``
    label : what outputs call the model (the demo weights say so)
    weights : ``"hub"``, ``"demo"``, ``"random"`` or a checkpoint path
    timm_id : the timm architecture and pretrained tag
    data : the dataset's one-line description; its counts are the extraction's where decoding refused images
    data_fingerprint : the dataset's fingerprint
    key : ``cache_key`` of the backbone's identity, the data fingerprint and the precision
    class_names : tuple of str, or None for unlabelled data
    num_prefix_tokens : CLS plus registers
    num_registers : register tokens after CLS
    grid_size : (rows, cols) of the patch grid
    default_theta : the paper's θ for the model, or None
    precision : ``"bf16"`` (the backbone ran under bf16 autocast) or ``"fp32"``
    preprocessing : the backbone's identity (model, weights, input size, mean, std, interpolation)
    theta, rule : the setting of the ``features_itae`` saved with it; None when there are none
    """

    model: str
    label: str
    weights: str
    timm_id: str
    data: str
    data_fingerprint: str
    key: str
    class_names: tuple[str, ...] | None
    num_prefix_tokens: int
    num_registers: int
    grid_size: tuple[int, int]
    default_theta: float | None
    precision: str
    preprocessing: dict
    theta: float | None = None
    rule: str | None = None

    def to_json(self) -> dict:
        """JSON-ready: the fields by name, tuples as lists."""
        fields = dataclasses.asdict(self)
        fields["class_names"] = None if self.class_names is None else list(self.class_names)
        fields["grid_size"] = list(self.grid_size)
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> "ExtractionInfo":
        """The record of :meth:`to_json`'s dict; keys that are not fields (file bookkeeping) are ignored."""
        known = {name: fields[name] for name in (f.name for f in dataclasses.fields(cls)) if name in fields}
        if known.get("class_names") is not None:
            known["class_names"] = tuple(known["class_names"])
        known["grid_size"] = tuple(known["grid_size"])
        return cls(**known)


@dataclass
class FinalBlockCache:
    """The per-image inputs of the final block's CLS output (see ``engine.FinalBlockState``).

    Attributes
    ----------
    cls_input : ndarray of shape (N, C), float32
    cls_logits : ndarray of shape (N, H, T), float32 (under bf16 autocast it holds the bf16 logits exactly)
    values : ndarray of shape (N, H, T, d); float32, or int16 holding bfloat16 bits when
        extraction ran under bf16 autocast (``values_dtype`` says which)
    values_dtype : "float32" or "bfloat16"
    """

    cls_input: np.ndarray
    cls_logits: np.ndarray
    values: np.ndarray
    values_dtype: str

    def nbytes_per_image(self) -> int:
        n = len(self.cls_input)
        return (self.cls_input.nbytes + self.cls_logits.nbytes + self.values.nbytes) // max(n, 1)

    def state(self, rows: slice, query_norms: np.ndarray, device: torch.device) -> engine.FinalBlockState:
        values = torch.from_numpy(np.ascontiguousarray(self.values[rows]))
        if self.values_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        return engine.FinalBlockState(
            cls_input=torch.from_numpy(self.cls_input[rows]).to(device),
            cls_logits=torch.from_numpy(self.cls_logits[rows]).to(device),
            values=values.to(device),
            query_norms=torch.from_numpy(query_norms[rows]).to(device),
        )


@dataclass
class ItaeResult:
    """Features and attention at one θ and rule.

    Attributes
    ----------
    theta, rule : the setting; ``theta`` None means no attenuation
    features : ndarray of shape (N, C), not L2-normalised; an image without artifacts has its original
        features, bit for bit
    attention : ndarray of shape (N, H, T), the softmax CLS row per head
    artifact_mask : ndarray of bool, shape (N, T)
    """

    theta: float | None
    rule: str
    features: np.ndarray
    attention: np.ndarray
    artifact_mask: np.ndarray


@dataclass
class Extraction:
    """Everything extracted from a dataset with one backbone.

    Attributes
    ----------
    info : ExtractionInfo, what it was made from: model, weights, data, cache key, token layout
    features_original : ndarray of shape (N, C), the unmodified final-norm CLS output
    query_norms : ndarray of shape (N, T), Eq. 4, CLS in column 0
    output_norms : ndarray of shape (N, T), L2 norms of the model's final (normed) output tokens
    key_norms, value_norms : ndarrays of shape (N, T), Eq. 4 on the final block's keys and values
    block_output_norms : ndarray of shape (N, T), L2 norms of the final block's output tokens in the
        residual stream, before the final norm (the ``"output"`` detector, Darcet et al.)
    attention_original : ndarray of shape (N, H, T), the original softmax CLS row per head
    labels : ndarray of int64, shape (N,), or None
    names : list of N str
    indices : ndarray of shape (N,), the dataset index of each row (skipped images have none)
    cache : FinalBlockCache, or None when loaded from a file saved without it
    skipped : images that could not be decoded
    planted_mask : ndarray of bool, shape (N, T): the planted artifacts (:mod:`itae.planted`), the ground
        truth of a model loaded with ``planted=True``; None for every other model
    """

    info: ExtractionInfo
    features_original: np.ndarray
    query_norms: np.ndarray
    output_norms: np.ndarray
    key_norms: np.ndarray
    value_norms: np.ndarray
    block_output_norms: np.ndarray
    attention_original: np.ndarray
    labels: np.ndarray | None
    names: list[str]
    indices: np.ndarray
    cache: FinalBlockCache | None
    skipped: list[SkippedImage] = field(default_factory=list)
    planted_mask: np.ndarray | None = None
    _backbone: Backbone | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.features_original)

    def detection_scores(self, artifact_mask: np.ndarray) -> DetectionScores:
        """Precision, recall and Jaccard of ``artifact_mask`` (bool (N, T)) against the planted artifacts."""
        if self.planted_mask is None:
            raise ValueError(f"{self.info.label} has no planted artifacts to score a detection against; "
                             "extract with a model loaded with planted=True (--planted)")
        return detection_scores(artifact_mask, self.planted_mask)

    @property
    def class_names(self) -> list[str] | None:
        return None if self.info.class_names is None else list(self.info.class_names)

    def attach(self, backbone: Backbone) -> None:
        """Give a loaded extraction the backbone whose final block recomputes features at a new θ."""
        if cache_key(backbone.identity(), self.info.data_fingerprint, self.info.precision) != self.info.key:
            raise StaleCacheError(f"this extraction was made with {self.info.model} / {self.info.weights}, not {backbone.label}")
        self._backbone = backbone

    def detector_norms(self, detector: str = "query") -> np.ndarray:
        """The norms ``detector`` splits at θ (:func:`itae.engine.detector_norms`): float32 (N, T), CLS in column 0."""
        if detector not in DETECTORS:
            raise ValueError(f"detector must be one of {DETECTORS}, got {detector!r}")
        return {"query": self.query_norms, "key": self.key_norms, "value": self.value_norms,
                "output": self.block_output_norms}[detector]

    def artifact_mask(self, theta: float, rule: str = "minority", detector: str = "query") -> np.ndarray:
        """Eq. 2-3 on the cached norms of ``detector`` (query norms: the paper): bool (N, T)."""
        return engine.split_artifacts(torch.from_numpy(self.detector_norms(detector)), float(theta), rule).numpy()

    @torch.inference_mode()
    def itae(self, theta: float | None, rule: str = "minority", batch_size: int = 256, *, detector: str = "query",
             attenuation: engine.Attenuation = engine.PAPER_ATTENUATION) -> ItaeResult:
        """Features and attention at ``theta`` and ``rule`` from the cache, without the backbone (Eq. 2-6).

        ``detector`` and ``attenuation`` choose a final-block variant (:mod:`itae.engine`); the defaults are
        the paper's. Eq. 5 (every row) gives the same CLS output as Eq. 6 in the final block.

        The final block runs at the extraction's precision (bf16 autocast where the backbone ran under
        it), so the result is the full forward pass at that precision. Images without artifacts, and all
        images when ``theta`` is None, keep their original features and attention, bit for bit.
        """
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if theta is None:
            no_artifacts = np.zeros(self.query_norms.shape, dtype=bool)
            return ItaeResult(None, rule, self.features_original, self.attention_original, no_artifacts)
        mask = self.artifact_mask(theta, rule, detector)
        if self.cache is None:
            raise RuntimeError("this extraction was saved without its final-block cache: extract again for a new θ")
        if self._backbone is None:
            raise RuntimeError("a loaded Extraction needs .attach(backbone) before .itae(): the final block lives there")
        backbone = self._backbone
        block, norm, device = backbone.model.blocks[-1], backbone.model.norm, backbone.device
        features, attention = [], []
        with autocast(device, self.info.precision):
            for start in range(0, len(self), batch_size):
                rows = slice(start, start + batch_size)
                state = self.cache.state(rows, self.query_norms, device)
                rows_mask = torch.from_numpy(mask[rows]).to(device)
                feats, attn = engine.cls_output(block, norm, state, rows_mask, attenuation)
                original_feats = torch.from_numpy(self.features_original[rows]).to(device)
                original_attn = torch.from_numpy(self.attention_original[rows]).to(device)
                features.append(engine.keep_unattenuated(feats.float(), original_feats, rows_mask).cpu().numpy())
                attention.append(engine.keep_unattenuated(attn.float(), original_attn, rows_mask).cpu().numpy())
        return ItaeResult(float(theta), rule, np.concatenate(features), np.concatenate(attention), mask)

    def save(self, path: str | Path, itae: ItaeResult | None = None, include_cache: bool = True) -> Path:
        """Write everything, optionally with the ITAE features at one θ (``features_itae``).

        ``path`` ending in ``.npz`` gets one archive, to share (``np.load`` reads it, but only whole); any
        other ``path`` becomes a folder of ``.npy`` files and ``meta.json``, which :meth:`load` memory-maps:
        the feature cache's format. The final-block cache is most of the bytes (about 0.4 MB per ViT-S/14
        image in float32); without it a loaded copy cannot recompute a new θ.
        """
        path = Path(path)
        arrays = {
            "features_original": self.features_original,
            "query_norms": self.query_norms,
            "output_norms": self.output_norms,
            "key_norms": self.key_norms,
            "value_norms": self.value_norms,
            "block_output_norms": self.block_output_norms,
            "attention_original": self.attention_original,
            "indices": self.indices,
            "names": np.array(self.names, dtype=str),
            "skipped": np.array([[s.name, s.reason] for s in self.skipped], dtype=str).reshape(-1, 2),
        }
        info = self.info
        if itae is not None:
            arrays["features_itae"] = itae.features
            arrays["artifact_mask"] = itae.artifact_mask
            info = dataclasses.replace(info, theta=itae.theta, rule=itae.rule)
        meta = {"format": FORMAT_VERSION, **info.to_json()}
        if include_cache and self.cache is not None:
            arrays.update(
                cache_cls_input=self.cache.cls_input, cache_cls_logits=self.cache.cls_logits, cache_values=self.cache.values
            )
            meta["values_dtype"] = self.cache.values_dtype
        if self.labels is not None:
            arrays["labels"] = self.labels
        if self.planted_mask is not None:
            arrays["planted_mask"] = self.planted_mask
        if path.suffix == ".npz":
            with atomic_path(path) as temporary, open(temporary, "wb") as file:
                np.savez(file, meta=np.array(json.dumps(meta)), **arrays)
        else:
            with atomic_directory(path) as folder:
                for name, array in arrays.items():
                    np.save(folder / f"{name}.npy", array, allow_pickle=False)
                (folder / META_FILE).write_text(json.dumps(meta))
        return path

    @classmethod
    def load(
        cls, path: str | Path, backbone: Backbone | None = None, data_fingerprint: str | None = None,
        precision: str | None = None,
    ) -> "Extraction":
        """Read a saved extraction; with ``backbone`` and ``data_fingerprint`` refuse a stale one.

        A folder (see :meth:`save`) is memory-mapped: its arrays are ``np.memmap`` (copy-on-write), read
        from disk as they are used, so loading 10,000 images' cache costs no memory up front. An ``.npz``
        is read whole. ``precision`` (``"bf16"`` or ``"fp32"``, see :func:`resolve_precision`) also refuses
        an extraction made at the other precision; without it the file's own precision is accepted.
        """
        path = Path(path)
        if path.is_dir():
            meta = _check_format(json.loads((path / META_FILE).read_text()), path)
            arrays = {file.stem: np.load(file, mmap_mode="c", allow_pickle=False) for file in path.glob("*.npy")}
        else:
            with np.load(path, allow_pickle=False) as file:
                meta = _check_format(json.loads(str(file["meta"])), path)
                arrays = {name: file[name] for name in file.files if name != "meta"}
        if backbone is not None and data_fingerprint is not None:
            if cache_key(backbone.identity(), data_fingerprint, precision or meta["precision"]) != meta["key"]:
                raise StaleCacheError(f"{path} was extracted from other data, model, weights, preprocessing or precision")
        extraction = cls(
            info=ExtractionInfo.from_json(meta),
            features_original=arrays["features_original"],
            query_norms=arrays["query_norms"],
            output_norms=arrays["output_norms"],
            key_norms=arrays["key_norms"],
            value_norms=arrays["value_norms"],
            block_output_norms=arrays["block_output_norms"],
            attention_original=arrays["attention_original"],
            labels=arrays.get("labels"),
            names=arrays["names"].tolist(),
            indices=arrays["indices"],
            cache=(
                FinalBlockCache(arrays["cache_cls_input"], arrays["cache_cls_logits"], arrays["cache_values"], meta["values_dtype"])
                if "cache_values" in arrays
                else None
            ),
            skipped=[SkippedImage(name, reason) for name, reason in arrays["skipped"].tolist()],
            planted_mask=arrays.get("planted_mask"),
        )
        if backbone is not None:
            extraction.attach(backbone)
        return extraction


def _check_format(meta: dict, path: Path) -> dict:
    if meta.get("format") != FORMAT_VERSION:
        raise StaleCacheError(
            f"{path} was written by another version of itae (format {meta.get('format')}, this one reads "
            f"{FORMAT_VERSION}): extract again"
        )
    return meta


def cache_key(backbone_identity: dict, data_fingerprint: str, precision: str) -> str:
    """A hex key that changes with the model, weights, preprocessing, data, precision or file format.

    ``precision`` is the resolved one, ``"bf16"`` or ``"fp32"``: features extracted under bf16 autocast
    differ from float32 ones by about 1e-2, so neither may stand in for the other.
    """
    blob = json.dumps(
        {"backbone": backbone_identity, "data": data_fingerprint, "precision": precision, "format": FORMAT_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class _Preprocessed(Dataset):
    """Decodes lazily; a file that fails to decode comes back as its reason instead of a tensor."""

    def __init__(self, dataset: ImageDataset, preprocess: Callable):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return index, self.preprocess(self.dataset.load(index)), None
        except UnreadableImage as error:
            return index, None, error.reason


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, reason) for i, x, reason in items if x is None]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    images = torch.stack([x for _, x in good]) if good else None
    return indices, images, bad


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision an extraction on ``device`` runs at: ``"bf16"`` or ``"fp32"``.

    Parameters
    ----------
    precision : {"auto", "bf16", "fp32"}
        ``"auto"`` is bf16 autocast on CUDA and on a CPU that computes bf16 natively
        (:func:`itae.devices.native_bf16_flags`: AMX, AVX512-BF16, Arm BF16), float32 elsewhere (MPS, and
        CPUs that would emulate bf16 more slowly than float32); ``"bf16"`` is bf16 autocast on any device.
    device : torch.device

    Returns
    -------
    str
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and bool(devices.native_bf16_flags()))
        return "bf16" if native else "fp32"
    return precision


def preprocessed_batches(
    backbone: Backbone, dataset: ImageDataset, indices, batch_size: int = 32, num_workers: int = 0
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The images ``dataset[indices]``, preprocessed, in batches on the backbone's device.

    For a second pass over the images an extraction already decoded (its ``indices``): one that fails to
    decode now raises :class:`UnreadableImage` instead of being skipped.

    Yields
    ------
    rows : slice of positions in ``indices``
    images : Tensor of shape (B, 3, H, W)
    """
    device = backbone.device
    subset = Subset(_Preprocessed(dataset, backbone.preprocess), [int(i) for i in indices])
    loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=device.type == "cuda")
    start = 0
    for batch_indices, images, bad in loader:
        if bad:
            index, reason = bad[0]
            raise UnreadableImage(dataset.names[index], reason)
        yield slice(start, start + len(batch_indices)), images.to(device, non_blocking=True)
        start += len(batch_indices)


def precision_path(precision: str, device: torch.device) -> str:
    """A few words naming the path an extraction at the resolved ``precision`` takes on ``device``, and why."""
    if device.type != "cpu":
        return f"{'bf16 autocast' if precision == 'bf16' else 'float32'} on {device.type}"
    flags = ", ".join(devices.native_bf16_flags())
    if precision == "bf16":
        return f"bf16 autocast, native on this CPU ({flags})" if flags else \
            "bf16 autocast, emulated on this CPU (no AMX, AVX512-BF16 or Arm BF16): slower than float32"
    return f"float32 (this CPU also computes bf16 natively: {flags})" if flags else "float32 (no native bf16 on this CPU)"


def autocast(device: torch.device, precision: str):
    """The autocast of ``precision`` on ``device``: the extraction and every re-evaluation run under it."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _new_array(shape: tuple, dtype, spill_dir: Path | None) -> np.ndarray:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes <= SPILL_BYTES:
        return np.empty(shape, dtype=dtype)
    with tempfile.NamedTemporaryFile(dir=spill_dir, suffix=".npy", delete=False) as handle:
        path = handle.name
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with contextlib.suppress(OSError):  # POSIX: the mapping outlives the name, and the disk space is freed with it
        os.unlink(path)
    return array


@torch.inference_mode()
def extract(
    backbone: Backbone,
    dataset: ImageDataset,
    batch_size: int = 32,
    num_workers: int = 0,
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    spill_dir: str | Path | None = None,
) -> Extraction:
    """Run the backbone once over ``dataset``.

    Parameters
    ----------
    backbone : Backbone from ``load_backbone``
    dataset : ImageDataset
    batch_size : images per forward pass
    num_workers : DataLoader worker processes for decoding
    precision : "auto", "bf16" (autocast on any device) or "fp32"; see :func:`resolve_precision`
    progress : callable(done, total), called after each batch
    spill_dir : folder for the memory-mapped value cache of large sets (default: the system temp folder)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("the dataset has no images to extract")
    model, device = backbone.model, backbone.device
    block = engine.check_model(model)
    precision = resolve_precision(precision, device)
    bf16 = precision == "bf16"
    n, total = len(dataset), len(dataset)
    T = model.patch_embed.num_patches + model.num_prefix_tokens
    H, d, C = block.attn.num_heads, block.attn.head_dim, model.embed_dim
    spill = Path(spill_dir) if spill_dir else None
    out = {
        "features": np.empty((n, C), np.float32),
        "output_norms": np.empty((n, T), np.float32),
        **{("norms", detector): np.empty((n, T), np.float32) for detector in DETECTORS},
        "attention": np.empty((n, H, T), np.float32),
        "cls_input": np.empty((n, C), np.float32),
        "cls_logits": np.empty((n, H, T), np.float32),
        "values": _new_array((n, H, T, d), np.int16 if bf16 else np.float32, spill),
        "planted": np.zeros((n, T), bool),
    }
    indices, skipped, row = np.empty(n, np.int64), [], 0
    loader = DataLoader(
        _Preprocessed(dataset, backbone.preprocess), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    done = 0
    for batch_indices, images, bad in loader:
        skipped += [SkippedImage(dataset.names[i], reason) for i, reason in bad]
        done += len(batch_indices) + len(bad)
        if images is not None:
            with autocast(device, precision):
                x = engine.final_block_input(model, images.to(device, non_blocking=True))
                planted = fired_tokens(model)
                tokens, state = engine.final_block_forward(block, x)
                output = model.norm(tokens)
            rows = slice(row, row + len(batch_indices))
            values = state.values.contiguous()
            out["values"][rows] = (values.view(torch.int16) if bf16 else values.float()).cpu().numpy()
            out["features"][rows] = output[:, 0].float().cpu().numpy()
            out["output_norms"][rows] = output.float().norm(dim=-1).cpu().numpy()
            for detector in DETECTORS:
                out["norms", detector][rows] = engine.detector_norms(detector, state, tokens).cpu().numpy()
            out["attention"][rows] = state.cls_logits.float().softmax(dim=-1).cpu().numpy()
            out["cls_input"][rows] = state.cls_input.float().cpu().numpy()
            out["cls_logits"][rows] = state.cls_logits.float().cpu().numpy()
            if planted is not None:
                out["planted"][rows] = planted.cpu().numpy()
            indices[rows] = batch_indices.numpy()
            row += len(batch_indices)
        if progress is not None:
            progress(done, total)
    if row == 0:
        raise ValueError(f"none of the {total} images could be decoded: {skipped[0].reason if skipped else ''}")
    keep = slice(0, row)
    labels = dataset.labels[indices[keep]] if dataset.labels is not None else None
    all_skipped = list(dataset.skipped) + skipped
    # The source's description counts the files as they were listed; where decoding refused some of them,
    # the extraction states what it holds, so that every count shown is the extraction's.
    data = describe(dataset.title, row, dataset.class_names, all_skipped) if skipped else dataset.description
    info = ExtractionInfo(
        model=backbone.spec.name,
        label=backbone.label,
        weights=backbone.weights,
        timm_id=backbone.spec.timm_id,
        data=data,
        data_fingerprint=dataset.fingerprint,
        key=cache_key(backbone.identity(), dataset.fingerprint, precision),
        class_names=None if dataset.class_names is None else tuple(dataset.class_names),
        num_prefix_tokens=model.num_prefix_tokens,
        num_registers=backbone.spec.num_registers,
        grid_size=tuple(backbone.grid_size),
        default_theta=backbone.default_theta,
        precision=precision,
        preprocessing=backbone.identity(),
    )
    extraction = Extraction(
        info=info,
        features_original=out["features"][keep],
        query_norms=out["norms", "query"][keep],
        output_norms=out["output_norms"][keep],
        key_norms=out["norms", "key"][keep],
        value_norms=out["norms", "value"][keep],
        block_output_norms=out["norms", "output"][keep],
        attention_original=out["attention"][keep],
        labels=labels,
        names=[dataset.names[i] for i in indices[keep]],
        indices=indices[keep],
        cache=FinalBlockCache(out["cls_input"][keep], out["cls_logits"][keep], out["values"][keep], "bfloat16" if bf16 else "float32"),
        skipped=all_skipped,
        planted_mask=out["planted"][keep] if backbone.planting is not None else None,
    )
    extraction.attach(backbone)
    return extraction


def extract_cached(
    backbone: Backbone, dataset: ImageDataset, cache_dir: str | Path, precision: str = "auto", **kwargs
) -> Extraction:
    """``extract``, reusing the folder ``<cache_dir>/features/<key>`` when nothing relevant changed, precision
    included. The result is the memory-mapped folder (:meth:`Extraction.load`), also right after extracting."""
    precision = resolve_precision(precision, backbone.device)
    folder = Path(cache_dir) / "features"
    path = folder / cache_key(backbone.identity(), dataset.fingerprint, precision)
    if path.is_dir():
        try:
            return Extraction.load(path, backbone, dataset.fingerprint, precision)
        except (StaleCacheError, OSError, KeyError, ValueError):
            shutil.rmtree(path, ignore_errors=True)  # unreadable or stale: extract again
    for legacy in folder.glob("*.npz"):  # formats 1-3 kept one archive per extraction, which nothing reads now
        legacy.unlink(missing_ok=True)
    extract(backbone, dataset, precision=precision, **kwargs).save(path)
    return Extraction.load(path, backbone, dataset.fingerprint, precision)
