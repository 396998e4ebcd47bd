"""End to end on a synthetic Cityscapes folder: a tiny 2D Auto-DeepLab search (arch.json, arch.png, checkpoints,
TensorBoard with validation mIoU), then the decoded network exported as a bundle, retrained for a few iterations,
run on the val images and scored by cityscapesscripts' official evaluator."""

import json
import time

import pytest
from PIL import Image

from dints3d.cli import main
from dints3d.spaces.factory import load_architecture

pytestmark = pytest.mark.slow

TINY_TRAIN = ["--set", "train.iterations=2", "--set", "train.val_interval=1", "--set", "train.patch_size=[32,32]"]


@pytest.fixture(scope="module")
def searched(prepared_cityscapes, tiny, tmp_path_factory):
    """(folder for the outputs, the prepared task, seconds the search took)."""
    prepared = prepared_cityscapes(config="autodeeplab_demo", cases=8, test_cases=0, size=64, seed=0)
    root = tmp_path_factory.mktemp("e2e")
    settings = ["search.iterations=8", "search.val_interval=4", "search.checkpoint_interval=4", *tiny.autodeeplab,
                "data.patch_size=[32,32]"]
    start = time.perf_counter()
    assert main(["search", "--config", "autodeeplab_demo", "--work", str(prepared.work), "--out", str(root / "run"),
                 *[arg for setting in settings for arg in ("--set", setting)]]) == 0
    return root, prepared, time.perf_counter() - start


def test_tiny_search_writes_architecture_picture_checkpoints_and_events(searched):
    root, _, seconds = searched
    run = root / "run"
    assert seconds < 180
    arch = load_architecture(run / "arch.json")
    assert arch.space == "autodeeplab" and len(arch.network_path) == 3 and arch.num_blocks == 2
    assert all(op != "zero" for _, op in arch.cell)
    prov = json.loads((run / "arch.json").read_text())["provenance"]
    assert prov["validation_metric"] == "iou" and len(prov["validation_dice"]) == 19
    assert (run / "arch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (run / "checkpoints").glob("*.pt")} >= {"last.pt", "best.pt"}
    assert sorted(p.name for p in (run / "arch_history").iterdir()) == ["arch_0000004.json", "arch_0000008.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == 8 and summary["validation_metric"] == "iou"
    assert 0 <= summary["best_validation_dice"] <= 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val/mean_iou", "val/iou_road", "loss/weights", "loss/arch_seg", "lr/weights"} <= tags
    assert [e.step for e in events.Scalars("val/mean_iou")] == [4, 8]


def test_decoded_network_retrains_and_is_scored_by_the_official_evaluator(searched, capsys):
    root, prepared, _ = searched
    folder, bundle = prepared.task, root / "bundle"
    assert main(["export", "--config", "autodeeplab_demo", "--arch", str(root / "run" / "arch.json"),
                 "--work", str(prepared.work), "--out", str(bundle), *TINY_TRAIN]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert "dints3d" in meta["required_packages_version"] and "needs dints3d installed" in meta["description"]
    assert meta["data_type"] == "png" and meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 19
    assert load_architecture(bundle / "models" / "arch.json").to_dict()["cell"] == json.loads(
        (root / "run" / "arch.json").read_text())["cell"]

    assert main(["train", str(bundle)]) == 0
    assert (bundle / "models" / "model.pt").is_file() and (bundle / "models" / "checkpoint_epoch=2.pt").is_file()

    assert main(["infer", str(bundle), "--input", str(folder / "leftImg8bit" / "val"), "--out",
                 str(root / "pred")]) == 0
    preds = sorted((root / "pred").glob("*_pred_labelIds.png"))
    assert len(preds) == 2
    assert all(Image.open(p).size == (128, 64) for p in preds)  # the inputs' own size (inference at half scale)

    capsys.readouterr()
    assert main(["evaluate", "--format", "cityscapes", "--pred", str(root / "pred"), "--label",
                 str(folder / "gtFine" / "val"), "--out", str(root / "eval")]) == 0
    summary = json.loads((root / "eval" / "summary.json").read_text())
    official = json.loads((root / "eval" / "resultPixelLevelSemanticLabeling.json").read_text())
    assert summary["num_images"] == 2
    assert summary["official"]["mean_iou"] == official["averageScoreClasses"]
    assert summary["mean_iou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert "(cityscapesscripts)" in capsys.readouterr().out
