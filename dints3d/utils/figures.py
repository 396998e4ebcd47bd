"""Figures without pyplot: matplotlib's object-oriented ``Figure`` draws and saves without selecting a backend, so
importing dints3d never changes the backend of a notebook or GUI that uses it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from dints3d.utils.io import write_stream


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: int = 110,
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A figure and its axes (one ``Axes`` or an array of them, as ``pyplot.subplots`` returns)."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a PNG atomically."""
    write_stream(path, lambda f: fig.savefig(f, format="png"))
    return Path(path)
