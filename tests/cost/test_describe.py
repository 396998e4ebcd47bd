"""``dints3d describe``: parameters, multiply-adds, memory, paths and operations (meta device, no allocation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dints3d.cli import main
from dints3d.cost.describe import describe
from dints3d.spaces.dints.architecture import random_dints_architecture
from dints3d.spaces.factory import load_architecture


@pytest.fixture(scope="module")
def cvpr_facts():
    # MACs scale exactly with the voxel count (every feature map shrinks by the same factor), so 32³ stands in for 96³.
    return describe(load_architecture("dints-cvpr"), input_size=(32, 32, 32), in_channels=1, classes=3,
                    channel_mul=1.0, batch=1, amp=True)


def test_cvpr_parameters_and_compute(cvpr_facts):
    assert cvpr_facts["parameters"] == pytest.approx(152.4e6, abs=0.1e6)  # 1 input channel, 3 classes: 152.361 M
    flops_96 = cvpr_facts["flops"] * 27
    assert flops_96 == pytest.approx(669e9, rel=0.002)  # the published "≈669 GFLOPs" counts 2 FLOPs per MAC
    assert cvpr_facts["macs"] * 2 == cvpr_facts["flops"]


def test_cvpr_topology_and_memory(cvpr_facts):
    assert (cvpr_facts["active_paths"], cvpr_facts["total_paths"]) == (97, 120)
    assert sum(cvpr_facts["operations"].values()) == 97 and cvpr_facts["operations"]["skip_connect"] == 24
    mem = cvpr_facts["memory"]["bytes"]
    assert mem["parameters"] == cvpr_facts["parameters"] * 4 == mem["gradients"] == mem["optimizer_state"]
    assert mem["peak"] == sum(v for k, v in mem.items() if k != "peak")


def test_cli_json_with_picture(tmp_path, capsys):
    arch = random_dints_architecture(3, 3, np.random.default_rng(0))
    arch.save(tmp_path / "arch.json")
    (tmp_path / "arch.png").write_bytes(b"\x89PNG")
    args = ["describe", str(tmp_path / "arch.json"), "--input-size", "32", "32", "32", "--channel-mul", "0.25",
            "--classes", "2", "--batch", "1"]
    assert main([*args, "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["picture"] == str(tmp_path / "arch.png")
    assert facts["active_paths"] == arch.num_active_paths and facts["memory"]["amp"] is True
    fp32 = describe(arch, (32, 32, 32), classes=2, channel_mul=0.25, batch=1, amp=False)
    assert fp32["memory"]["bytes"]["activations"] > facts["memory"]["bytes"]["activations"]
    assert main([*args, "--no-amp"]) == 0
    text = capsys.readouterr().out
    assert f"active paths: {arch.num_active_paths}/21" in text and "picture:      " in text and "fp32" in text


def test_cli_errors(capsys):
    assert main(["describe", "dints-cvpr", "--input-size", "40", "40", "40"]) == 2
    assert capsys.readouterr().err.startswith("error: --input-size: every side must be a positive multiple of 32")
    assert main(["describe", "no-such-preset"]) == 2
    err = capsys.readouterr().err
    assert "no such arch file or preset (presets: " in err and "dints-cvpr" in err
