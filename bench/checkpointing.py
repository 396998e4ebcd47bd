"""Peak memory of one search step, with and without ``checkpoint_cells``: dints3d vs plain MONAI, fresh processes.

Variants, each in its own fresh subprocess (``--repeats`` rounds, order alternating): ``monai`` (the plain-MONAI
step of bench/search_common.py), ``ours`` (SearchRun's weight + architecture step) and ``ckpt_<f>`` (the same with
``search.checkpoint_cells=true`` and ``search.checkpoint_fraction=f`` for each ``--fractions`` value). L = 12, D = 4,
channel_mul 0.5, batch 1, a ``--side``³ patch, 3 classes, CPU fp32 (``--amp``: bf16 autocast), ``--threads`` torch
threads.

Memory: in the child, after imports, model and optimizer build and one warm-up step on the smallest valid patch
(32³: pages in kernels and creates the optimizer state), the peak-RSS counter is reset (``/proc/self/clear_refs``)
and one full step runs on the measured patch; the figure is peak RSS (VmHWM) minus the RSS just before the step, so
activations, gradients and transient buffers count and the resident model does not. ``MALLOC_MMAP_THRESHOLD_`` is
fixed so freed tensors leave the RSS. That threshold makes every large allocation a fresh mmap, so the step times the
children print are inflated and only indicative; time ratios come from ``bench/search_step.py --checkpoint-cells``
(in-process, interleaved). The ``ours`` figure is also compared with the memory model: ``activations + transient``
of :func:`dints3d.cost.memory.predict_search_step_memory` (what a step adds on top of parameters, optimizer state and
the previous step's gradients, all resident before it).
Usage: python bench/checkpointing.py [--side 64] [--fractions 1.0 0.5] [--repeats 1] [--threads 1] [--amp].
Last line: JSON summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_common import (  # noqa: E402
    MonaiSearchStep,
    OurSearchStep,
    make_batches,
    measure_step_peak,
    our_search_run,
    run_in_fresh_process,
)


def child(spec: dict) -> dict:
    """Runs in the fresh subprocess."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    side, amp, variant = spec["side"], spec["amp"], spec["variant"]
    batches, warm = make_batches(side, seed=1), make_batches(32, seed=2)
    if variant == "monai":
        return measure_step_peak(MonaiSearchStep(None, amp), batches, warm)
    fraction = float(variant.split("_")[1]) if variant.startswith("ckpt_") else 1.0
    with our_search_run(side, amp, checkpoint_cells=variant != "ours", fraction=fraction) as run:
        return measure_step_peak(OurSearchStep(run), batches, warm)


def predicted_step_mib(side: int, amp: bool, threads: int) -> float:
    """The memory model's ``activations + transient`` of our (non-checkpointed) search step."""
    import torch

    from dints3d.cost.memory import predict_search_step_memory

    torch.set_num_threads(threads)  # the CPU convolution path (and so im2col) depends on it
    hparams = {"num_blocks": 12, "num_depths": 4, "channel_mul": 0.5}
    model = predict_search_step_memory(hparams, (1, side, side, side), batch=1, amp=amp, num_classes=3)
    return (model["activations"] + model["transient"]) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    variants = ["monai", "ours", *(f"ckpt_{f:g}" for f in args.fractions)]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            spec = {"variant": variant, "side": args.side, "amp": args.amp, "threads": args.threads}
            out = run_in_fresh_process(__file__, spec, args.threads)
            results[variant].append(out)
            print(f"round {r}: {variant:9s} peak +{out['peak_mib']:7.1f} MiB  ({out['seconds']:.1f} s, inflated)",
                  flush=True)
    peak = {v: statistics.median(o["peak_mib"] for o in rs) for v, rs in results.items()}
    predicted = predicted_step_mib(args.side, args.amp, args.threads)
    ratios = {v: round(peak[v] / peak["monai"], 3) for v in variants if v != "monai"}
    for v, ratio in ratios.items():
        print(f"{v:9s}: {ratio:.3f}x the peak memory of plain MONAI ({peak[v]:.0f} vs {peak['monai']:.0f} MiB)")
    error = (predicted - peak["ours"]) / peak["ours"]
    print(f"memory model for ours: {predicted:.0f} MiB predicted vs {peak['ours']:.0f} MiB measured "
          f"({100 * error:+.1f} %)")
    print(json.dumps({"bench": "checkpointing", "side": args.side, "amp": args.amp, "threads": args.threads,
                      "repeats": args.repeats, "peak_mib": {v: round(p, 1) for v, p in peak.items()},
                      "memory_ratio_vs_monai": ratios, "ours_predicted_mib": round(predicted, 1),
                      "ours_prediction_error": round(error, 3)}))


if __name__ == "__main__":
    main()
