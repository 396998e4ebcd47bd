"""How this bundle's own code reports a problem: one line ``error: <where>: <problem>`` that ends
``python -m monai.bundle run`` (``SystemExit``) instead of a traceback."""

from __future__ import annotations

import os

import torch.distributed as dist


class BundleError(Exception):
    """A problem with one file or setting (``where``) and one sentence saying what is wrong and what to do."""

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else os.fspath(where)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        """The message on one line, without the ``error:`` prefix."""
        text = self.problem if self.where is None else f"{self.where}: {self.problem}"
        return " ".join(text.split())


def stop(error: BundleError) -> SystemExit:
    """The one-line failure of a bundle run (``monai.bundle run`` would otherwise print a traceback)."""
    return SystemExit(f"error: {error.line()}")


def rank() -> int:
    """This process's rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
