"""Memory model accuracy: predicted vs measured training memory of random DiNTS networks on the CPU.

For each of ``--archs`` random connected architectures (4 blocks × 3 depths, channel_mul 0.25, seeded), each patch
size (32³, 48³) and precision (fp32, bf16 autocast as the AMP proxy): the prediction of
``dints3d.cost.memory.predict_training_memory`` (meta device, no allocation) minus the parameters, against the peak RSS
increase of two SGD-momentum DiceCE training steps in a fresh subprocess after imports, model build and a warm-up
(``dints3d.cost.memory.measure_training_memory``). Error = (predicted − measured) / measured.
Usage: python bench/memory_model.py [--archs 5] [--threads 2] [--seed 2021]. The last line printed is the JSON summary.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dints3d.cost.memory import (
    measure_training_memory,
    meta_network,
    predict_training_memory,
)
from dints3d.spaces.dints.architecture import random_dints_architecture

NUM_BLOCKS, NUM_DEPTHS, CHANNEL_MUL, CLASSES = 4, 3, 0.25, 3
SIDES = (32, 48)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=2021, help="seed of the random architectures")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    cases = []
    for index in range(args.archs):
        arch = random_dints_architecture(NUM_BLOCKS, NUM_DEPTHS, rng)
        model = meta_network(arch, 1, CLASSES, channel_mul=CHANNEL_MUL)
        for side in SIDES:
            for amp in (False, True):
                shape = (1, side, side, side)
                bytes_ = predict_training_memory(model, shape, batch=1, amp=amp)
                predicted = bytes_["peak"] - bytes_["parameters"]
                measured = measure_training_memory(arch, 1, CLASSES, shape, amp=amp, channel_mul=CHANNEL_MUL,
                                                   threads=args.threads)
                case = {"arch": index, "active_paths": arch.num_active_paths, "side": side, "amp": amp,
                        "predicted_mib": round(predicted / 2**20, 1), "measured_mib": round(measured / 2**20, 1),
                        "error": round((predicted - measured) / measured, 3)}
                cases.append(case)
                print(f"arch {index} ({case['active_paths']} paths) {side}^3 {'amp ' if amp else 'fp32'}: predicted "
                      f"{case['predicted_mib']:7.1f} MiB, measured {case['measured_mib']:7.1f} MiB, "
                      f"error {100 * case['error']:+.1f} %", flush=True)
    errors = [abs(c["error"]) for c in cases]
    print(json.dumps({"bench": "memory_model", "cases": len(cases), "threads": args.threads, "seed": args.seed,
                      "max_abs_error": max(errors), "mean_abs_error": round(float(np.mean(errors)), 3),
                      "max_abs_error_fp32": max(abs(c["error"]) for c in cases if not c["amp"]),
                      "max_abs_error_amp": max(abs(c["error"]) for c in cases if c["amp"])}))


if __name__ == "__main__":
    main()
