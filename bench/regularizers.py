"""Per-architecture-step regularizer cost, forward + backward: dints3d vs MONAI's TopologySearch methods.

One step = path/op entropies + M and M_full (memory loss) + topology loss, summed and back-propagated to
log_alpha_a and log_alpha_c, at L = 12, D = 4 on CPU with one thread. Both sides run interleaved in this process.
Usage: python bench/regularizers.py [--repeats 50]. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from monai.networks.nets.dints import TopologySearch

from dints3d.spaces.dints import regularizers as reg
from dints3d.spaces.dints.relaxation import pattern_probabilities
from dints3d.spaces.dints.topology import DintsTopology

NUM_BLOCKS, NUM_DEPTHS = 12, 4
IN_SIZE = (1, 1, 96, 96, 96)
RAM_COST_FACTOR = 0.8


def monai_step(space: TopologySearch) -> torch.Tensor:
    """The reference script's arch regularizers, through MONAI's methods."""
    probs, _ = space.get_prob_a(child=True)
    entropy_a = -(probs * torch.log(probs + 1e-5)).mean()
    entropy_c = -(torch.softmax(space.log_alpha_c, -1) * torch.log_softmax(space.log_alpha_c, -1)).mean()
    usage = space.get_ram_cost_usage(IN_SIZE)
    full = space.get_ram_cost_usage(IN_SIZE, full=True)
    loss = entropy_a + entropy_c + (RAM_COST_FACTOR - usage / full).abs() + 0.001 * space.get_topology_entropy(probs)
    loss.backward()
    return loss.detach()


def our_step(beta, alpha, ram_cost, out_sizes, topology) -> torch.Tensor:
    """The same terms through dints3d.spaces.dints.regularizers."""
    probs = pattern_probabilities(beta, topology.patterns)
    loss = (
        reg.path_entropy(probs)
        + reg.op_entropy(alpha)
        + reg.memory_loss(beta, alpha, ram_cost, out_sizes, RAM_COST_FACTOR)
        + 0.001 * reg.topology_loss(probs, topology)
    )
    loss.backward()
    return loss.detach()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    space = TopologySearch(channel_mul=0.5, num_blocks=NUM_BLOCKS, num_depths=NUM_DEPTHS)
    with torch.no_grad():
        space.log_alpha_a.normal_(0, 1)
        space.log_alpha_c.normal_(1, 1)
    topology = DintsTopology(NUM_DEPTHS)
    beta = space.log_alpha_a.detach().clone().requires_grad_(True)
    alpha = space.log_alpha_c.detach().clone().requires_grad_(True)
    ram_cost = torch.from_numpy(space.ram_cost).float()
    sizes = reg.feature_sizes(IN_SIZE, space.filter_nums, NUM_DEPTHS, 3, space.use_downsample)[topology.path_out]

    def ours():
        return our_step(beta, alpha, ram_cost, sizes, topology)

    def theirs():
        return monai_step(space)

    # Warm-up: MONAI builds its node2in/node2out tables on the first topology call.
    _, expected = timed(theirs)
    _, got = timed(ours)
    relative_error = abs(float(got) - float(expected)) / abs(float(expected))
    assert relative_error < 1e-5, (float(got), float(expected))

    our_times, monai_times = [], []
    for _ in range(args.repeats):
        monai_times.append(timed(theirs)[0])
        our_times.append(timed(ours)[0])
    ours_ms = 1e3 * statistics.median(our_times)
    monai_ms = 1e3 * statistics.median(monai_times)
    print(f"per arch step (fwd+bwd), L={NUM_BLOCKS} D={NUM_DEPTHS}: dints3d {ours_ms:.3f} ms, MONAI {monai_ms:.3f} ms")
    summary = {
        "bench": "regularizers",
        "num_blocks": NUM_BLOCKS,
        "num_depths": NUM_DEPTHS,
        "repeats": args.repeats,
        "threads": 1,
        "ours_median_ms": round(ours_ms, 4),
        "monai_median_ms": round(monai_ms, 4),
        "speedup": round(monai_ms / ours_ms, 1),
        "loss_relative_error": relative_error,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
