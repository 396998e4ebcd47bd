"""One process per output folder (dints3d/utils/lock.py): a second process is refused in one line naming the first;
the lock goes with the process however it ends; a folder a failed command created is removed again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from support import HOLD_LOCK, lock_held_elsewhere

from dints3d.utils.errors import DintsError
from dints3d.utils.lock import lock_folder, locked_folder, never


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "run"
    with lock_held_elsewhere(folder) as holder:
        with pytest.raises(DintsError) as caught:
            lock_folder(folder)
        line = caught.value.line()
        assert line.startswith(f"{folder}: is in use by another process (process {holder.pid}: ")
        assert "wait for it to finish or choose another folder (nothing was written)" in line
    lock_folder(folder).release()  # the holder was killed: free again


def test_a_sigkilled_holder_releases_the_lock(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    lock = lock_folder(folder)
    lock.release()
    assert list(folder.iterdir()) == []  # flock on the folder itself: no lock file is left behind


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    outer = lock_folder(tmp_path / "run")
    inner = lock_folder(tmp_path / "run")
    inner.release()
    with lock_held_elsewhere(tmp_path / "other"):
        pass
    outer.release()


def test_a_failed_block_removes_what_it_created_unless_there_is_state_to_keep(tmp_path):
    folder = tmp_path / "a" / "b" / "run"
    with pytest.raises(RuntimeError), locked_folder(folder):
        (folder / "checkpoints").mkdir()
        raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "a").exists()  # the folders above it that it created too

    with pytest.raises(RuntimeError), locked_folder(folder, keep=never):
        (folder / "imagesTr").mkdir()
        (folder / "imagesTr" / "half.nii.gz").write_text("x")
        raise RuntimeError("a command whose outputs land at once (synth, prepare, export): nothing worth keeping")
    assert not (tmp_path / "a").exists()

    with pytest.raises(KeyboardInterrupt), locked_folder(folder):
        (folder / "checkpoint_epoch=1.pt").write_text("hours of training")
        raise KeyboardInterrupt  # by default any file is worth keeping (checkpoints, masks already written)
    assert (folder / "checkpoint_epoch=1.pt").read_text() == "hours of training"
    shutil.rmtree(tmp_path / "a")

    keep = (lambda f: (f / "last.pt").exists())  # a search: only a checkpoint is worth keeping
    with pytest.raises(RuntimeError), locked_folder(folder, keep=keep):
        (folder / "config.yaml").write_text("x")
        raise RuntimeError("failed before the first checkpoint")
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), locked_folder(folder, keep=keep):
        (folder / "last.pt").write_text("state")
        raise RuntimeError("failed after a checkpoint")
    assert (folder / "last.pt").read_text() == "state"

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(RuntimeError), locked_folder(tmp_path / "mine", keep=never):
        (tmp_path / "mine" / "new.txt").write_text("y")
        raise RuntimeError("a folder that held something is left as the block left it")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["new.txt", "notes.txt"]


def test_a_file_where_the_folder_should_be_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DintsError, match="exists and is not a folder"):
        lock_folder(tmp_path / "afile")
