"""Where and how a run executes: device, mixed precision, seeding, and torch.distributed (via ``torchrun``)."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dints3d.utils.errors import DintsError


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
        """Autocast in the precision :func:`amp_policy` picks for this device."""
        dtype, _ = amp_policy(self.device.type, enabled)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self, amp: bool) -> torch.amp.GradScaler:
        """A GradScaler, enabled when :func:`amp_policy` asks for loss scaling (a disabled scaler is a no-op)."""
        return torch.amp.GradScaler(self.device.type, enabled=amp_policy(self.device.type, amp)[1])

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

    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> None:
        """Replace every tensor (any shapes) by its mean over ranks, in place, with one all-reduce of a
        flat bucket holding all of them."""
        flat = torch._utils._flatten_dense_tensors(tensors)
        dist.all_reduce(flat)
        flat /= self.world_size
        for tensor, mean in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(mean)

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduce (mean) the gradients of ``params`` in one flat bucket."""
        if not self.distributed:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            self._all_reduce_mean(grads)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """All-reduce (mean) the running statistics of every normalization layer that tracks them (the BatchNorm of
        the Auto-DeepLab supernet), which each rank otherwise updates from its own batches only; DiNTS (InstanceNorm)
        and DPC (GroupNorm) keep none. Other buffers are constants, identical on every rank, and are left alone (a
        mean over 3 ranks may round them)."""
        if not self.distributed:
            return
        stats = [buffer.data for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                 and m.track_running_stats for buffer in (m.running_mean, m.running_var) if buffer is not None]
        if stats:
            self._all_reduce_mean(stats)

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


def amp_policy(device_type: str, enabled: bool) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether to scale the loss) for ``amp: enabled`` on a ``device_type`` device:
    fp16 with a GradScaler on CUDA; bf16 without one elsewhere (CPU has no fast fp16 kernels, and bf16 has fp32's
    exponent range, so gradients do not underflow)."""
    if not enabled:
        return None, False
    if device_type == "cuda":
        return torch.float16, True
    return torch.bfloat16, False


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


def process_group_backend(device: torch.device) -> str:
    """The torch.distributed backend for processes on ``device``: NCCL on GPUs, gloo on CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_runtime(device_name: str = "auto") -> Runtime:
    """Join the process group when launched by ``torchrun`` (NCCL on GPU, gloo on CPU), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=process_group_backend(device))
    return Runtime(device=device, rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states(device: torch.device) -> dict:
    """Python ``random``, numpy, torch CPU and (on a CUDA device) CUDA generator states, as tensors, ints and
    lists only, so a checkpoint holding them loads with ``torch.load(weights_only=True)``."""
    version, mt, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    states = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"bit_generator": numpy["bit_generator"],
                  "key": torch.from_numpy(numpy["state"]["key"].astype(np.int64)), "pos": int(numpy["state"]["pos"]),
                  "has_gauss": int(numpy["has_gauss"]), "gauss": float(numpy["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    """Restore :func:`rng_states`. Raises ``ValueError`` when ``states`` is not such a dict (a damaged checkpoint);
    a CUDA state is restored only on a CUDA device (a run resumed on another device type draws fresh CUDA numbers)."""
    try:
        py, numpy = states["python"], states["numpy"]
        mt = tuple(int(v) for v in py["state"].tolist())
        key = np.asarray(numpy["key"].tolist(), dtype=np.uint32)
        if len(mt) != 625 or key.shape != (624,) or numpy["bit_generator"] != "MT19937":
            raise ValueError("wrong Mersenne Twister state size")
        numpy_state = {"bit_generator": "MT19937", "state": {"key": key, "pos": int(numpy["pos"])},
                       "has_gauss": int(numpy["has_gauss"]), "gauss": float(numpy["gauss"])}
        python_state = (int(py["version"]), mt, None if py["gauss"] is None else float(py["gauss"]))
        torch_state = states["torch"]
        if not (torch.is_tensor(torch_state) and torch_state.dtype == torch.uint8):
            raise ValueError("torch generator state is not a byte tensor")
        cuda_state = states.get("cuda") if device.type == "cuda" else None
        if cuda_state is not None and not (torch.is_tensor(cuda_state) and cuda_state.dtype == torch.uint8):
            raise ValueError("CUDA generator state is not a byte tensor")
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
