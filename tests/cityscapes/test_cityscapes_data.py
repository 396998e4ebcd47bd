"""Cityscapes-format data: the synthetic writer, the label tables, ``dints3d prepare`` on a Cityscapes folder and the
2D DeepLab transforms."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import labels as cs_labels
from PIL import Image

from dints3d.cityscapes.folder import read_label_ids
from dints3d.cityscapes.labels import (
    IGNORE_INDEX,
    class_names,
    to_label_ids,
    to_train_ids,
)
from dints3d.cityscapes.loss import IgnoreIndexCrossEntropy
from dints3d.cityscapes.synthetic import INSTANCE_CLASSES, make_cityscapes_task
from dints3d.cityscapes.transforms import train_transforms, validation_transforms
from dints3d.cli import main
from dints3d.config import load_config
from dints3d.data.datalist import read_datalist
from dints3d.data.losses import segmentation_loss
from dints3d.data.prepare import prepare
from dints3d.utils.errors import DintsError


@pytest.fixture(scope="module")
def folder(cityscapes_task):
    return cityscapes_task(cases=10, test_cases=1, size=32, seed=4)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_synth_writes_the_cityscapes_layout_deterministically(folder, tmp_path):
    train = sorted(folder.glob("leftImg8bit/train/*/*_leftImg8bit.png"))
    val = sorted(folder.glob("leftImg8bit/val/*/*_leftImg8bit.png"))
    test = sorted(folder.glob("leftImg8bit/test/*/*_leftImg8bit.png"))
    assert (len(train), len(val), len(test)) == (8, 2, 1)  # 10 labelled cases split 3:1 (at least one val)
    assert not (folder / "gtFine" / "test").exists()
    for image in train + val:
        city, core = image.parent.name, image.name[: -len("_leftImg8bit.png")]
        assert core.startswith(city + "_") and len(core.split("_")) == 3
        split = image.parent.parent.name
        label = folder / "gtFine" / split / city / f"{core}_gtFine_labelIds.png"
        instance = folder / "gtFine" / split / city / f"{core}_gtFine_instanceIds.png"
        rgb, ids, inst = (np.asarray(Image.open(p)) for p in (image, label, instance))
        assert Image.open(image).mode == "RGB" and rgb.shape == (32, 64, 3)
        assert ids.dtype == np.uint8 and ids.shape == (32, 64)
        assert set(np.unique(ids).tolist()) <= {lab.id for lab in cs_labels if lab.id >= 0}
        # instance ids: id·1000 + k on cars and persons, the label id elsewhere (what the official iIoU reads)
        things = np.isin(ids, INSTANCE_CLASSES)
        assert np.array_equal(inst[things] // 1000, ids[things]) and np.array_equal(inst[~things], ids[~things])
    # evaluated and ignored classes both occur
    all_ids = np.concatenate([read_label_ids(p).ravel() for p in folder.rglob("*_labelIds.png")])
    assert (to_train_ids(all_ids) == IGNORE_INDEX).any() and len(set(to_train_ids(all_ids).tolist())) >= 10
    again = make_cityscapes_task(tmp_path / "again", cases=10, test_cases=1, size=32, seed=4)
    other = make_cityscapes_task(tmp_path / "other", cases=10, test_cases=1, size=32, seed=5)
    assert _files(again) == _files(folder)
    assert _files(other) != _files(folder)


def test_synth_cli_refuses_msd_only_options(tmp_path, capsys):
    assert main(["synth", "--format", "cityscapes", "--out", str(tmp_path / "x"), "--classes", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--classes" in err and len(err.splitlines()) == 1
    assert main(["synth", "--format", "cityscapes", "--out", str(tmp_path / "y"), "--cases", "2", "--size", "16"]) == 0
    assert len(list((tmp_path / "y").rglob("*_leftImg8bit.png"))) == 4  # 2 labelled + 2 test (default)


def test_label_tables_follow_cityscapesscripts():
    for lab in cs_labels:
        if lab.id < 0:
            continue
        expected = IGNORE_INDEX if lab.ignoreInEval or lab.trainId in (255, -1) else lab.trainId
        assert to_train_ids(np.array([lab.id]))[0] == expected, lab.name
    train_ids = np.arange(19)
    assert np.array_equal(to_train_ids(to_label_ids(train_ids)), train_ids)
    assert class_names()[0] == "road" and class_names()[-1] == "bicycle" and len(class_names()) == 19


def test_prepare_writes_format_fields_and_disjoint_seeded_halves(folder, tmp_path):
    out = prepare(folder, tmp_path / "w", seed=3, config=load_config(None, ["space=autodeeplab"]), progress=False)
    plan, datalist, fp = out["plan"], out["datalist"], out["fingerprint"]
    assert plan["format"] == datalist["format"] == fp["format"] == "cityscapes"
    assert (plan["in_channels"], plan["out_channels"], plan["ignore_index"]) == (3, 19, 255)
    assert plan["class_names"] == class_names() and plan["image_scale"] == 0.5
    assert plan["median_shape"] == [16, 32] and plan["patch_size"] == [16, 16]  # min(321, scaled side), divisor 1
    assert json.loads((tmp_path / "w" / "plan.json").read_text()) == plan
    train = {e["case"] for e in datalist["training"]}
    weights = {e["case"] for e in datalist["fold0_weights"]}
    arch = {e["case"] for e in datalist["fold0_arch"]}
    assert weights | arch == train and not weights & arch and len(weights) == len(arch) == 4
    assert {e["case"] for e in datalist["fold0_validation"]} == {e["case"] for e in datalist["validation"]}
    assert len(datalist["validation"]) == 2 and datalist["fold0_train"] == datalist["training"]
    items = read_datalist(tmp_path / "w", "fold0_weights")
    assert all(Path(i["image"]).is_file() and Path(i["label"]).is_file() for i in items)
    # class pixel counts are the train split's train ids
    counts = np.bincount(np.concatenate([to_train_ids(read_label_ids(Path(i["label"]))).ravel()
                                         for i in read_datalist(tmp_path / "w", "training")]), minlength=256)
    assert fp["class_pixels"] == {n: int(counts[i]) for i, n in enumerate(class_names())}
    # the halves are a function of the seed
    same = prepare(folder, tmp_path / "w2", seed=3, progress=False)["datalist"]
    assert same["fold0_weights"] == datalist["fold0_weights"]
    halves = {tuple(e["case"] for e in prepare(folder, tmp_path / f"s{s}", seed=s, progress=False)["datalist"][
        "fold0_weights"]) for s in range(6)}
    assert len(halves) > 1


def test_prepare_config_overrides_and_divisor(folder, tmp_path):
    cfg = load_config(None, ["space=dints", "dints.num_depths=2", "plan.image_scale=1.0"])
    plan = prepare(folder, tmp_path / "w", config=cfg, progress=False)["plan"]
    assert plan["image_scale"] == 1.0 and plan["median_shape"] == [32, 64]
    assert plan["patch_divisor"] == 8 and plan["patch_size"] == [32, 32]
    with pytest.raises(DintsError, match="target_spacing"):
        prepare(folder, tmp_path / "x", config=load_config(None, ["plan.target_spacing=[1,1,1]"]), progress=False)



@pytest.mark.parametrize("override,expected", [
    ("plan.median_shape=[a,b]", "'plan.median_shape' must be a list of 2 positive numbers, got ['a', 'b']"),
    ("plan.median_shape=[0,0]", "'plan.median_shape' must be a list of 2 positive numbers, got [0, 0]"),
    ("plan.patch_size=[100,100]", "'plan.patch_size' [100, 100] must be integers divisible by the network's patch "
                                  "divisor 32"),
    ("plan.image_scale=0", "'plan.image_scale' must be a number in (0, 4], got 0"),
    ("plan.patch_sise=[64,64]", "unknown plan field 'plan.patch_sise'; did you mean 'plan.patch_size'?"),
])
def test_prepare_refuses_bad_plan_overrides_in_one_line_before_reading_images(folder, tmp_path, capsys, override,
                                                                               expected):
    root = _copy(folder, tmp_path / "cs")
    image = sorted(root.glob("leftImg8bit/train/*/*_leftImg8bit.png"))[0]
    image.write_bytes(image.read_bytes()[:-40])  # a damaged image: the override must be refused before any is read
    args = ["prepare", "--task", str(root), "--out", str(tmp_path / "w"), "--set", "space=dints", "--set", override]
    assert main(args) == 2  # dints.num_depths 4 with downsampling: patch divisor 32
    assert capsys.readouterr().err == f"error: --set: {expected}\n"
    assert not (tmp_path / "w").exists()


def test_prepare_refuses_a_plan_json_cannot_hold_and_writes_nothing(folder, tmp_path, monkeypatch):
    import dints3d.cityscapes.prepare as cityscapes

    real = cityscapes.fingerprint

    def nan_fingerprint(*args, **kwargs):
        return {**real(*args, **kwargs), "ignored_fraction": float("nan")}

    monkeypatch.setattr(cityscapes, "fingerprint", nan_fingerprint)
    with pytest.raises(DintsError, match="cannot be written as JSON .*nothing was written"):
        prepare(folder, tmp_path / "w", progress=False)
    assert not list((tmp_path / "w").glob("*.json"))

def _copy(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


@pytest.mark.parametrize("damage,expected", [
    ("missing_label", "has no label file"),
    ("bad_id", "not in cityscapesscripts' label table"),
    ("grey_image", "must be an 8-bit RGB image"),
    ("wrong_size", "differs from the image's"),
    ("bad_name", "not a Cityscapes file name"),
    ("truncated", "cannot read image"),
])
def test_prepare_refuses_damaged_folders_in_one_line(folder, tmp_path, capsys, damage, expected):
    root = _copy(folder, tmp_path / "cs")
    image = sorted(root.glob("leftImg8bit/train/*/*_leftImg8bit.png"))[0]
    label = Path(str(image).replace("leftImg8bit", "gtFine", 1).replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    if damage == "missing_label":
        label.unlink()
    elif damage == "bad_id":
        ids = np.asarray(Image.open(label)).copy()
        ids[0, 0] = 40
        Image.fromarray(ids).save(label)
    elif damage == "grey_image":
        Image.open(image).convert("L").save(image)
    elif damage == "wrong_size":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(label)
    elif damage == "bad_name":
        image.rename(image.with_name("frame_leftImg8bit.png"))
    elif damage == "truncated":
        image.write_bytes(image.read_bytes()[:-40])
    assert main(["prepare", "--task", str(root), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w" / "plan.json").exists()


def test_transforms_map_train_ids_pad_with_ignore_and_crop(folder, tmp_path):
    prepare(folder, tmp_path / "w", progress=False)
    item = read_datalist(tmp_path / "w", "fold0_weights")[0]
    raw = to_train_ids(read_label_ids(Path(item["label"])))
    full = validation_transforms(1.0)(item)
    assert full["image"].shape == (3, 32, 64) and full["image"].min() >= -1 and full["image"].max() <= 1
    assert np.array_equal(full["label"][0].numpy(), raw)
    rgb = np.asarray(Image.open(item["image"]), np.float32)
    assert torch.allclose(full["image"], torch.from_numpy(rgb / 127.5 - 1).permute(2, 0, 1), atol=1e-6)
    half = validation_transforms(0.5)(item)
    assert half["image"].shape == (3, 16, 32) and half["label"].shape == (1, 16, 32)
    assert np.array_equal(half["label"][0].numpy(), raw[::2, ::2])  # nearest: no label is invented
    # crops larger than the image: padding is 0 in the image and 255 (ignored) in the label
    t = train_transforms([40, 80], num_samples=3, augment=False, image_scale=1.0)
    t.set_random_state(seed=1)
    samples = t(item)
    assert len(samples) == 3
    for s in samples:  # the crop is the padded image: 4 rows and 8 columns of padding on each side
        assert s["image"].shape == (3, 40, 80) and s["label"].shape == (1, 40, 80)
        frame = torch.ones(40, 80, dtype=torch.bool)
        frame[4:36, 8:72] = False
        assert (s["label"][0][frame] == IGNORE_INDEX).all() and (s["image"][:, frame] == 0).all()
        assert torch.equal(s["label"][0, 4:36, 8:72].to(torch.uint8), full["label"][0])
        assert torch.allclose(s["image"][:, 4:36, 8:72], full["image"])
    # DeepLab augmentation: random whole-image scale changes what a fixed-seed crop sees, labels stay train ids
    aug = train_transforms([16, 16], num_samples=1, augment=True, image_scale=1.0)
    seen = set()
    for seed in range(6):
        aug.set_random_state(seed=seed)
        s = aug(item)[0]
        assert set(np.unique(s["label"].numpy()).tolist()) <= set(range(19)) | {IGNORE_INDEX}
        seen.add(s["image"].numpy().tobytes())
    assert len(seen) == 6


def test_cityscapes_loss_ignores_255_and_is_finite_when_all_ignored():
    assert isinstance(segmentation_loss({"format": "cityscapes"}), IgnoreIndexCrossEntropy)
    assert not isinstance(segmentation_loss({}), IgnoreIndexCrossEntropy)
    logits = torch.randn(2, 19, 5, 7, requires_grad=True)
    label = torch.randint(0, 19, (2, 1, 5, 7))
    label[0, 0, :2] = 255
    keep = label[:, 0] != 255
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[keep], label[:, 0][keep])
    loss = IgnoreIndexCrossEntropy()(logits, label.to(torch.uint8))
    assert torch.allclose(loss, expected)
    empty = IgnoreIndexCrossEntropy()(logits, torch.full_like(label, 255))
    empty.backward()
    assert empty.item() == 0 and torch.isfinite(logits.grad).all()
