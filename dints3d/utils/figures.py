"""Figures without pyplot: matplotlib's object-oriented ``Figure`` draws and saves without selecting a backend, so
importing dints3d never changes the backend of a notebook or GUI that uses it.

matplotlib is imported only when a figure is drawn: it is a dependency of dints3d, but figures are all that need
it, and ``bench/gpu_check.py`` runs where only PyTorch and pure-Python wheels are installed (architectures then draw
no ``arch.png``: :func:`matplotlib_available`)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dints3d.utils.io import write_stream

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (``Architecture.figure`` returns ``None`` where it cannot)."""
    return importlib.util.find_spec("matplotlib") is not None


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: int = 110,
               **subplot_kw: Any) -> tuple[Figure, Any]:
    """A figure and its axes (one ``Axes`` or an array of them, as ``pyplot.subplots`` returns)."""
    from matplotlib.figure import Figure  # optional: figures only (module docstring)

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols, **subplot_kw)


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a PNG atomically."""
    write_stream(path, lambda f: fig.savefig(f, format="png"))
    return Path(path)
