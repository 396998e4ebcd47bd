"""The DiNTS search space and architecture against MONAI's own classes (numerical equivalences in float64, where
they do not depend on the CPU's kernels: support.F64_RTOL)."""

import copy
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import DiNTS, TopologySearch
from support import F64_RTOL, rel_error

from dints3d.config import config_path, load_config
from dints3d.random_search.samplers import DintsSampler
from dints3d.spaces.dints.architecture import (
    DintsArchitecture,
    network_options,
    stem_stride_for_spacing,
)
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.factory import (
    architecture_from_dict,
    build_search_space,
    load_architecture,
)
from dints3d.utils.errors import DintsError

#: MONAI's own network (no full-resolution skip), so that its forward is the reference
TINY = dict(num_blocks=3, num_depths=3, channel_mul=0.25, use_downsample=True, spatial_dims=3, stem_skip=False)


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    s = DintsSearchSpace(in_channels=2, num_classes=3, **TINY)
    with torch.no_grad():
        s.log_alpha_a.normal_(0, 1)
        s.log_alpha_c.normal_(1, 1)
    return s


@pytest.fixture(scope="module")
def space64(space):
    """A float64 copy of ``space`` (same parameter values)."""
    return copy.deepcopy(space).double()


def test_supernet_forward_equals_monai(space64):
    """Our host-sync-free forward computes exactly what MONAI's TopologySearch.forward does."""
    reference = TopologySearch(channel_mul=0.25, num_blocks=3, num_depths=3, use_downsample=True)
    reference.load_state_dict(space64.topology_space.state_dict())
    monai_net = DiNTS(dints_space=reference, in_channels=2, num_classes=3, use_downsample=True).double()
    monai_net.load_state_dict(space64.net.state_dict())
    x = torch.randn(1, 2, 32, 32, 32, dtype=torch.float64)
    space64.eval(), monai_net.eval()
    with torch.no_grad():
        ours, theirs = space64(x), monai_net(x)
    assert ours.dtype == theirs.dtype == torch.float64
    assert rel_error(ours, theirs) < F64_RTOL


def test_parameter_groups_are_disjoint_and_complete(space):
    weights = {id(p) for p in space.weight_parameters()}
    arch = {id(p) for p in space.arch_parameters()}
    assert not weights & arch
    assert weights | arch == {id(p) for p in space.parameters()}
    assert arch == {id(space.log_alpha_a), id(space.log_alpha_c)}


def test_checkpointed_cells_give_same_gradients(space64):
    x = torch.randn(1, 2, 32, 32, 32, dtype=torch.float64)
    space64.train()
    grads = []
    for flag in (False, True):
        space64.topology_space.checkpoint_cells = flag
        space64.zero_grad()
        space64(x).square().mean().backward()
        grads.append(space64.log_alpha_a.grad.clone())
    space64.topology_space.checkpoint_cells = False
    assert grads[0].dtype == torch.float64
    assert rel_error(grads[1], grads[0]) < F64_RTOL


def test_regularizers_are_finite_scalars_with_arch_gradients(space):
    terms = space.regularizers((1, 2, 32, 32, 32))
    assert set(terms) == {"entropy", "memory", "topology"}
    total = sum(terms.values())
    assert total.dim() == 0 and torch.isfinite(total)
    space.zero_grad()
    total.backward()
    assert space.log_alpha_a.grad.abs().sum() > 0 and space.log_alpha_c.grad.abs().sum() > 0


def test_decode_round_trips_and_builds_monai_network(space, tmp_path):
    arch, info = space.decode()
    assert info["active_paths"] == arch.num_active_paths > 0
    path = arch.save(tmp_path / "arch.json")
    loaded = load_architecture(path)
    assert isinstance(loaded, DintsArchitecture)
    for key in ("node_a", "arch_code_a", "arch_code_c"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(arch, key))
    net = loaded.build(in_channels=2, out_channels=3, channel_mul=0.5)
    assert isinstance(net, DiNTS)
    with torch.no_grad():
        out = net(torch.randn(1, 2, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


def test_discrete_memory_ratio_orders_architectures(space):
    arch, _ = space.decode()
    shape = (1, 2, 32, 32, 32)
    full = DintsArchitecture(node_a=np.ones_like(arch.node_a), arch_code_a=np.ones_like(arch.arch_code_a),
                             arch_code_c=np.ones_like(arch.arch_code_c))
    assert 0 < space.discrete_memory_ratio(arch, shape) <= space.discrete_memory_ratio(full, shape)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("node_a"), "missing key 'node_a'"),
        (lambda d: d.update(space="nope"), "unknown or missing 'space'"),
        (lambda d: d.update(version=99), "unsupported arch format version"),
        (lambda d: d["arch_code_a"][0].__setitem__(0, 2), "only 0 and 1"),
        (lambda d: d["arch_code_c"][0].__setitem__(0, 7), "operation indices"),
        (lambda d: d["node_a"].pop(), "must be"),
        (lambda d: d.update(arch_code_a=[[0] * 7] * 3), "no active path"),
        (lambda d: d.update(num_blocks=5), "num_blocks"),
        (lambda d: d.update(stem_skip="yes"), "'stem_skip' must be true or false"),
        (lambda d: d.update(stem_skip=True, use_downsample=False), "'stem_skip' needs 'use_downsample': true"),
    ],
)
def test_bad_arch_json_is_refused_with_reason(space, mutate, message):
    arch, _ = space.decode()
    data = json.loads(json.dumps(arch.to_dict()))
    mutate(data)
    with pytest.raises(DintsError, match=message):
        architecture_from_dict(data, "arch.json")


def test_disconnected_topology_is_refused(space):
    arch, _ = space.decode()
    data = arch.to_dict()
    data["node_a"][0] = [1 - v for v in data["node_a"][0]] if sum(data["node_a"][0]) < 3 else [1, 0, 0]
    with pytest.raises(DintsError, match="node"):
        architecture_from_dict(data, "arch.json")


def test_stem_skip_network_adds_the_full_resolution_stem_to_monais_output(space64):
    """DiNTSStemSkip = MONAI's DiNTS with the first stem's full-resolution conv → norm output added to the input of
    ``stem_finals``; the same state dict loads into both (no new parameter). Float64: exact up to summation order."""
    arch, _ = space64.decode()
    kwargs = dict(in_channels=2, out_channels=3, channel_mul=0.25)
    plain = arch.build(**kwargs).double().eval()
    arch.stem_skip = True
    skipped = arch.build(**kwargs).double().eval()
    assert type(skipped).__name__ == "DiNTSStemSkip" and isinstance(skipped, DiNTS)
    skipped.load_state_dict(plain.state_dict())  # strict: the same parameters and buffers

    stem = {}
    plain.stem_down["0"].mod[2].register_forward_hook(lambda module, args, out: stem.update(out=out))
    plain.stem_finals.register_forward_pre_hook(lambda module, args: (args[0] + stem["out"],))
    x = torch.randn(2, 2, 32, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, reference = skipped(x), plain(x)
    assert rel_error(ours, reference) < F64_RTOL
    assert torch.jit.script(skipped)(x).allclose(ours)  # bundles export TorchScript


def test_stem_skip_is_decoded_saved_and_void_without_the_stride_2_stem(tmp_path):
    space = DintsSearchSpace(in_channels=1, num_classes=2, num_blocks=2, num_depths=2, channel_mul=0.125)
    assert space.hparams["stem_skip"] and type(space.net).__name__ == "DiNTSStemSkip"
    arch, _ = space.decode()
    loaded = load_architecture(arch.save(tmp_path / "arch.json"))
    assert loaded.stem_skip and loaded.bundle_network()["_target_"] == "scripts.networks.DiNTSStemSkip"
    old = {key: value for key, value in arch.to_dict().items() if key != "stem_skip"}
    assert not architecture_from_dict(old, "old arch.json").stem_skip  # files from before the option: the paper's
    full_resolution = DintsSearchSpace(1, 2, num_blocks=2, num_depths=2, channel_mul=0.125, use_downsample=False)
    assert not full_resolution.hparams["stem_skip"] and not full_resolution.decode()[0].stem_skip


@pytest.mark.parametrize("spacing, stride", [
    ((0.8, 0.8, 2.8), (2, 2, 1)),   # thick slices: the coarse axis is not halved by the stems
    ((1.0, 1.0, 1.0), None),         # isotropic: MONAI's stems
    ((1.0, 1.5, 2.0), None),         # at most twice the finest: still halved (nnU-Net's rule)
    ((3.0, 1.0, 1.0), (1, 2, 2)),
    ((0.5, 0.5), None),
    (None, None),
])
def test_stem_stride_follows_nnunets_rule_for_pooling_an_axis(spacing, stride):
    assert stem_stride_for_spacing(spacing) == stride


def test_anisotropic_stems_halve_only_the_fine_axes(tmp_path):
    """Depth d of the space has spatial / (2^d · stem_stride) voxels; the output is on the input grid; the decoded
    network keeps the stride through arch.json and the bundle's network definition; TorchScript agrees."""
    torch.manual_seed(0)
    space = DintsSearchSpace(1, 2, num_blocks=2, num_depths=3, channel_mul=0.125, stem_stride=(2, 2, 1))
    seen = []
    space.net.dints_space.register_forward_pre_hook(lambda module, args: seen.extend(t.shape[2:] for t in args[0]))
    x = torch.randn(1, 1, 32, 32, 16)
    assert space(x).shape == (1, 2, 32, 32, 16)
    assert seen == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    arch, _ = space.decode()
    loaded = load_architecture(arch.save(tmp_path / "arch.json"))
    assert loaded.stem_stride == (2, 2, 1) and loaded.bundle_network()["stem_stride"] == "$@arch['stem_stride']"
    net = loaded.build(1, 2, channel_mul=0.125).eval()
    with torch.no_grad():
        assert net(x).shape == (1, 2, 32, 32, 16)
        assert torch.jit.script(net)(x).allclose(net(x))
    isotropic = DintsSearchSpace(1, 2, num_blocks=2, num_depths=3, channel_mul=0.125, stem_skip=False,
                                 stem_stride=(2, 2, 1))
    assert isotropic.hparams["stem_stride"] is None  # MONAI's stems cannot take it


@pytest.mark.parametrize("use_downsample, stem_skip, stem_stride, expected", [
    (True, True, [2, 2, 1], {"stem_skip": True, "stem_stride": (2, 2, 1)}),
    (True, True, None, {"stem_skip": True, "stem_stride": None}),
    (True, False, [2, 2, 1], {"stem_skip": False, "stem_stride": None}),   # MONAI's stems halve every axis
    (False, True, [2, 2, 1], {"stem_skip": False, "stem_stride": None}),   # no stride-2 stem: nothing to skip
])
def test_network_options_hold_the_one_rule_the_space_the_sampler_and_the_factory_share(
        use_downsample, stem_skip, stem_stride, expected):
    assert network_options(use_downsample, stem_skip, stem_stride) == expected
    space = DintsSearchSpace(1, 2, num_blocks=2, num_depths=2, channel_mul=0.125, use_downsample=use_downsample,
                             stem_skip=stem_skip, stem_stride=stem_stride)
    assert {key: space.hparams[key] for key in expected} == expected
    arch = DintsSampler(2, 2, 3, use_downsample, stem_skip=stem_skip, stem_stride=stem_stride).uniform(
        np.random.default_rng(0))
    assert (arch.stem_skip, arch.stem_stride) == (expected["stem_skip"], expected["stem_stride"])


@pytest.mark.parametrize("stride, message", [
    ([2, 2], "3 values of 1 or 2"), ([2, 2, 3], "3 values of 1 or 2"), ("221", "3 values of 1 or 2"),
])
def test_bad_stem_stride_is_refused(space, stride, message):
    data = json.loads(json.dumps(space.decode()[0].to_dict()))
    data.update(stem_skip=True, stem_stride=stride)
    with pytest.raises(DintsError, match=message):
        architecture_from_dict(data, "arch.json")
    data.update(stem_skip=False, stem_stride=[2, 2, 1])
    with pytest.raises(DintsError, match="'stem_stride' needs 'stem_skip': true"):
        architecture_from_dict(data, "arch.json")


def test_the_search_space_takes_its_stem_stride_from_the_plans_spacing():
    cfg = load_config(config_path("demo"))
    assert build_search_space(cfg, 1, 2, [0.8, 0.8, 2.8]).hparams["stem_stride"] == (2, 2, 1)
    assert build_search_space(cfg, 1, 2, [1.0, 1.0, 1.0]).hparams["stem_stride"] is None
    off = load_config(config_path("demo"), ["dints.anisotropic_stem=false"])
    assert build_search_space(off, 1, 2, [0.8, 0.8, 2.8]).hparams["stem_stride"] is None
