"""The DPC space: arch.json round trip and refusals, operations per axis, the head, backbone features, sampling."""

import json

import numpy as np
import pytest
import torch
from support import F64_RTOL, rel_error

from dints3d.random_search.samplers import DpcSampler
from dints3d.spaces.dints.architecture import random_dints_architecture
from dints3d.spaces.dpc.architecture import DpcArchitecture
from dints3d.spaces.dpc.backbones import DintsFeatures
from dints3d.spaces.dpc.genotype import (
    BACKBONE,
    CONV_1X1,
    PYRAMID_POOL,
    SEP_CONV,
    Branch,
    DpcCatalog,
    DpcOp,
)
from dints3d.spaces.dpc.network import PyramidPool, SeparableConv
from dints3d.spaces.factory import architecture_from_dict, load_architecture
from dints3d.utils.errors import DintsError

CELL_2D = [
    Branch(BACKBONE, DpcOp(SEP_CONV, (6, 3))),
    Branch(0, DpcOp(PYRAMID_POOL, (2, 4))),
    Branch(BACKBONE, DpcOp(CONV_1X1)),
    Branch(1, DpcOp(SEP_CONV, (1, 21))),
    Branch(3, DpcOp(PYRAMID_POOL, (1, 1))),
]


def _backbone(spatial_dims=2, seed=1):
    return random_dints_architecture(2, 3, np.random.default_rng(seed), spatial_dims=spatial_dims)


def test_catalog_sizes_match_the_paper():
    c2 = DpcCatalog.default(2)
    assert c2.rates == (1, 3, 6, 9, 12, 15, 18, 21) and c2.grids == (1, 2, 4, 8)
    assert c2.num_operations == 81
    assert c2.num_cells(5) == 120 * 81**5  # B! · 81^B ≈ 4.2e11
    assert 4.1e11 < c2.num_cells(5) < 4.3e11
    assert DpcCatalog.default(3).num_operations == 1 + 6**3 + 3**3


def test_arch_json_round_trip_with_backbone(tmp_path):
    arch = DpcArchitecture(CELL_2D, 2, 16).with_backbone(_backbone(), 1, 0.25)
    arch.provenance = {"trial": 3}
    path = arch.save(tmp_path / "arch.json")
    loaded = load_architecture(path)
    assert isinstance(loaded, DpcArchitecture)
    assert loaded.to_dict() == json.loads(path.read_text()) == arch.to_dict()
    assert loaded.branches == CELL_2D
    assert loaded.backbone["space"] == "dints" and loaded.feature_depth == 1


@pytest.mark.parametrize("change, message", [
    (lambda d: d["branches"][1].update(input=1), "earlier branch"),
    (lambda d: d["branches"][0].update(rates=[6, 3, 1]), "2 positive integers"),
    (lambda d: d["branches"][1].update(op="max_pool"), "must be one of"),
    (lambda d: d.update(branches=[]), "non-empty"),
    (lambda d: d.update(backbone={"space": "dpc", "version": 1}), "another space"),
    (lambda d: d.update(channels=0), "positive integer"),
])
def test_bad_arch_json_is_refused(change, message):
    data = DpcArchitecture(CELL_2D, 2, 16).with_backbone(_backbone(), 1, 0.25).to_dict()
    change(data)
    with pytest.raises(DintsError, match=message):
        architecture_from_dict(data, "arch.json")


def test_backbone_of_other_dimension_is_refused():
    data = DpcArchitecture(CELL_2D, 2, 16).with_backbone(_backbone(spatial_dims=3), 1, 0.25).to_dict()
    with pytest.raises(DintsError, match="3-D but the cell is 2-D"):
        architecture_from_dict(data, "arch.json")


def test_operations_use_their_rates_and_grids_per_axis():
    head = DpcArchitecture(CELL_2D, 2, 16).build_head(24, 3)
    sep, pool = head.ops[0], head.ops[1]
    assert isinstance(sep, SeparableConv) and sep[0].dilation == (6, 3) and sep[0].groups == 24
    assert isinstance(pool, PyramidPool) and tuple(pool.pool.output_size) == (2, 4)
    assert head.ops[0][1].in_channels == 24 and head.ops[1].project[0].in_channels == 16  # backbone vs branch 0
    x = torch.randn(2, 24, 20, 12)
    with torch.no_grad():
        assert head(x).shape == (2, 3, 20, 12)
        assert pool(torch.randn(1, 16, 20, 12)).shape == (1, 16, 20, 12)


def test_3d_head_with_anisotropic_rates():
    cell = [Branch(BACKBONE, DpcOp(SEP_CONV, (4, 4, 1))), Branch(0, DpcOp(PYRAMID_POOL, (2, 2, 1)))]
    head = DpcArchitecture(cell, 3, 8).build_head(16, 2)
    assert head.ops[0][0].dilation == (4, 4, 1)
    with torch.no_grad():
        assert head(torch.randn(1, 16, 8, 8, 4)).shape == (1, 2, 8, 8, 4)


def test_dints_features_follow_monai_decoder():
    """Features at depth 0 through DiNTS's last upsampling stem and classifier give DiNTS's own output."""
    backbone = _backbone()
    net = backbone.build(1, 3, channel_mul=0.25).eval().double()  # float64: support.F64_RTOL
    features = DintsFeatures(net, 0, backbone.use_downsample)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        rebuilt = net.stem_finals(net.stem_up["0"](features(x)))
        assert rebuilt.dtype == torch.float64
        assert rel_error(rebuilt, net(x)) < F64_RTOL
        deeper = DintsFeatures(net, 1, True)
        assert deeper(x).shape == (2, deeper.out_channels, 8, 8) and deeper.stride == 4
    assert set(deeper.state_dict()) < set(net.state_dict())  # a sub-network: pre-trained weights load by name


def test_dints_features_branch_on_python_bools_and_keep_the_network_keys(monkeypatch):
    """The node activations are Python bools (a tensor on the GPU would sync with the host at every test), not in the
    state dict, and the network's trained weights (e.g. a bundle's model.pt) still load into the extractor."""
    from dints3d.spaces.dpc.backbones import backbone_features

    backbone = _backbone()
    net = backbone.build(1, 3, channel_mul=0.25).eval()
    features = DintsFeatures(net, 1, backbone.use_downsample)
    assert features.node_a == [[bool(v) for v in row] for row in torch.as_tensor(net.node_a).tolist()]
    assert all(type(v) is bool for row in features.node_a for v in row)
    assert "node_a" not in dict(features.named_buffers()) and "node_a" not in features.state_dict()
    assert {k for k in net.state_dict() if k.startswith(("stem_down.", "dints_space."))} <= set(features.state_dict())

    trained = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    extractor, _ = backbone_features(backbone, 1, 3, 1, 0.25, trained)  # the network's whole state dict loads
    weights = extractor.state_dict()
    assert all(torch.equal(weights[k], trained[k]) for k in weights)

    # with MONAI's topology stubbed out, the extractor's forward never asks a tensor for its truth value
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        outputs = features.dints_space([features.stem_down[str(d)](x) for d in range(features.num_depths)])
    monkeypatch.setattr(features.dints_space, "forward", lambda inputs: outputs)

    def no_bool(self):
        raise AssertionError("a tensor was tested for truth in DintsFeatures.forward")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_bool)
    with torch.no_grad():
        assert features(x).shape == (2, features.out_channels, 8, 8)


def test_full_network_resizes_logits_to_the_input():
    arch = DpcArchitecture(CELL_2D, 2, 8).with_backbone(_backbone(), 1, 0.25)
    net = arch.build(1, 3)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 64)).shape == (1, 3, 32, 64)


def test_sampler_uniform_and_perturb():
    sampler = DpcSampler(DpcCatalog.default(2), 5, 8)
    assert len(sampler.operations) == 81
    rng = np.random.default_rng(0)
    cells = [sampler.uniform(rng) for _ in range(50)]
    assert all(b.input < i for c in cells for i, b in enumerate(c.branches))
    assert len({c.key() for c in cells}) == 50
    kinds = {b.op.kind for c in cells for b in c.branches}
    assert kinds == {CONV_1X1, SEP_CONV, PYRAMID_POOL}
    for cell in cells[:20]:
        near = sampler.perturb(cell, rng)
        changed = [i for i, (a, b) in enumerate(zip(cell.branches, near.branches)) if a != b]
        assert len(changed) == 1  # one branch changes, the rest is kept
        assert architecture_from_dict(near.to_dict()).key() == near.key()
    again = DpcSampler(DpcCatalog.default(2), 5, 8).uniform(np.random.default_rng(0))
    assert again.key() == cells[0].key()  # a pure function of the generator
