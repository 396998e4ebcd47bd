"""Where a command's output meets the file system: one place that turns a failed write into one line.

Every command checks its output folder before any work (:func:`check_output_folder`: a file where a folder should be,
a folder that cannot be created, no permission, a read-only file system) and writes its files through
:mod:`dints3d.utils.io` (temporary file, fsync, rename). An ``OSError`` at that boundary (a full disk, a read-only
file system, a folder where a file should be, …) becomes a :class:`~dints3d.utils.errors.DintsError` naming the path,
the system's reason and its errno name, and saying what is still intact (:func:`cannot_write`): the file that was
there before is never touched by a failed write. The CLI (:mod:`dints3d.cli`) prints any other ``OSError`` the same
way, as a last resort.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from dints3d.utils.errors import DintsError

#: what a failed atomic write leaves, unless the caller knows better
KEPT = "what was there before is unchanged"


def describe_os_error(error: OSError) -> str:
    """``"No space left on device [ENOSPC]"``: the system's reason and the errno's name."""
    reason = error.strerror or str(error) or type(error).__name__
    name = errno.errorcode.get(error.errno) if isinstance(error.errno, int) else None
    return f"{reason} [{name}]" if name else reason


def cannot_write(path: str | os.PathLike, error: OSError, kept: str = KEPT) -> DintsError:
    """The one-line error of a write to ``path`` that failed with ``error``; ``kept`` says what is still intact and,
    where it helps, what to do next."""
    return DintsError(path, f"cannot write: {describe_os_error(error)}; {kept}")


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that cannot be created or written in: ``folder`` (or the nearest
    existing folder above it) must be a folder this process may write in. Creates nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == folder and not folder.is_dir():
        raise DintsError(folder, "exists and is not a folder")
    if not existing.is_dir():
        raise DintsError(folder, f"cannot create the output folder: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the output folder" if existing == folder else f"{existing}, where the output folder would be created"
        raise DintsError(folder, f"cannot write in {what} (no permission or a read-only file system)")
    return folder
