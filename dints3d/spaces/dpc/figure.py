"""The picture of a DPC cell (``arch.png``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dints3d.spaces.dpc.genotype import BACKBONE
from dints3d.utils.figures import new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def dpc_figure(arch, title: str | None = None) -> Figure:
    """A :class:`~dints3d.spaces.dpc.architecture.DpcArchitecture`'s cell as a left-to-right DAG: the backbone, one
    box per branch (its operation), the concatenation."""
    n = arch.num_branches
    fig, ax = new_figure((2.0 + 1.6 * n, 2.6))
    ax.set_xlim(-0.7, n + 1.7)
    ax.set_ylim(-1.2, 1.2)
    ax.axis("off")
    boxes = {BACKBONE: ax.text(0.0, 0.0, "backbone", ha="center", va="center", fontsize=8,
                               bbox=dict(boxstyle="round", fc="#dddddd"))}
    for i, b in enumerate(arch.branches):
        boxes[i] = ax.text(1.0 + i, 0.6 if i % 2 else -0.6, f"{i}\n{b.op}", ha="center", va="center", fontsize=8,
                           bbox=dict(boxstyle="round", fc="#f3f3f3", ec="#444444"))
    concat = ax.text(n + 1.0, 0.0, "concat\n1×1 conv", ha="center", va="center", fontsize=8,
                     bbox=dict(boxstyle="round", fc="#dddddd"))

    def arrow(source, target, **style):
        ax.annotate("", xy=target.get_position(), xytext=source.get_position(),
                    arrowprops=dict(patchA=source.get_bbox_patch(), patchB=target.get_bbox_patch(), **style))

    for i, b in enumerate(arch.branches):
        arrow(boxes[b.input], boxes[i], arrowstyle="-|>", color="#1f77b4", lw=1.4, connectionstyle="arc3,rad=0.2")
        arrow(boxes[i], concat, arrowstyle="-", color="#cccccc", lw=0.8)
    ax.set_title(title or f"DPC cell ({n} branches, {arch.channels} channels, {arch.spatial_dims}-D)")
    fig.tight_layout()
    return fig
