"""The DiNTS search space and architecture against MONAI's own classes (numerical equivalences in float64, where
they do not depend on the CPU's kernels: support.F64_RTOL)."""

import copy
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import DiNTS, TopologySearch
from support import F64_RTOL, rel_error

from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.dints.supernet import DintsSearchSpace
from dints3d.spaces.factory import architecture_from_dict, load_architecture
from dints3d.utils.errors import DintsError

TINY = dict(num_blocks=3, num_depths=3, channel_mul=0.25, use_downsample=True, spatial_dims=3)


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
