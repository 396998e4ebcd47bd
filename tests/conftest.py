"""Test-wide settings: one CPU thread (tiny tensors run fastest single-threaded, and CI machines are shared)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
