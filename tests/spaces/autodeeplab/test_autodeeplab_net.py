"""The discrete Auto-DeepLab network, the S/M/L presets against the paper's Table 2, arch.json, the picture, and
``dints3d describe`` on Auto-DeepLab architectures."""

import json

import pytest
import torch

from dints3d.cli import main
from dints3d.cost.describe import (
    count_flops,
    deeplab_eval_crop,
    deeplab_tensorflow_macs,
)
from dints3d.cost.memory import meta_network
from dints3d.spaces.autodeeplab.architecture import AutoDeepLabArchitecture
from dints3d.spaces.autodeeplab.network import AutoDeepLabNet
from dints3d.spaces.factory import (
    architecture_from_dict,
    list_presets,
    load_architecture,
)
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import save_figure

#: Liu et al., CVPR 2019, Table 2: parameters of Auto-DeepLab-S/M/L (19 classes), and multiply-adds at 1024×2048
TABLE_2 = {"autodeeplab-s": (20, 10.15e6, 333.25e9), "autodeeplab-m": (32, 21.62e6, 460.93e9),
           "autodeeplab-l": (48, 44.42e6, 695.03e9)}
#: the released path and cell (TensorFlow DeepLab hnasnet; inputs renumbered 0 = H^{l-2}, 1 = H^{l-1})
RELEASED_PATH = [0, 0, 0, 1, 2, 1, 2, 2, 3, 3, 2, 1]
RELEASED_CELL = [(0, "atrous_conv_5x5"), (1, "sep_conv_3x3"), (0, "sep_conv_3x3"), (1, "atrous_conv_3x3"),
                 (3, "sep_conv_3x3"), (0, "sep_conv_3x3"), (4, "sep_conv_5x5"), (2, "sep_conv_5x5"),
                 (3, "sep_conv_5x5"), (5, "atrous_conv_5x5")]


def small_arch(path=(0, 1, 1, 0), spatial_dims=2) -> AutoDeepLabArchitecture:
    cell = [(0, "sep_conv_3x3"), (1, "atrous_conv_3x3"), (2, "avg_pool_3x3"), (1, "max_pool_3x3"),
            (3, "skip_connect"), (0, "sep_conv_5x5")]
    return AutoDeepLabArchitecture(network_path=list(path), cell=cell, filter_multiplier=2, spatial_dims=spatial_dims)


@pytest.mark.parametrize("preset", sorted(TABLE_2))
def test_presets_match_table_2(preset):
    width, params, _ = TABLE_2[preset]
    arch = load_architecture(preset)
    assert (arch.network_path, arch.cell, arch.filter_multiplier) == (RELEASED_PATH, RELEASED_CELL, width)
    count = sum(p.numel() for p in meta_network(arch, 3, 19).parameters())
    assert count == pytest.approx(params, rel=0.02)
    assert round(count / 1e6, 2) == params / 1e6  # in fact equal to the reported digits
    assert preset in list_presets()


def test_describe_reports_the_published_figures(capsys):
    assert main(["describe", "autodeeplab-s", "--batch", "1", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["input_size"] == [1024, 2048] and (facts["in_channels"], facts["classes"]) == (3, 19)
    assert facts["reference"]["parameters"] == 10.15e6 and facts["reference"]["multiply_adds"] == 333.25e9
    assert facts["strides"] == [4 * 2**j for j in RELEASED_PATH] and facts["filter_multiplier"] == 20
    # our module-level count (convolutions and matmuls only) is 4.7 % under the paper's, its rule 0.02 %
    assert facts["macs"] == pytest.approx(317.54e9, rel=1e-4)
    assert facts["macs_deeplab_tensorflow"]["macs"] == pytest.approx(333.25e9, rel=1e-3)
    assert main(["describe", "autodeeplab-s", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert "paper's rule: 333.18 G multiply-adds" in text and "(ours -4.7 %, paper's rule -0.02 %)" in text
    assert main(["describe", "autodeeplab-m", "--input-size", "64", "128", "--channel-mul", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "F = 16" in text and "strides 4-4-4-8-16-8" in text and "published" not in text
    assert main(["describe", "autodeeplab-s", "--input-size", "64", "64", "64"]) == 2
    assert "needs 2 positive sides" in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(TABLE_2))
def test_multiply_adds_under_the_papers_rule_match_table_2(preset):
    """TensorFlow's profiler on DeepLab's evaluation graph (docs/autodeeplab.md): 1025×2049 crop, dilated convs over
    space-to-batch padding, 97×97 image-pooling windows, additions — within 0.03 % of all three published figures."""
    published = TABLE_2[preset][2]
    count = deeplab_tensorflow_macs(meta_network(load_architecture(preset), 3, 19), (1024, 2048))
    assert count["eval_crop"] == [1025, 2049] and count["image_pooling_window"] == [97, 97]
    assert count["macs"] == sum(count["parts"].values()) == pytest.approx(published, rel=1e-3)
    # every detail is needed: without any one of them the count misses by more than 1.5 %
    parts = count["parts"]
    for detail in ("dilated_padding", "image_pooling"):
        assert count["macs"] - parts[detail] < 0.985 * published
    assert parts["additions"] < 1e-3 * published


def test_papers_rule_counts_the_same_convolutions_as_torch():
    model = meta_network(load_architecture("autodeeplab-s"), 3, 19)
    count = deeplab_tensorflow_macs(model, (1024, 2048))
    pooling_conv = model.aspp.pooling[0].in_channels * model.aspp.pooling[0].out_channels  # on a 1-pixel map
    assert count["parts"]["convolutions"] == count_flops(model, (1, 3, 1025, 2049)) // 2 - pooling_conv


def test_papers_rule_on_small_inputs():
    assert deeplab_eval_crop((1024, 2048)) == (1025, 2049) and deeplab_eval_crop((321, 33, 64)) == (321, 33, 65)
    count = deeplab_tensorflow_macs(meta_network(small_arch(path=(0, 1)), 3, 5), (40, 60))
    # crop 65×65 → stride 8 map 9×9: the 769 window covers it all, i.e. global pooling
    assert count["eval_crop"] == [65, 65] and count["image_pooling_window"] == [9, 9]
    channels = 3 * 2 * 2  # 3 blocks of F·2 channels at stride 8
    assert count["parts"]["image_pooling"] == channels * 256 + round(81 * channels / 2)
    # the ASPP's rate-12/24/36 convs cover 12/24/36 positions a side instead of 9; the first cell's rate-2 3×3 conv
    # (2 channels, stride 4: 17×17) covers 18×18; the second cell strides, so its atrous conv runs at rate 1
    aspp = sum(channels * 9 * 256 * (r * r - 81) for r in (12, 24, 36))
    assert count["parts"]["dilated_padding"] == aspp + 2 * 9 * 2 * (18 * 18 - 17 * 17)


def test_network_shapes_strides_and_low_level_features():
    arch = small_arch()
    net = arch.build(3, 5)
    x = torch.randn(2, 3, 37, 50)
    assert net(x).shape == (2, 5, 37, 50)
    seen = []
    hooks = [cell.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for cell in net.cells]
    net.eval()(x)
    for h in hooks:
        h.remove()
    # stem: 37×50 → 19×25 → 10×13 (stride 4); 3 blocks of F·2^level channels; ceil halving between levels
    assert seen == [(2, 6, 10, 13), (2, 12, 5, 7), (2, 12, 5, 7), (2, 6, 10, 13)]
    assert net.low_level_index == 2 + 3  # the last stride-4 cell
    assert arch.build(3, 5, filter_multiplier=4).cells[0].ops[0][2].out_channels == 4
    assert AutoDeepLabNet(3, 5, [1, 2], arch.cell, 2).low_level_index == 1  # the stem's stride-4 output


def test_cells_follow_the_released_layout():
    net = load_architecture("autodeeplab-s").build(3, 19)
    down = net.cells[3]  # stride 4 → 8
    assert down.step == 1 and down.prev[1].kernel_size == (1, 1) and down.prev[1].in_channels == 100
    # ops on the cell's own inputs stride, ops on blocks do not
    assert [i for i, _ in RELEASED_CELL][:4] == [0, 1, 0, 1]
    assert down.ops[1][1].stride == (2, 2) and down.ops[4][1].stride == (1, 1)
    assert type(down.ops[0]).__name__ == "HalveThenConv" and down.ops[9][1].dilation == (2, 2)
    up = net.cells[5]  # stride 16 → 8: bilinear ×2, then the 1x1 projection
    assert up.step == -1 and up.prev[1].in_channels == 5 * 20 * 4 and up.prev[1].out_channels == 40


def test_three_dimensional_network_forward_backward():
    net = small_arch(spatial_dims=3).build(1, 2)
    y = net(torch.randn(2, 1, 20, 18, 16))
    assert y.shape == (2, 2, 20, 18, 16)
    y.mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_arch_json_round_trip(tmp_path):
    arch = small_arch()
    arch.provenance = {"note": "test"}
    data = arch.to_dict()
    assert data["space"] == "autodeeplab" and data["network_path"] == [0, 1, 1, 0]
    assert data["cell"][1] == [1, "atrous_conv_3x3"] and data["num_blocks"] == 3 and data["filter_multiplier"] == 2
    assert architecture_from_dict(json.loads(json.dumps(data)), "x") == arch
    path = arch.save(tmp_path / "arch.json")
    assert load_architecture(path) == arch
    figure = arch.figure()
    save_figure(figure, tmp_path / "arch.png")
    assert (tmp_path / "arch.png").stat().st_size > 5000


@pytest.mark.parametrize("change, message", [
    ({"network_path": [1, 3]}, "jumps more than one level"),
    ({"network_path": [0, 4]}, "outside levels 0..3"),
    ({"network_path": []}, "non-empty list"),
    ({"cell": [[0, "zero"], [1, "skip_connect"]]}, "unknown operation 'zero'"),
    ({"cell": [[0, "sep_conv_3x3"], [2, "skip_connect"]]}, "block 0 can read inputs 0..1, not 2"),
    ({"cell": [[0, "sep_conv_3x3"]]}, "two [input, operation] pairs per block"),
    ({"num_blocks": 5}, "'num_blocks' is 5 but the codes say 3"),
    ({"filter_multiplier": 0}, "'filter_multiplier' must be an integer ≥ 1"),
    ({"spatial_dims": 4}, "'spatial_dims' must be 2 or 3"),
])
def test_bad_arch_json(change, message):
    data = {**small_arch().to_dict(), **change}
    with pytest.raises(DintsError, match=message.replace("[", r"\[").replace("(", r"\(")):
        architecture_from_dict(data, "arch.json")
