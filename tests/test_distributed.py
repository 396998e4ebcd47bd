"""The search under torchrun with 2 CPU processes (gloo)."""

import json
import os
import subprocess
import sys

import pytest

from dints3d.data.prepare import prepare
from dints3d.data.synthetic import make_msd_task

TINY = ["device=cpu", "dints.num_blocks=2", "dints.num_depths=3", "dints.channel_mul=0.125",
        "data.patch_size=[32,32,32]", "data.num_samples=1", "data.max_cases=2", "search.iterations=4",
        "search.val_interval=4", "search.checkpoint_interval=2", "search.val_overlap=0.0", "search.amp=false",
        "search.check_replicas=true"]


def _search(work, out, nproc, *extra):
    args = [a for o in TINY for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dints3d", "search", "--work", str(work), "--out", str(out), *args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    task = make_msd_task(root / "task", cases=6, test_cases=1, size=36, seed=5)
    prepare(task, root / "work", folds=3, progress=False)
    return root / "work"


def test_two_process_search_keeps_replicas_identical_and_writes_once(work, tmp_path):
    """check_replicas makes every architecture step compare α/β across ranks exactly; a completed run proves
    they never differed. Rank 0 alone writes the outputs."""
    out = tmp_path / "run"
    result = _search(work, out, 2, "--stop-after", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "arch.json").exists()
    # resume the same search with a different world size
    result = _search(work, out, 1, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    arch = json.loads((out / "arch.json").read_text())
    assert arch["provenance"]["iteration"] == 4
    assert [p.name for p in out.glob("arch*.json")] == ["arch.json"]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per (rank-0) session


def _replica_worker(rank, init_file, results):
    import torch
    import torch.distributed as dist

    from dints3d.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=2)
    same = [torch.arange(6.0).reshape(2, 3)]
    differ = [torch.arange(6.0).reshape(2, 3) + (0.5 if rank == 1 else 0.0)]
    grads = torch.nn.Parameter(torch.zeros(3))
    grads.grad = torch.full((3,), float(rank))
    rt.average_gradients([grads])
    results[rank] = (rt.replica_spread(same), rt.replica_spread(differ), rt.all_true(rank == 0),
                     grads.grad.tolist())
    dist.destroy_process_group()


def test_replica_check_detects_divergence_and_gradients_are_averaged(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_replica_worker, args=(str(tmp_path / "init"), results), nprocs=2)
    for rank in (0, 1):
        same, differ, agreed, grad = results[rank]
        assert same == 0.0 and differ == 0.5
        assert agreed is False  # one rank's False wins: every rank skips together
        assert grad == [0.5, 0.5, 0.5]
