"""What a search under torchrun changes per process, checked without launching one: learning rates scale with the
world size (``search.scale_lr``), and each rank draws its own patches, seeded by their global index, so the ranks
together read exactly the one-process sample sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropd

from dints3d.config import load_config
from dints3d.data.stream import PatchStream
from dints3d.search.architect import Architect
from dints3d.search.loop import SearchRun
from dints3d.spaces.factory import build_search_space
from dints3d.utils.runtime import Runtime


def _optimizers(tiny, world_size: int, scale_lr: bool) -> SearchRun:
    """Only the optimizer set-up of a SearchRun, for a process of a ``world_size``-process run."""
    cfg = load_config(None, [*tiny.dints, f"search.scale_lr={str(scale_lr).lower()}"])
    run = SearchRun.__new__(SearchRun)
    run.cfg, run.rt = cfg, Runtime(device=torch.device("cpu"), world_size=world_size)
    run.space = build_search_space(cfg, 1, 2)
    run.architect = Architect(run.space, None, cfg.search, run.rt)
    return run


@pytest.mark.parametrize("world_size, scale_lr, factor", [(1, True, 1), (4, True, 4), (4, False, 1)])
def test_learning_rates_scale_with_the_world_size(tiny, world_size, scale_lr, factor):
    run = _optimizers(tiny, world_size, scale_lr)
    s = run.cfg.search
    assert run.architect.base_lr == pytest.approx(s.lr * factor)
    assert run.architect.opt_w.param_groups[0]["lr"] == pytest.approx(s.lr * factor)
    assert set(run.architect.opt_arch) == {"alpha", "beta"}
    for optimizer in run.architect.opt_arch.values():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(s.arch_lr * factor)


def test_ranks_read_their_own_share_of_the_one_process_sequence():
    rng = np.random.default_rng(0)
    items = [{"image": rng.normal(size=(1, 8, 8, 8)).astype(np.float32)} for _ in range(3)]
    transform = Compose([RandSpatialCropd("image", roi_size=(4, 4, 4), random_size=False),
                         RandGaussianNoised("image", prob=1.0)])
    base = Dataset(items, transform=transform)
    one = PatchStream(base, seed=7, stream=0, length=8)
    ranks = [PatchStream(base, seed=7, stream=0, length=4, rank=r, world_size=2) for r in (0, 1)]
    sequence = [np.asarray(one[k]["image"]) for k in range(8)]
    for rank, stream in enumerate(ranks):
        for i in range(4):
            assert np.array_equal(np.asarray(stream[i]["image"]), sequence[2 * i + rank])
    assert not np.array_equal(np.asarray(ranks[0][0]["image"]), np.asarray(ranks[1][0]["image"]))


def test_resumed_under_another_world_size_the_learning_rates_are_rescaled(tiny, tmp_path):
    """A checkpoint of a 4-process run resumed by 1 process: Adam's saved learning rate (4 × arch_lr) is replaced
    by the one for 1 process (the weights' SGD rate is set every step from the schedule anyway)."""
    four = _optimizers(tiny, 4, True)
    saved = {"model": four.space.state_dict(), "opt_w": four.architect.opt_w.state_dict(),
             "opt_arch": {k: o.state_dict() for k, o in four.architect.opt_arch.items()},
             "scaler_w": four.architect.scaler_w.state_dict(), "scaler_a": four.architect.scaler_a.state_dict(),
             "loop": {"iteration": 3, "consumed": {"weights": 12, "arch": 0}}}
    one = _optimizers(tiny, 1, True)
    one._restore(saved, tmp_path / "last.pt")
    for optimizer in one.architect.opt_arch.values():
        assert optimizer.param_groups[0]["lr"] == pytest.approx(one.cfg.search.arch_lr)
    assert one.architect.base_lr == pytest.approx(one.cfg.search.lr)
    assert one.state.iteration == 3 and one.state.consumed == {"weights": 12, "arch": 0}


def test_a_resumed_stream_continues_the_global_sequence_under_any_world_size():
    """2 processes read samples 0–5 (3 each); 3 processes resuming at offset 6 read 6, 7, 8, … in turn."""
    items = [{"image": np.full((1, 4, 4, 4), float(i), dtype=np.float32)} for i in range(4)]
    base = Dataset(items, transform=Compose([RandGaussianNoised("image", prob=1.0)]))
    one = PatchStream(base, seed=3, stream=1, length=12)
    sequence = [np.asarray(one[k]["image"]) for k in range(12)]
    first = [PatchStream(base, seed=3, stream=1, length=3, rank=r, world_size=2) for r in (0, 1)]
    then = [PatchStream(base, seed=3, stream=1, length=2, rank=r, world_size=3, offset=6) for r in (0, 1, 2)]
    read = [np.asarray(s[i]["image"]) for i in range(3) for s in first]
    read += [np.asarray(s[i]["image"]) for i in range(2) for s in then]
    assert len(read) == 12
    for got, want in zip(read, sequence):
        assert np.array_equal(got, want)
