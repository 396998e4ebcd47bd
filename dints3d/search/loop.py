"""First-order bilevel architecture search (DARTS-style alternation, DiNTS recipe).

Each iteration: a weight step on a patch from the ``weights`` half (SGD, architecture frozen); after warm-up, an
architecture step on a patch from the ``arch`` half (Adam on α and β, weights frozen) minimising
``L_seg + w(t) · Σ regularizers`` with ``w(t)`` ramped linearly from 0 to 1 after warm-up. The same loss on every
device and precision (``docs/search.md`` says why). State is checkpointed atomically and restored exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from dints3d import __version__
from dints3d.config import Config, config_to_dict
from dints3d.cost.budget import sigma_for_budget
from dints3d.cost.memory import predict_search_step_memory
from dints3d.data.dataset import (
    check_items,
    load_items,
    load_plan,
    make_dataset,
    prepared_digest,
)
from dints3d.data.losses import segmentation_loss
from dints3d.data.patch import resolve_patch
from dints3d.data.stream import PatchStream, stream_loader
from dints3d.data.transforms import train_transforms, validation_transforms
from dints3d.evaluation.validation import validate_scores, validation_metric
from dints3d.search.architect import Architect
from dints3d.search.resume import (
    LoopState,
    check_resumable_config,
    check_same_data,
    loop_state,
    restore_rng,
)
from dints3d.search.schedule import regularizer_ramp, warmup_iterations, weight_lr
from dints3d.spaces.dints.architecture import DintsArchitecture
from dints3d.spaces.factory import build_search_space
from dints3d.utils.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from dints3d.utils.errors import DintsError
from dints3d.utils.figures import save_figure
from dints3d.utils.io import write_json, write_yaml
from dints3d.utils.lock import FolderLock, discard_if_new, lock_folder
from dints3d.utils.outputs import check_output_folder
from dints3d.utils.preflight import (
    check_free_disk,
    check_writable,
    estimate_cache_bytes,
    out_of_memory_advice,
    remove_stale_temporaries,
)
from dints3d.utils.runtime import Runtime, rng_states, seed_everything

WEIGHT_STREAM, ARCH_STREAM = 0, 1
STREAM_NAMES = {WEIGHT_STREAM: "weights", ARCH_STREAM: "arch"}


class SearchRun:
    """One search, from a prepared WORK folder to ``RUN/arch.json``.

    Args:
        cfg: the run's configuration.
        work: folder written by ``dints3d prepare`` (plan.json, datalist.json).
        out: the run folder (created; must be empty of another run's checkpoint unless ``resume``). Rank 0 locks it
            until :meth:`close` (:mod:`dints3d.utils.lock`); a run folder this search created is removed again if
            the search fails before its first checkpoint. Use the run as a context manager, or call :meth:`close`.
        runtime: device and distributed placement.
        resume: continue from ``out/checkpoints/last.pt``.
    """
    def __init__(self, cfg: Config, work: str | Path, out: str | Path, runtime: Runtime, resume: bool = False):
        self.cfg, self.work, self.out, self.rt = cfg, Path(work), Path(out), runtime
        self.ckpt_dir = self.out / "checkpoints"
        self.writer = None
        self.lock: FolderLock | None = None
        if runtime.is_main:
            check_output_folder(self.out)
            self.lock = lock_folder(self.out)
        try:
            self._setup(resume)
        except BaseException:
            self.close(failed=True)
            raise

    def _setup(self, resume: bool) -> None:
        cfg, runtime = self.cfg, self.rt
        if runtime.is_main:
            check_writable(self.out)
            for folder in (self.out, self.ckpt_dir, self.out / "arch_history"):
                remove_stale_temporaries(folder)
        last = self.ckpt_dir / "last.pt"
        if resume:
            if not has_checkpoint(last):
                raise DintsError(last, "no checkpoint to resume from (start without --resume)")
            saved = load_checkpoint(last)
            check_resumable_config(saved, self.cfg, last)
        elif has_checkpoint(last):
            raise DintsError(self.out, "already holds a search; pass --resume to continue it or choose another --out")
        else:
            saved = None

        self.plan = load_plan(self.work, cfg.plan)
        self.data_digest = prepared_digest(self.work, self.plan)
        if saved is not None:
            check_same_data(saved, self.data_digest, last, self.work)
        d = cfg.data
        items = [item for key in ("weights", "arch", "validation")
                 for item in load_items(self.work, f"fold{d.fold}_{key}", d.max_cases)]
        check_items(items, int(self.plan["in_channels"]), self.work / "plan.json",
                    f"the task folder moved or changed after `dints3d prepare`; prepare {self.work} again from the "
                    "task's current location")
        seed_everything(cfg.seed)
        self.space = build_search_space(cfg, int(self.plan["in_channels"]), int(self.plan["out_channels"]),
                                        self.plan.get("target_spacing"))
        self.space.to(runtime.device)
        runtime.broadcast_parameters(self.space)
        self.patch = resolve_patch(self.plan, self.space.patch_divisor, f"the {cfg.space} space",
                                   ("data.patch_size", cfg.data.patch_size), note=print if runtime.is_main else None)
        self.budget = self._apply_memory_budget()
        if cfg.data.cache_dir is not None and runtime.is_main:
            cases = len(load_items(self.work, "training"))
            check_free_disk(cfg.data.cache_dir, estimate_cache_bytes(self.plan, cases))
        # DiceCE (MSD) or cross-entropy ignoring 255 (Cityscapes)
        self.architect = Architect(self.space, segmentation_loss(self.plan), cfg.search, runtime)
        self.state = LoopState()
        self._nonfinite_stop: str | None = None
        if saved is not None:
            self._restore(saved, last)
        self._make_data()
        if saved is not None:  # last, so that nothing above draws from the restored generators
            restore_rng(saved, self.rt.device, last)
        if runtime.is_main:
            # tensorboard: heavy, and optional where only the search loop's logs need it (bench/gpu_check.py)
            from torch.utils.tensorboard import SummaryWriter

            self.out.mkdir(parents=True, exist_ok=True)
            write_yaml(self.out / "config.yaml", config_to_dict(cfg))
            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"), purge_step=self.state.iteration)

    # ----------------------------------------------------------------------------------------------- setup
    def _apply_memory_budget(self) -> dict | None:
        """Translate ``search.memory_budget_gb`` into σ for the memory loss (``dints3d/cost/budget.py``)."""
        budget_gb = self.cfg.search.memory_budget_gb
        if budget_gb is None:
            return None
        if self.cfg.space != "dints":
            raise DintsError("search.memory_budget_gb", f"is only defined for the dints space, not {self.cfg.space}")

        train = self.cfg.train
        budget = sigma_for_budget(budget_gb, self.space, int(self.plan["in_channels"]), int(self.plan["out_channels"]),
                                  self.patch, train.batch_size, train.amp, train.channel_mul,
                                  device=self.rt.device.type, seed=self.cfg.seed)
        self.space.ram_cost_factor = budget["sigma"]
        if self.rt.is_main:
            write_json(self.out / "budget.json", budget)
            tqdm.write(f"memory budget {budget_gb:g} GB → ram_cost_factor σ = {budget['sigma']:.3f} "
                       f"(predicted ≈ {budget['intercept_gb']:.2f} + {budget['slope_gb']:.2f}·r GB)")
        return budget

    def _make_data(self) -> None:
        d = self.cfg.data
        fold = d.fold
        cache_dev = self.rt.device if d.gpu_cache and self.rt.device.type == "cuda" else None
        transform = train_transforms(self.plan, self.patch, d.num_samples, d.augment, device=cache_dev)
        self.train_data = {}
        for stream_id, key in ((WEIGHT_STREAM, f"fold{fold}_weights"), (ARCH_STREAM, f"fold{fold}_arch")):
            items = load_items(self.work, key, d.max_cases)
            cache_dir = None if d.cache_dir is None else Path(d.cache_dir) / "train"
            self.train_data[stream_id] = make_dataset(items, transform, d.cache_rate, cache_dir, d.num_workers,
                                                      progress=self.rt.is_main)
        val_items = load_items(self.work, f"fold{fold}_validation", d.max_cases)
        if self.rt.distributed:
            val_items = val_items[self.rt.rank :: self.rt.world_size]
        self.val_data = make_dataset(val_items, validation_transforms(self.plan), d.cache_rate, None,
                                     d.num_workers, progress=self.rt.is_main)

    def _loader(self, stream_id: int) -> Iterator:
        """A persistent iterator over the stream's samples, continuing after every sample consumed so far (by
        however many processes earlier sessions had); each rank reads at most a batch per remaining iteration."""
        d = self.cfg.data
        remaining = self.cfg.search.iterations - self.state.iteration
        stream = PatchStream(self.train_data[stream_id], self.cfg.seed, stream_id, remaining * d.batch_size,
                             self.rt.rank, self.rt.world_size, offset=self.state.consumed[STREAM_NAMES[stream_id]])
        return iter(stream_loader(stream, d.batch_size, d.num_workers, d.gpu_cache))

    # ------------------------------------------------------------------------------------------ checkpoint
    def _state_dict(self) -> dict:
        return {
            "format": "dints3d-search-checkpoint-2",
            "config": config_to_dict(self.cfg),
            "model": self.space.state_dict(),
            **self.architect.state_dict(),
            "loop": dataclasses.asdict(self.state),
            "rng": rng_states(self.rt.device),
            "data": self.data_digest,
        }

    def _restore(self, saved: dict, path: Path) -> None:
        try:
            self.space.load_state_dict(saved["model"])
            self.architect.load_state_dict(saved)
        except (RuntimeError, KeyError, ValueError) as e:
            first = str(e).strip().splitlines()[0][:200]
            raise DintsError(path, f"does not fit this search's network ({first}); resume with the WORK folder and "
                             "config the search began with, or start a new search with another --out") from None
        self.state = loop_state(saved["loop"], self.cfg, self.rt.world_size)
        if self.state.stopped_nonfinite:
            self.state.stopped_nonfinite = False
            self.state.nonfinite_streak = {kind: 0 for kind in self.state.nonfinite_streak}
            if self.rt.is_main:
                tqdm.write(f"{path} was written by a non-finite stop; counting consecutive non-finite losses afresh")

    def save(self, name: str = "last") -> None:
        """Write ``checkpoints/<name>.pt`` (rank 0). Every rank must call it: normalization statistics are averaged
        over the ranks first, so the checkpoint holds the statistics of all the data seen."""
        self.rt.average_buffers(self.space)
        if self.rt.is_main:
            path = self.ckpt_dir / f"{name}.pt"
            kept = (f"the previous {path.name} is unchanged (the search state it holds is intact); free space, then "
                    "continue with --resume")
            save_checkpoint(path, self._state_dict(), kept=kept)

    # ------------------------------------------------------------------------------------------------ steps
    def _batch(self, it: Iterator, stream_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = next(it)
        self.state.consumed[STREAM_NAMES[stream_id]] += self.cfg.data.batch_size * self.rt.world_size
        dev = self.rt.device
        return batch["image"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)

    def _count(self, finite: bool, kind: str) -> None:
        """Count a skipped step of ``kind`` (``weight`` or ``architecture``) whose loss was not finite;
        ``search.max_nonfinite_steps`` in a row of one kind make :meth:`run` stop once the iteration is complete."""
        streak = self.state.nonfinite_streak
        if finite:
            streak[kind] = 0
            return
        self.state.nonfinite_total += 1
        streak[kind] += 1
        tqdm.write(f"warning: non-finite {kind} loss at iteration {self.state.iteration}; step skipped "
                   f"({streak[kind]} in a row, {self.state.nonfinite_total} in total)")
        if streak[kind] >= self.cfg.search.max_nonfinite_steps:
            self._nonfinite_stop = f"{streak[kind]} consecutive non-finite {kind} losses"

    def _stop_nonfinite(self) -> None:
        """Checkpoint the completed iteration (its skipped steps included, so a resume neither repeats an update
        nor re-reads the batch) and stop with what the user can change on resume."""
        self.state.stopped_nonfinite = True
        self.save()
        raise DintsError(self.ckpt_dir / "last.pt", f"{self._nonfinite_stop} up to iteration "
                         f"{self.state.iteration - 1}; stopped with a resumable checkpoint. Check the data for "
                         "NaN/Inf, then continue with --resume and, e.g., --set search.lr=<lower> / "
                         "search.arch_lr=<lower> / search.amp=false / search.max_nonfinite_steps=<more>")

    def weight_step(self, image: torch.Tensor, label: torch.Tensor, lr: float) -> torch.Tensor | None:
        """:meth:`Architect.weight_step`, counted."""
        loss = self.architect.weight_step(image, label, lr)
        self._count(loss is not None, "weight")
        return loss

    def arch_step(self, image: torch.Tensor, label: torch.Tensor, ramp: float) -> dict | None:
        """:meth:`Architect.arch_step`, counted; with ``search.check_replicas``, the ranks' architectures are then
        compared."""
        terms = self.architect.arch_step(image, label, ramp)
        self._count(terms is not None, "architecture")
        if terms is not None and self.cfg.search.check_replicas and self.rt.distributed:
            spread = self.rt.replica_spread(self.architect.arch_params)
            if spread != 0.0:
                raise DintsError("search", f"architecture parameters differ between ranks by {spread:g} after "
                                 f"iteration {self.state.iteration}; the replicas have diverged")
        return terms

    def validate_and_decode(self) -> dict:
        """Validation Dice (MSD) or IoU (Cityscapes) of the supernet and a decode snapshot (``arch_history/``)."""
        self.rt.average_buffers(self.space)  # validate with the statistics of every rank's batches, as one network
        dice = validate_scores(self.plan, self.space, (self.val_data[i] for i in range(len(self.val_data))),
                               self.patch, self.rt.device, self.rt.autocast(self.cfg.search.amp),
                               self.cfg.search.val_sw_batch_size, self.cfg.search.val_overlap)
        if self.rt.distributed:
            dice = _allgather_mean(dice, self.rt)
        mean = _nanmean(dice)
        self.state.last_dice = dice
        arch, info = self.decode(dice)
        if self.rt.is_main:
            arch.save(self.out / "arch_history" / f"arch_{self.state.iteration:07d}.json")
            t = self.state.iteration
            metric, first = validation_metric(self.plan)  # Dice of foreground classes, or IoU of every class
            self.writer.add_scalar(f"val/mean_{metric}", mean, t)
            for c, v in enumerate(dice, start=first):
                self.writer.add_scalar(f"val/{metric}_{self.plan['class_names'][c]}", v, t)
            for key, value in info.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"arch/{key}", float(value), t)
            figure = arch.figure()
            if figure is not None:
                self.writer.add_figure("arch/picture", figure, t)
            if info.get("argmax_connected") is False:
                tqdm.write(f"iteration {t}: the per-layer argmax topology is disconnected (discretization gap); "
                           "the decoder's connected choice is used")
        return {"mean_dice": mean, **info}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one step's batch: (patches, channels, *patch)."""
        return (self.cfg.data.batch_size * self.cfg.data.num_samples, int(self.plan["in_channels"]), *self.patch)

    @torch.no_grad()
    def decode(self, dice: list | None = None):
        arch, info = self.space.decode(self.input_shape)
        facts = self.space.architecture_facts(arch, self.input_shape)
        info.update(facts)
        arch.provenance = {
            "tool": f"dints3d {__version__}",
            "task": self.plan.get("name"),
            "iteration": self.state.iteration,
            "seed": self.cfg.seed,
            "validation_dice": _json_scores(dice if dice is not None else self.state.last_dice),
            "validation_metric": validation_metric(self.plan)[0],
            **facts,
            **({"memory_budget": self.budget, "predicted_memory_gb": self.budget["intercept_gb"]
                + self.budget["slope_gb"] * facts["estimated_memory_ratio"]}
               if self.budget and "estimated_memory_ratio" in facts else {}),
            "decode": {k: v for k, v in info.items() if k not in facts},
            "patch_size": self.patch,
            "config": config_to_dict(self.cfg),
        }
        return arch, info

    # ------------------------------------------------------------------------------------------------- loop
    def run(self, stop_after: int | None = None) -> Path | None:
        """Search until the configured number of iterations (or ``stop_after`` iterations in total, leaving a
        resumable checkpoint). Returns the path of ``arch.json`` when the search is complete."""
        s = self.cfg.search
        total = s.iterations
        if stop_after is not None and stop_after < 0:
            raise DintsError("--stop-after", f"must be ≥ 0, got {stop_after}")
        end = total if stop_after is None else min(total, stop_after)
        warmup = warmup_iterations(total, s.warmup_fraction)
        weights_it = self._loader(WEIGHT_STREAM)
        arch_it = None
        bar = tqdm(total=total, initial=self.state.iteration, desc="search", dynamic_ncols=True,
                   disable=not self.rt.is_main)
        wait = compute = 0.0
        logs: dict[str, torch.Tensor] = {}
        try:
            while self.state.iteration < end:
                t = self.state.iteration
                t0 = time.perf_counter()
                image, label = self._batch(weights_it, WEIGHT_STREAM)
                t1 = time.perf_counter()
                lr = weight_lr(t, total, warmup, self.architect.base_lr, s.lr_schedule, s.lr_decay_points, s.lr_min)
                with self._explain_out_of_memory():
                    loss = self.weight_step(image, label, lr)
                if loss is not None:
                    logs["loss/weights"] = loss
                if t >= warmup:
                    arch_it = arch_it or self._loader(ARCH_STREAM)
                    t2 = time.perf_counter()
                    a_image, a_label = self._batch(arch_it, ARCH_STREAM)
                    t1 += time.perf_counter() - t2
                    ramp = regularizer_ramp(t, total, warmup)
                    with self._explain_out_of_memory():
                        terms = self.arch_step(a_image, a_label, ramp)
                    if terms is not None:
                        logs.update({f"loss/{k}": v for k, v in terms.items()})
                        logs["search/ramp"] = torch.tensor(ramp)
                t3 = time.perf_counter()
                wait += t1 - t0
                compute += t3 - t1
                self.state.iteration += 1
                bar.update(1)
                done = self.state.iteration
                if self.rt.is_main and (done % 10 == 0 or done == end):
                    self._log(logs, lr, wait / max(wait + compute, 1e-9), bar)
                if self._nonfinite_stop is not None:
                    bar.close()
                    self._stop_nonfinite()
                if done % s.val_interval == 0 or done == total:
                    with self._explain_out_of_memory("validation"):
                        result = self.validate_and_decode()
                    if result["mean_dice"] > self.state.best_dice:
                        self.state.best_dice = result["mean_dice"]
                        self.save("best")
                    bar.set_postfix_str(f"val {validation_metric(self.plan)[0]} {result['mean_dice']:.3f}")
                if done % s.checkpoint_interval == 0 or done == end:
                    self.save()
        except BaseException:
            bar.close()  # the error then starts a line of its own, not the progress bar's
            raise
        bar.close()
        if self.state.iteration < total:
            if self.state.iteration == 0:  # --stop-after 0: no iteration saved one; leave a checkpoint to resume
                self.save()
            return None
        return self.finish()

    @contextlib.contextmanager
    def _explain_out_of_memory(self, stage: str | None = None):
        """Turn a CUDA out-of-memory error into one line with what to change: in a search step with the predicted
        need of the step, during ``stage`` (``"validation"``) with what bounds that stage's memory."""
        try:
            yield
        except torch.OutOfMemoryError:
            predicted = self._predicted_step_bytes() if stage is None else None
            raise DintsError(str(self.rt.device), out_of_memory_advice(predicted, self.patch,
                                                                  self.cfg.search.checkpoint_cells, stage)) from None

    def _predicted_step_bytes(self) -> int | None:
        """Peak memory of one search step by the memory model, or None where it has no answer (e.g. this space)."""
        with contextlib.suppress(Exception):
            return predict_search_step_memory(
                self.space.hparams, self.input_shape[1:], batch=self.cfg.data.batch_size * self.cfg.data.num_samples,
                amp=self.cfg.search.amp, num_classes=int(self.plan["out_channels"]),
                device=self.rt.device.type)["peak"]
        return None

    def _log(self, logs: dict, lr: float, wait_fraction: float, bar: tqdm) -> None:
        t = self.state.iteration
        values = {k: float(v) for k, v in logs.items()}  # one host sync per logging interval
        for k, v in values.items():
            self.writer.add_scalar(k, v, t)
        self.writer.add_scalar("lr/weights", lr, t)
        self.writer.add_scalar("data/wait_fraction", wait_fraction, t)
        self.writer.add_scalar("nonfinite/total", self.state.nonfinite_total, t)
        for key, value in self.space.log_scalars(self.input_shape).items():
            if value.numel() == 1:
                self.writer.add_scalar(key, float(value), t)
            else:
                self.writer.add_histogram(key, value.detach().float().cpu(), t)
        short = {k.split("/")[-1]: v for k, v in values.items() if k.startswith("loss/")}
        bar.set_postfix({k: f"{v:.3f}" for k, v in short.items()}, refresh=False)

    def finish(self) -> Path:
        """Decode the final architecture and write ``arch.json`` and ``arch.png``."""
        arch, info = self.decode()
        if self.rt.is_main:
            path = arch.save(self.out / "arch.json")
            figure = arch.figure()
            if figure is not None:
                save_figure(figure, self.out / "arch.png")
            summary = {"iterations": self.state.iteration, "best_validation_dice": self.state.best_dice,
                       "validation_metric": validation_metric(self.plan)[0],
                       "nonfinite_steps": self.state.nonfinite_total, **info}
            if isinstance(arch, DintsArchitecture):
                summary["unused_depths"] = arch.unused_depths()
            write_json(self.out / "summary.json", summary)
            self.writer.flush()
            return path
        return self.out / "arch.json"

    def close(self, failed: bool = False) -> None:
        """Close the TensorBoard writer and release the run folder; after a failure (``failed``), a run folder this
        search created is removed when it holds no checkpoint to resume from."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.lock is not None:
            if failed:
                discard_if_new(self.lock, lambda folder: has_checkpoint(folder / "checkpoints" / "last.pt"))
            self.lock.release()
            self.lock = None

    def __enter__(self) -> SearchRun:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(failed=kind is not None)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _json_scores(values: list[float]) -> list[float | None]:
    """NaN (a class absent from the validation truth) as null: JSON has no NaN."""
    return [None if math.isnan(v) else v for v in values]


def _allgather_mean(dice: list[float], rt: Runtime) -> list[float]:
    """Average per-class Dice over ranks, each rank weighted equally, NaNs ignored."""
    t = torch.tensor(dice, dtype=torch.float64, device=rt.device)
    gathered = [torch.zeros_like(t) for _ in range(rt.world_size)]
    torch.distributed.all_gather(gathered, t)
    return torch.nanmean(torch.stack(gathered), 0).cpu().tolist()


