"""The one error type users see: a file and what is wrong with it.

The CLI turns a :class:`DintsError` into a single line ``error: <file>: <problem>`` on stderr and exit status 2,
never a traceback. Library code raises it wherever user input (a file, a config key, a CLI value) is at fault.
"""

from __future__ import annotations

import os


class DintsError(Exception):
    """A user-facing error about one file (or setting) and one problem.

    Args:
        where: the file path (or config key / option name) the problem is in.
        problem: one short sentence saying what is wrong, ideally what to do.
    """

    def __init__(self, where: str | os.PathLike | None, problem: str):
        self.where = None if where is None else os.fspath(where)
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        """The message without the ``error:`` prefix, on one line."""
        text = self.problem if self.where is None else f"{self.where}: {self.problem}"
        return " ".join(text.split())
