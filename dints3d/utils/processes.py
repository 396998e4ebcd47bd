"""Child processes that die with their parent.

``dints3d train`` and ``dints3d infer`` run ``python -m monai.bundle run`` (``torchrun`` for several processes) in a
child process. A SIGKILL of the parent cannot be caught or forwarded, so without help the child would be orphaned
and go on writing into the folder the parent was responsible for (a second ``train --resume`` would then race it).
Every such child therefore starts through this module as its entry point: ``python -m dints3d.utils.processes MODULE
ARGS…`` asks the kernel to SIGKILL it when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), checks that the parent
is still the one that started it (it may have died in between), then runs ``python -m MODULE ARGS…`` in the same
interpreter. ``torchrun``'s workers start through it too, so they die with the ``torchrun`` agent, which dies with
dints3d. SIGTERM and SIGINT reach a child as before (the terminal's process group, ``subprocess``'s handling).
"""

from __future__ import annotations

import ctypes
import os
import runpy
import signal
import subprocess
import sys
from typing import IO, Mapping, Sequence

#: the environment variable carrying the pid of the process that started a child (checked, then removed, by the child)
PARENT_ENV = "DINTS3D_PARENT_PID"
#: prctl option: the signal the calling process gets when its parent thread ends
PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux; elsewhere nothing), and end now if the
    parent is no longer ``expected_parent`` (it died before the request was made)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(128 + signal.SIGKILL)


def guarded(module_args: Sequence[str]) -> list[str]:
    """The arguments after ``python -m`` that run ``module_args`` (a module and its arguments) through this guard."""
    return [__name__, *module_args]


def run_child(cmd: Sequence[str], env: Mapping[str, str] | None = None, stdout: IO | int | None = None,
              stderr: IO | int | None = None, pass_fds: Sequence[int] = ()) -> int:
    """Run ``cmd`` (whose guarded entry, if any, reads :data:`PARENT_ENV`) to its end; returns its exit status.
    ``pass_fds``: descriptors the child inherits (e.g. a folder lock it must keep while it runs)."""
    child_env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
    return subprocess.run(list(cmd), env=child_env, stdout=stdout, stderr=stderr, pass_fds=tuple(pass_fds),
                          check=False).returncode


def main(argv: Sequence[str]) -> None:
    """``python -m dints3d.utils.processes MODULE ARGS…``: :func:`die_with_parent`, then run ``MODULE`` as
    ``python -m MODULE ARGS…`` would."""
    parent = os.environ.pop(PARENT_ENV, None)
    die_with_parent(int(parent) if parent and parent.isdigit() else None)
    if not argv:
        raise SystemExit("usage: python -m dints3d.utils.processes MODULE [ARGS...]")
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
