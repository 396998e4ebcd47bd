"""``torch.compile`` (inductor, CPU) of the DiNTS supernet vs eager: one forward + backward (DiceCE) per step.

4 blocks × 3 depths, channel_mul 0.5, a 32³ patch, batch 1, fp32, one thread, CPU convolution routing off (inductor
cannot lower its custom backward); best of 3 steps after a warm-up, and the first compiled step's time including
compilation. Usage: python bench/compile.py. Last line: JSON summary.
"""

from __future__ import annotations

import json
import time
import warnings

import torch
from monai.losses import DiceCELoss

from dints3d.spaces.dints.supernet import DintsSearchSpace


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    space = DintsSearchSpace(1, 3, num_blocks=4, num_depths=3, channel_mul=0.5, cpu_conv_routing=False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, squared_pred=True, batch=True)
    x, y = torch.randn(1, 1, 32, 32, 32), torch.randint(0, 3, (1, 1, 32, 32, 32))

    def step(model) -> None:
        loss_fn(model(x), y).backward()

    def best_s(model, repeats: int = 3) -> float:
        step(model)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            step(model)
            best = min(best, time.perf_counter() - start)
        return best

    eager = best_s(space)
    start = time.perf_counter()
    compiled = torch.compile(space)
    step(compiled)
    first = time.perf_counter() - start
    steady = best_s(compiled)
    print(f"eager {eager:.3f} s/step, compiled {steady:.3f} s/step (ratio {steady / eager:.2f}); "
          f"first compiled step incl. compilation {first:.0f} s")
    print(json.dumps({"bench": "compile", "eager_s": round(eager, 3), "compiled_s": round(steady, 3),
                      "ratio": round(steady / eager, 3), "first_compiled_step_s": round(first, 1)}))


if __name__ == "__main__":
    main()
