"""Short training schedules that score one random-search trial.

- :func:`train_steps`: SGD with momentum and the ``train:`` section's halving schedule on any stream of
  ``(image, label)`` batches (non-finite steps are skipped).
- :class:`NetworkEvaluator`: a whole discrete network (DiNTS baselines) trained on the fold's training patches and
  scored as the search validates (mean foreground Dice for MSD tasks, mean IoU for Cityscapes).
- :class:`HeadEvaluator`: a DPC head trained on cached backbone features and scored on the cached validation patches
  by the same metric, counted over all of them at once.

The loss is the task's (:func:`dints3d.losses.segmentation_loss`: DiceCE, or cross-entropy ignoring 255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dints3d.config import Config
from dints3d.confusion import confusion_matrix, iou_per_class, mean_iou
from dints3d.losses import segmentation_loss
from dints3d.random_search.engine import Evaluation
from dints3d.runtime import Runtime, seed_everything
from dints3d.search.schedule import weight_lr_factor


@dataclass(frozen=True)
class Schedule:
    """Optimizer settings of a short run (from ``cfg.train``)."""

    lr: float
    momentum: float
    weight_decay: float
    decay_points: tuple[float, ...]
    amp: bool

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        t = cfg.train
        return cls(t.lr, t.momentum, t.weight_decay, tuple(t.lr_decay_points), t.amp)


def train_steps(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], iterations: int,
                schedule: Schedule, runtime: Runtime, loss_fn: torch.nn.Module) -> dict:
    """``iterations`` SGD steps of ``loss_fn(model(image), label)`` over ``batches`` (``B C [spatial]`` images,
    ``B 1 [spatial]`` labels; logits smaller than the label are resized to it). Returns the mean loss of the last
    tenth of the steps and the number of skipped non-finite steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    model.train()
    tail, skipped = [], 0
    for t in range(iterations):
        image, label = next(batches)
        image, label = image.to(runtime.device), label.to(runtime.device)
        for group in opt.param_groups:
            group["lr"] = schedule.lr * weight_lr_factor(t, iterations, 0, schedule.decay_points)
        opt.zero_grad(set_to_none=True)
        with runtime.autocast(schedule.amp):
            logits = model(image)
        loss = loss_fn(resize_logits(logits.float(), label.shape[2:]), label)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        opt.step()
        if t >= iterations - max(1, iterations // 10):
            tail.append(float(loss.detach()))
    return {"train_loss": sum(tail) / len(tail) if tail else math.nan, "nonfinite_steps": skipped}


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at feature resolution → the label's size (bilinear / trilinear, as DeepLab upsamples its logits)."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)


def class_scores(matrix: torch.Tensor, metric: str) -> dict:
    """Per-class IoU (every class) and Dice (foreground classes; NaN where absent from the truth) from a
    ``C × (C + 1)`` confusion matrix (:func:`dints3d.confusion.confusion_matrix`), their means over the defined
    values, and ``score``: the mean of ``metric`` (``"dice"`` or ``"iou"``, see
    :func:`dints3d.search.validate_iou.validation_metric`)."""
    m = matrix.double()
    tp, gt, pred = m.diagonal(), m.sum(1), m[:, : m.shape[0]].sum(0)
    dice = torch.where(gt > 0, 2 * tp / (gt + pred).clamp_min(1), torch.nan)[1:].tolist()
    iou = iou_per_class(matrix)
    means = {"mean_dice": mean_iou(dice), "mean_iou": mean_iou(iou)}  # mean_iou averages the non-NaN values
    return {"dice": dice, "iou": iou, **means, "score": means[f"mean_{metric}"]}


def cycling_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of ``(images[i], labels[i])``, a fresh seeded permutation per pass; images as float32."""
    rng = np.random.default_rng(seed)
    n = len(images)
    size = min(batch_size, n)
    while True:
        order = torch.as_tensor(rng.permutation(n))
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield images[idx].float(), labels[idx]


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class HeadEvaluator:
    """Trains a DPC head on cached features (``features.train_x``, ``B C [feature spatial]``, float16) against the
    patches' labels and scores it on the cached validation features. The state returned is the head's."""

    def __init__(self, features, plan: dict, schedule: Schedule, batch_size: int, runtime: Runtime):
        from dints3d.search.validate_iou import validation_metric

        self.features, self.num_classes = features, int(plan["out_channels"])
        self.loss_fn, self.metric = segmentation_loss(plan), validation_metric(plan)[0]
        self.schedule, self.batch_size, self.rt = schedule, batch_size, runtime

    def __call__(self, arch, iterations: int, seed: int) -> Evaluation:
        f = self.features
        seed_everything(seed)
        head = arch.build_head(f.channels, self.num_classes).to(self.rt.device)
        log = train_steps(head, cycling_batches(f.train_x, f.train_y, self.batch_size, seed), iterations,
                          self.schedule, self.rt, self.loss_fn)
        scores = self.score(head)
        return Evaluation(scores.pop("score"), {**scores, **log, "parameters": _count(head)}, head.state_dict())

    @torch.no_grad()
    def score(self, head: torch.nn.Module) -> dict:
        f, k = self.features, self.num_classes
        head.eval()
        total = torch.zeros(k, k + 1, dtype=torch.int64)
        for start in range(0, len(f.val_x), self.batch_size):
            x = f.val_x[start : start + self.batch_size].float().to(self.rt.device)
            y = f.val_y[start : start + self.batch_size]
            with self.rt.autocast(self.schedule.amp):
                logits = head(x)
            pred = resize_logits(logits.float(), y.shape[2:]).argmax(1).cpu()
            total += confusion_matrix(pred, y[:, 0], k)
        return class_scores(total, self.metric)


class NetworkEvaluator:
    """Trains a whole discrete network (``arch.build(..., channel_mul=train.channel_mul)``) on patches of the fold's
    training cases (both search halves) and scores it as the search validates (sliding windows; Dice or IoU)."""

    def __init__(self, cfg: Config, work, runtime: Runtime, plan: dict, patch: list[int]):
        from dints3d.data.dataset import load_items, make_dataset
        from dints3d.data.transforms import train_transforms, validation_transforms

        self.cfg, self.rt, self.plan, self.patch = cfg, runtime, plan, patch
        d = cfg.data
        items = load_items(work, f"fold{d.fold}_train", d.max_cases)
        self.train_data = make_dataset(items, train_transforms(plan, patch, d.num_samples, d.augment),
                                       d.cache_rate, None, d.num_workers)
        val_items = load_items(work, f"fold{d.fold}_validation", d.max_cases)
        self.val_data = make_dataset(val_items, validation_transforms(plan), d.cache_rate, None, d.num_workers)
        self.schedule, self.loss_fn = Schedule.from_config(cfg), segmentation_loss(plan)

    def _batches(self, seed: int, iterations: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from dints3d.data.stream import PatchStream, stream_loader

        d = self.cfg.data
        stream = PatchStream(self.train_data, seed, 0, iterations * d.batch_size)
        for batch in stream_loader(stream, d.batch_size, d.num_workers):
            yield batch["image"], batch["label"]

    def __call__(self, arch, iterations: int, seed: int) -> Evaluation:
        from dints3d.search.validate_iou import validate_scores

        seed_everything(seed)
        in_channels, classes = int(self.plan["in_channels"]), int(self.plan["out_channels"])
        net = arch.build(in_channels, classes, channel_mul=self.cfg.train.channel_mul).to(self.rt.device)
        log = train_steps(net, self._batches(seed, iterations), iterations, self.schedule, self.rt, self.loss_fn)
        s = self.cfg.search
        scores = validate_scores(self.plan, net, (self.val_data[i] for i in range(len(self.val_data))), self.patch,
                                 self.rt.device, self.rt.autocast(self.schedule.amp), s.val_sw_batch_size,
                                 s.val_overlap)
        return Evaluation(mean_iou(scores), {"scores": scores, **log, "parameters": _count(net)})
