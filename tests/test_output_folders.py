"""Every command's output folder, one mechanism each (docs/reliability.md, *Output folders*): a file where the
folder should be, a read-only file system, a full disk and a folder another process is using each give one line
``error: <path>: <problem>`` and exit 2, leave no traceback and leave nothing behind (dints3d/utils/outputs.py,
dints3d/utils/io.py, dints3d/utils/lock.py). Root ignores permissions, so read-only and full are simulated at the one
place every file dints3d writes starts (support.failing_writes)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest
import torch
from support import FailingFile, failing_writes, lock_held_elsewhere, parse, tiny_arch

from dints3d.bundle.handlers import AtomicDiskSaver
from dints3d.cli import main


@pytest.fixture(scope="module")
def inputs(small_task, make_bundle, tmp_path_factory) -> dict[str, Path]:
    """What the commands read: a prepared task, an arch.json, a bundle with seeded weights, a test image."""
    root = tmp_path_factory.mktemp("inputs")
    bundle = make_bundle(root)
    torch.manual_seed(0)
    net = parse(bundle, "inference.yaml").get_parsed_content("network_def")
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return {"task": small_task.task, "work": small_task.work, "arch": tiny_arch().save(root / "arch.json"),
            "bundle": bundle, "image": sorted((root / "task" / "imagesTs").glob("*.nii.gz"))[0]}


def _sets(settings: list[str]) -> list[str]:
    return [a for s in settings for a in ("--set", s)]


#: command → its argv writing into OUT (``inputs`` and the tiny settings filled in)
COMMANDS = {
    "synth": lambda i, t, out: ["synth", "--out", out, "--cases", "2", "--test-cases", "0", "--size", "16"],
    "prepare": lambda i, t, out: ["prepare", "--task", i["task"], "--out", out, "--folds", "2"],
    "search": lambda i, t, out: ["search", "--work", i["work"], "--out", out,
                                 *_sets(t.search_with("data.patch_size=[16,16,16]"))],
    "random-search": lambda i, t, out: ["random-search", "--work", i["work"], "--out", out, "--space", "dints",
                                        *_sets([*t.dints, "data.patch_size=[16,16,16]", "random_search.trials=1",
                                                "random_search.iterations=1", "random_search.top_k=0"])],
    "export": lambda i, t, out: ["export", "--arch", i["arch"], "--work", i["work"], "--out", out, "--config", "demo"],
    "train": lambda i, t, out: ["train", i["bundle"], "--set", f"ckpt_dir={out}"],
    "infer": lambda i, t, out: ["infer", i["bundle"], "--input", i["image"], "--out", out],
    "evaluate": lambda i, t, out: ["evaluate", "--pred", i["task"] / "labelsTr", "--label", i["task"] / "labelsTr",
                                   "--out", out],
}
#: commands whose files are written by a child process (monai.bundle run): a full disk there is the child's to
#: report (AtomicDiskSaver, below; infer's partial masks: bundle/test_bundle_inference.py)
CHILD_WRITES = ("train", "infer")
#: commands that only write two files atomically and hold no lock (evaluate)
UNLOCKED = ("evaluate",)


def _run(argv: list, capsys) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err[-3000:]
    return status, errors[0]


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not [p for p in out.rglob("*") if p.is_file()]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_where_the_output_folder_should_be(inputs, tiny, tmp_path, capsys, command):
    out = tmp_path / "afile"
    out.write_text("mine")
    status, line = _run(COMMANDS[command](inputs, tiny, out), capsys)
    assert status == 2 and line.startswith(f"error: {out}: exists and is not a folder"), line
    assert out.read_text() == "mine"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_file_system(inputs, tiny, tmp_path, capsys, monkeypatch, command, code):
    if code == errno.ENOSPC and command in CHILD_WRITES:
        pytest.skip("the child process writes these files (see AtomicDiskSaver's test)")
    failing_writes(monkeypatch, code, after=None if code == errno.EROFS else 0)
    out = tmp_path / "out"
    status, line = _run(COMMANDS[command](inputs, tiny, out), capsys)
    monkeypatch.undo()
    name = errno.errorcode[code]
    assert status == 2 and line.startswith(f"error: {out}") and f"{os.strerror(code)} [{name}]" in line, line
    assert _nothing_written(out), sorted(out.rglob("*"))


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in UNLOCKED])
def test_a_folder_another_process_is_using(inputs, tiny, tmp_path, capsys, command):
    out = tmp_path / "out"
    with lock_held_elsewhere(out) as holder:
        status, line = _run(COMMANDS[command](inputs, tiny, out), capsys)
    assert status == 2 and line.startswith(f"error: {out}: is in use by another process (process {holder.pid}: "), \
        line
    assert _nothing_written(out)


def test_a_training_checkpoint_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """What `monai.bundle run` of train.yaml does on a full disk: the checkpoint saver stops the run with one line
    (not torch's "RuntimeError: [enforce fail at inline_container.cc] unexpected pos"), the previous file intact."""
    saver = AtomicDiskSaver(tmp_path, "model.pt")
    saver({"w": torch.ones(3)}, "model.pt")
    # the bundle's scripts/ use no dints3d code: its checkpoint file is the one that fills the disk
    scripts = sys.modules[AtomicDiskSaver.__module__]
    monkeypatch.setattr(scripts, "open", lambda path, mode: FailingFile(open(path, mode), path, errno.ENOSPC, 100),
                        raising=False)
    with pytest.raises(SystemExit) as stopped:
        saver({"w": torch.zeros(10_000)}, "model.pt")
    monkeypatch.undo()
    assert str(stopped.value) == (f"error: {tmp_path / 'model.pt'}: cannot write: No space left on device [ENOSPC]; "
                                  "the previous model.pt is unchanged")
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.ones(3))
