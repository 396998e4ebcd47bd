"""One process at a time per output folder.

Every command that writes a folder of state (``prepare``'s WORK, a search or random-search run, a bundle's
``export``, a training's checkpoint folder, ``synth``'s task, ``infer``'s masks) holds an advisory lock on that folder
for as long as it runs: ``flock`` on the folder itself, so no lock file is left behind and the operating system
releases the lock when the process ends, however it ends (a SIGKILL included). A second process that wants the same
folder is refused in one line naming the process that holds it. A child process that writes into the folder (the
``monai.bundle run`` of ``dints3d train``) inherits the lock, so the folder stays locked until the child is gone too.

Locks are re-entrant within a process (a pipeline locks its run folder, then a stage locks it again), and a folder
that a failed command created (or found empty) is removed again unless it holds something worth keeping: by default
any file (a training's checkpoints, masks already written), for a search only a checkpoint (:func:`locked_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from dints3d.utils.errors import DintsError
from dints3d.utils.outputs import cannot_write, check_output_folder

#: (device, inode) of each folder this process holds → [descriptor, holders]
_HELD: dict[tuple[int, int], list[int]] = {}
_GUARD = threading.Lock()


@dataclass
class FolderLock:
    """A held lock on ``folder``; ``fd`` is the descriptor a child process may inherit to keep it."""

    folder: Path
    fd: int
    key: tuple[int, int]
    created: Path | None  #: the highest folder this lock created (``folder`` or one above it), if any
    was_empty: bool  #: the folder did not exist or held nothing
    released: bool = field(default=False)

    def release(self) -> None:
        with _GUARD:
            if self.released:
                return
            self.released = True
            entry = _HELD.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[self.key]
                os.close(entry[0])  # closing the last descriptor releases the lock


def lock_folder(folder: str | os.PathLike) -> FolderLock:
    """Create ``folder`` if needed (after :func:`~dints3d.utils.outputs.check_output_folder`) and lock it for this
    process, or refuse in one line naming the process that holds it."""
    folder = Path(folder)
    check_output_folder(folder)
    created = None
    for above in (folder, *folder.parents):
        if above.exists():
            break
        created = above
    try:
        folder.mkdir(parents=True, exist_ok=True)
        was_empty = created is not None or not any(folder.iterdir())
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise cannot_write(folder, e, "nothing was written") from None
    status = os.fstat(fd)
    key = (status.st_dev, status.st_ino)
    with _GUARD:
        entry = _HELD.get(key)
        if entry is not None:
            os.close(fd)
            entry[1] += 1
            return FolderLock(folder, entry[0], key, created, was_empty)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DintsError(folder, f"is in use by another process ({_holder(key)}); wait for it to finish or choose "
                             f"another folder (nothing was written)") from None
        except OSError:  # a file system without locks (some network mounts): run unlocked
            pass
        _HELD[key] = [fd, 1]
    return FolderLock(folder, fd, key, created, was_empty)


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[FolderLock]:
    """Hold :func:`lock_folder` for the block. When the block fails and the folder was absent or empty before, what
    the block wrote there is removed (the folder too, if this created it) unless ``keep(folder)`` says it holds
    something worth keeping (default :func:`holds_files`: any file); a folder that held something before is left as
    the block left it."""
    lock = lock_folder(folder)
    try:
        yield lock
    except BaseException:
        discard_if_new(lock, keep)
        raise
    finally:
        lock.release()


def holds_files(folder: Path) -> bool:
    """Whether ``folder`` holds a file anywhere below it (empty sub-folders do not count)."""
    return any(not p.is_dir() for p in folder.rglob("*"))


def never(folder: Path) -> bool:
    """Nothing a failed run of this command leaves is worth keeping (its real outputs land all at once)."""
    return False


def discard_if_new(lock: FolderLock, keep: Callable[[Path], bool] | None = None) -> None:
    """After a failure: empty ``lock.folder`` when it was absent or empty before and holds nothing ``keep`` (default
    :func:`holds_files`) wants kept, and remove the folders the lock created (``lock.folder`` up to
    ``lock.created``). Only the outermost holder in this process does it."""
    keep = holds_files if keep is None else keep
    with _GUARD:
        entry = _HELD.get(lock.key)
        outermost = entry is not None and entry[1] == 1 and not lock.released
    if not outermost or not lock.was_empty or not lock.folder.is_dir() or keep(lock.folder):
        return
    with contextlib.suppress(OSError):
        for child in list(lock.folder.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        if lock.created is not None:
            for folder in (lock.folder, *lock.folder.parents):
                folder.rmdir()
                if folder == lock.created:
                    break


def _holder(key: tuple[int, int]) -> str:
    """``"process 1234: dints3d search --out run"`` for the process holding a lock on the file ``key`` (from
    ``/proc/locks``), or ``"another dints3d process"`` where that cannot be read."""
    device, inode = key
    wanted = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    try:
        with open("/proc/locks") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == wanted:
                    return _describe_process(int(fields[4]))
    except (OSError, ValueError):
        pass
    return "another dints3d process"


def _describe_process(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [a.decode(errors="replace") for a in argv if a]
    except OSError:
        return f"process {pid}"
    if len(words) > 2 and words[1:3] == ["-m", "dints3d"]:
        words = ["dints3d", *words[3:]]
    text = " ".join(words)
    return f"process {pid}: {text[:120] + '…' if len(text) > 120 else text}"
