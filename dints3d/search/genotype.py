"""The cell level of Auto-DeepLab (and DARTS): α over every (block, input) edge, decoded to a genotype.

Block b of a cell reads every earlier state: input 0 = H^{l-2}, 1 = H^{l-1}, 2 + j = block j (j < b), so it has
2 + b incoming edges and a cell of B blocks has B(B+3)/2 edges, numbered block by block. α holds one row of
operation logits per edge (:data:`OPERATIONS` order).
"""

from __future__ import annotations

import torch

from dints3d.spaces.autodeeplab_ops import OPERATIONS, ZERO


def num_edges(num_blocks: int) -> int:
    return num_blocks * (num_blocks + 3) // 2


def edge_offset(block: int) -> int:
    """Index of block ``block``'s first edge (its edge from input 0)."""
    return block * (block + 3) // 2


def decode_cell(alpha: torch.Tensor, num_blocks: int) -> list[tuple[int, str]]:
    """The discrete cell: for each block, its 2 strongest inputs, each with its most likely non-``zero`` operation.

    Strength of an edge = its largest operation weight other than ``zero`` (weights = softmax of α over all eight
    operations, so a dominant ``zero`` weakens an edge without being chosen). Ties go to the earlier input / the
    earlier operation.

    Args:
        alpha: (num_edges(num_blocks), len(OPERATIONS)) logits.
    Returns:
        ``[(input, operation), …]``, two pairs per block, inputs in increasing order within a block.
    """
    if alpha.shape != (num_edges(num_blocks), len(OPERATIONS)):
        raise ValueError(f"alpha must be {num_edges(num_blocks)}×{len(OPERATIONS)} for {num_blocks} blocks, "
                         f"got {tuple(alpha.shape)}")
    weights = torch.softmax(alpha.detach().double().cpu(), dim=-1)
    weights[:, ZERO] = -1.0  # never chosen, never counted in an edge's strength
    genotype = []
    for block in range(num_blocks):
        rows = weights[edge_offset(block): edge_offset(block) + 2 + block]
        strength, best_op = rows.max(dim=-1)
        # stable order: the stronger first, the earlier input among equals
        ranked = sorted(range(len(rows)), key=lambda i: (-float(strength[i]), i))[:2]
        genotype += [(i, OPERATIONS[int(best_op[i])]) for i in sorted(ranked)]
    return genotype
