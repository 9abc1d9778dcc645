"""The atomic writers: a reader sees the old file or the whole new one, and a failure leaves nothing behind."""
import os

import pytest

from itae.fileio import atomic_directory, atomic_path


def test_a_completed_write_replaces_the_file(tmp_path):
    target = tmp_path / "deeper" / "data.bin"
    with atomic_path(target) as temporary:
        assert temporary.parent == target.parent and temporary != target
        temporary.write_bytes(b"complete")
    assert target.read_bytes() == b"complete"
    assert list(target.parent.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_write_leaves_nothing_behind(tmp_path, failure):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(failure)):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise failure
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == b"old"


def test_a_failed_first_write_creates_no_file(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "new.bin"):
            raise ValueError("the writer failed before writing")
    assert list(tmp_path.iterdir()) == []


def test_a_completed_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "deeper" / "cache"
    for files in ({"a.npy": b"1", "b.npy": b"2"}, {"c.npy": b"3"}):
        with atomic_directory(target) as temporary:
            assert temporary.parent == target.parent and temporary != target and not any(temporary.iterdir())
            for name, data in files.items():
                (temporary / name).write_bytes(data)
        assert {p.name: p.read_bytes() for p in target.iterdir()} == files  # nothing of the old folder is left
        assert list(target.parent.iterdir()) == [target]
        assert target.stat().st_mode & 0o777 == 0o755


def test_an_open_file_of_the_replaced_folder_stays_readable(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as temporary:
        (temporary / "values.npy").write_bytes(b"old values")
    with open(target / "values.npy", "rb") as reader:
        with atomic_directory(target) as temporary:
            (temporary / "values.npy").write_bytes(b"new")
        assert reader.read() == b"old values"
    assert (target / "values.npy").read_bytes() == b"new"


def test_a_writer_that_loses_the_race_still_puts_its_whole_folder_in_place(tmp_path):
    target = tmp_path / "cache"
    with atomic_directory(target) as temporary:
        (temporary / "mine.npy").write_bytes(b"mine")
        target.mkdir()  # another writer finished first, between our check and our rename
        (target / "theirs.npy").write_bytes(b"theirs")
    assert [p.name for p in target.iterdir()] == ["mine.npy"] and os.listdir(tmp_path) == ["cache"]


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_a_failed_folder_leaves_the_old_one_and_nothing_else(tmp_path, failure):
    target = tmp_path / "cache"
    with atomic_directory(target) as temporary:
        (temporary / "a.npy").write_bytes(b"old")
    with pytest.raises(type(failure)):
        with atomic_directory(target) as temporary:
            (temporary / "a.npy").write_bytes(b"half")
            raise failure
    assert os.listdir(tmp_path) == ["cache"] and (target / "a.npy").read_bytes() == b"old"
