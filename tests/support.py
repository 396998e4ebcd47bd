"""Helpers and constants tests import (``import support``; pyproject.toml puts tests/ on sys.path). Fixtures are in
the conftest.py files; nothing imports from those."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.utils import io as io_module

# --- Numerical comparisons that hold on any CPU ---------------------------------------------------------------------
# Equivalence tests (ours against MONAI, a second implementation or brute force) compare in float64 where the ops
# allow it: float32 results move with the CPU's kernels (oneDNN and ATen pick AVX-512, AVX2 or SSE4.1 code, which
# sum in different orders), float64 results move ~2^29 times less. Comparisons that must stay float32 derive their
# bound from the computation with fp32_sum_bound.

#: Unit roundoff of float32 (half its machine epsilon): one rounding moves a value by at most U32·|value|.
U32 = 2.0**-24

#: Bound on rel_error for float64 equivalence tests. In float32 these comparisons differ by up to ~1.4e-4 (fused-cell
#: weight gradients against MONAI's, on an AVX-512 CPU); float64's unit roundoff is 2^-53 / 2^-24 ≈ 1.9e-9 times
#: float32's, so the same summation-order effects give ≲ 3e-13 (observed ≤ 1.4e-14). 1e-10 leaves a margin of more than
#: 300 over that, and is still ~10^7 below a real discrepancy (a missing term or a wrong scale is ≥ 1e-3).
F64_RTOL = 1e-10


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual − expected| / max|expected| (computed in float64): the difference relative to the scale of the
    result, not per element, so entries that happen to be near zero need no hand-picked absolute tolerance."""
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(torch.finfo(torch.float64).tiny))


def fp32_sum_bound(n: int) -> float:
    """γ_n = n·u / (1 − n·u), u = 2^-24: a float32 sum (or dot product) of n terms, in any order and blocking, is
    within γ_n·Σ|terms| of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., §3.1).
    Two float32 evaluations of the same sum, in different orders, are thus within 2·γ_n·Σ|terms| of each other."""
    assert n * U32 < 0.5
    return n * U32 / (1 - n * U32)


# --- Synthetic tasks and configs (what the shared fixtures of conftest.py hand out) ----------------------------------

@dataclass(frozen=True)
class PreparedTask:
    """A synthetic task folder and the work folder ``dints3d prepare`` wrote for it. Shared by every test that asks
    for the same options: tests read both folders and write elsewhere (a test that changes a task changes a copy)."""

    task: Path
    work: Path
    #: what :func:`dints3d.data.prepare.prepare` returned: ``{"fingerprint": …, "plan": …, "datalist": …}``
    outputs: dict


def with_settings(overrides: list[str], *changes: str) -> list[str]:
    """``overrides`` with each ``KEY=VALUE`` of ``changes`` in place of the entry for the same KEY (appended where
    there is none), so every key is set once."""
    result = list(overrides)
    for change in changes:
        key = change.partition("=")[0]
        where = [i for i, text in enumerate(result) if text.partition("=")[0] == key]
        if where:
            result[where[0]] = change
        else:
            result.append(change)
    return result


class TinyConfig:
    """``--set`` overrides under which a stage runs in seconds on a CPU (the ``tiny`` fixture). Each property is a
    fresh list."""

    @property
    def dints(self) -> list[str]:
        """A 2-block, 3-resolution DiNTS space at 1/8 of the channels, on the CPU."""
        return ["device=cpu", "dints.num_blocks=2", "dints.num_depths=3", "dints.channel_mul=0.125"]

    @property
    def search(self) -> list[str]:
        """A 6-iteration search of :attr:`dints` on one 32³ patch of 2 cases per step: validation at iterations 3 and
        6 (no window overlap), a checkpoint every 2 iterations, fp32."""
        return [*self.dints, "data.patch_size=[32,32,32]", "data.num_samples=1", "data.max_cases=2",
                "search.iterations=6", "search.val_interval=3", "search.checkpoint_interval=2",
                "search.val_overlap=0.0", "search.amp=false"]

    def search_with(self, *changes: str) -> list[str]:
        """:attr:`search` with some settings changed or added (:func:`with_settings`)."""
        return with_settings(self.search, *changes)

    @property
    def autodeeplab(self) -> list[str]:
        """A 3-layer Auto-DeepLab space with 2 blocks per cell."""
        return ["autodeeplab.num_layers=3", "autodeeplab.num_blocks=2"]

    @property
    def bundle(self) -> list[str]:
        """A bundle that trains in seconds on CPU: 2 iterations at 1/4 of the channels, validation after each."""
        return ["train.channel_mul=0.25", "train.iterations=2", "train.val_interval=1", "train.batch_size=1",
                "data.num_samples=1", "data.num_workers=0"]


# --- Bundles ---------------------------------------------------------------------------------------------------------

def tiny_arch() -> DintsArchitecture:
    """A decoded 3-block, 3-resolution DiNTS space (seeded, no search): the architecture of the tests' bundles."""
    torch.manual_seed(0)
    arch, _ = DintsSearchSpace(1, 3, num_blocks=3, num_depths=3, channel_mul=0.25).decode()
    return arch


def parse(bundle: Path, *names: str) -> ConfigParser:
    """The bundle's configs ``names`` (merged in order) and its metadata, parsed as ``monai.bundle run --bundle_root
    BUNDLE`` does (the configs say ``bundle_root: .``, the folder they are run from)."""
    if str(bundle) not in sys.path:  # its scripts/ (the network class), as `monai.bundle run` puts the root there
        sys.path.insert(1, str(bundle))
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in names])
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser.parse()
    return parser


# --- Bundles with MONAI alone ------------------------------------------------------------------------------------

#: ``python -c BLOCK_DINTS3D monai.bundle run ...``: a process whose import system refuses ``dints3d`` (an editable
#: install's finder would win over a PYTHONPATH shadow, so the refusal goes first on ``sys.meta_path``)
BLOCK_DINTS3D = """
import importlib.abc, runpy, sys
class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dints3d" or name.startswith("dints3d."):
            raise ImportError("dints3d must not be needed for inference")
sys.meta_path.insert(0, _Refuse())
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


# --- Faults of the file system and of other processes --------------------------------------------------------------

class FailingFile(io.RawIOBase):
    """A file whose writes fail with ``OSError(code)`` once more than ``after`` bytes were written (what a full disk
    does), passing the first ``after`` bytes on to ``real``."""

    def __init__(self, real, path: Path, code: int, after: int):
        super().__init__()
        self.real, self.name, self.code, self.left = real, str(path), code, after

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.left:
            self.real.write(data[: self.left])
            self.left = 0
            raise OSError(self.code, os.strerror(self.code))
        self.left -= len(data)
        return self.real.write(data)

    def fileno(self) -> int:
        return self.real.fileno()

    def flush(self) -> None:
        self.real.flush()

    def close(self) -> None:
        if not self.closed:
            super().close()  # flushes
            self.real.close()


def failing_writes(monkeypatch, code: int = errno.ENOSPC, after: int | None = 0,
                   names: Callable[[str], bool] = lambda name: True) -> list[str]:
    """Make the files dints3d writes (every one starts at :func:`dints3d.utils.io.temporary_file`) fail with
    ``OSError(code)``: at creation when ``after`` is None (a read-only file system: EROFS, EACCES), else once more
    than ``after`` bytes are written (a full disk: ENOSPC). Only targets whose file name ``names`` accepts fail; the
    names of those that did are returned (the list grows as they fail). Root ignores permissions, so this is how the
    tests make a folder unwritable."""
    real, failed = io_module.temporary_file, []

    def temporary_file(folder: Path, name: str):
        if not names(name):
            return real(folder, name)
        failed.append(name)
        if after is None:
            raise OSError(code, os.strerror(code), str(Path(folder) / name))
        f, path = real(folder, name)
        return FailingFile(f, path, code, after), path

    monkeypatch.setattr(io_module, "temporary_file", temporary_file)
    return failed


#: a process that holds the lock on the folder argv[1] (:mod:`dints3d.utils.lock`) until it is killed
HOLD_LOCK = """
import sys, time
from dints3d.utils.lock import lock_folder
lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def lock_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holds the lock on ``folder`` for the block (then it is killed, by its pid)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def children(pid: int) -> list[int]:
    """The pids of the child processes of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` every 0.1 s until it holds; fail the test after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds} s waiting for {what}"
        time.sleep(0.1)
