"""Extraction and its final-block cache: a new θ must equal a full forward pass, without the backbone."""
import dataclasses

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from itae import cls_features, devices, engine, extract as extract_module, query_norms
from itae.choices import DETECTORS
from itae.backbones import Backbone, make_preprocess
from itae.errors import StaleCacheError, UnreadableImage
from itae.extract import Extraction, extract, extract_cached, precision_path, resolve_precision
from itae.registry import BackboneSpec

ATTENUATIONS = [engine.Attenuation(kind) for kind in ("min", "remove", "mean")] + [engine.Attenuation("scale", 0.3)]
SPEC = BackboneSpec("tiny", "vit_tiny_test", "tiny test ViT", num_registers=2, default_theta=None, img_size=28)


def tiny_backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    model = timm.models.VisionTransformer(
        img_size=28, patch_size=7, embed_dim=32, depth=2, num_heads=4, reg_tokens=2, init_values=0.5, num_classes=0
    ).eval()
    model.blocks[-1].attn.qkv.weight.data.mul_(3)  # peakier attention, so that θ visibly matters
    return Backbone(SPEC, model, make_preprocess(model, 28), f"random-{seed}", SPEC.label, torch.device("cpu"))


class ListDataset:
    """The ImageDataset interface over in-memory images; ``broken`` indices fail to decode."""

    def __init__(self, n: int = 10, broken=(), seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8) for i in range(n)]
        self.broken = set(broken)
        self.labels = np.arange(n) % 3
        self.class_names = ["a", "b", "c"]
        self.names = [f"img{i}.png" for i in range(n)]
        self.skipped = []
        self.fingerprint = f"list-{n}-{seed}-{sorted(self.broken)}"
        self.title = "Random images"
        self.description = f"{self.title}, {n} images, 3 classes"

    def __len__(self):
        return len(self.images)

    def load(self, index):
        if index in self.broken:
            raise UnreadableImage(self.names[index], "truncated file")
        return Image.fromarray(self.images[index])


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Every test here sees a CPU without native bf16, so that "auto" is float32 on any machine; the tests of
    the bf16 path ask for it, and those of "auto" set the CPU they need."""
    monkeypatch.setattr(devices, "native_bf16_flags", lambda: ())


def batch_of(backbone, dataset, indices):
    return torch.stack([backbone.preprocess(dataset.load(int(i))) for i in indices])


def test_extraction_matches_the_model_and_the_cache_matches_a_full_forward_pass():
    backbone, dataset = tiny_backbone(), ListDataset(10)
    calls = []
    extraction = extract(backbone, dataset, batch_size=4, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (10, 10) and len(extraction) == 10
    x = batch_of(backbone, dataset, range(10))
    model = backbone.model
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(extraction.features_original), model.forward_features(x)[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.from_numpy(extraction.query_norms), query_norms(model, x), atol=1e-5, rtol=0)
        output = model.forward_features(x)
        torch.testing.assert_close(torch.from_numpy(extraction.output_norms), output.norm(dim=-1), atol=1e-4, rtol=0)
    assert np.allclose(extraction.attention_original.sum(-1), 1.0, atol=1e-5)
    thetas = np.quantile(extraction.query_norms[:, 1:], [0.2, 0.5, 0.9])
    for theta in thetas:
        for rule in ("minority", "below", "above"):
            result = extraction.itae(theta, rule, batch_size=3)
            full = cls_features(model, x, float(theta), rule)
            torch.testing.assert_close(torch.from_numpy(result.features), full, atol=1e-5, rtol=0)
            assert result.artifact_mask.shape == extraction.query_norms.shape and not result.artifact_mask[:, 0].any()
    below = extraction.itae(thetas[1], "below")
    assert np.abs(below.features - extraction.features_original).max() > 1e-3


def test_the_attenuated_attention_matches_eq6_written_here():
    backbone, dataset = tiny_backbone(), ListDataset(10)
    extraction = extract(backbone, dataset, batch_size=4)
    # The original CLS-row logits the cache keeps, with each row's own CLS column made its smallest logit:
    # there a minimum taken over the whole row gives other numbers than Eq. 6's minimum over 1 <= j <= N.
    logits = extraction.cache.cls_logits
    logits[:, :, 0] = logits.min(axis=-1) - 2.0
    theta = float(np.median(extraction.query_norms[:, 1:]))

    result = extraction.itae(theta, "below", batch_size=3)

    attenuated = result.artifact_mask.any(axis=1)
    assert attenuated.sum() >= 8
    for n in np.flatnonzero(attenuated):
        artifacts = [j for j in range(1, logits.shape[-1]) if extraction.query_norms[n, j] <= theta]  # Eq. 2
        for h in range(logits.shape[1]):
            row = logits[n, h].astype(np.float64)
            smallest = min(row[j] for j in range(1, len(row)))  # Eq. 6: the CLS column (j = 0) excluded
            row[artifacts] = smallest
            weights = np.exp(row - row.max())
            np.testing.assert_allclose(result.attention[n, h], weights / weights.sum(), atol=1e-6, rtol=0)
    assert np.array_equal(result.attention[~attenuated], extraction.attention_original[~attenuated])


def test_a_new_theta_never_runs_the_backbone(monkeypatch):
    backbone, dataset = tiny_backbone(), ListDataset(6)
    extraction = extract(backbone, dataset, batch_size=4)

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(backbone.model, "forward_features", forbidden)
    monkeypatch.setattr(backbone.model.blocks[0], "forward", forbidden)
    monkeypatch.setattr(backbone.model.patch_embed, "forward", forbidden)
    extraction.itae(float(np.median(extraction.query_norms[:, 1:])), "minority")


def test_undecodable_images_are_skipped_and_reported():
    backbone, dataset = tiny_backbone(), ListDataset(7, broken={2, 5})
    extraction = extract(backbone, dataset, batch_size=3)
    assert list(extraction.indices) == [0, 1, 3, 4, 6]
    assert extraction.names == ["img0.png", "img1.png", "img3.png", "img4.png", "img6.png"]
    assert list(extraction.labels) == [0, 1, 0, 1, 0]
    assert [s.name for s in extraction.skipped] == ["img2.png", "img5.png"]
    assert extraction.skipped[0].reason == "truncated file"  # the name is not repeated in the reason
    assert extraction.info.data == "Random images, 5 images, 3 classes, 2 skipped", "the counts of what was decoded"
    assert extract(backbone, ListDataset(4)).info.data == "Random images, 4 images, 3 classes"
    with pytest.raises(ValueError, match="none of the 2 images could be decoded"):
        extract(backbone, ListDataset(2, broken={0, 1}))


def test_save_load_roundtrip_and_stale_keys(tmp_path):
    backbone, dataset = tiny_backbone(), ListDataset(5)
    extraction = extract(backbone, dataset)
    theta = float(np.median(extraction.query_norms[:, 1:]))
    itae_result = extraction.itae(theta)
    path = extraction.save(tmp_path / "features.npz", itae=itae_result)
    with np.load(path) as file:
        assert file["features_itae"].shape == file["features_original"].shape == (5, 32)
        assert file["labels"].tolist() == dataset.labels.tolist()
    loaded = Extraction.load(path, backbone, dataset.fingerprint)
    assert loaded.info.theta == theta and loaded.info.rule == "minority" and loaded.names == extraction.names
    assert dataclasses.replace(loaded.info, theta=None, rule=None) == extraction.info
    np.testing.assert_array_equal(loaded.itae(theta).features, itae_result.features)
    with pytest.raises(StaleCacheError):
        Extraction.load(path, backbone, ListDataset(5, seed=1).fingerprint)
    with pytest.raises(StaleCacheError):  # same data, other weights
        Extraction.load(path, tiny_backbone(seed=1), dataset.fingerprint)
    with pytest.raises(StaleCacheError):
        Extraction.load(path).attach(tiny_backbone(seed=1))
    with pytest.raises(RuntimeError, match="attach"):
        Extraction.load(path).itae(theta)
    light = extraction.save(tmp_path / "light.npz", itae=itae_result, include_cache=False)
    with np.load(light) as file:
        assert "features_itae" in file.files and not any(name.startswith("cache_") for name in file.files)
    reloaded = Extraction.load(light, backbone, dataset.fingerprint)
    np.testing.assert_array_equal(reloaded.features_original, extraction.features_original)
    with pytest.raises(RuntimeError, match="without its final-block cache"):
        reloaded.itae(theta)


def test_extract_cached_reuses_the_file(tmp_path, monkeypatch):
    backbone, dataset = tiny_backbone(), ListDataset(4)
    first = extract_cached(backbone, dataset, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(extract_module, "extract", lambda *a, **k: pytest.fail("extracted twice"))
        second = extract_cached(backbone, dataset, tmp_path)
    np.testing.assert_array_equal(first.features_original, second.features_original)
    other = extract_cached(backbone, ListDataset(4, seed=3), tmp_path)
    assert other.info.key != first.info.key
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == sorted([first.info.key, other.info.key])


def test_a_saved_folder_is_memory_mapped_and_holds_what_the_archive_holds(tmp_path):
    backbone, dataset = tiny_backbone(), ListDataset(5, broken=[2])
    extraction = extract(backbone, dataset)
    theta = float(np.median(extraction.query_norms[:, 1:]))
    result = extraction.itae(theta)
    folder = Extraction.load(extraction.save(tmp_path / "features", itae=result), backbone, dataset.fingerprint)
    archive = Extraction.load(extraction.save(tmp_path / "features.npz", itae=result), backbone, dataset.fingerprint)
    assert (tmp_path / "features").is_dir() and (tmp_path / "features.npz").is_file()
    for name in ("features_original", "query_norms", "output_norms", "attention_original", "labels", "indices"):
        assert isinstance(getattr(folder, name), np.memmap), name  # read from disk as used, not up front
        assert not isinstance(getattr(archive, name), np.memmap), name
        np.testing.assert_array_equal(getattr(folder, name), getattr(archive, name))
    for name in ("cls_input", "cls_logits", "values"):
        assert isinstance(getattr(folder.cache, name), np.memmap), name
    assert folder.info == archive.info and folder.names == archive.names and folder.skipped == archive.skipped
    np.testing.assert_array_equal(folder.itae(theta).features, result.features)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_a_folder_is_replaced_whole_and_readers_keep_the_old_one(tmp_path):
    backbone = tiny_backbone()
    first = extract(backbone, ListDataset(3))
    loaded = Extraction.load(first.save(tmp_path / "features"))
    second = extract(backbone, ListDataset(4, seed=1))
    again = Extraction.load(second.save(tmp_path / "features"))
    assert len(again) == 4 and sorted(p.name for p in tmp_path.iterdir()) == ["features"]
    np.testing.assert_array_equal(loaded.features_original, first.features_original)  # its mapping outlives the folder


def test_older_formats_are_refused_and_extracted_again(tmp_path, monkeypatch):
    backbone, dataset = tiny_backbone(), ListDataset(3)
    with monkeypatch.context() as patch:
        patch.setattr(extract_module, "FORMAT_VERSION", 2)
        old = extract(backbone, dataset)
        archive = old.save(tmp_path / "features" / f"{old.info.key}.npz")  # what format 2 kept in the cache
        folder = old.save(tmp_path / "old-folder")
    for path in (archive, folder):
        with pytest.raises(StaleCacheError, match="format 2.*extract again"):
            Extraction.load(path)
    real_extract, calls = extract_module.extract, []
    monkeypatch.setattr(extract_module, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    fresh = extract_cached(backbone, dataset, tmp_path)
    assert calls == [1] and fresh.info.key != old.info.key
    assert [p.name for p in (tmp_path / "features").iterdir()] == [fresh.info.key]  # the old archive is gone


def test_large_value_caches_spill_to_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(extract_module, "SPILL_BYTES", 1024)
    backbone, dataset = tiny_backbone(), ListDataset(6)
    extraction = extract(backbone, dataset, spill_dir=tmp_path)
    assert isinstance(extraction.cache.values.base, np.memmap) or isinstance(extraction.cache.values, np.memmap)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind
    x = batch_of(backbone, dataset, range(6))
    theta = float(np.median(extraction.query_norms[:, 1:]))
    torch.testing.assert_close(
        torch.from_numpy(extraction.itae(theta).features), cls_features(backbone.model, x, theta), atol=1e-5, rtol=0
    )


def test_bad_arguments():
    backbone = tiny_backbone()
    with pytest.raises(ValueError, match="batch_size"):
        extract(backbone, ListDataset(2), batch_size=0)
    with pytest.raises(ValueError, match="no images"):
        extract(backbone, ListDataset(0))
    with pytest.raises(ValueError, match="rule must be one of"):
        extract(backbone, ListDataset(2)).itae(1.0, "sideways")
    with pytest.raises(ValueError, match="precision must be one of"):
        extract(backbone, ListDataset(2), precision="fp16")


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    extraction = extract(tiny_backbone(), ListDataset(3))
    extraction.save(tmp_path / "features.npz")
    before = (tmp_path / "features.npz").read_bytes()

    def disk_full(file, **arrays):
        file.write(b"half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left"):
        extraction.save(tmp_path / "features.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["features.npz"]  # no .part file left behind
    assert (tmp_path / "features.npz").read_bytes() == before  # and the old file untouched


def test_an_empty_artifact_mask_returns_the_original_features_bit_for_bit():
    backbone, dataset = tiny_backbone(), ListDataset(8)
    extraction = extract(backbone, dataset, batch_size=3)
    norms = extraction.query_norms[:, 1:]
    for theta, rule in [(None, "minority"), (float(norms.min()) - 1, "below"), (float(norms.max()) + 1, "minority")]:
        result = extraction.itae(theta, rule, batch_size=3)
        assert not result.artifact_mask.any()
        assert np.array_equal(result.features, extraction.features_original), (theta, rule)
        assert np.array_equal(result.attention, extraction.attention_original), (theta, rule)
    # Only the image holding the lowest token has an artifact at that θ: the others keep their features.
    image = int(np.argmin(norms.min(axis=1)))
    result = extraction.itae(float(norms.min()), "below", batch_size=3)
    untouched = ~result.artifact_mask.any(axis=1)
    assert untouched.sum() == 7 and not untouched[image]
    assert np.array_equal(result.features[untouched], extraction.features_original[untouched])
    assert np.abs(result.features[image] - extraction.features_original[image]).max() > 1e-4


def test_a_bf16_extraction_is_reevaluated_at_bf16_exactly_as_a_full_forward_pass():
    backbone, dataset = tiny_backbone(), ListDataset(10)
    extraction = extract(backbone, dataset, batch_size=4, precision="bf16")
    assert extraction.info.precision == "bf16" and extraction.cache.values_dtype == "bfloat16"
    float32 = extract(backbone, dataset, batch_size=4)
    x = batch_of(backbone, dataset, range(10))
    for theta in np.quantile(extraction.query_norms[:, 1:], [0.2, 0.5, 0.9]):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            full = cls_features(backbone.model, x, float(theta), "below").float()
        result = extraction.itae(float(theta), "below", batch_size=3)
        torch.testing.assert_close(torch.from_numpy(result.features), full, atol=1e-6, rtol=0)
        # The two precisions differ far more than that tolerance: the comparison can tell them apart.
        assert np.abs(result.features - float32.itae(float(theta), "below").features).max() > 1e-3


def test_a_cache_written_at_bf16_is_never_read_at_fp32_and_the_reverse(tmp_path, monkeypatch):
    backbone, dataset = tiny_backbone(), ListDataset(4)
    real_extract, calls = extract_module.extract, []

    def counted(*args, **kwargs):
        calls.append(kwargs["precision"])
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(extract_module, "extract", counted)
    bf16 = extract_cached(backbone, dataset, tmp_path, precision="bf16")
    fp32 = extract_cached(backbone, dataset, tmp_path, precision="fp32")
    assert calls == ["bf16", "fp32"] and bf16.info.key != fp32.info.key
    again = [extract_cached(backbone, dataset, tmp_path, precision=p) for p in ("fp32", "bf16", "auto")]
    assert calls == ["bf16", "fp32"]  # each read back from its own file; "auto" on a CPU is fp32
    assert [e.info.precision for e in again] == ["fp32", "bf16", "fp32"]
    assert np.array_equal(again[1].features_original, bf16.features_original)
    assert not np.array_equal(again[0].features_original, bf16.features_original)
    for written, other in ((bf16, "fp32"), (fp32, "bf16")):
        with pytest.raises(StaleCacheError, match="precision"):
            Extraction.load(tmp_path / "features" / written.info.key, backbone, dataset.fingerprint, other)
    loaded = Extraction.load(tmp_path / "features" / bf16.info.key, backbone, dataset.fingerprint)
    theta = float(np.median(bf16.query_norms[:, 1:]))
    assert np.array_equal(loaded.itae(theta).features, bf16.itae(theta).features)


@pytest.mark.parametrize("detector", DETECTORS)
def test_the_cache_serves_every_final_block_variant_without_the_backbone(monkeypatch, detector):
    backbone, dataset = tiny_backbone(), ListDataset(6)
    extraction = extract(backbone, dataset, batch_size=4)
    x = batch_of(backbone, dataset, range(6))
    model = backbone.model
    with torch.no_grad():
        tokens, state = engine.final_block_forward(model.blocks[-1], engine.final_block_input(model, x))
        torch.testing.assert_close(torch.from_numpy(extraction.detector_norms(detector)),
                                   engine.detector_norms(detector, state, tokens), atol=1e-5, rtol=0)
        expected = {theta: [cls_features(model, x, theta, "minority", detector=detector, attenuation=attenuation,
                                         rows=rows) for attenuation in ATTENUATIONS for rows in ("cls", "all")]
                    for theta in np.quantile(extraction.detector_norms(detector)[:, 1:], [0.15, 0.85])}

    def forbidden(*args, **kwargs):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(model.blocks[0], "forward", forbidden)
    monkeypatch.setattr(model.patch_embed, "forward", forbidden)
    for theta, features in expected.items():
        for attenuation, full in zip(ATTENUATIONS, features[::2]):
            cached = extraction.itae(theta, "minority", detector=detector, attenuation=attenuation)
            torch.testing.assert_close(torch.from_numpy(cached.features), full, atol=1e-5, rtol=0)
            assert np.array_equal(cached.artifact_mask, extraction.artifact_mask(theta, "minority", detector))
        for eq6, eq5 in zip(features[::2], features[1::2]):  # only row 0 reaches the CLS output of the final block
            torch.testing.assert_close(eq5, eq6, atol=1e-5, rtol=0)
    nothing = [extraction.itae(-1.0, "below", detector=detector, attenuation=attenuation).features
               for attenuation in ATTENUATIONS]
    for features in nothing:  # an image with nothing attenuated keeps its features bit for bit
        np.testing.assert_array_equal(features, extraction.features_original)


def test_detector_norms_survive_save_and_load(tmp_path):
    extraction = extract(tiny_backbone(), ListDataset(3))
    loaded = Extraction.load(extraction.save(tmp_path / "x.npz", include_cache=False))
    for detector in DETECTORS:
        np.testing.assert_array_equal(loaded.detector_norms(detector), extraction.detector_norms(detector))
    with pytest.raises(ValueError, match="detector must be one of"):
        loaded.detector_norms("attention")


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        ("cpu", (), "fp32"),  # bf16 would be emulated, slower than float32
        ("cpu", ("avx512_bf16",), "bf16"),
        ("cpu", ("amx_bf16", "avx512_bf16"), "bf16"),
        ("cuda", (), "bf16"),
        ("mps", ("bf16",), "fp32"),
    ],
)
def test_auto_is_bf16_where_the_hardware_computes_it(monkeypatch, device, flags, expected):
    monkeypatch.setattr(devices, "native_bf16_flags", lambda: flags)
    assert resolve_precision("auto", torch.device(device)) == expected
    for forced in ("bf16", "fp32"):  # the user's choice stands on any hardware
        assert resolve_precision(forced, torch.device(device)) == forced
    assert precision_path(expected, torch.device(device)).startswith("bf16 autocast" if expected == "bf16" else "float32")


def test_the_precision_path_names_the_cpu_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "native_bf16_flags", lambda: ("avx512_bf16",))
    assert precision_path("bf16", cpu) == "bf16 autocast, native on this CPU (avx512_bf16)"
    assert precision_path("fp32", cpu) == "float32 (this CPU also computes bf16 natively: avx512_bf16)"
    monkeypatch.setattr(devices, "native_bf16_flags", lambda: ())
    assert precision_path("fp32", cpu) == "float32 (no native bf16 on this CPU)"
    assert "emulated" in precision_path("bf16", cpu)


def test_auto_on_a_native_bf16_cpu_extracts_at_bf16_and_reevaluates_exactly(monkeypatch):
    monkeypatch.setattr(devices, "native_bf16_flags", lambda: ("avx512_bf16",))
    backbone, dataset = tiny_backbone(), ListDataset(6)
    extraction = extract(backbone, dataset, batch_size=4)
    assert extraction.info.precision == "bf16" and extraction.cache.values.dtype == np.int16
    x = batch_of(backbone, dataset, range(6))
    theta = float(np.median(extraction.query_norms[:, 1:]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = cls_features(backbone.model, x, theta).float()
    torch.testing.assert_close(torch.from_numpy(extraction.itae(theta).features), full, atol=1e-6, rtol=0)
