"""``arch.png`` of an Auto-DeepLab architecture: the network path on the trellis and the cell's DAG."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dints3d.spaces.autodeeplab.operations import CELL_OPERATIONS
from dints3d.utils.figures import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OP_COLORS = dict(zip(CELL_OPERATIONS, ["#1f77b4", "#17becf", "#d62728", "#ff7f0e", "#2ca02c", "#8c564b", "#7f7f7f"]))


def _trellis(ax, arch) -> None:
    """Layers left to right, strides 4 (top) to 4·2^(D-1) (bottom); the path in black over the reachable nodes."""
    L, D = arch.num_layers, arch.num_levels
    for layer in range(L + 1):
        for level in range(min(layer, D - 1) + 1):
            ax.plot(layer, level, "o", ms=7, mfc="white", mec="#bbbbbb", zorder=2)
    levels = [0, *arch.network_path]
    ax.plot(range(L + 1), levels, "-o", color="#222222", lw=2.2, ms=8, zorder=3)
    ax.set_xticks(range(L + 1), ["stem"] + [str(i + 1) for i in range(L)])
    ax.set_yticks(range(D), [f"/{4 * 2 ** d}" for d in range(D)])
    ax.set_ylim(D - 0.5, -0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("downsample rate")
    ax.set_title(f"network path (final stride {arch.strides[-1]})", fontsize=10)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _cell_dag(ax, arch) -> None:
    """H^{l-2} and H^{l-1} on the left, blocks left to right, each incoming edge coloured by its operation."""
    B = arch.num_blocks
    position = {0: (0.0, 1.1), 1: (0.0, -0.1)}
    for block in range(B):
        position[block + 2] = (1.3 + 1.2 * block, 0.85 if block % 2 == 0 else 0.15)
    for k, (source, op) in enumerate(arch.cell):
        target = k // 2 + 2
        bend = 0.25 if k % 2 else -0.25
        ax.annotate("", xy=position[target], xytext=position[source],
                    arrowprops=dict(arrowstyle="-|>", color=OP_COLORS[op], lw=1.6, shrinkA=11, shrinkB=11,
                                    connectionstyle=f"arc3,rad={bend}"))
    out = (1.5 + 1.2 * B, 0.5)
    for block in range(B):
        ax.annotate("", xy=out, xytext=position[block + 2],
                    arrowprops=dict(arrowstyle="-", color="#cccccc", lw=0.8, ls="--", shrinkA=11, shrinkB=11))
    labels = {0: "H$^{l-2}$", 1: "H$^{l-1}$", **{b + 2: f"B{b}" for b in range(B)}}
    for node, (x, y) in position.items():
        ax.text(x, y, labels[node], ha="center", va="center", fontsize=8,
                bbox=dict(boxstyle="circle,pad=0.3", fc="white", ec="#222222"))
    ax.text(*out, "concat", ha="center", va="center", fontsize=8,
            bbox=dict(boxstyle="round,pad=0.3", fc="#eeeeee", ec="#222222"))
    ax.set_xlim(-0.5, out[0] + 0.6)
    ax.set_ylim(-0.5, 1.5)
    ax.axis("off")
    used = [op for op in CELL_OPERATIONS if any(op == o for _, o in arch.cell)]
    from matplotlib.lines import Line2D  # optional: figures only (utils/figures.py)

    handles = [Line2D([0], [0], color=OP_COLORS[op], lw=2, label=op) for op in used]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncol=min(len(used), 4),
              frameon=False, fontsize=7)
    ax.set_title(f"cell ({B} blocks, F = {arch.filter_multiplier})", fontsize=10)


def autodeeplab_figure(arch, title: str | None = None) -> Figure:
    """An :class:`~dints3d.spaces.autodeeplab.architecture.AutoDeepLabArchitecture` (which imports this module to
    draw itself): the network path (left) and the cell (right)."""
    ratios = [max(arch.num_layers, 4), 1.2 * arch.num_blocks + 2]
    fig, (left, right) = new_figure((7.0 + 0.45 * arch.num_layers, 3.8), 1, 2, gridspec_kw={"width_ratios": ratios})
    _trellis(left, arch)
    _cell_dag(right, arch)
    fig.suptitle(title or "Auto-DeepLab architecture", fontsize=11)
    fig.tight_layout()
    return fig
