"""An exported bundle under torchrun with 2 CPU processes (gloo), through ``dints3d train/infer --nproc 2``:
data-parallel training (configs/multi_gpu_train.yaml) and inference split across processes
(configs/multi_gpu_inference.yaml), each output written once."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from support import parse

from dints3d.bundle.infer import infer
from dints3d.bundle.runner import launcher, shown_command
from dints3d.bundle.train import train
from dints3d.cli import main
from dints3d.spaces.factory import load_architecture
from dints3d.utils.errors import DintsError

FAST = ("sw_overlap=0.25",)


def test_two_process_training_partitions_the_cases_and_saves_once(bundle, tmp_path):
    log = tmp_path / "train.log"
    assert train(bundle, sets=FAST + ("num_iterations=4", "epoch_length=2"), log=log, nproc=2) == 0, \
        log.read_text()[-3000:]
    text = log.read_text()
    # 2 training cases: one per process (partition_dataset), each process's epochs seeded with its rank
    assert "rank 0/2: 1 training case(s)" in text and "rank 1/2: 1 training case(s)" in text
    models = bundle / "models"
    assert sorted(p.name for p in models.glob("*.pt")) == ["checkpoint_epoch=1.pt", "checkpoint_epoch=2.pt",
                                                          "model.pt"]
    assert not list(models.glob(".*"))
    state = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    assert state["trainer"]["iteration"] == 4
    net = load_architecture(models / "arch.json").build(1, 3, channel_mul=0.25)
    net.load_state_dict(torch.load(models / "model.pt", weights_only=True))  # the bare network, no DDP wrapper
    net.load_state_dict(state["model"])
    events = list((bundle / "logs").glob("events.out.tfevents.*"))
    assert len(events) == 2 and len({p.name.split(".")[-2] for p in events}) == 1  # trainer + evaluator, one pid


def test_two_process_inference_writes_each_mask_once_and_equals_one_process(bundle, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "weights.pt"
    torch.save(parse(bundle, "inference.yaml").get_parsed_content("network_def").state_dict(), weights)
    images = tmp_path / "images"
    images.mkdir()
    task = bundle.parent / "task"
    for path in [*sorted((task / "imagesTs").glob("*.nii.gz")), sorted((task / "imagesTr").glob("*.nii.gz"))[0]]:
        shutil.copy(path, images / path.name)  # 3 cases: 2 for rank 0, 1 for rank 1
    sets = (*FAST, f"ckpt_path={weights}", "postprocessing_steps#5#print_log=true")

    two = infer(bundle, [images], tmp_path / "two", sets, log=tmp_path / "two.log", nproc=2)
    assert two.returncode == 0 and not two.failures, (tmp_path / "two.log").read_text()[-3000:]
    written = re.findall(r"writing: (\S+)", (tmp_path / "two.log").read_text())
    # written once each (into OUT's hidden partial folder, then moved into OUT)
    assert sorted(Path(w).name for w in written) == sorted(mask.name for mask in two.masks.values())
    assert len(written) == 3 and all(mask.parent == tmp_path / "two" for mask in two.masks.values())

    one = infer(bundle, [images], tmp_path / "one", sets, log=tmp_path / "one.log")
    assert one.returncode == 0 and len(one.masks) == 3
    for source, mask in two.masks.items():
        a, b = nib.load(mask), nib.load(one.masks[source])
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)

    # fewer cases than processes: the process without a case does nothing
    single = sorted(images.iterdir())[0]
    lone = infer(bundle, [single], tmp_path / "lone", sets, log=tmp_path / "lone.log", nproc=2)
    assert lone.returncode == 0 and list(lone.masks) == [single], (tmp_path / "lone.log").read_text()[-3000:]


def test_launcher_and_nproc_option(bundle, tmp_path, capsys):
    # every process starts through the guard that makes it die with its parent (dints3d.utils.processes)
    assert launcher(1)[1:] == ["-m", "dints3d.utils.processes"]
    assert launcher(3)[1:] == ["-m", "dints3d.utils.processes", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=3", "-m", "dints3d.utils.processes"]
    assert shown_command([*launcher(3), "monai.bundle", "run"]) == ["torchrun", "--standalone", "--nproc_per_node=3",
                                                                    "-m", "monai.bundle", "run"]
    with pytest.raises(DintsError, match="--nproc: must be ≥ 1"):
        launcher(0)
    assert main(["infer", str(bundle), "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--nproc", "0"]) == 2
    assert "error: --nproc: must be ≥ 1, got 0" in capsys.readouterr().err
