"""Where and how a run executes: device, mixed precision, seeding, and torch.distributed (via ``torchrun``)."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dints3d.errors import DintsError


@dataclass
class Runtime:
    """The process's place in a (possibly distributed) run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self, enabled: bool) -> contextlib.AbstractContextManager:
        """fp16 autocast on CUDA, bf16 on CPU (CPU has no fast fp16 kernels)."""
        if not enabled:
            return contextlib.nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self, amp: bool) -> torch.amp.GradScaler:
        """Loss scaling only for fp16 on CUDA; bf16 has fp32's range and needs none (a disabled scaler is a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=amp and self.device.type == "cuda")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → the local CUDA device if there is one, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DintsError("device", f"unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DintsError("device", f"'{name}' requested but no CUDA GPU is available (use device=cpu or auto)")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def init_runtime(device_name: str = "auto") -> Runtime:
    """Join the process group when launched by ``torchrun`` (NCCL on GPU, gloo on CPU), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
