"""The output boundary (dints3d/utils/outputs.py, dints3d/utils/io.py): a failed write is one line naming the path and
the errno, what was there before stays intact, and the CLI turns any other OSError into one line too."""

from __future__ import annotations

import argparse
import errno
import os

import pytest
import torch
from support import failing_writes

from dints3d import cli
from dints3d.utils.checkpoint import load_checkpoint, save_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.io import read_json, write_json, write_texts_together
from dints3d.utils.outputs import check_output_folder


@pytest.mark.parametrize("code, after", [(errno.ENOSPC, 0), (errno.ENOSPC, 10), (errno.EROFS, None),
                                         (errno.EACCES, None), (errno.EDQUOT, 5)])
def test_a_failed_write_is_one_line_and_the_old_file_stays(tmp_path, monkeypatch, code, after):
    path = write_json(tmp_path / "summary.json", {"version": 1, "text": "x" * 100})
    failing_writes(monkeypatch, code, after)
    with pytest.raises(DintsError) as caught:
        write_json(path, {"version": 2, "text": "y" * 100})
    assert caught.value.line() == (f"{path}: cannot write: {os.strerror(code)} [{errno.errorcode[code]}]; what was "
                                   "there before is unchanged")
    monkeypatch.undo()
    assert read_json(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_a_checkpoint_on_a_full_disk_is_an_oserror_not_torchs_runtime_error(tmp_path, monkeypatch):
    """torch.save to a path raises "RuntimeError: [enforce fail at inline_container.cc] unexpected pos" on a full
    disk; dints3d writes through a file object, so the failure is an OSError, then one line."""
    path = save_checkpoint(tmp_path / "last.pt", {"n": torch.tensor(1)})
    failing_writes(monkeypatch, errno.ENOSPC, after=200)
    with pytest.raises(DintsError, match=r"last.pt: cannot write: No space left on device \[ENOSPC\]; the previous "
                                         r"last.pt is unchanged"):
        save_checkpoint(path, {"n": torch.arange(10_000)})
    monkeypatch.undo()
    assert int(load_checkpoint(path)["n"]) == 1


def test_a_folder_where_a_file_should_be_is_refused_before_writing(tmp_path):
    (tmp_path / "arch.json").mkdir()
    with pytest.raises(DintsError, match="arch.json: is a folder where a file should be written"):
        write_json(tmp_path / "arch.json", {})
    with pytest.raises(DintsError, match="plan.json: is a folder where a file should be written"):
        (tmp_path / "plan.json").mkdir()
        write_texts_together(tmp_path, {"fingerprint.json": "{}", "plan.json": "{}"})
    assert not (tmp_path / "fingerprint.json").exists()


def test_output_folder_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(DintsError, match="exists and is not a folder"):
        check_output_folder(afile)
    with pytest.raises(DintsError, match=f"cannot create the output folder: {afile} is a file, not a folder"):
        check_output_folder(afile / "sub" / "out")
    assert check_output_folder(tmp_path / "new" / "out") == tmp_path / "new" / "out"
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_the_cli_prints_an_unforeseen_oserror_as_one_line(monkeypatch, capsys):
    """The last resort of the boundary: an OSError no check turned into a DintsError still gives one line, exit 2."""
    def run(args: argparse.Namespace) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.nii.gz")

    monkeypatch.setattr(cli, "_command_module", lambda name: argparse.Namespace(add_arguments=lambda p: None, run=run))
    assert cli.main(["describe"]) == 2
    assert capsys.readouterr().err == "error: /data/out/x.nii.gz: No space left on device [ENOSPC]\n"
