"""One 3-D convolution, forward + backward, contiguous (NCDHW) vs ``channels_last_3d`` (NDHWC) on the CPU.

Batch 1, fp32, one thread, at shapes of the DiNTS supernet (channel_mul 0.5, 64³ patch): best of 4 after a warm-up.
Usage: python bench/channels_last.py. Last line: JSON summary (time ratio channels_last / contiguous per shape).
"""

from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

SHAPES = [(32, 32, (3, 3, 3)), (32, 32, (3, 3, 1)), (64, 16, (3, 3, 3)), (64, 16, (1, 3, 3)), (128, 8, (3, 3, 3))]


def best_ms(fn, repeats: int = 4) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    torch.set_num_threads(1)
    ratios = {}
    for channels, side, kernel in SHAPES:
        padding = [k // 2 for k in kernel]
        times = []
        for layout in (torch.contiguous_format, torch.channels_last_3d):
            x = torch.randn(1, channels, side, side, side).to(memory_format=layout).requires_grad_()
            w = torch.randn(channels, channels, *kernel).to(memory_format=layout).requires_grad_()
            times.append(best_ms(lambda: F.conv3d(x, w, padding=padding).sum().backward()))
        key = f"{channels}@{side}^3 k{'x'.join(map(str, kernel))}"
        ratios[key] = round(times[1] / times[0], 3)
        print(f"{key}: contiguous {times[0]:.1f} ms, channels_last_3d {times[1]:.1f} ms, ratio {ratios[key]:.2f}")
    print(json.dumps({"bench": "channels_last", "ratio_channels_last_to_contiguous": ratios}))


if __name__ == "__main__":
    main()
