"""``dints3d describe``: what an architecture costs — parameters, multiply-adds per patch, predicted training memory,
active paths and operations — computed on the ``meta`` device, so a 96³ patch of a 150 M-parameter net is free.

Compute convention: ``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per multiply-add of convolutions and
matrix products (norms, activations and interpolation are not counted); we report ``macs = flops / 2`` and both
numbers. The "≈669 GFLOPs per 96³ patch" quoted for the DiNTS CVPR-2021 network is this FLOP count (334 G MACs).

Auto-DeepLab networks also get the count under the rule of the paper's Table 2 (:func:`deeplab_tensorflow_macs`):
TensorFlow's profiler on DeepLab's evaluation graph, which reproduces the published S/M/L figures to 0.03 %
(docs/autodeeplab.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dints3d.cost.memory import DEVICES, meta_network, predict_training_memory
from dints3d.data.fingerprint import read_plan
from dints3d.data.patch import per_axis, shown
from dints3d.spaces.autodeeplab.network import AutoDeepLabNet, Cell
from dints3d.spaces.base import Architecture
from dints3d.spaces.baselines.networks import BASELINES
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError

#: per space: default (input size, image channels, classes) of the CLI — a 3-D CT patch; a Cityscapes image
SPACE_DEFAULTS = {"dints": ((96, 96, 96), 1, 3), "autodeeplab": ((1024, 2048), 3, 19)}


def count_flops(model: torch.nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on a meta tensor of ``input_shape`` = ``B C [spatial]``."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(*input_shape, device="meta"))
    return int(counter.get_total_flops())


#: DeepLab's Cityscapes training crop: the window of the ASPP image pooling in its evaluation graph
DEEPLAB_IMAGE_POOLING_CROP = 769
#: DeepLab's crops are k·32 + 1 pixels a side (1025×2049 for a 1024×2048 Cityscapes image)
DEEPLAB_CROP_STRIDE = 32


def deeplab_eval_crop(input_size: Sequence[int]) -> tuple[int, ...]:
    """The smallest ``k·32 + 1`` crop holding the image, per side: DeepLab pads a 1024×2048 image to 1025×2049."""
    return tuple(DEEPLAB_CROP_STRIDE * -(-(int(n) - 1) // DEEPLAB_CROP_STRIDE) + 1 for n in input_size)


def _conv_macs(conv: nn.Module, output_size: Sequence[int]) -> int:
    return (torch.Size(output_size).numel() * torch.Size(conv.kernel_size).numel() * conv.in_channels
            // conv.groups * conv.out_channels)


def deeplab_tensorflow_macs(model: AutoDeepLabNet, input_size: Sequence[int], in_channels: int = 3,
                            image_pooling_crop: int = DEEPLAB_IMAGE_POOLING_CROP) -> dict:
    """Multiply-adds as the Auto-DeepLab paper's Table 2 counts them: TensorFlow's profiler (float ops / 2) on
    DeepLab's evaluation graph of the same network, computed from one forward pass of ``model`` (build it with
    :func:`dints3d.cost.memory.meta_network`: on the ``meta`` device the pass allocates nothing).

    Where that count differs from the module-level one (``describe``'s ``macs``):

    - the graph runs on DeepLab's crop, :func:`deeplab_eval_crop` (1025×2049 for 1024×2048);
    - TensorFlow runs a convolution of rate r > 1 through space-to-batch, which covers ``ceil(n/r)·r`` output
      positions per side instead of n (``dilated_padding``: the ASPP's rates 12/24/36, the cells' rate-2 convs);
    - ASPP image pooling averages ``image_pooling_crop``-sized windows (DeepLab's ``image_pooling_crop_size``, the
      769×769 training crop) with stride 1 instead of the whole map: the profiler counts ``window area × outputs``
      float ops for the average pooling, and the branch's 1×1 conv runs on the pooled map (``image_pooling``);
    - float ops of element-wise additions: the cells' block sums and the classifier's bias (``additions``).
    BN, ReLU, resizing and concatenation have no float-op statistics in the profiler and count 0, as here.

    Returns ``{"macs", "eval_crop", "image_pooling_window", "parts": {"convolutions", "dilated_padding",
    "image_pooling", "additions"}}`` (``convolutions``: every convolution but the image-pooling one, at the crop).
    """
    crop = deeplab_eval_crop(input_size)
    parts = dict.fromkeys(("convolutions", "dilated_padding", "image_pooling", "additions"), 0.0)
    aspp_input: list[torch.Size] = []

    def count_conv(conv: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if conv is model.aspp.pooling[0]:
            return
        size = output.shape[2:]
        parts["convolutions"] += _conv_macs(conv, size)
        if max(conv.dilation) > 1:
            padded = [-(-n // d) * d for n, d in zip(size, conv.dilation)]
            parts["dilated_padding"] += _conv_macs(conv, padded) - _conv_macs(conv, size)
        if conv.bias is not None:
            parts["additions"] += output.numel() / 2

    def count_cell(cell: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        parts["additions"] += output.numel() / 2  # each block's two operations are summed, one addition per element

    hooks = [m.register_forward_hook(count_conv) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    hooks += [m.register_forward_hook(count_cell) for m in model.modules() if isinstance(m, Cell)]
    hooks.append(model.aspp.register_forward_pre_hook(lambda module, inputs: aspp_input.append(inputs[0].shape)))
    try:
        with torch.no_grad():
            model(torch.empty(1, in_channels, *crop, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    channels, features = aspp_input[0][1], aspp_input[0][2:]
    stride = 4 * 2 ** model.network_path[-1]
    window = [min(n, (min(image_pooling_crop, c) - 1) // stride + 1) for n, c in zip(features, crop)]
    pooled = torch.Size([n - w + 1 for n, w in zip(features, window)]).numel()
    pooling_conv = model.aspp.pooling[0]
    parts["image_pooling"] = (pooled * channels * pooling_conv.out_channels  # the 1×1 conv on the pooled map
                              + torch.Size(window).numel() * pooled * channels / 2)  # AvgPool: window × outputs
    return {"macs": int(round(sum(parts.values()))), "eval_crop": list(crop), "image_pooling_window": window,
            "parts": {name: int(round(value)) for name, value in parts.items()}}


def _check_input_size(arch: Architecture, input_size: Sequence[int]) -> None:
    dims, divisor = arch.spatial_dims, arch.patch_divisor
    if divisor == 1:
        if len(input_size) != dims or min(input_size) < 1:
            raise DintsError("--input-size", f"needs {dims} positive sides for a {dims}-D architecture")
        return
    if len(input_size) != dims:
        raise DintsError("--input-size", f"needs {dims} sides for a {dims}-D architecture")
    if any(s <= 0 or s % d for s, d in zip(input_size, per_axis(divisor, dims))):
        raise DintsError("--input-size", f"every side must be a positive multiple of {shown(divisor)}, got "
                         f"{list(input_size)}")


def describe(arch: Architecture, input_size: Sequence[int] = (96, 96, 96), in_channels: int = 1, classes: int = 3,
             channel_mul: float = 1.0, batch: int = 2, amp: bool = True, device: str = "cpu") -> dict:
    """All facts as one JSON-able dict (bytes, counts). MACs/FLOPs are per single patch (batch 1); memory is for a
    training step of ``batch`` patches with SGD momentum."""
    _check_input_size(arch, input_size)
    model = meta_network(arch, in_channels, classes, channel_mul=channel_mul)
    flops = count_flops(model, (1, in_channels, *input_size))
    memory = predict_training_memory(model, (in_channels, *input_size), batch=batch, amp=amp, device=device)
    facts = {
        "space": arch.space,
        "in_channels": in_channels,
        "classes": classes,
        "channel_mul": channel_mul,
        "input_size": list(input_size),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "macs": flops // 2,
        "flops": flops,
        "flop_convention": "flops = 2 x multiply-adds of convolutions/matmuls per patch (torch FlopCounterMode)",
        "memory": {"batch": batch, "amp": amp, "optimizer": "sgd_momentum", "device": device, "bytes": memory},
    }
    facts.update(arch.summary(channel_mul))
    if isinstance(model, AutoDeepLabNet):  # DeepLab's counting rule, for comparison with the paper's Table 2
        facts["macs_deeplab_tensorflow"] = deeplab_tensorflow_macs(model, input_size, in_channels)
        reference = arch.provenance.get("reference")
        if isinstance(reference, dict) and (reference.get("input_size"), reference.get("in_channels"),
                                            reference.get("classes")) == (list(input_size), in_channels, classes):
            facts["reference"] = reference  # published figures for this very setting
    return facts


def picture_next_to(path_or_preset: str) -> str | None:
    """``arch.png`` in the folder of an ``arch.json`` file, if there is one."""
    path = Path(path_or_preset)
    picture = path.parent / "arch.png"
    return os.fspath(picture) if path.is_file() and picture.is_file() else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_text(name: str, facts: dict) -> str:
    mem = facts["memory"]
    b = mem["bytes"]
    size = "x".join(map(str, facts["input_size"]))
    if "network" in facts:
        shape = f", {facts['network']}, {facts['spatial_dims']}-D"
    elif "num_depths" in facts:
        shape = (f", {facts['num_blocks']} blocks x {facts['num_depths']} depths, {facts['spatial_dims']}-D, "
                 f"searched at channel_mul {facts['channel_mul_search']}")
    elif "network_path" in facts:
        shape = (f", {facts['num_layers']} layers at strides {'-'.join(map(str, facts['strides']))}, "
                 f"{facts['num_blocks']}-block cell, F = {facts['filter_multiplier']}, {facts['spatial_dims']}-D")
    else:
        shape = ""
    lines = [f"architecture: {name} ({facts['space']}{shape})",
             f"network:      {facts['in_channels']} -> {facts['classes']} channels, channel_mul {facts['channel_mul']}",
             f"parameters:   {facts['parameters'] / 1e6:.2f} M ({facts['parameters'] * 4 / 2**20:.1f} MiB fp32)",
             f"compute:      {facts['macs'] / 1e9:.2f} G multiply-adds = {facts['flops'] / 1e9:.2f} GFLOPs per {size} "
             "patch (convolutions and matmuls; 1 MAC = 2 FLOPs)",
             f"memory:       {_gib(b['peak'])} predicted training peak (batch {mem['batch']}, "
             f"{'AMP' if mem['amp'] else 'fp32'}, SGD momentum, {mem['device']} model): parameters "
             f"{_gib(b['parameters'])}, gradients {_gib(b['gradients'])}, optimizer {_gib(b['optimizer_state'])}, "
             f"activations {_gib(b['activations'])}, transient {_gib(b['transient'])}"]
    if "macs_deeplab_tensorflow" in facts:
        tf = facts["macs_deeplab_tensorflow"]
        lines.append(f"paper's rule: {tf['macs'] / 1e9:.2f} G multiply-adds per {size} image as the Auto-DeepLab paper "
                     f"counts them (TensorFlow profiler float ops / 2 of DeepLab's graph on its "
                     f"{'x'.join(map(str, tf['eval_crop']))} crop: dilated convs over space-to-batch padding, "
                     f"{'x'.join(map(str, tf['image_pooling_window']))} image-pooling windows, additions)")
    if "active_paths" in facts:
        ops = ", ".join(f"{op} {n}" for op, n in facts["operations"].items())
        lines += [f"active paths: {facts['active_paths']}/{facts['total_paths']}", f"operations:   {ops}"]
    if facts.get("reference"):
        ref = facts["reference"]
        params, macs = facts["parameters"] / ref["parameters"] - 1, facts["macs"] / ref["multiply_adds"] - 1
        under_rule = ""
        if "macs_deeplab_tensorflow" in facts:
            rule = facts["macs_deeplab_tensorflow"]["macs"] / ref["multiply_adds"] - 1
            under_rule = f", paper's rule {100 * rule:+.2f} %"
        lines.append(f"published:    {ref['parameters'] / 1e6:.2f} M parameters (ours {100 * params:+.2f} %), "
                     f"{ref['multiply_adds'] / 1e9:.2f} G multiply-adds (ours {100 * macs:+.1f} %{under_rule}) — "
                     f"{ref['source']}")
    if facts.get("picture"):
        lines.append(f"picture:      {facts['picture']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("arch", metavar="ARCH_OR_PRESET",
                        help="an arch.json file, a preset name (e.g. dints-cvpr, autodeeplab-s) or a baseline "
                             "(segresnet, dynunet: planned for --work's task, else for --input-size and --spacing)")
    parser.add_argument("--input-size", type=int, nargs="+", default=None,
                        help="patch size (default: --work's plan, else 96 96 96; Auto-DeepLab: 1024 2048)")
    parser.add_argument("--work", help="a prepared task (plan.json): its patch, channels and classes are the defaults, "
                                       "and baselines are planned for it")
    parser.add_argument("--spacing", type=float, nargs="+", default=None,
                        help="target spacing in mm a baseline is planned for without --work (default 1 per axis)")
    parser.add_argument("--in-channels", type=int, default=None, help="image channels (default 1; Auto-DeepLab: 3)")
    parser.add_argument("--classes", type=int, default=None,
                        help="output classes incl. background (default 3; Auto-DeepLab: 19)")
    parser.add_argument("--channel-mul", type=float, default=1.0,
                        help="channel multiplier of the network (default 1; Auto-DeepLab: scales F)")
    parser.add_argument("--batch", type=int, default=2, help="training batch for the memory prediction (default 2)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed precision for the memory prediction (default on)")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="memory model: cpu counts CPU fp32 im2col buffers, cuda does not (same under AMP)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    plan = read_plan(args.work) if args.work is not None else None
    if plan is None and args.arch in BASELINES:
        size = args.input_size or SPACE_DEFAULTS["dints"][0]
        spacing = args.spacing or [1.0] * len(size)
        if len(spacing) != len(size) or min(spacing) <= 0:
            raise DintsError("--spacing", f"needs {len(size)} positive spacings (one per side of --input-size)")
        plan = {"name": "describe", "patch_size": list(size), "target_spacing": spacing}
    arch = load_architecture(args.arch, plan)
    size, channels, classes = SPACE_DEFAULTS.get(arch.space, SPACE_DEFAULTS["dints"])
    if plan is not None and "in_channels" in plan:
        size, channels, classes = plan["patch_size"], int(plan["in_channels"]), int(plan["out_channels"])
    args.input_size = size if args.input_size is None else args.input_size
    args.in_channels = channels if args.in_channels is None else args.in_channels
    args.classes = classes if args.classes is None else args.classes
    for option, value in (("--in-channels", args.in_channels), ("--classes", args.classes), ("--batch", args.batch)):
        if value < 1:
            raise DintsError(option, f"must be at least 1, got {value}")
    if not args.channel_mul > 0:
        raise DintsError("--channel-mul", "must be positive")
    facts = describe(arch, args.input_size, args.in_channels, args.classes, args.channel_mul, args.batch, args.amp,
                     args.device)
    facts = {"architecture": args.arch, **facts, "picture": picture_next_to(args.arch)}
    print(json.dumps(facts) if args.json else format_text(args.arch, facts))
    return 0
