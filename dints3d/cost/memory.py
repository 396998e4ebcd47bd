"""Training-memory model: bytes a training step needs, computed on the ``meta`` device (nothing is allocated).

One training step (SGD with momentum by default, MONAI ``DiceCELoss`` as in the search loop) holds

- ``parameters`` (fp32 master weights, also under AMP), ``gradients`` (one per trainable parameter) and
  ``optimizer_state`` (momentum: 1×, Adam: 2× the trainable parameters);
- ``activations``: every tensor autograd saves for backward during forward + loss, recorded with
  ``torch.autograd.graph.saved_tensors_hooks``, counted once per storage among those still alive when the loss is
  computed (deterministic, see :class:`_SavedTensors`); parameters are not counted again, but AMP's low-precision
  weight copies are;
- ``transient``: what lives only while one op runs — :data:`TRANSIENT_FACTOR` × the largest op output (in backward
  that output's gradient and its input's, and oneDNN's reordered copies of both) plus, for ``device="cpu"``, the
  largest im2col buffer of an fp32 3-D convolution (see :class:`_OpScratch`).

``peak = parameters + gradients + optimizer_state + activations + transient``. AMP is modelled by casting the inputs
of the ops autocast runs in half precision (convolutions, matrix products) to a 2-byte dtype and those it runs in
fp32 to fp32 — on CUDA softmax, losses and norms, on the CPU only the losses (CPU autocast keeps softmax in bf16);
other ops follow type promotion, as under ``torch.autocast``. The model is
calibrated against the peak RSS of real CPU training steps (:func:`measure_training_memory`, ``bench/memory_model.py``,
accuracy in ``docs/architectures.md``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from dints3d.data.losses import DeepSupervised, dice_ce_loss
from dints3d.spaces.base import Architecture
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.dints.cpu_conv import (
    OneDnnConv3d,
    routes_to_onednn,
    uses_slow_conv3d,
)
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.dints.topology import patch_divisor

#: optimizer → state tensors per trainable parameter
OPTIMIZER_STATE = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}
#: transient bytes per byte of the largest single op output (calibrated on CPU, see docs/architectures.md)
TRANSIENT_FACTOR = 4.0
DEVICES = ("cpu", "cuda")

_HALF_PRECISION_OPS = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__,
}
#: ops autocast runs in fp32, by device (CPU autocast's list has the losses but not softmax or the norms)
_FLOAT32_OPS = {
    "cuda": {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, torch.Tensor.softmax,
             torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, F.layer_norm, F.group_norm, torch.pow,
             torch.Tensor.pow},
    "cpu": {F.cross_entropy, F.nll_loss},
}


def training_loss() -> DeepSupervised:
    """The segmentation loss of the search and training loops: DiceCE, over every head of a deep-supervised
    network."""
    return DeepSupervised(dice_ce_loss())


class _AutocastOnMeta(TorchFunctionMode):
    """``torch.autocast``'s casting rules at the torch-function level, where they also apply to meta tensors."""

    def __init__(self, low: torch.dtype, device: str):
        super().__init__()
        self.low = low
        self.float32_ops = _FLOAT32_OPS[device]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.low if func in _HALF_PRECISION_OPS else torch.float32 if func in self.float32_ops else None
        if dtype is not None:
            def cast(t):
                return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


class _OpScratch(TorchDispatchMode):
    """Records, over all aten ops, the largest output and the largest im2col buffer (bytes).

    PyTorch's CPU fp32 3-D convolution, where it takes the ``slow_conv3d`` path (:func:`uses_slow_conv3d`, with
    this process's thread count), unfolds one sample at a time into a ``C_in·k³ × output voxels`` column buffer
    (measured: it does not grow with the batch); oneDNN (CPU bf16, the other fp32 cases, and the convolutions
    :class:`~dints3d.spaces.dints.cpu_conv.OneDnnConv3d` routes there when ``routed``) and cuDNN do not."""

    def __init__(self, count_im2col: bool, routed: bool = False):
        super().__init__()
        self.count_im2col = count_im2col
        self.routed = routed
        self.threads = torch.get_num_threads()
        self.largest_output = 0
        self.largest_im2col = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest_output = max(self.largest_output, t.numel() * t.element_size())
        if func is torch.ops.aten.convolution.default and self.count_im2col:
            x, w, _, stride, _, dilation, transposed, _, groups = args
            if (w.dim() == 5 and out.dtype == torch.float32 and not transposed
                    and uses_slow_conv3d(x.shape, w.shape, stride, dilation, groups, self.threads)
                    and not (self.routed and groups == 1
                             and routes_to_onednn(x.shape, w.shape, stride, dilation, self.threads))):
                columns = math.prod(w.shape[1:]) * math.prod(out.shape[2:]) * out.element_size()
                self.largest_im2col = max(self.largest_im2col, columns)
        return out


def _storage_key(t: torch.Tensor) -> int:
    """Address of ``t``'s storage: unique among live tensors only (a freed storage's address is reused)."""
    return t.untyped_storage()._cdata


class _SavedTensors:
    """Tensors autograd saves for backward, counted once per storage among those still alive at the end.

    A saved tensor dies with its graph node when an output is discarded mid-forward (MONAI's DiNTS replaces the stem
    output of an inactive input node by zeros), and its storage address may then be reused by a later tensor. Keying
    on the address alone merged such tensors at random (predictions varied by ~1 % between calls), so each address
    keeps weak references to the tensors saved there and :meth:`live_bytes` counts an address only while one of them
    is alive: deterministic, and what a real device holds when the forward ends."""

    def __init__(self, exclude: set[int]):
        self.exclude = exclude
        self.by_key: dict[int, list[tuple[weakref.ref, int]]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude:
            self.by_key.setdefault(key, []).append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    def live_bytes(self) -> int:
        return sum(max((n for ref, n in refs if ref() is not None), default=0) for refs in self.by_key.values())


class _CheckpointRecorder:
    """Stands in for ``torch.utils.checkpoint.checkpoint`` in a module with a ``checkpoint_fn`` attribute (the DiNTS
    supernet's cells under ``checkpoint_cells``) and records what the saved-tensor hooks cannot see there.

    Inside a non-reentrant checkpoint, PyTorch's own hooks take over from :class:`_SavedTensors`: the region saves
    nothing, but it keeps its tensor inputs alive for the recompute (counted here with the saved tensors, once per
    storage), and backward recomputes the region, holding what it saves until its gradient is done (the largest such
    region is added to the transient term). Each region runs once more, outside the checkpoint, to count that."""

    def __init__(self, saved: _SavedTensors):
        self.saved = saved
        self.largest_recompute = 0

    def __call__(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        for t in args:
            if isinstance(t, torch.Tensor):
                self.saved.pack(t)
        inner = _SavedTensors(exclude=self.saved.exclude)
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = fn(*args)
            self.largest_recompute = max(self.largest_recompute, inner.live_bytes())
        del out
        return checkpoint(fn, *args, **kwargs)


@contextlib.contextmanager
def _recording_checkpoints(model: nn.Module, saved: _SavedTensors) -> Iterator[_CheckpointRecorder]:
    """Swap a :class:`_CheckpointRecorder` into every ``checkpoint_fn`` of ``model``'s modules while active."""
    recorder = _CheckpointRecorder(saved)
    owners = [m for m in model.modules() if callable(getattr(m, "checkpoint_fn", None))]
    originals = [m.checkpoint_fn for m in owners]
    for m in owners:
        m.checkpoint_fn = recorder
    try:
        yield recorder
    finally:
        for m, fn in zip(owners, originals):
            m.checkpoint_fn = fn


def _meta_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Meta stand-ins for ``model``'s parameters and buffers (same shapes, dtypes, ``requires_grad``)."""
    params = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
              for n, p in model.named_parameters()}
    buffers = {n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()}
    return {**params, **buffers}


def step_activation_memory(model: nn.Module, input_shape: Sequence[int], batch: int, amp: bool,
                           device: str = "cpu") -> dict[str, int]:
    """Bytes saved for backward, and the transient peak of one op, of the DiceCE loss of ``model(x)`` (every head of a
    deep-supervised network) on meta tensors.

    Args:
        model: any module (real or meta); its parameters are replaced by meta stand-ins, nothing is allocated.
        input_shape: ``(C, *spatial)`` of one sample; ``x`` is ``(batch, C, *spatial)``, ``y`` ``(batch, 1, *spatial)``.
        device: ``"cpu"`` counts the im2col buffers of PyTorch's CPU fp32 3-D convolution, ``"cuda"`` does not.
    Returns:
        ``{"activations": bytes, "transient": bytes}``.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    stand_ins = _meta_parameters(model)
    param_keys = {_storage_key(t) for t in stand_ins.values()}
    saved = _SavedTensors(exclude=param_keys)

    x = torch.empty(batch, *input_shape, device="meta")
    y = torch.zeros(batch, 1, *input_shape[1:], device="meta")
    routed = any(isinstance(m, OneDnnConv3d) for m in model.modules())
    scratch = _OpScratch(count_im2col=device == "cpu", routed=routed)
    autocast = _AutocastOnMeta(torch.bfloat16, device) if amp else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), scratch, torch.enable_grad(), autocast, \
            _recording_checkpoints(model, saved) as checkpoints:
        loss = training_loss()(torch.func.functional_call(model, stand_ins, (x,)), y)
        activations = saved.live_bytes()  # while ``loss`` keeps the graph alive
    del loss
    transient = TRANSIENT_FACTOR * scratch.largest_output + scratch.largest_im2col + checkpoints.largest_recompute
    return {"activations": int(activations), "transient": int(transient)}


def _parameter_bytes(model: nn.Module, trainable: bool | None = None) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()
                   if trainable is None or p.requires_grad == trainable))


def predict_training_memory(model: nn.Module | Callable[[], nn.Module], input_shape: Sequence[int], batch: int = 1,
                            amp: bool = False, optimizer: str = "sgd_momentum", device: str = "cpu"
                            ) -> dict[str, int]:
    """Predicted bytes of one training step (see the module docstring for the terms).

    Args:
        model: a module, or a zero-argument builder (called under :func:`parameters_on_meta`).
        input_shape: ``(C, *spatial)`` of one sample, e.g. ``(1, 96, 96, 96)``.
        batch: samples per step.
        amp: mixed precision (half-precision convolutions, fp32 master weights).
        optimizer: one of :data:`OPTIMIZER_STATE`.
        device: ``"cpu"`` (calibrated) or ``"cuda"`` (no im2col buffers; cuDNN workspaces are not modelled).
    Returns:
        ``parameters, gradients, optimizer_state, activations, transient, peak`` in bytes.
    """
    if optimizer not in OPTIMIZER_STATE:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE)}, got {optimizer!r}")
    if not isinstance(model, nn.Module):
        with parameters_on_meta():
            model = model()
    trainable = _parameter_bytes(model, trainable=True)
    terms = {
        "parameters": _parameter_bytes(model),
        "gradients": trainable,
        "optimizer_state": OPTIMIZER_STATE[optimizer] * trainable,
        **step_activation_memory(model, input_shape, batch, amp, device),
    }
    return {**terms, "peak": sum(terms.values())}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on the meta device (shapes only: no memory, initialisers do nothing).

    Unlike ``torch.device("meta")`` this leaves every other tensor real: MONAI's DiNTS keeps its architecture codes
    in plain CPU tensors that it reads in Python control flow. Not thread-safe (patches
    ``nn.Module.register_parameter`` while active)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_network(arch: Architecture, in_channels: int, out_channels: int, **build_kwargs: Any) -> nn.Module:
    """``arch.build(in_channels, out_channels, **build_kwargs)`` with meta parameters (and meta running statistics
    of normalisation layers, which a training-mode forward updates)."""
    with parameters_on_meta():
        model = arch.build(in_channels, out_channels, **build_kwargs)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.to("meta")
    return model


def meta_search_space(in_channels: int, num_classes: int, **space_hparams: Any) -> DintsSearchSpace:
    """A :class:`DintsSearchSpace` (supernet) with meta parameters (``checkpoint_cells`` / ``checkpoint_fraction``
    included: the memory model counts checkpointed cells by :class:`_CheckpointRecorder`)."""
    with parameters_on_meta():
        return DintsSearchSpace(in_channels, num_classes, **space_hparams)


def predict_search_step_memory(space_hparams: dict, input_shape: Sequence[int], batch: int = 1, amp: bool = False,
                               num_classes: int = 2, device: str = "cpu") -> dict[str, int]:
    """Predicted bytes of one bilevel search iteration of the DiNTS supernet.

    The weight step (SGD momentum on the weights, architecture frozen) and the architecture step (Adam on α, β,
    weights frozen) run one after the other; both optimizers' states persist. ``peak`` is the larger of the two
    steps on top of the persistent bytes.

    Args:
        space_hparams: :class:`DintsSearchSpace` keyword arguments (``num_blocks``, ``num_depths``, ``channel_mul``…).
        input_shape: ``(C, *spatial)`` of one sample.
    Returns:
        ``parameters, gradients, optimizer_state, activations, transient, peak`` in bytes, and
        ``weight_step_peak``, ``arch_step_peak``.
    """
    space = meta_search_space(input_shape[0], num_classes, **space_hparams)
    weights, arch = space.weight_parameters(), space.arch_parameters()
    weight_bytes = sum(p.numel() * p.element_size() for p in weights)
    arch_bytes = sum(p.numel() * p.element_size() for p in arch)
    optimizer_state = OPTIMIZER_STATE["sgd_momentum"] * weight_bytes + OPTIMIZER_STATE["adam"] * arch_bytes
    persistent = weight_bytes + arch_bytes + optimizer_state
    steps = {}
    for name, trainable, frozen, grad_bytes in (("weight", weights, arch, weight_bytes),
                                                ("arch", arch, weights, arch_bytes)):
        for p in trainable:
            p.requires_grad_(True)
        for p in frozen:
            p.requires_grad_(False)
        steps[name] = {"gradients": grad_bytes, **step_activation_memory(space, input_shape, batch, amp, device)}
    worst = max(steps.values(), key=lambda s: sum(s.values()))
    return {"parameters": weight_bytes + arch_bytes, "optimizer_state": optimizer_state, **worst,
            "peak": persistent + sum(worst.values()),
            "weight_step_peak": persistent + sum(steps["weight"].values()),
            "arch_step_peak": persistent + sum(steps["arch"].values())}


def proc_status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: resident now, ``VmHWM``: the peak). Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_here(spec: dict) -> dict:
    """In this (fresh) process: build the network, reset the peak-RSS counter, run ``spec["steps"]`` training steps
    on random data and return the peak RSS increase in bytes."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    arch = DintsArchitecture.from_dict(spec["arch"])
    model = arch.build(spec["in_channels"], spec["out_channels"], channel_mul=spec["channel_mul"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = training_loss()
    batch, shape = spec["batch"], spec["input_shape"]
    # Warm-up on the smallest valid patch: pages in the kernels' code and per-process pools (not tensor memory).
    small = [shape[0]] + [patch_divisor(arch.num_depths, arch.use_downsample)] * (len(shape) - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["amp"]):
        loss_fn(model(torch.randn(1, *small)), torch.zeros(1, 1, *small[1:])).backward()
    opt.zero_grad(set_to_none=True)
    baseline = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) to the current RSS
        f.write("5")
    x = torch.randn(batch, *shape)
    y = torch.randint(0, spec["out_channels"], (batch, 1, *shape[1:]))
    for _ in range(spec["steps"]):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["amp"]):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return {"measured_bytes": (proc_status_kib("VmHWM") - baseline) * 1024}


def measure_training_memory(arch: DintsArchitecture, in_channels: int, out_channels: int, input_shape: Sequence[int],
                            batch: int = 1, amp: bool = False, channel_mul: float = 1.0, steps: int = 2,
                            threads: int = 1) -> int:
    """Measured bytes of ``steps`` SGD-momentum DiceCE training steps on the CPU: peak RSS beyond the RSS after
    imports, model build and a warm-up step (Linux; a fresh subprocess each call, ``threads`` torch threads).
    ``MALLOC_MMAP_THRESHOLD_`` is fixed so freed tensors return to the OS, making peak RSS track peak live memory
    rather than glibc's heap caching. Compare with ``peak - parameters`` of :func:`predict_training_memory`."""
    spec = {"arch": arch.to_dict(), "in_channels": in_channels, "out_channels": out_channels,
            "input_shape": list(input_shape), "batch": batch, "amp": amp, "channel_mul": channel_mul,
            "steps": steps, "threads": threads}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "dints3d.cost.memory", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory measurement failed:\n{done.stderr[-2000:]}")
    return int(json.loads(done.stdout.strip().splitlines()[-1])["measured_bytes"])


if __name__ == "__main__":
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
