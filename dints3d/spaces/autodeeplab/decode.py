"""Decoding an Auto-DeepLab supernet: the network-level path by Viterbi, the cell by DARTS' top-2 rule.

Network level. The trellis has layers 0..L. Layer 0 is the stem's output, one node at level 0 (stride 4); a node at
level j has stride 4·2^j, j = 0..D-1. From node (l, j) transition t leads to node (l+1, j + STEPS[t]) — ``down`` to
the next coarser level, ``same``, or ``up`` to the next finer one — with probability p[l, j, t]. Auto-DeepLab
normalises β over each node's OUTGOING transitions, so a node's valid transitions sum to 1 and β reads as a Markov
chain over levels: the network path with the highest probability is a Viterbi decoding.

Cell level (Auto-DeepLab and DARTS): α over every (block, input) edge. Block b of a cell reads every earlier state:
input 0 = H^{l-2}, 1 = H^{l-1}, 2 + j = block j (j < b), so it has 2 + b incoming edges and a cell of B blocks has
B(B+3)/2 edges, numbered block by block. α holds one row of operation logits per edge (:data:`OPERATIONS` order).
"""

from __future__ import annotations

import math

import torch

from dints3d.spaces.autodeeplab.operations import OPERATIONS, ZERO

TRANSITIONS = ("down", "same", "up")
#: level change of each transition (down: stride ×2, up: stride ÷2)
STEPS = (1, 0, -1)


def valid_transitions(num_layers: int, num_levels: int) -> torch.Tensor:
    """Bool (L, D, 3): True where node (l, j) is reachable from the stem and its transition t stays in 0..D-1.

    Layer l's reachable levels are 0..min(l, D-1) (one level per step from level 0), so the first layer lands at
    stride 4 or 8, as in the paper.
    """
    valid = torch.zeros(num_layers, num_levels, len(STEPS), dtype=torch.bool)
    for layer in range(num_layers):
        for level in range(min(layer, num_levels - 1) + 1):
            for t, step in enumerate(STEPS):
                valid[layer, level, t] = 0 <= level + step < num_levels
    return valid


def transition_log_probs(beta: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each node's outgoing transitions: a log-softmax over the node's VALID transitions only.

    Invalid logits are masked to −∞ before the softmax (so a boundary node's two transitions sum to 1 on their own,
    and invalid logits get no gradient); the result is −∞ at invalid transitions and on nodes the stem cannot reach.

    Args:
        beta: (L, D, 3) logits; valid: (L, D, 3) bool from :func:`valid_transitions`.
    """
    reachable = valid.any(dim=-1, keepdim=True)
    logits = beta.float().masked_fill(~valid, -math.inf)
    logits = torch.where(reachable, logits, torch.zeros_like(logits))  # an all −∞ row would give NaN
    return torch.log_softmax(logits, dim=-1).masked_fill(~valid, -math.inf)


def viterbi(log_probs: torch.Tensor) -> tuple[list[int], float]:
    """The most probable path from the stem.

    Args:
        log_probs: (L, D, 3) log transition probabilities; invalid transitions are ``-inf``.
    Returns:
        the level of each layer 1..L, and the path's log-probability. Ties go to the lower level.
    """
    num_layers, num_levels, _ = log_probs.shape
    table = log_probs.detach().double().cpu().tolist()
    score = [0.0] + [-math.inf] * (num_levels - 1)
    came_from: list[list[int]] = []
    for layer in range(num_layers):
        best = [-math.inf] * num_levels
        back = [-1] * num_levels
        for level in range(num_levels):
            for t, step in enumerate(STEPS):
                target = level + step
                if not 0 <= target < num_levels:
                    continue
                candidate = score[level] + table[layer][level][t]
                if candidate > -math.inf and candidate > best[target]:
                    best[target], back[target] = candidate, level
        score = best
        came_from.append(back)
    level = max(range(num_levels), key=lambda j: (score[j], -j))
    log_prob = score[level]
    path = [level]
    for back in reversed(came_from[1:]):
        level = back[level]
        path.append(level)
    return path[::-1], log_prob


# ------------------------------------------------------------------------------------------------------- cell
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
