"""The training-memory model (meta device) behaves like memory does, and matches real saved tensors."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from dints3d.cost.memory import (
    dice_ce_loss,
    measure_training_memory,
    meta_network,
    meta_search_space,
    parameters_on_meta,
    predict_search_step_memory,
    predict_training_memory,
    step_activation_memory,
)
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    random_dints_architecture,
)

MUL = 0.25  # tiny scale: 4 blocks × 3 depths at channel_mul 0.25


@pytest.fixture(scope="module")
def arch():
    return random_dints_architecture(4, 3, np.random.default_rng(0))


def predict(arch, side: int, batch: int = 1, amp: bool = False, **kwargs) -> dict:
    return predict_training_memory(meta_network(arch, 1, 3, channel_mul=MUL), (1, side, side, side), batch, amp,
                                   **kwargs)


def test_random_architectures_are_connected_and_seeded():
    for seed in range(8):
        a = random_dints_architecture(5, 3, np.random.default_rng(seed))
        a.check()  # raises unless every layer reads exactly what the previous one wrote
        assert a.arch_code_c[a.arch_code_a == 0].max(initial=0) == 0
    first, again = (random_dints_architecture(5, 4, np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(first.arch_code_a, again.arch_code_a) and np.array_equal(first.node_a, again.node_a)


def test_parameters_on_meta_allocates_nothing_and_restores(arch):
    model = meta_network(arch, 1, 3, channel_mul=MUL)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # the patch is gone afterwards
    with parameters_on_meta():
        assert torch.nn.Conv3d(1, 1, 3).weight.device.type == "meta"


def test_monotone_in_patch_size_and_batch(arch):
    small, large, double = predict(arch, 32), predict(arch, 48), predict(arch, 32, batch=2)
    for key in ("activations", "transient", "peak"):
        assert large[key] > small[key]
    assert double["activations"] > 1.9 * small["activations"]
    # On the CPU a batch of 1 may take slow_conv3d, whose im2col buffer can outweigh a second sample's activations
    # (a batch of 2 takes oneDNN); without that buffer the peak grows with the batch.
    assert predict(arch, 32, batch=2, device="cuda")["peak"] > predict(arch, 32, device="cuda")["peak"]
    assert small["parameters"] == large["parameters"] == small["gradients"] == small["optimizer_state"]
    assert small["peak"] == sum(v for k, v in small.items() if k != "peak")


def test_amp_halves_activations_and_drops_im2col(arch):
    fp32, amp = predict(arch, 48), predict(arch, 48, amp=True)
    assert 0.45 < amp["activations"] / fp32["activations"] < 0.7  # half-size tensors plus bf16 weight copies
    assert amp["transient"] < fp32["transient"] and amp["parameters"] == fp32["parameters"]
    cuda = predict(arch, 48, device="cuda")
    assert cuda["transient"] < fp32["transient"] and cuda["activations"] == fp32["activations"]


def test_more_active_paths_need_more_memory():
    depth0_only = np.zeros((4, 7), dtype=np.int64)
    depth0_only[:, 0] = 1
    node_a = np.zeros((5, 3), dtype=np.int64)
    node_a[:, 0] = 1
    sparse = DintsArchitecture(node_a, depth0_only, depth0_only.copy())
    dense = DintsArchitecture(np.ones((5, 3), np.int64), np.ones((4, 7), np.int64), np.ones((4, 7), np.int64))
    sparse.check(), dense.check()
    assert predict(dense, 32)["activations"] > 1.5 * predict(sparse, 32)["activations"]
    assert predict(dense, 32)["peak"] > predict(sparse, 32)["peak"]


def test_optimizer_state():
    arch = random_dints_architecture(2, 2, np.random.default_rng(1))
    adam, sgd = predict(arch, 16, optimizer="adam"), predict(arch, 16, optimizer="sgd")
    assert adam["optimizer_state"] == 2 * adam["gradients"] and sgd["optimizer_state"] == 0
    with pytest.raises(ValueError, match="optimizer"):
        predict(arch, 16, optimizer="lion")


@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("seed", [0, 1])  # seed 1 has an inactive input node: MONAI discards that stem's output
def test_meta_activations_match_real_saved_tensors(amp, seed):
    """The meta run (with CPU autocast emulated) saves exactly what a real CPU step saves and still holds when the
    loss is computed (bf16 autocast for AMP)."""
    arch = random_dints_architecture(3, 3, np.random.default_rng(seed))
    assert arch.node_a[0].all() == (seed == 0)
    model = arch.build(1, 3, channel_mul=MUL)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, list] = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved.setdefault(t.untyped_storage()._cdata, []).append((weakref.ref(t), t.untyped_storage().nbytes()))
        return t

    x, y = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 3, (2, 1, 32, 32, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = dice_ce_loss()(model(x), y)
    held = sum(max((n for ref, n in refs if ref() is not None), default=0) for refs in saved.values())
    assert loss.requires_grad and held > 0
    assert step_activation_memory(model, (1, 32, 32, 32), batch=2, amp=amp)["activations"] == held


def test_predictions_are_deterministic():
    """Storage addresses freed mid-forward (discarded stem outputs) are reused; the count must not depend on that."""
    rng = np.random.default_rng(0)
    archs = [a for a in (random_dints_architecture(4, 3, rng) for _ in range(8)) if not a.node_a[0].all()][:3]
    assert len(archs) == 3
    for arch in archs:
        model = meta_network(arch, 1, 3, channel_mul=MUL)
        first = predict_training_memory(model, (1, 32, 32, 32))
        for _ in range(3):
            junk = [torch.empty(1000, device="meta") for _ in range(50)]  # stir the allocator between calls
            assert predict_training_memory(model, (1, 32, 32, 32)) == first
            del junk


def test_search_step_memory():
    hp = dict(num_blocks=2, num_depths=3, channel_mul=MUL)
    small, large = (predict_search_step_memory(hp, (1, s, s, s), num_classes=3) for s in (16, 32))
    assert small["peak"] == max(small["weight_step_peak"], small["arch_step_peak"])
    assert large["peak"] > small["peak"] and large["activations"] > small["activations"]
    amp = predict_search_step_memory(hp, (1, 32, 32, 32), amp=True, num_classes=3)
    assert amp["activations"] < large["activations"]


def test_search_step_memory_with_checkpointed_cells():
    """Checkpointing the first half of the blocks, then all of them, saves activations; the recomputed cell adds
    to the transient term; the supernet's own checkpoint function is back afterwards."""
    hp = dict(num_blocks=4, num_depths=3, channel_mul=MUL)
    plain, half, every = (predict_search_step_memory({**hp, **extra}, (1, 32, 32, 32), amp=True, num_classes=3)
                          for extra in ({}, {"checkpoint_cells": True, "checkpoint_fraction": 0.5},
                                        {"checkpoint_cells": True}))
    assert plain["activations"] > half["activations"] > every["activations"] > 0
    assert plain["peak"] > half["peak"] > every["peak"]
    assert every["transient"] > plain["transient"]
    space = meta_search_space(1, 3, **hp, checkpoint_cells=True)
    step_activation_memory(space, (1, 16, 16, 16), batch=1, amp=False)
    assert space.topology_space.checkpoint_fn is torch.utils.checkpoint.checkpoint


class _Checkpointed(nn.Module):
    """conv → [relu → conv], the bracket checkpointed through a ``checkpoint_fn`` attribute (as the supernet's)."""

    def __init__(self, checkpointed: bool):
        super().__init__()
        self.a, self.b = nn.Conv3d(1, 4, 3, padding=1), nn.Conv3d(4, 3, 3, padding=1)
        self.checkpointed = checkpointed
        self.checkpoint_fn = torch.utils.checkpoint.checkpoint

    def tail(self, h):
        return self.b(torch.relu(h))

    def forward(self, x):
        h = self.a(x)
        return self.checkpoint_fn(self.tail, h, use_reentrant=False) if self.checkpointed else self.tail(h)


def test_checkpointed_region_keeps_its_input_and_recomputes_what_it_saves():
    """Inside the bracket only relu(h) is saved (by relu and by conv b, one storage); checkpointed, the bracket
    keeps h instead (same size) and recomputes relu(h) in backward: activations equal, transient + relu(h)."""
    plain, checkpointed = (step_activation_memory(_Checkpointed(c), (1, 8, 8, 8), batch=2, amp=False)
                           for c in (False, True))
    relu_bytes = 2 * 4 * 8**3 * 4
    assert checkpointed["activations"] == plain["activations"]
    assert checkpointed["transient"] - plain["transient"] == relu_bytes


@pytest.mark.slow
def test_predicted_peak_within_20_percent_of_measured(arch):
    """One real CPU measurement (fresh subprocess): peak RSS increase of two SGD steps vs the prediction."""
    predicted = predict(arch, 32)
    measured = measure_training_memory(arch, 1, 3, (1, 32, 32, 32), channel_mul=MUL)
    assert predicted["peak"] - predicted["parameters"] == pytest.approx(measured, rel=0.2)


@pytest.mark.parametrize("shape, kernel, stride", [
    ((1, 8, 16, 16, 16), (3, 3, 3), 1),    # 8·16·16 ≤ 20480 at batch 1: slow_conv3d
    ((1, 32, 32, 32, 32), (3, 3, 3), 1),   # 32·32·32 > 20480: oneDNN
    ((2, 8, 16, 16, 16), (3, 3, 3), 1),    # batch 2: oneDNN
    ((1, 32, 32, 32, 32), (3, 1, 1), 1),   # last two kernel sides 1, one thread: slow
    ((1, 32, 32, 32, 32), (1, 1, 1), 2),   # strided 1×1×1 on a large input: oneDNN
])
def test_slow_conv3d_rule_matches_pytorch(shape, kernel, stride):
    """The im2col term follows the convolution kernel PyTorch really picks (checked with the profiler)."""
    from torch.profiler import profile

    from dints3d.spaces.dints.cpu_conv import uses_slow_conv3d

    x, w = torch.randn(*shape), torch.randn(shape[1], shape[1], *kernel)
    threads = torch.get_num_threads()
    with profile() as prof:
        torch.nn.functional.conv3d(x, w, stride=stride)
    slow = any(e.key == "aten::slow_conv3d_forward" for e in prof.key_averages())
    assert slow == uses_slow_conv3d(shape, w.shape, [stride] * 3, [1] * 3, 1, threads)
