"""The search under torchrun with 2 CPU processes (gloo): a complete run, resumes across world sizes, and the
collectives (gradient and normalization-statistics averaging, the replica check)."""

import json
import os
import subprocess
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

import pytest

# Run by torchrun in place of `-m dints3d`: each process records, in its own file, every file it renames into place
# (all of dints3d's writes are atomic renames), every TensorBoard writer it opens, a digest of α/β after each
# architecture step, each validation, and the global index of every sample it reads. Observation only.
RECORDER = textwrap.dedent('''
    import hashlib, json, os, sys
    import torch
    import torch.utils.tensorboard
    from dints3d.data import stream
    from dints3d.search import loop

    rank = int(os.environ.get("RANK", "0"))
    log = open(os.path.join(os.environ["RECORD_DIR"], f"{os.environ['RECORD_SESSION']}.rank{rank}.jsonl"), "a")

    def note(**event):
        log.write(json.dumps(event) + "\\n")
        log.flush()

    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        note(event="write", path=os.path.abspath(os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace

    real_writer = torch.utils.tensorboard.SummaryWriter.__init__
    def writer(self, *args, **kwargs):
        note(event="tensorboard")
        real_writer(self, *args, **kwargs)
    torch.utils.tensorboard.SummaryWriter.__init__ = writer

    real_arch_step = loop.SearchRun.arch_step
    def arch_step(self, *args, **kwargs):
        result = real_arch_step(self, *args, **kwargs)
        values = torch.cat([p.detach().reshape(-1) for p in self.architect.arch_params]).numpy().tobytes()
        note(event="arch", iteration=self.state.iteration, digest=hashlib.sha256(values).hexdigest())
        return result
    loop.SearchRun.arch_step = arch_step

    real_validate = loop.SearchRun.validate_and_decode
    def validate(self, *args, **kwargs):
        note(event="validate", iteration=self.state.iteration)
        return real_validate(self, *args, **kwargs)
    loop.SearchRun.validate_and_decode = validate

    real_case_index = stream.PatchStream.case_index
    def case_index(self, k):
        note(event="sample", stream=self.stream, k=int(k))
        return real_case_index(self, k)
    stream.PatchStream.case_index = case_index

    from dints3d.cli import main
    sys.exit(main(sys.argv[1:]))
''')


@pytest.fixture(scope="module")
def ddp(tiny):
    """The tiny search with the replica check on and no loader workers; each test sets iterations, validation and
    checkpoint intervals."""
    return tiny.search_with("data.num_workers=0", "search.check_replicas=true")


def _search(ddp, work, out, nproc, session, settings, *extra):
    """``torchrun --nproc_per_node nproc`` of the recorded CLI with ``ddp`` and ``settings``; returns (completed
    process, {rank: events})."""
    record = out.parent / "record"
    record.mkdir(exist_ok=True)
    script = out.parent / "recorded_cli.py"
    script.write_text(RECORDER)
    args = [a for o in [*ddp, *settings] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           "search", "--work", str(work), "--out", str(out), *args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RECORD_DIR": str(record), "RECORD_SESSION": session}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    events = {}
    for rank in range(nproc):
        path = record / f"{session}.rank{rank}.jsonl"
        events[rank] = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return result, events


def _of(events, kind):
    return [e for e in events if e["event"] == kind]


def test_two_process_search_completes_with_identical_replicas_and_rank0_writes(search_work, ddp, tmp_path):
    """A whole 2-process search: weight and architecture steps, two validations, the final decode. α/β are
    identical on both ranks after every architecture step; rank 0 alone writes anything into the run folder."""
    out = tmp_path / "run"
    settings = ["search.iterations=4", "search.val_interval=2", "search.checkpoint_interval=2"]
    result, events = _search(ddp, search_work, out, 2, "whole", settings)
    assert result.returncode == 0, result.stderr[-3000:]

    arch = json.loads((out / "arch.json").read_text())
    assert arch["provenance"]["iteration"] == 4 and len(arch["provenance"]["validation_dice"]) == 2
    assert (out / "arch.png").stat().st_size > 5000
    assert sorted(p.name for p in (out / "arch_history").iterdir()) == ["arch_0000002.json", "arch_0000004.json"]

    # α/β after each architecture step (iterations 2 and 3, after the warm-up half), compared across ranks
    steps = {rank: [(e["iteration"], e["digest"]) for e in _of(events[rank], "arch")] for rank in (0, 1)}
    assert [t for t, _ in steps[0]] == [2, 3] and steps[0] == steps[1]
    assert steps[0][0][1] != steps[0][1][1]  # they did move
    for rank in (0, 1):  # both ranks validate (each its share of the cases)
        assert [e["iteration"] for e in _of(events[rank], "validate")] == [2, 4]

    written = {rank: {Path(e["path"]) for e in _of(events[rank], "write")} for rank in (0, 1)}
    in_run = {rank: {p.relative_to(out) for p in paths if out in p.parents} for rank, paths in written.items()}
    assert in_run[1] == set(), in_run[1]
    assert {Path("arch.json"), Path("arch.png"), Path("summary.json"), Path("config.yaml"),
            Path("checkpoints/last.pt"), Path("checkpoints/best.pt"),
            Path("arch_history/arch_0000002.json"), Path("arch_history/arch_0000004.json")} <= in_run[0]
    assert len(_of(events[0], "tensorboard")) == 1 and _of(events[1], "tensorboard") == []
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # the ranks read disjoint samples that together are the one-process sequence
    for stream, count in ((0, 8), (1, 4)):  # 4 weight steps and 2 architecture steps, 2 ranks, batch 1
        reads = {rank: [e["k"] for e in _of(events[rank], "sample") if e["stream"] == stream] for rank in (0, 1)}
        assert sorted(reads[0] + reads[1]) == list(range(count))
        assert set(reads[0]).isdisjoint(reads[1])


def test_resume_under_another_world_size_reads_each_sample_once(search_work, ddp, tmp_path):
    """2 processes for 2 iterations, 1 process up to iteration 4, 2 processes to the end (6): each stream is read
    as one sequence, every sample once, however many processes there were; one arch.json."""
    out = tmp_path / "run"
    settings = ["search.iterations=6", "search.val_interval=6", "search.checkpoint_interval=2"]
    reads = defaultdict(list)
    for session, nproc, extra in (("a", 2, ["--stop-after", "2"]), ("b", 1, ["--resume", "--stop-after", "4"]),
                                  ("c", 2, ["--resume"])):
        result, events = _search(ddp, search_work, out, nproc, session, settings, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        for rank in events:
            for e in _of(events[rank], "sample"):
                reads[e["stream"]].append(e["k"])
    # weights: 2 iterations × 2 ranks + 2 × 1 + 2 × 2; arch (from iteration 3): 1 × 1 + 2 × 2
    assert sorted(reads[0]) == list(range(10))
    assert sorted(reads[1]) == list(range(5))
    arch = json.loads((out / "arch.json").read_text())
    assert arch["provenance"]["iteration"] == 6
    assert [p.name for p in out.glob("arch*.json")] == ["arch.json"]


def _collectives_worker(rank, init_file, checkpoint_dir, results):
    import torch
    import torch.distributed as dist

    from dints3d.config import load_config
    from dints3d.search import loop
    from dints3d.utils.checkpoint import load_checkpoint
    from dints3d.utils.runtime import Runtime

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=2)

    same = [torch.arange(6.0).reshape(2, 3)]
    differ = [torch.arange(6.0).reshape(2, 3) + (0.5 if rank == 1 else 0.0)]
    grads = torch.nn.Parameter(torch.zeros(3))
    grads.grad = torch.full((3,), float(rank))
    rt.average_gradients([grads])
    results[("replicas", rank)] = (rt.replica_spread(same), rt.replica_spread(differ), rt.all_true(rank == 0),
                                   grads.grad.tolist())

    # BatchNorm running statistics drift apart: each rank normalizes its own batches
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2), torch.nn.InstanceNorm3d(2))
    bn = net[1]
    seen = {}

    def record():
        return bn.running_mean.clone(), bn.running_var.clone()

    run = loop.SearchRun.__new__(loop.SearchRun)
    run.rt, run.space, run.ckpt_dir = rt, net, Path(checkpoint_dir)
    run._state_dict = lambda: {"model": net.state_dict()}
    run.cfg, run.plan, run.val_data, run.patch = load_config(None, ["device=cpu"]), {}, [], [4, 4, 4]

    class Stop(Exception):
        pass

    def validate_scores(plan, model, *args):
        seen["validation"] = record()
        raise Stop

    loop.validate_scores = validate_scores
    for step, label in ((0, "save"), (1, "validation")):
        net.train()
        net(torch.randn(2, 1, 4, 4, 4) * (1 + rank) + 3 * rank + step)
        before = torch.stack([bn.running_mean, bn.running_var])
        both = [torch.zeros_like(before) for _ in range(2)]
        dist.all_gather(both, before)
        if label == "save":
            run.save()
            seen["save"] = record()
        else:
            try:
                run.validate_and_decode()
            except Stop:
                pass
        results[(label, rank)] = (both[0].tolist(), both[1].tolist(), [t.tolist() for t in seen[label]])
        dist.barrier()
        if label == "save" and rank == 0:
            saved = load_checkpoint(Path(checkpoint_dir) / "last.pt")["model"]
            results["saved"] = (saved["1.running_mean"].tolist(), saved["1.running_var"].tolist())
    dist.destroy_process_group()


def test_collectives_average_gradients_and_normalization_statistics(tmp_path):
    """Gradients are averaged and a divergence is detected; BatchNorm running statistics, different on each rank,
    are averaged before a checkpoint is written and before validation, on every rank."""
    import torch
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_collectives_worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt"), results), nprocs=2)
    for rank in (0, 1):
        same, differ, agreed, grad = results[("replicas", rank)]
        assert same == 0.0 and differ == 0.5
        assert agreed is False  # one rank's False wins: every rank skips together
        assert grad == [0.5, 0.5, 0.5]
    for label in ("save", "validation"):
        rank0, rank1, _ = results[(label, 0)]
        assert rank0 != rank1  # the statistics had drifted apart
        expected = ((torch.tensor(rank0) + torch.tensor(rank1)) / 2).tolist()
        for rank in (0, 1):
            torch.testing.assert_close(torch.tensor(results[(label, rank)][2]), torch.tensor(expected))
    saved_mean, saved_var = results["saved"]
    torch.testing.assert_close(torch.tensor([saved_mean, saved_var]), torch.tensor(results[("save", 0)][2]))

