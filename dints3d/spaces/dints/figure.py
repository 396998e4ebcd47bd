"""The picture of a DiNTS topology (``arch.png``): what people look at instead of reading the codes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dints3d.spaces.dints.operations import operation_names
from dints3d.spaces.dints.topology import DintsTopology
from dints3d.utils.figures import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OP_COLORS = ["#9e9e9e", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"]


def dints_figure(arch, title: str | None = None) -> Figure:
    """A :class:`~dints3d.spaces.dints.architecture.DintsArchitecture` (which imports this module to draw itself):
    layers left to right, resolutions top (finest) to bottom; each active path an arrow coloured by its op."""
    topo = DintsTopology(arch.num_depths)
    path_in, path_out = topo.path_in.tolist(), topo.path_out.tolist()
    ops = operation_names(arch.spatial_dims)
    L, D = arch.num_blocks, arch.num_depths
    fig, ax = new_figure((max(6.5, 1.0 + 0.75 * L), 1.6 + 0.8 * D))
    for layer in range(L):
        for p in range(topo.num_paths):
            if arch.arch_code_a[layer, p]:
                op = int(arch.arch_code_c[layer, p])
                ax.annotate("", xy=(layer + 1, path_out[p]), xytext=(layer, path_in[p]),
                            arrowprops=dict(arrowstyle="-|>", color=OP_COLORS[op % len(OP_COLORS)], lw=1.6,
                                            shrinkA=5, shrinkB=5))
    for layer in range(L + 1):
        for d in range(D):
            active = bool(arch.node_a[layer, d])
            ax.plot(layer, d, "o", ms=9, mfc="#222222" if active else "white",
                    mec="#222222" if active else "#bbbbbb", zorder=3)
    scale = 2 if arch.use_downsample else 1
    ax.set_yticks(range(D), [f"1/{scale * 2 ** d}" for d in range(D)])
    ax.set_xticks(range(L + 1), ["in"] + [str(i + 1) for i in range(L)])
    ax.set_ylim(D - 0.5, -0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("resolution")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    from matplotlib.lines import Line2D  # optional: figures only (utils/figures.py)

    handles = [Line2D([0], [0], color=OP_COLORS[i % len(OP_COLORS)], lw=2, label=name) for i, name in enumerate(ops)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(ops), 5), frameon=False,
              fontsize=8)
    ax.set_title(title or f"DiNTS: {arch.num_active_paths}/{L * topo.num_paths} paths active")
    fig.tight_layout()
    return fig


def draw_architecture(arch, path: str | os.PathLike, title: str | None = None) -> Path:
    return save_figure(dints_figure(arch, title), path)
