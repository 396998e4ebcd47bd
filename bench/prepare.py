"""Benchmark ``dints3d prepare`` on 20 synthetic CT cases of about 128³ (not a test).

Generates the task with ``dints3d synth --size 128`` into a temporary folder, runs ``python -m dints3d prepare`` in
a fresh subprocess, and reports its wall time and peak RSS next to the dataset's uncompressed size; the last line
printed is one JSON object. Run: ``python bench/prepare.py [--cases 20] [--size 128]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def uncompressed_mb(task: Path) -> float:
    """Sum of voxel-data bytes of every NIfTI in the task (as stored, before gzip), in MB."""
    import nibabel as nib  # imported late: see main()

    total = 0
    for path in task.rglob("*.nii.gz"):
        header = nib.load(path).header
        total += header.get_data_dtype().itemsize * math.prod(header.get_data_shape())
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    dints3d = [sys.executable, "-m", "dints3d"]
    with tempfile.TemporaryDirectory(prefix="dints3d-bench-") as tmp:
        task, work = Path(tmp) / "task", Path(tmp) / "work"
        subprocess.run([*dints3d, "synth", "--out", str(task), "--cases", str(args.cases), "--test-cases", "0",
                        "--size", str(args.size)], check=True, stdout=subprocess.DEVNULL)
        # Linux charges a child the parent's peak RSS up to its exec, so this process stays small (no numpy or
        # nibabel yet) and reads the prepare child's own usage with wait4 rather than all children's.
        start = time.perf_counter()
        child = subprocess.Popen([*dints3d, "prepare", "--task", str(task), "--out", str(work)],
                                 stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"prepare failed with status {os.waitstatus_to_exitcode(status)}")
        result = {"bench": "prepare", "cases": args.cases, "size": args.size, "seconds": round(seconds, 2),
                  "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
                  "dataset_mb": round(uncompressed_mb(task), 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
