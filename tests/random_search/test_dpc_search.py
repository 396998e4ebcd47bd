"""A tiny DPC search on synthetic 2D (Cityscapes-format) data on an Auto-DeepLab backbone: outputs, weights that
load into the searched network and into the exported bundle's, and a second search that reuses the cached backbone
features."""

import json

import pytest
import torch
from monai.bundle import ConfigParser

from dints3d.cli import main
from dints3d.random_search.trials import read_rows
from dints3d.spaces.dpc.architecture import DpcArchitecture
from dints3d.spaces.dpc.backbones import AutoDeepLabFeatures
from dints3d.spaces.factory import load_architecture

TINY = [
    "device=cpu", "dpc.backbone=autodeeplab-s", "dpc.backbone_channel_mul=0.2", "dpc.pretrain_iterations=3",
    "data.patch_size=[32,32]", "dpc.channels=8", "dpc.num_branches=3", "dpc.train_patches=8", "dpc.val_patches=4",
    "dpc.batch_size=4", "train.amp=false", "random_search.trials=4", "random_search.iterations=3",
    "random_search.top_k=2", "random_search.topk_iterations=6",
]


@pytest.fixture(scope="module")
def work(prepared_cityscapes):
    """6 labelled Cityscapes-format images of 32 × 64 pixels, prepared with the default config."""
    return prepared_cityscapes(cases=6, test_cases=0, size=32, seed=0).work


@pytest.fixture
def backbone_forwards(monkeypatch):
    """Counts forward passes of the backbone's feature extractor and of the whole backbone network."""
    from dints3d.spaces.autodeeplab.network import AutoDeepLabNet

    counts = {"features": 0, "network": 0}
    for cls, key in ((AutoDeepLabFeatures, "features"), (AutoDeepLabNet, "network")):
        original = cls.forward

        def counted(self, x, _original=original, _key=key):
            counts[_key] += 1
            return _original(self, x)

        monkeypatch.setattr(cls, "forward", counted)
    return counts


def _search(work, out, cache, extra=()):
    args = ["random-search", "--space", "dpc", "--work", str(work), "--out", str(out)]
    for o in [*TINY, f"dpc.cache_dir={cache}", *extra]:
        args += ["--set", o]
    return main(args)


def test_dpc_search_writes_outputs_and_reuses_the_feature_cache(work, tmp_path, backbone_forwards):
    cache = tmp_path / "cache"
    assert _search(work, tmp_path / "first", cache) == 0
    first = tmp_path / "first"
    assert backbone_forwards["network"] == 3  # pre-training steps
    assert backbone_forwards["features"] == 3  # 8 training + 4 validation patches in batches of 4
    rows = read_rows(first / "trials.csv")
    assert len(rows) == 4 and all(0 <= r.score <= 1 for r in rows)
    assert len(read_rows(first / "topk.csv")) == 2
    assert (first / "trials.png").read_bytes()[:4] == b"\x89PNG" and (first / "arch.png").exists()
    summary = json.loads((first / "summary.json").read_text())
    assert summary["feature_cache"]["reused"] is False and summary["feature_cache"]["backbone_forwards"] == 3

    arch = load_architecture(first / "arch.json")
    assert isinstance(arch, DpcArchitecture) and arch.num_branches == 3 and arch.backbone["space"] == "autodeeplab"
    net = arch.build(3, 19)
    net.load_state_dict(torch.load(first / "model.pt", weights_only=True))  # backbone + searched head
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 16, 32)).shape == (1, 19, 16, 32)

    bundle = tmp_path / "bundle"  # the best cell on its backbone as a MONAI bundle (Cityscapes template)
    assert main(["export", "--arch", str(first / "arch.json"), "--work", str(work), "--out", str(bundle),
                 "--config", "demo", "--set", "data.patch_size=[32,32]"]) == 0
    assert load_architecture(bundle / "models" / "arch.json").to_dict() == arch.to_dict()
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "dints3d" in meta["required_packages_version"]
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.yaml")
    bundled = parser.get_parsed_content("network_def")
    bundled.load_state_dict(torch.load(first / "model.pt", weights_only=True))  # the search's weights fit it

    backbone_forwards.update(features=0, network=0)
    assert _search(work, tmp_path / "second", cache, ["seed=0", "random_search.trials=2"]) == 0
    assert backbone_forwards == {"features": 0, "network": 0}  # features (and pre-trained weights) from the cache
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["feature_cache"] == {"folder": str(cache / next(cache.iterdir()).name), "reused": True,
                                        "backbone_forwards": 0}
    assert [r.key for r in read_rows(tmp_path / "second" / "trials.csv")] == [r.key for r in rows[:2]]


def test_changed_backbone_settings_do_not_reuse_the_cache(work, tmp_path, backbone_forwards):
    cache = tmp_path / "cache"
    assert _search(work, tmp_path / "a", cache, ["random_search.trials=1", "random_search.top_k=0"]) == 0
    assert _search(work, tmp_path / "b", cache, ["random_search.trials=1", "random_search.top_k=0",
                                                 "dpc.pretrain_iterations=2"]) == 0
    assert len(list(cache.iterdir())) == 2 and backbone_forwards["features"] == 6


def test_existing_run_and_bad_patch_are_refused(work, tmp_path, capsys):
    assert _search(work, tmp_path / "a", tmp_path / "cache", ["random_search.trials=1", "random_search.top_k=0"]) == 0
    assert _search(work, tmp_path / "a", tmp_path / "cache", ["random_search.trials=1"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _search(work, tmp_path / "c", tmp_path / "cache", ["data.patch_size=[32,32,32]"]) == 2
    assert "data.patch_size" in capsys.readouterr().err


ONE_TRIAL = ["random_search.trials=1", "random_search.top_k=0"]


@pytest.mark.parametrize("damage", ["meta.json", "features.pt"])
def test_unreadable_feature_cache_is_recomputed_with_a_warning(work, tmp_path, backbone_forwards, capsys, damage):
    cache = tmp_path / "cache"
    assert _search(work, tmp_path / "a", cache, ONE_TRIAL) == 0
    folder = next(cache.iterdir())
    (folder / damage).write_text("{ not json, not a zip")
    backbone_forwards.update(features=0, network=0)
    assert _search(work, tmp_path / "b", cache, ONE_TRIAL) == 0
    assert f"warning: feature cache {folder} is unreadable" in capsys.readouterr().out
    assert backbone_forwards["features"] == 3  # computed again
    assert json.loads((folder / "meta.json").read_text())["channels"] > 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["feature_cache"]["reused"] is False


def test_unreadable_backbone_files_are_one_line_errors(work, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00 not a checkpoint")
    assert _search(work, tmp_path / "a", tmp_path / "cache", [*ONE_TRIAL, f"dpc.backbone_weights={weights}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert err.startswith(f"error: {weights}: cannot be read as backbone weights (dpc.backbone_weights)")

    cache = tmp_path / "cache2"
    assert _search(work, tmp_path / "b", cache, ONE_TRIAL) == 0
    backbone = next(cache.iterdir()) / "backbone.pt"
    backbone.write_bytes(b"damaged")
    assert _search(work, tmp_path / "c", cache, ["random_search.trials=1", "random_search.top_k=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {backbone}: cannot be read as the cached backbone weights") and "delete" in err
