"""Tests of itae.data: every source kind on tiny files in the official formats."""

import gzip
import hashlib
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, STL10

from itae.data import (
    SOURCES,
    DataSourceError,
    ImageDataset,
    UnreadableImage,
    balanced_subset,
    open_source,
    open_uploads,
)
from itae.data import files as data_files
from itae.errors import PathNotAllowedError
from itae.resources import bundled

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# Helpers: tiny files ----------------------------------------------------------------


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(image, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


def colour(rgb, size=(8, 8)):
    return Image.new("RGB", size, rgb)


def noise(size=(64, 64), seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_claiming(width, height):
    """A valid 1x1 PNG whose header claims `width` x `height` pixels."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR payload starts after 16 bytes
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def make_class_folder(root):
    """cat: 2 red images, dog: 3 blue images."""
    for i in range(2):
        write(root / "cat" / f"c{i}.png", png_bytes(colour((255, 0, 0))))
    for i in range(3):
        write(root / "dog" / f"d{i}.png", png_bytes(colour((0, 0, 255))))
    return root


def make_zip(path, members):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def idx_bytes(array):
    """IDX file of a uint8 array: magic (type 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def reasons(ds):
    return {skip.name: skip.reason for skip in ds.skipped}


# Image modes ------------------------------------------------------------------------


def rgb_of(tmp_path, image, name="x.png"):
    write(tmp_path / "one" / name, png_bytes(image))
    ds = open_source(tmp_path / "one")
    loaded = ds.load(0)
    assert loaded.mode == "RGB"
    return np.asarray(loaded)


def test_grayscale_becomes_rgb(tmp_path):
    assert rgb_of(tmp_path, Image.new("L", (4, 4), 77))[0, 0].tolist() == [77, 77, 77]


def test_palette_becomes_rgb(tmp_path):
    image = colour((10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert image.mode == "P"
    assert rgb_of(tmp_path, image)[0, 0].tolist() == [10, 200, 30]


def test_rgba_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((1, 1), (0, 255, 0, 255))
    pixels = rgb_of(tmp_path, image)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[1, 1].tolist() == [0, 255, 0]


def test_la_becomes_rgb(tmp_path):
    image = Image.new("LA", (4, 4), (0, 0))
    image.putpixel((2, 2), (40, 255))
    pixels = rgb_of(tmp_path, image)
    assert pixels[0, 0].tolist() == [255, 255, 255]
    assert pixels[2, 2].tolist() == [40, 40, 40]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    assert rgb_of(tmp_path, image)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    write(tmp_path / "rot" / "r.jpg", jpeg_bytes(image, exif=exif))
    assert open_source(tmp_path / "rot").load(0).size == (20, 40)


# Folders ----------------------------------------------------------------------------


def test_class_folders_give_labels(tmp_path):
    ds = open_source(make_class_folder(tmp_path / "pets"))
    assert len(ds) == 5
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [0, 0, 1, 1, 1]
    assert ds.names[0] == "cat/c0.png"
    assert ds.load(4).getpixel((0, 0)) == (0, 0, 255)
    assert ds.skipped == []
    assert "5 images, 2 classes" in ds.description


def test_numeric_class_folders_sort_as_numbers(tmp_path):
    for name in ("10", "2", "1"):
        write(tmp_path / "n" / name / "a.png", png_bytes(colour((0, 0, 0))))
    assert open_source(tmp_path / "n").class_names == ["1", "2", "10"]


def test_flat_folder_has_no_labels(tmp_path):
    for i in range(3):
        write(tmp_path / "flat" / f"{i}.png", png_bytes(colour((i, i, i))))
    ds = open_source(tmp_path / "flat")
    assert ds.labels is None and ds.class_names is None
    assert ds.names == ["0.png", "1.png", "2.png"]
    assert "unlabeled" in ds.description


def test_bad_files_are_skipped_with_reasons(tmp_path):
    root = make_class_folder(tmp_path / "pets")
    write(root / "cat" / "fake.png", b"this is text, not a PNG")
    write(root / "cat" / "notes.txt", b"hello")
    write(root / "cat" / ".hidden.png", b"junk")
    write(root / "dog" / "huge.png", png_claiming(100_000, 100_000))
    write(root / "dog" / "big.png", png_claiming(8000, 8000))
    ds = open_source(root)
    assert len(ds) == 5
    why = reasons(ds)
    assert set(why) == {"cat/fake.png", "cat/notes.txt", "dog/huge.png", "dog/big.png"}
    assert why["cat/fake.png"] == "not an image file (Pillow cannot identify it)"
    assert "not an image file type (.txt)" in why["cat/notes.txt"]
    assert "decompression bomb" in why["dog/huge.png"]
    assert "64.0 megapixels" in why["dog/big.png"]
    assert "4 skipped" in ds.description


def test_pillow_bomb_warning_is_a_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x12 warns, stays below 2x
    write(tmp_path / "w" / "a.png", png_bytes(Image.new("L", (12, 12))))
    write(tmp_path / "w" / "b.png", png_bytes(Image.new("L", (5, 5))))
    ds = open_source(tmp_path / "w")
    assert ds.names == ["b.png"]
    assert "decompression bomb" in reasons(ds)["a.png"]


def test_truncated_jpeg_raises_unreadable_at_load(tmp_path):
    content = jpeg_bytes(noise())
    write(tmp_path / "t" / "cut.jpg", content[: len(content) // 2])
    write(tmp_path / "t" / "ok.jpg", content)
    ds = open_source(tmp_path / "t")
    assert ds.names == ["cut.jpg", "ok.jpg"]
    with pytest.raises(UnreadableImage, match="cut.jpg"):
        ds.load(0)
    assert ds.load(1).size == (64, 64)


def test_images_outside_class_folders_are_skipped(tmp_path):
    root = make_class_folder(tmp_path / "pets")
    write(root / "stray.png", png_bytes(colour((1, 2, 3))))
    ds = open_source(root)
    assert len(ds) == 5
    assert reasons(ds) == {"stray.png": "outside the class subfolders"}


def test_lone_top_folder_is_looked_through(tmp_path):
    make_class_folder(tmp_path / "outer" / "pets")
    ds = open_source(tmp_path / "outer")
    assert ds.class_names == ["cat", "dog"]


def test_train_and_test_subfolders_are_splits(tmp_path):
    make_class_folder(tmp_path / "s" / "train")
    write(tmp_path / "s" / "test" / "cat" / "t.png", png_bytes(colour((9, 9, 9))))
    test, train = open_source(tmp_path / "s"), open_source(tmp_path / "s", split="train")
    assert (len(test), len(train)) == (1, 5)
    assert test.fingerprint != train.fingerprint


def test_train_split_of_a_folder_without_splits_says_how(tmp_path):
    with pytest.raises(DataSourceError, match="train/"):
        open_source(make_class_folder(tmp_path / "pets"), split="train")


@pytest.mark.parametrize("setup, message", [
    (lambda p: p.mkdir(), "holds no image files"),
    (lambda p: write(p / "a.txt", b"x"), "holds no image files"),
    (lambda p: write(p / "bad.png", b"x"), "none of the 1 files is a readable image"),
    (lambda p: None, "no such folder or file"),
    (lambda p: write(p, b"not a zip"), "not a zip archive"),
])
def test_unusable_paths_raise_with_advice(tmp_path, setup, message):
    path = tmp_path / "src"
    setup(path)
    with pytest.raises(DataSourceError, match=message):
        open_source(path)


def test_unknown_name_lists_the_sources():
    with pytest.raises(DataSourceError, match="cifar10") as info:
        open_source("imagenet-42")
    assert "folder" in str(info.value)


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="split"):
        open_source("demo", split="val")
    with pytest.raises(ValueError, match="labels_csv"):
        open_source("demo", labels_csv=tmp_path / "x.csv")
    with pytest.raises(IndexError):
        open_source("demo").load(1000)


def test_sources_have_descriptions():
    assert {"demo", "demo-photos", "fashion-mnist", "cifar10", "cifar100", "stl10",
            "tiny-imagenet"} <= set(SOURCES)
    assert all(name == source.name and source.description for name, source in SOURCES.items())
    assert [name for name, source in SOURCES.items() if not source.needs_root] == ["demo", "demo-photos"]
    assert [name for name, source in SOURCES.items() if not source.has_train_split] == ["demo", "demo-photos"]


def test_a_source_without_a_train_split_says_so():
    with pytest.raises(DataSourceError, match="'demo-photos' has no train split"):
        open_source("demo-photos", split="train")


# Paths a server's visitor typed -----------------------------------------------------


def allowed_and_outside(tmp_path):
    """An allowed folder of pets (with a labels CSV) and, beside it, a folder the server must not open."""
    allowed = make_class_folder(tmp_path / "allowed" / "pets")
    write(tmp_path / "allowed" / "labels.csv", b"cat/c0.png,cat\n")
    outside = make_class_folder(tmp_path / "secret")
    write(tmp_path / "secret.csv", b"cat/c0.png,cat\n")
    return allowed.parent, outside


@pytest.mark.parametrize("typed", ["../secret", "{tmp}/secret", "pets/../../secret", "link_out"],
                         ids=["dot-dot", "absolute-outside", "dot-dot-inside", "symlinked-folder"])
def test_a_path_leaving_the_allowed_roots_is_refused(tmp_path, typed):
    allowed, outside = allowed_and_outside(tmp_path)
    (allowed / "link_out").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathNotAllowedError, match="outside the folders this server allows") as info:
        open_source(typed.format(tmp=tmp_path), allowed_roots=[allowed])
    if typed == "link_out":
        assert str(outside) not in str(info.value), "the message must not reveal where a link points"


def test_paths_inside_the_allowed_roots_open(tmp_path):
    allowed, _ = allowed_and_outside(tmp_path)
    assert len(open_source("pets", allowed_roots=[allowed])) == 5, "relative to the first allowed root"
    assert len(open_source(allowed / "pets", labels_csv="labels.csv", allowed_roots=[allowed])) == 1
    with pytest.raises(PathNotAllowedError, match="outside"):
        open_source(allowed / "pets", labels_csv=tmp_path / "secret.csv", allowed_roots=[allowed])
    with pytest.raises(PathNotAllowedError, match="switched off"):
        open_source(allowed / "pets", allowed_roots=[])


def test_a_built_in_source_root_must_stay_inside_the_allowed_roots(tmp_path):
    allowed, outside = allowed_and_outside(tmp_path)
    with pytest.raises(PathNotAllowedError, match="outside"):
        open_source("cifar10", root=outside, allowed_roots=[allowed])
    with pytest.raises(DataSourceError, match="CIFAR-10 could not be loaded"):
        open_source("cifar10", root=allowed, allowed_roots=[allowed])


def test_a_linked_file_inside_an_allowed_folder_is_read_only_when_it_stays_inside(tmp_path):
    allowed, outside = allowed_and_outside(tmp_path)
    (allowed / "pets" / "cat" / "stolen.png").symlink_to(outside / "dog" / "d0.png")
    (allowed / "pets" / "cat" / "alias.png").symlink_to(allowed / "pets" / "dog" / "d1.png")
    ds = open_source(allowed / "pets", allowed_roots=[allowed])
    assert "cat/stolen.png" not in ds.names and "cat/alias.png" in ds.names
    why = reasons(ds)
    assert why == {"cat/stolen.png": "refused: a link to a file outside the allowed folders"}
    assert str(outside) not in why["cat/stolen.png"]
    assert "cat/stolen.png" in open_source(allowed / "pets").names, "without allowed roots every path is trusted"


# Labels CSV -------------------------------------------------------------------------


def flat_folder(root, n=4):
    for i in range(n):
        write(root / f"img{i}.png", png_bytes(colour((10 * i, 0, 0))))
    return root


def test_labels_csv_with_header_missing_rows_and_unknown_files(tmp_path):
    root = flat_folder(tmp_path / "flat")
    csv_path = write(tmp_path / "labels.csv",
                     b"filename,label\nimg0.png,b\nimg1.png,a\nimg2.png,b\nghost.png,a\n")
    ds = open_source(root, labels_csv=csv_path)
    assert ds.names == ["img0.png", "img1.png", "img2.png"]
    assert ds.class_names == ["a", "b"]
    assert ds.labels.tolist() == [1, 0, 1]
    why = reasons(ds)
    assert set(why) == {"img3.png", "ghost.png"}
    assert why["img3.png"] == "no row for it in the labels CSV"
    assert why["ghost.png"] == "listed in the labels CSV but no such image"


def test_labels_csv_without_header(tmp_path):
    root = flat_folder(tmp_path / "flat", n=2)
    ds = open_source(root, labels_csv=write(tmp_path / "l.csv", b"img0.png,1\nimg1.png,0\n"))
    assert ds.labels.tolist() == [1, 0]


@pytest.mark.parametrize("content, message", [
    (b"nothing.png,a\n", "names none of the 2 images"),
    (b"img0.png,a\nimg0.png,b\n", "two labels"),
    (b"img0.png\n", "line 1: expected filename,label"),
    (b"img0.png;a\nimg1.png;b\n", "line 1: expected filename,label .* separated by semicolons, use commas"),
    (png_bytes(colour((1, 2, 3))), "not a text CSV file .*binary"),
    ("img0.png,a\n".encode("utf-16"), "not a text CSV file"),  # Excel's "Unicode text"
    (b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00", "not a text CSV file"),  # a spreadsheet (.xlsx)
], ids=["no-match", "two-labels", "one-column", "semicolons", "an-image", "utf-16", "xlsx"])
def test_bad_labels_csv_raises(tmp_path, content, message):
    root = flat_folder(tmp_path / "flat", n=2)
    with pytest.raises(DataSourceError, match=message):
        open_source(root, labels_csv=write(tmp_path / "l.csv", content))
    with pytest.raises(DataSourceError, match=message.replace("line 1", "the labels CSV, line 1")):
        open_uploads([(f"img{i}.png", png_bytes(colour((i, i, i)))) for i in range(2)], labels_csv=content)


def test_labels_csv_header_is_recognised_by_its_label_column(tmp_path):
    root = flat_folder(tmp_path / "flat", n=2)
    ds = open_source(root, labels_csv=write(tmp_path / "l.csv", b"picture,class\nimg0.png,a\nimg1.png,b\n"))
    assert ds.class_names == ["a", "b"] and ds.skipped == []


def test_missing_labels_csv_raises(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        open_source(flat_folder(tmp_path / "flat"), labels_csv=tmp_path / "none.csv")
    with pytest.raises(DataSourceError, match="is a folder, not a file"):
        open_source(flat_folder(tmp_path / "flat"), labels_csv=tmp_path)


# Zips -------------------------------------------------------------------------------


def test_zip_with_wrapper_folder_and_escaping_members(tmp_path):
    red, blue = png_bytes(colour((255, 0, 0))), png_bytes(colour((0, 0, 255)))
    path = make_zip(tmp_path / "pets.zip", {
        "pets/cat/a.png": red, "pets/cat/b.png": red, "pets/dog/c.png": blue,
        "../evil.png": red, "/abs.png": red, "pets/__MACOSX/._a.png": b"junk",
    })
    ds = open_source(path)
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.names == ["cat/a.png", "cat/b.png", "dog/c.png"]
    assert ds.load(2).getpixel((0, 0)) == (0, 0, 255)
    why = reasons(ds)
    assert set(why) == {"../evil.png", "/abs.png"}
    assert all("escapes the archive" in reason for reason in why.values())


def test_zip_with_corrupt_member_skips_it(tmp_path):
    path = make_zip(tmp_path / "flat.zip", {"a.png": png_bytes(colour((1, 1, 1))),
                                            "b.png": b"garbage"})
    ds = open_source(path)
    assert ds.names == ["a.png"]
    assert reasons(ds)["b.png"] == "not an image file (Pillow cannot identify it)"


def test_zip_bomb_ratio_is_refused(tmp_path):
    path = make_zip(tmp_path / "bomb.zip", {"zeros.bmp": bytes(4 * 1024**2)})
    with pytest.raises(DataSourceError, match="possible zip bomb"):
        open_source(path)


def test_zip_total_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(data_files, "MAX_ZIP_BYTES", 1000)
    path = make_zip(tmp_path / "big.zip", {"a.png": png_bytes(noise((32, 32)))})
    with pytest.raises(DataSourceError, match="GiB limit"):
        open_source(path)


def test_empty_zip_raises(tmp_path):
    with pytest.raises(DataSourceError, match="holds no image files"):
        open_source(make_zip(tmp_path / "empty.zip", {}))


def test_zip_dataset_survives_pickling(tmp_path):
    ds = open_source(make_zip(tmp_path / "z.zip", {"a.png": png_bytes(colour((5, 6, 7)))}))
    ds.load(0)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.load(0).getpixel((0, 0)) == (5, 6, 7)
    assert clone.fingerprint == ds.fingerprint


# Uploads ----------------------------------------------------------------------------


def test_uploaded_images_with_labels(tmp_path):
    files = [("a.png", png_bytes(colour((1, 1, 1)))), ("b.jpg", jpeg_bytes(colour((2, 2, 2)))),
             ("c.png", b"broken"), ("dir/a.png", png_bytes(colour((3, 3, 3))))]
    ds = open_uploads(files, labels_csv=b"a.png,x\nb.jpg,y\nc.png,y\n")
    assert ds.names == ["a.png", "b.jpg"]
    assert ds.labels.tolist() == [0, 1]
    why = reasons(ds)
    assert why["c.png"] == "not an image file (Pillow cannot identify it)"  # no "<_io.BytesIO object at 0x...>"
    assert "same file name" in why["dir/a.png"]


def test_uploaded_zip(tmp_path):
    content = make_zip(tmp_path / "u.zip", {"x/1.png": png_bytes(colour((0, 9, 0))),
                                            "y/2.png": png_bytes(colour((0, 0, 9)))}).read_bytes()
    ds = open_uploads([("u.zip", content)])
    assert ds.class_names == ["x", "y"]
    assert ds.load(0).getpixel((0, 0)) == (0, 9, 0)


@pytest.mark.parametrize("files, message", [
    ([], "no files were uploaded"),
    ([("a.zip", b"PK"), ("b.png", b"x")], "not both"),
])
def test_bad_uploads_raise(files, message):
    with pytest.raises(DataSourceError, match=message):
        open_uploads(files)


def test_uploads_must_be_name_bytes_pairs():
    with pytest.raises(TypeError, match="filename, bytes"):
        open_uploads([("a.png", "not bytes")])


# torchvision datasets ---------------------------------------------------------------


def write_cifar10(root, n=3):
    """Official CIFAR-10 python batches, n images each; return the test batch arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    return batch


def accept_checksums(monkeypatch, cls, folder, meta=True):
    """Point torchvision's md5 lists at our tiny files, so its integrity check passes."""
    for attr in ("train_list", "test_list"):
        entries = [[name, md5(folder / name)] for name, _ in getattr(cls, attr)]
        monkeypatch.setattr(cls, attr, entries)
    if meta:
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})


def test_cifar10_reads_official_batches(tmp_path, monkeypatch):
    test_batch = write_cifar10(tmp_path)
    accept_checksums(monkeypatch, CIFAR10, tmp_path / "cifar-10-batches-py")
    ds = open_source("cifar10", root=tmp_path)
    assert len(ds) == 3
    assert ds.labels.tolist() == test_batch["labels"]
    assert ds.class_names[0] == "airplane" and len(ds.class_names) == 10
    assert ds.names[1] == "test/1"
    row = test_batch["data"][1]  # 1024 red, 1024 green, 1024 blue values, rows of 32
    assert ds.load(1).getpixel((5, 2)) == tuple(int(row[c * 1024 + 2 * 32 + 5]) for c in range(3))
    assert len(open_source("cifar10", root=tmp_path, split="train")) == 15


def test_cifar100_reads_fine_labels(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, labels in (("train", [3, 1]), ("test", [2, 0, 2])):
        pixels = np.zeros((len(labels), 3072), dtype=np.uint8)
        batch = {"data": pixels, "fine_labels": labels, "coarse_labels": [0] * len(labels)}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    accept_checksums(monkeypatch, CIFAR100, folder)
    ds = open_source("cifar100", root=tmp_path)
    assert ds.labels.tolist() == [2, 0, 2]
    assert len(ds.class_names) == 100


def test_stl10_matches_torchvision(tmp_path, monkeypatch):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 2), ("test", 3)):
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96,
                                                             dtype=np.uint8).tobytes())
        (folder / f"{split}_y.bin").write_bytes(np.array([1, 10, 4][:n], dtype=np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(bytes(3 * 96 * 96))
    (folder / "class_names.txt").write_text("\n".join(f"k{i}" for i in range(10)))
    accept_checksums(monkeypatch, STL10, folder, meta=False)
    ds = open_source("stl10", root=tmp_path)
    reference = STL10(str(tmp_path), split="test")
    assert ds.labels.tolist() == [0, 9, 3]
    assert ds.class_names[9] == "k9"
    assert np.array_equal(np.asarray(ds.load(2)), np.asarray(reference[2][0]))


@pytest.mark.parametrize("spec, folder", [("cifar10", "cifar-10-batches-py"),
                                          ("cifar100", "cifar-100-python"),
                                          ("stl10", "stl10_binary")])
def test_missing_torchvision_dataset_says_where(tmp_path, spec, folder):
    with pytest.raises(DataSourceError, match=folder) as info:
        open_source(spec, root=tmp_path)
    assert str(tmp_path) in str(info.value) and "download=True" in str(info.value)


# Tiny ImageNet ----------------------------------------------------------------------


def make_tiny_imagenet(root):
    base = root / "tiny-imagenet-200"
    write(base / "wnids.txt", b"n02\nn01\n")
    write(base / "words.txt", b"n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\n"
                              b"n99\tunused\n")
    image = jpeg_bytes(colour((0, 128, 0), (64, 64)))
    for name in ("val_0.JPEG", "val_1.JPEG", "val_2.JPEG", "stray.JPEG"):
        write(base / "val" / "images" / name, image)
    write(base / "val" / "val_annotations.txt",
          b"val_0.JPEG\tn01\t0\t0\t10\t10\nval_1.JPEG\tn02\t1\t1\t9\t9\n"
          b"val_2.JPEG\tn01\t2\t2\t8\t8\nval_9.JPEG\tn02\t0\t0\t5\t5\n")
    for wnid in ("n01", "n02"):
        write(base / "train" / wnid / "images" / f"{wnid}_0.JPEG", image)
        write(base / "train" / wnid / f"{wnid}_boxes.txt", b"")
    return base


def test_tiny_imagenet_val_layout(tmp_path):
    make_tiny_imagenet(tmp_path)
    ds = open_source("tiny-imagenet", root=tmp_path)
    assert ds.names == ["val_0.JPEG", "val_1.JPEG", "val_2.JPEG"]
    assert ds.class_names == ["tabby", "goldfish"]  # wnids.txt order: n02, n01
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.load(0).size == (64, 64)
    why = reasons(ds)
    assert why["stray.JPEG"] == "no entry in val_annotations.txt"
    assert "missing" in why["val_9.JPEG"]


def test_tiny_imagenet_without_wnids_or_words_uses_wnids_sorted(tmp_path):
    base = make_tiny_imagenet(tmp_path)
    (base / "wnids.txt").unlink()
    (base / "words.txt").unlink()
    ds = open_source("tiny-imagenet", root=tmp_path)
    assert ds.class_names == ["n01", "n02"]
    assert ds.labels.tolist() == [0, 1, 0]


def test_tiny_imagenet_train_split(tmp_path):
    make_tiny_imagenet(tmp_path)
    ds = open_source("tiny-imagenet", root=tmp_path / "tiny-imagenet-200", split="train")
    assert ds.names == ["n01/n01_0.JPEG", "n02/n02_0.JPEG"]
    assert ds.labels.tolist() == [1, 0]


def test_missing_tiny_imagenet_says_where(tmp_path):
    with pytest.raises(DataSourceError, match="tiny-imagenet-200/val/images"):
        open_source("tiny-imagenet", root=tmp_path)


# Fashion-MNIST ----------------------------------------------------------------------


def write_idx_pair(folder, prefix, images, labels, gz):
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        content = idx_bytes(array)
        name = f"{prefix}-{kind}" + (".gz" if gz else "")
        write(folder / name, gzip.compress(content) if gz else content)


def test_fashion_mnist_from_gzipped_idx(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28).astype(np.uint8)
    write_idx_pair(tmp_path, "t10k", images, np.array([9, 0, 3], dtype=np.uint8), gz=True)
    ds = open_source("fashion-mnist", root=tmp_path)
    assert ds.labels.tolist() == [9, 0, 3]
    assert ds.class_names[9] == "Ankle boot"
    assert ds.names == ["test/0", "test/1", "test/2"]
    assert np.array_equal(np.asarray(ds.load(2))[..., 1], images[2])


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_pair(raw, "train", images, np.array([1, 2], dtype=np.uint8), gz=False)
    ds = open_source("fashion-mnist", root=tmp_path, split="train")
    assert ds.names == ["train/0", "train/1"] and ds.labels.tolist() == [1, 2]


def test_missing_fashion_mnist_says_which_files(tmp_path):
    with pytest.raises(DataSourceError, match="t10k-images-idx3-ubyte.gz"):
        open_source("fashion-mnist", root=tmp_path)


def test_fashion_mnist_found_where_debian_installs_it():
    assert DEBIAN_FASHION_MNIST.is_dir(), "install Debian's dataset-fashion-mnist: `make system-packages`"
    ds = open_source("fashion-mnist")
    assert len(ds) == 10_000
    assert np.bincount(ds.labels).tolist() == [1000] * 10


# Embedded demo ----------------------------------------------------------------------


def test_demo_loads_offline():
    ds = open_source("demo")
    assert len(ds) == 1000
    assert len(ds.class_names) == 10 and ds.class_names[0] == "T-shirt/top"
    assert np.bincount(ds.labels).tolist() == [100] * 10
    assert ds.load(0).mode == "RGB" and ds.load(999).size == (28, 28)
    assert ds.names[0].startswith("test/")
    assert open_source("demo").fingerprint == ds.fingerprint


def test_demo_photos_load():
    ds = open_source("demo-photos")
    assert 6 <= len(ds) <= 10
    assert ds.labels is None and "chelsea" in ds.names
    for i in range(len(ds)):
        image = ds.load(i)
        assert image.mode == "RGB" and min(image.size) == 256


def test_demo_assets_stay_small():
    demo = Path(str(bundled("assets"))) / "demo"
    assert sum(f.stat().st_size for f in demo.rglob("*") if f.is_file()) < 2 * 1024**2


# balanced_subset --------------------------------------------------------------------


def labelled(counts):
    """A dataset of blank images with `counts[k]` images of class k."""
    labels = np.repeat(np.arange(len(counts)), counts)
    images = np.zeros((len(labels), 2, 2), dtype=np.uint8)
    return ImageDataset.from_arrays(images, labels, [f"c{k}" for k in range(len(counts))])


def test_balanced_subset_is_balanced():
    ds = labelled([50, 50, 50, 50])
    subset = balanced_subset(ds, 40, seed=3)
    assert np.bincount(subset.labels).tolist() == [10, 10, 10, 10]
    assert isinstance(subset, ImageDataset) and subset.class_names == ds.class_names
    assert subset.title == "In-memory images; balanced subset of 40 (seed 3)", "what the images are, without counts"
    assert subset.description == "In-memory images, 200 images, 4 classes; balanced subset of 40 (seed 3)"


def test_balanced_subset_gives_small_classes_all_they_have():
    subset = balanced_subset(labelled([2, 30, 30]), 12, seed=0)
    assert np.bincount(subset.labels).tolist() == [2, 5, 5]


def test_balanced_subset_remainder_is_spread():
    counts = np.bincount(balanced_subset(labelled([20, 20, 20]), 10, seed=1).labels)
    assert sorted(counts.tolist()) == [3, 3, 4]


def test_balanced_subset_remainder_goes_to_random_classes():
    ds = labelled([20, 20, 20])
    favoured = {int(np.argmax(np.bincount(balanced_subset(ds, 4, seed=s).labels)))
                for s in range(20)}
    assert len(favoured) > 1


def test_balanced_subset_is_deterministic_and_seeded():
    ds = labelled([40, 40, 40])
    first, again = balanced_subset(ds, 30, seed=7), balanced_subset(ds, 30, seed=7)
    other = balanced_subset(ds, 30, seed=8)
    assert first.names == again.names and first.fingerprint == again.fingerprint
    assert first.names != other.names and first.fingerprint != other.fingerprint
    assert first.fingerprint != ds.fingerprint


def test_balanced_subset_without_labels_and_whole():
    ds = ImageDataset.from_arrays(np.zeros((20, 2, 2), np.uint8))
    subset = balanced_subset(ds, 5, seed=0)
    assert len(subset) == 5 and subset.labels is None
    assert len(set(subset.names)) == 5
    assert balanced_subset(ds, 20) is ds


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_balanced_subset_refuses_bad_limits(limit):
    with pytest.raises(ValueError, match="limit"):
        balanced_subset(labelled([3, 3]), limit)


def test_balanced_subset_needs_an_integer_seed():
    with pytest.raises(ValueError, match="seed"):
        balanced_subset(labelled([3, 3]), 2, seed=None)


# In-memory arrays -------------------------------------------------------------------


def test_from_arrays_defaults_and_fingerprint():
    images = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    ds = ImageDataset.from_arrays(images, labels=[1, 0])
    assert ds.class_names == ["0", "1"] and ds.names == ["0", "1"]
    assert np.array_equal(np.asarray(ds.load(-1)), images[1])
    changed = images.copy()
    changed[1, 2, 2, 2] += 1
    assert ImageDataset.from_arrays(changed, labels=[1, 0]).fingerprint != ds.fingerprint
    assert ImageDataset.from_arrays(images, labels=[1, 0]).fingerprint == ds.fingerprint


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=np.zeros((2, 3, 3), np.float32)), "uint8"),
    (dict(images=np.zeros((2, 3, 3), np.uint8), labels=[0]), "labels"),
    (dict(images=np.zeros((2, 3, 3), np.uint8), labels=[0, 2], class_names=["a", "b"]),
     "class_names"),
    (dict(images=np.zeros((2, 3, 3), np.uint8), names=["x"]), "names"),
])
def test_from_arrays_validates(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageDataset.from_arrays(**kwargs)


# Fingerprints -----------------------------------------------------------------------


def test_fingerprint_is_stable_and_follows_content(tmp_path):
    root = make_class_folder(tmp_path / "pets")
    first = open_source(root).fingerprint
    assert open_source(root).fingerprint == first
    write(root / "cat" / "c0.png", png_bytes(colour((255, 0, 0), (9, 9))))
    changed = open_source(root).fingerprint
    assert changed != first
    write(root / "dog" / "d9.png", png_bytes(colour((0, 0, 255))))
    assert open_source(root).fingerprint not in {first, changed}


def test_fingerprint_follows_labels(tmp_path):
    root = flat_folder(tmp_path / "flat", n=2)
    one = open_source(root, labels_csv=write(tmp_path / "a.csv", b"img0.png,a\nimg1.png,b\n"))
    two = open_source(root, labels_csv=write(tmp_path / "b.csv", b"img0.png,a\nimg1.png,a\n"))
    assert one.fingerprint != two.fingerprint


def test_upload_fingerprint_follows_bytes():
    a = open_uploads([("a.png", png_bytes(colour((1, 1, 1))))])
    b = open_uploads([("a.png", png_bytes(colour((2, 2, 2))))])
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == open_uploads([("a.png", png_bytes(colour((1, 1, 1))))]).fingerprint


def test_zip_whose_every_member_escapes_is_refused_as_such(tmp_path):
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("../../evil.png", b"not even an image")
    with pytest.raises(DataSourceError, match="every member's path escapes the archive"):
        open_source(str(path))
