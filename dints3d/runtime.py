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


    def all_true(self, flag: bool) -> bool:
        """``flag`` and-ed over ranks, so every rank takes the same branch (e.g. skipping a non-finite step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Make rank 0's parameters and buffers everyone's."""
        if self.distributed:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduce (mean) the gradients of ``params`` in one flat bucket."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def replica_spread(self, tensors: list[torch.Tensor]) -> float:
        """Largest difference of any element of ``tensors`` between ranks (0.0 when all ranks agree exactly)."""
        if not self.distributed:
            return 0.0
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        return float((high - low).max())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


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
