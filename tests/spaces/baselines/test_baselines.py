"""Baselines as architectures: nnU-Net's stage rule, arch.json round trips, the bundle form building the very network
``build`` builds, deep-supervision heads and their loss, per-axis patch divisors, and sizing to a memory target."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from monai.bundle import ConfigParser

from dints3d.cost.sizing import channel_mul_for_memory, peak_bytes
from dints3d.data.losses import DeepSupervised, dice_ce_loss
from dints3d.data.patch import resolve_patch
from dints3d.spaces.baselines.networks import (
    BASELINES,
    DynUNetArchitecture,
    SegResNetArchitecture,
    plan_baseline,
)
from dints3d.spaces.baselines.planning import MIN_FEATURE_MAP, stage_count, unet_stages
from dints3d.spaces.factory import architecture_from_dict, load_architecture
from dints3d.utils.errors import DintsError

ISOTROPIC = {"name": "iso", "patch_size": [64, 64, 64], "target_spacing": [1.0, 1.0, 1.0]}
ANISOTROPIC = {"name": "aniso", "patch_size": [64, 64, 16], "target_spacing": [0.8, 0.8, 3.0]}


def brute_force_stages(spacing, patch):
    """nnU-Net's rule stage by stage, written as plainly as possible (no shared code with planning.py)."""
    spacing, size, stages = list(spacing), list(patch), [([3 if s <= 2 * min(spacing) else 1 for s in spacing],
                                                         [1] * len(patch))]
    for _ in range(5):
        stride = []
        for s, n in zip(spacing, size):
            halve = s <= 2 * min(spacing) and n % 2 == 0 and n // 2 >= MIN_FEATURE_MAP
            stride.append(2 if halve else 1)
        if stride == [1] * len(patch):
            break
        size = [n // st for n, st in zip(size, stride)]
        spacing = [s * st for s, st in zip(spacing, stride)]
        stages.append(([3 if s <= 2 * min(spacing) else 1 for s in spacing], stride))
    return [k for k, _ in stages], [s for _, s in stages]


@pytest.mark.parametrize("spacing, patch", list(
    itertools.product([(1, 1, 1), (0.8, 0.8, 3.0), (0.7, 0.7, 5.0), (1.5, 0.75, 0.75), (1, 1, 1.9)],
                       [(64, 64, 64), (128, 128, 32), (96, 160, 48), (32, 32, 8), (16, 24, 16)])))
def test_unet_stages_follow_nnunet_rule(spacing, patch):
    kernels, strides = unet_stages(spacing, patch)
    assert (kernels, strides) == brute_force_stages(spacing, patch)
    for axis, n in enumerate(patch):
        total = math.prod(s[axis] for s in strides)
        assert n % total == 0 and n // total >= min(MIN_FEATURE_MAP, n)  # every stage's map stays ≥ 4 voxels


def test_anisotropic_plans_keep_thick_slices_at_first():
    kernels, strides = unet_stages([0.8, 0.8, 3.0], [128, 128, 32])
    assert kernels[0] == [3, 3, 1] and strides[1] == [2, 2, 1]  # 3×3×1 kernel, in-plane downsampling first
    assert [2, 2, 2] in strides  # once the in-plane spacing reaches the slice thickness, all axes go together
    assert stage_count([64, 64, 16]) == 3 and stage_count([96, 96, 96]) == 5


@pytest.mark.parametrize("name, plan", list(itertools.product(sorted(BASELINES), [ISOTROPIC, ANISOTROPIC])))
def test_round_trip_bundle_form_and_deep_supervision(name, plan):
    arch = plan_baseline(name, plan)
    again = architecture_from_dict(arch.to_dict(), "arch.json")
    assert again == arch and type(again) is type(arch)
    net = arch.build(2, 3, channel_mul=0.25)
    parser = ConfigParser({"in_channels": 2, "out_channels": 3, "channel_mul": 0.25, "arch": arch.to_dict(),
                           "net": arch.bundle_network()})
    from_bundle = parser.get_parsed_content("net")  # what train.yaml / inference.yaml build, with MONAI alone
    assert type(from_bundle).__module__.startswith("monai.")
    assert {k: v.shape for k, v in from_bundle.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}

    x = torch.randn(1, 2, *plan["patch_size"])
    label = torch.randint(0, 3, (1, 1, *plan["patch_size"]))
    net.train()
    out = net(x)
    heads = len(out) if isinstance(out, list) else out.shape[1]
    assert heads >= 2  # deep supervision on by default
    loss = DeepSupervised(dice_ce_loss())(out, label)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (1, 3, *plan["patch_size"])  # inference: the finest head only
    without = plan_baseline(name, plan, deep_supervision=False).build(2, 3, channel_mul=0.25).train()
    single = without(x)
    assert torch.is_tensor(single) and single.shape == (1, 3, *plan["patch_size"])


def test_deep_supervised_loss_weights_heads_and_passes_single_outputs_through():
    label = torch.randint(0, 3, (2, 1, 16, 16, 16))
    logits = torch.randn(2, 3, 16, 16, 16)
    inner = dice_ce_loss()
    assert torch.equal(DeepSupervised(inner)(logits, label), inner(logits, label))
    coarse = torch.randn(2, 3, 8, 8, 8)
    expected = (inner(logits, label) + 0.5 * inner(coarse, torch.nn.functional.interpolate(
        label.float(), size=(8, 8, 8), mode="nearest-exact"))) / 1.5  # weights 1, ½ normalised (nnU-Net)
    assert torch.allclose(DeepSupervised(inner)([logits, coarse], label), expected, rtol=1e-5)
    stacked = torch.stack([logits, torch.randn_like(logits)], dim=1)  # DynUNet's training output
    assert torch.allclose(DeepSupervised(inner)(stacked, label),
                          DeepSupervised(inner)([stacked[:, 0], stacked[:, 1]], label))


def test_per_axis_divisors_and_refusals():
    arch = plan_baseline("dynunet", ANISOTROPIC)  # in-plane halved 4 times, the thick axis twice
    assert arch.patch_divisor == (16, 16, 4) == tuple(math.prod(s[a] for s in arch.strides) for a in range(3))
    assert resolve_patch(ANISOTROPIC, arch.patch_divisor, arch.patch_requirement, dims=3) == [64, 64, 16]
    with pytest.raises(DintsError, match=r"must be 3 positive multiples of 16 × 16 × 4"):
        resolve_patch(ANISOTROPIC, arch.patch_divisor, arch.patch_requirement, ("data.patch_size", [64, 56, 16]))
    with pytest.raises(DintsError, match="sized from a prepared task's plan"):
        load_architecture("segresnet")
    for bad, match in (({"blocks_down": []}, "blocks_down"), ({"dsdepth": 9}, "dsdepth"),
                       ({"resolution": [1, 1]}, "resolution")):
        data = {**SegResNetArchitecture().to_dict(), **bad}
        with pytest.raises(DintsError, match=match):
            architecture_from_dict(data, "arch.json")
    data = {**DynUNetArchitecture.from_plan(ISOTROPIC).to_dict(), "filters": [32]}
    with pytest.raises(DintsError, match="same ≥ 2 stages"):
        architecture_from_dict(data, "arch.json")


def test_sizing_matches_a_memory_target_within_five_percent():
    reference = load_architecture("dints-cvpr")
    target = peak_bytes(reference, 2, 3, [64, 64, 32], 0.5, 4, True)
    for name in sorted(BASELINES):
        arch = plan_baseline(name, {**ANISOTROPIC, "patch_size": [64, 64, 32]})
        mul, peak = channel_mul_for_memory(arch, 2, 3, [64, 64, 32], target, batch=4)
        assert abs(peak / target - 1) < 0.05, (name, mul, peak, target)
        assert peak_bytes(arch, 2, 3, [64, 64, 32], mul * 1.5, 4, True) > peak  # wider → more memory
