"""Atomic writes: the target is replaced whole or not at all, and gets ordinary permissions (not mkstemp's 0600)."""

from __future__ import annotations

import os
import stat

import pytest

from dints3d.utils.io import read_json, write_atomic, write_json


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "arch.json", {"space": "dints"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_json(tmp_path / "plan.json", {"version": 1})

    def fail(tmp):
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_atomic(path, fail)
    assert read_json(path) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
