"""Faults during a search: SIGKILL at several points, corrupt checkpoints, CUDA OOM, bad output folders."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from support import failing_writes

from dints3d.cli import main
from dints3d.config import load_config
from dints3d.search.loop import SearchRun
from dints3d.utils.checkpoint import load_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.runtime import init_runtime

# Runs the CLI with a fault injected from outside the product code: the process SIGKILLs itself at a chosen point.
KILLER = textwrap.dedent('''
    import os, signal, sys
    import torch
    from dints3d.search import loop
    point, at = sys.argv[1], int(sys.argv[2])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "checkpoint_write":  # after the temporary file is written, before it replaces last.pt
        real_save = torch.save
        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if isinstance(obj, dict) and obj.get("loop", {}).get("iteration") == at:
                die()
        torch.save = save
    else:
        method = {"arch_step": "arch_step", "validation": "validate_and_decode"}[point]
        real = getattr(loop.SearchRun, method)
        def wrapped(self, *a, **k):
            if self.state.iteration == at:
                die()
            return real(self, *a, **k)
        setattr(loop.SearchRun, method, wrapped)
    from dints3d.cli import main
    sys.exit(main(sys.argv[3:]))
''')


@pytest.fixture(scope="module")
def settings(tiny):
    """The tiny search on one case, with a checkpoint after every iteration (a kill anywhere has one to resume)."""
    return tiny.search_with("data.max_cases=1", "search.checkpoint_interval=1")


def _cli_args(settings, work, out, *extra):
    return ["search", "--work", str(work), "--out", str(out), *[a for o in settings for a in ("--set", o)], *extra]


def _codes(path):
    arch = json.loads(path.read_text())
    return [arch[k] for k in ("node_a", "arch_code_a", "arch_code_c")], arch["provenance"]["validation_dice"]


@pytest.fixture(scope="module")
def uninterrupted(search_work, settings, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(_cli_args(settings, search_work, out)) == 0
    return out


@pytest.mark.parametrize("point, at", [("checkpoint_write", 2), ("arch_step", 4), ("validation", 3)])
def test_sigkill_then_resume_gives_the_uninterrupted_result(search_work, settings, tmp_path, uninterrupted, point, at):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLER, point, str(at), *_cli_args(settings, search_work, out)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "arch.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "dints3d", *_cli_args(settings, search_work, out, "--resume")],
                             capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _codes(out / "arch.json") == _codes(uninterrupted / "arch.json")
    a = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_truncated_checkpoint_falls_back_to_previous_with_warning(search_work, settings, tmp_path):
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "3")) == 0
    last = out / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert main(_cli_args(settings, search_work, out, "--resume")) == 0
    assert (out / "arch.json").exists()


def test_garbled_checkpoints_stop_with_one_line_naming_the_file(search_work, settings, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "2")) == 0
    for name in ("last.pt", "last.prev.pt"):
        (out / "checkpoints" / name).write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(_cli_args(settings, search_work, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "last.pt" in err[0] and "corrupt" in err[0]


def test_cuda_out_of_memory_is_explained(search_work, settings, tmp_path, monkeypatch):
    cfg = load_config(None, settings)
    run = SearchRun(cfg, search_work, tmp_path / "oom", init_runtime("cpu"))

    def exhausted(*_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(run.space, "forward", exhausted)
    try:
        with pytest.raises(DintsError, match=r"out of memory; predicted need [0-9.]+ GiB; try search.checkpoint_cells"):
            run.run()
    finally:
        run.close()


def test_unwritable_output_and_full_disk_fail_before_work(search_work, settings, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DintsError, match="cannot create the output folder: .* is a file, not a folder"):
        SearchRun(load_config(None, settings), search_work, blocker / "run", init_runtime("cpu"))

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10, 10, 0))
    with pytest.raises(DintsError, match="GiB free for the cache"):
        SearchRun(load_config(None, [*settings, f"data.cache_dir={tmp_path / 'cache'}"]), search_work,
                  tmp_path / "r2", init_runtime("cpu"))


def test_stale_temporary_files_are_removed(search_work, settings, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = out / "checkpoints" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half")
    run = SearchRun(load_config(None, settings), search_work, out, init_runtime("cpu"))
    run.close()
    assert not stale.exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["device=cuda"], "error: device: 'cuda' requested but no CUDA GPU is available"),
        (["search.iterations=0"], "error: --set: 'search.iterations' must be ≥ 1"),
        (["search.lrr=0.1"], "error: --set: unknown key 'search.lrr'; did you mean 'search.lr'?"),
        (["data.patch_size=[40,32,32]"], "error: data.patch_size: [40, 32, 32] must have 3 sides, each a positive "
                                         "multiple of 16"),
    ],
)
def test_preflight_errors_are_one_line(search_work, settings, tmp_path, capsys, overrides, expected):
    if "cuda" in overrides[0] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["search", "--work", str(search_work), "--out", str(tmp_path / "run")]
    for o in [*settings, *overrides]:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


class _Crash(Exception):
    """Stands in for a SIGKILL at one point of a checkpoint write."""


@pytest.mark.parametrize("call", ["torch.save", "fsync-1", "fsync-2", "link", "replace-1", "replace-2"])
def test_a_crash_anywhere_in_a_checkpoint_write_leaves_a_loadable_last_pt(tmp_path, monkeypatch, call):
    """Abort ``save_checkpoint`` at each file-system step in turn: ``last.pt`` itself must then hold the old or the
    new state (never only ``last.prev.pt``), and loading it needs no fallback."""
    import warnings

    from dints3d.utils import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"n": torch.tensor(1)})
    checkpoint.save_checkpoint(path, {"n": torch.tensor(2)})
    name, _, nth = call.partition("-")
    calls = {"count": 0}

    def crash_at(real):
        def wrapped(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == int(nth or 1):
                raise _Crash(call)
            return real(*args, **kwargs)
        return wrapped

    if name == "torch.save":
        monkeypatch.setattr(torch, "save", crash_at(torch.save))
    else:
        monkeypatch.setattr(os, name, crash_at(getattr(os, name)))
    with pytest.raises(_Crash):
        checkpoint.save_checkpoint(path, {"n": torch.tensor(3)})
    monkeypatch.undo()
    assert path.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(checkpoint.load_checkpoint(path)["n"]) in (2, 3)
    assert int(torch.load(checkpoint.previous_path(path), weights_only=True)["n"]) in (1, 2)


def test_only_the_previous_checkpoint_left_resumes_from_it_with_a_warning(search_work, settings, tmp_path):
    """The state a kill between rotating last.pt away and renaming the new file in could leave (on a file system
    without hard links): only last.prev.pt. `--resume auto` resumes from it."""
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "3")) == 0
    (out / "checkpoints" / "last.pt").replace(out / "checkpoints" / "last.prev.pt")
    with pytest.warns(UserWarning, match=r"last.pt is missing .*previous checkpoint"):
        assert main(_cli_args(settings, search_work, out, "--resume", "auto")) == 0
    assert json.loads((out / "arch.json").read_text())["provenance"]["iteration"] == 6


def test_garbled_last_checkpoint_falls_back_to_previous_with_warning(search_work, settings, tmp_path):
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "3")) == 0
    last = out / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 4000] = os.urandom(4000)  # same size, garbage in the middle
    last.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"last.pt is unreadable .*previous checkpoint"):
        assert main(_cli_args(settings, search_work, out, "--resume")) == 0
    assert (out / "arch.json").exists()


def test_cuda_out_of_memory_during_validation_is_explained(search_work, settings, tmp_path, monkeypatch):
    """An OOM in the sliding-window validation (no gradients) gets the one-line advice too, not a traceback."""
    cfg = load_config(None, settings)
    run = SearchRun(cfg, search_work, tmp_path / "oom_val", init_runtime("cpu"))
    real = run.space.forward

    def exhausted_without_grad(x):
        if not torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real(x)

    monkeypatch.setattr(run.space, "forward", exhausted_without_grad)
    try:
        with pytest.raises(DintsError, match=r"out of memory during validation; try search.val_sw_batch_size=1, "
                                             r"a smaller data.patch_size than \[32, 32, 32\]"):
            run.run()
        assert run.state.iteration == 3  # the steps ran; validation (every 3 iterations) hit the error
    finally:
        run.close()


def test_a_checkpoint_write_fsyncs_the_new_file_once_before_keeping_the_old_one(tmp_path, monkeypatch):
    """The order that makes a kill harmless, and no second fsync of the same file: the new checkpoint is fsynced,
    only then is last.pt kept as last.prev.pt (a hard link), then the new file is renamed over last.pt."""
    import stat

    from dints3d.utils import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.save_checkpoint(path, {"n": torch.tensor(1)})
    events = []
    real = {name: getattr(os, name) for name in ("fsync", "link", "replace")}

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real["fsync"](fd)

    def link(src, dst, **kwargs):
        events.append(("link", os.path.basename(src)))
        return real["link"](src, dst, **kwargs)

    def replace(src, dst, **kwargs):
        events.append(("replace to", os.path.basename(dst)))
        return real["replace"](src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save_checkpoint(path, {"n": torch.tensor(2)})
    monkeypatch.undo()
    assert events == [("fsync", "file"), ("link", "last.pt"), ("replace to", "last.prev.pt"),
                      ("replace to", "last.pt"), ("fsync", "folder")]
    assert int(checkpoint.load_checkpoint(path)["n"]) == 2
    assert int(torch.load(checkpoint.previous_path(path), weights_only=True)["n"]) == 1


# --- issue 18: state that must not be lost or silently replaced ------------------------------------------------------

def test_stop_after_zero_leaves_a_checkpoint_and_the_resume_equals_the_uninterrupted_run(search_work, settings,
                                                                                        tmp_path, uninterrupted):
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "0")) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loop"]["iteration"] == 0
    assert main(_cli_args(settings, search_work, out, "--resume")) == 0
    assert _codes(out / "arch.json") == _codes(uninterrupted / "arch.json")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_resume_on_other_prepared_data_is_refused(search_work, settings, prepared_task, tmp_path, capsys):
    """The config may be unchanged while WORK was prepared again (another split) or is another task's: the
    checkpoint's digest of the datalist and plan tells, instead of a different arch.json or a size mismatch."""
    import shutil

    from dints3d.data.prepare import prepare
    from dints3d.utils.checkpoint import save_checkpoint

    work = Path(shutil.copytree(search_work, tmp_path / "work"))
    out = tmp_path / "run"
    assert main(_cli_args(settings, work, out, "--stop-after", "0")) == 0
    task = json.loads((work / "datalist.json").read_text())["task_dir"]
    prepare(task, work, folds=2, progress=False)  # the same task, re-prepared: another split
    capsys.readouterr()
    assert main(_cli_args(settings, work, out, "--resume")) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {out / 'checkpoints' / 'last.pt'}: was written on other prepared data: "
                           f"{work / 'datalist.json'} differs"), line

    other = prepared_task(folds=3, cases=6, test_cases=1, size=36, seed=3, modalities=2, classes=3).work
    assert main(_cli_args(settings, other, out, "--resume")) == 2
    assert "was written on other prepared data" in _one_error_line(capsys)

    # a checkpoint from before the digest was recorded: the network's shapes still refuse it in one line
    last = out / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    del state["data"]
    save_checkpoint(last, state)
    assert main(_cli_args(settings, other, out, "--resume")) == 2
    assert "does not fit this search's network (Error(s) in loading state_dict" in _one_error_line(capsys)


def test_last_pt_replaced_by_a_folder_is_refused_in_one_line(search_work, settings, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out, "--stop-after", "1")) == 0
    last = out / "checkpoints" / "last.pt"
    last.unlink()
    last.mkdir()
    capsys.readouterr()
    assert main(_cli_args(settings, search_work, out, "--resume")) == 2
    assert _one_error_line(capsys).startswith(f"error: {last}: is not a file (a folder?) where a checkpoint should be")


def test_full_disk_at_a_checkpoint_write_is_one_line_and_the_state_resumes(search_work, settings, tmp_path, capsys,
                                                                           monkeypatch, uninterrupted):
    """The second write of last.pt hits a full disk (torch.save would raise "RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos" writing to a path): one line naming last.pt and the errno, the first
    last.pt intact; after freeing space, --resume finishes with the uninterrupted result."""
    writes = []

    def second_last_pt(name: str) -> bool:
        writes.append(name)
        return name == "last.pt" and writes.count("last.pt") == 2

    failed = failing_writes(monkeypatch, errno.ENOSPC, after=100, names=second_last_pt)
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out)) == 2
    monkeypatch.undo()
    assert failed == ["last.pt"]
    last = out / "checkpoints" / "last.pt"
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]  # besides the progress bars of the work done
    line = errors[0]
    assert line.startswith(f"error: {last}: cannot write: No space left on device [ENOSPC]; the previous last.pt is "
                           "unchanged (the search state it holds is intact); free space, then continue with --resume")
    assert load_checkpoint(last)["loop"]["iteration"] == 1
    assert not list(last.parent.glob(".*.tmp"))
    assert main(_cli_args(settings, search_work, out, "--resume")) == 0
    assert _codes(out / "arch.json") == _codes(uninterrupted / "arch.json")


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_run_folder_is_one_line_before_work(search_work, settings, tmp_path, capsys, monkeypatch, code):
    failing_writes(monkeypatch, code, after=None)
    out = tmp_path / "run"
    assert main(_cli_args(settings, search_work, out)) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {out}: cannot write here ({os.strerror(code)} [{errno.errorcode[code]}])"), line
    assert not out.exists()


def test_a_failed_search_leaves_no_run_folder(search_work, settings, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "run"
    assert main(_cli_args([*settings, "data.patch_size=[40,32,32]"], search_work, out)) == 2
    assert "multiple of 16" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    assert main(_cli_args([*settings, "data.patch_size=[40,32,32]"], search_work, existing)) == 2
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]  # a folder that held something is left as it was


def _moved_task_work(small_task, tmp_path):
    import shutil

    from dints3d.data.prepare import prepare

    task = Path(shutil.copytree(small_task.task, tmp_path / "task"))
    work = tmp_path / "work"
    prepare(task, work, folds=2, progress=False)
    return task, work


def test_task_moved_or_changed_after_prepare_is_one_line_naming_the_case(small_task, settings, tmp_path, capsys):
    task, work = _moved_task_work(small_task, tmp_path)
    args = _cli_args([*settings, "data.patch_size=[16,16,16]"], work, tmp_path / "run")
    moved = task.rename(tmp_path / "moved")
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {task / 'imagesTr'}") and " of case 'synthetic_" in line
    assert "not found: the task folder moved or changed after `dints3d prepare`; prepare" in line

    moved.rename(task)
    plan = json.loads((work / "plan.json").read_text())
    (work / "plan.json").write_text(json.dumps({**plan, "in_channels": 2}))  # edited by hand
    assert main(args) == 2
    assert f"but {work / 'plan.json'} says the network takes 2" in _one_error_line(capsys)

    (work / "plan.json").write_text(json.dumps(plan))
    import nibabel as nib
    import numpy as np

    image = sorted((task / "imagesTr").iterdir())[0]  # swapped for a 2-channel image
    original = nib.load(image)
    data = np.asanyarray(original.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), original.affine), image)
    assert main(args) == 2
    assert _one_error_line(capsys).startswith(f"error: {image}: has 2 channel(s)")


def test_two_searches_racing_for_one_run_folder(search_work, settings, tmp_path):
    """Started 0.3 s apart into one --out: whichever locks the folder first runs; the other is refused in one line
    naming it, and the folder holds the winner's config and result only."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = []
    for seed in (0, 7):
        runs.append(subprocess.Popen([sys.executable, "-m", "dints3d",
                                      *_cli_args([*settings, f"seed={seed}"], search_work, out)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(0.3)
    errors = [run.communicate(timeout=600)[1] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], (codes, [e[-2000:] for e in errors])
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    lines = errors[loser].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: is in use by another process (process "
                                                   f"{runs[winner].pid}: dints3d search"), errors[loser]
    assert f"seed: {(0, 7)[winner]}\n" in (out / "config.yaml").read_text() and (out / "arch.json").exists()
