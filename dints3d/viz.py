"""Pictures people look at instead of reading codes: the searched topology (``arch.png``)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from dints3d.io import write_atomic  # noqa: E402
from dints3d.spaces.dints import DintsArchitecture, operation_names  # noqa: E402
from dints3d.spaces.dints_topology import DintsTopology  # noqa: E402

OP_COLORS = ["#9e9e9e", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"]


def dints_figure(arch: DintsArchitecture, title: str | None = None) -> Figure:
    """Layers left to right, resolutions top (finest) to bottom; each active path an arrow coloured by its op."""
    topo = DintsTopology(arch.num_depths)
    path_in, path_out = topo.path_in.tolist(), topo.path_out.tolist()
    ops = operation_names(arch.spatial_dims)
    L, D = arch.num_blocks, arch.num_depths
    fig, ax = plt.subplots(figsize=(max(6.5, 1.0 + 0.75 * L), 1.6 + 0.8 * D), dpi=110)
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
    handles = [Line2D([0], [0], color=OP_COLORS[i % len(OP_COLORS)], lw=2, label=name) for i, name in enumerate(ops)]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(ops), 5), frameon=False,
              fontsize=8)
    ax.set_title(title or f"DiNTS: {arch.num_active_paths}/{L * topo.num_paths} paths active")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write a PNG atomically and free the figure."""
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return Path(path)


def draw_architecture(arch: DintsArchitecture, path: str | os.PathLike, title: str | None = None) -> Path:
    return save_figure(dints_figure(arch, title), path)
