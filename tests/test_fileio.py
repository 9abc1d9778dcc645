"""The atomic writer: a reader sees the old file or the whole new one, and a failure leaves nothing behind."""
import pytest

from itae.fileio import atomic_path


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
