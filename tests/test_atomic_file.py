"""toolkit/atomic_file.py: a write lands whole or not at all."""

from __future__ import annotations

import pytest

from toolkit.atomic_file import write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "cache" / "choice.json"  # the folder is made on the way
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in path.parent.iterdir()] == ["choice.json"]


def test_a_write_that_fails_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    path = tmp_path / "choice.json"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["choice.json"]
