"""Short training schedules that score one random-search trial.

- :func:`train_steps`: SGD with momentum and the ``train:`` section's halving schedule on any stream of
  ``(image, label)`` batches, with the runtime's loss scaling under fp16 autocast (non-finite steps are skipped).
- :class:`NetworkEvaluator`: a whole discrete network (DiNTS baselines) trained on the fold's training patches and
  scored as the search validates (mean foreground Dice for MSD tasks, mean IoU for Cityscapes).
- :class:`HeadEvaluator`: a DPC head trained on cached backbone features and scored on the cached validation patches
  by the same metric, counted over all of them at once.

The loss is the task's (:func:`dints3d.data.losses.segmentation_loss`: DiceCE, or cross-entropy ignoring 255).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dints3d.config import Config
from dints3d.data.dataset import load_items, make_dataset
from dints3d.data.losses import segmentation_loss
from dints3d.data.stream import PatchStream, stream_loader
from dints3d.data.transforms import train_transforms, validation_transforms
from dints3d.evaluation.confusion import confusion_matrix, iou_per_class, mean_iou
from dints3d.evaluation.validation import validate_scores, validation_metric
from dints3d.random_search.engine import Evaluation
from dints3d.search.schedule import weight_lr_factor
from dints3d.utils.runtime import Runtime, seed_everything


@dataclass(frozen=True)
class Schedule:
    """Optimizer settings of a short run (from ``cfg.train``; unset ones are the DiNTS recipe's, whose halving
    schedule the short runs follow)."""

    lr: float
    momentum: float
    weight_decay: float
    decay_points: tuple[float, ...]
    amp: bool

    @classmethod
    def from_config(cls, cfg: Config) -> "Schedule":
        t = cfg.train
        settings = t.optimizer_settings("dints")
        return cls(settings["lr"], settings["momentum"], settings["weight_decay"], tuple(t.lr_decay_points), t.amp)


def train_steps(model: torch.nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], iterations: int,
                schedule: Schedule, runtime: Runtime, loss_fn: torch.nn.Module) -> dict:
    """``iterations`` SGD steps of ``loss_fn(model(image), label)`` over ``batches`` (``B C [spatial]`` images of any
    float dtype, e.g. cached float16 features, converted to float32 on the device; ``B 1 [spatial]`` labels; logits
    smaller than the label are resized to it). The loss is scaled by ``runtime.grad_scaler(schedule.amp)`` (enabled
    for fp16 autocast on CUDA, see :func:`dints3d.utils.runtime.amp_policy`). Returns the mean loss of the finite steps in
    the last tenth and the number of skipped non-finite steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)
    scaler = runtime.grad_scaler(schedule.amp)
    model.train()
    dev = runtime.device
    # running sums stay on the device: one host transfer at the end instead of one per step
    tail_sum = torch.zeros((), dtype=torch.float64, device=dev)
    tail_count = torch.zeros((), dtype=torch.int64, device=dev)
    skipped = torch.zeros((), dtype=torch.int64, device=dev)
    tail_start = iterations - max(1, iterations // 10)
    for t in range(iterations):
        image, label = next(batches)
        image = image.to(dev, non_blocking=True).float()
        label = label.to(dev, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = schedule.lr * weight_lr_factor(t, iterations, 0, schedule.decay_points)
        opt.zero_grad(set_to_none=True)
        with runtime.autocast(schedule.amp):
            logits = model(image)
        loss = loss_fn(resize_logits(logits.float(), label.shape[2:]), label)
        finite = torch.isfinite(loss.detach())
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            # a non-finite loss gives non-finite gradients, and the scaler's own check refuses the step (it reads
            # its found-inf flag on the host once per step, as the search loop's scalers do)
            scaler.step(opt)
            scaler.update()
        elif finite:
            # One host sync per step, kept on purpose: skipping an SGD step cannot be done on the device (zeroed
            # gradients would still apply momentum and weight decay). Without a scaler this is the CPU (where it costs
            # nothing) or CUDA with amp off.
            opt.step()
        skipped += ~finite
        if t >= tail_start:
            tail_sum += torch.where(finite, loss.detach().double(), 0.0)
            tail_count += finite
    total, count, nonfinite = torch.stack([tail_sum, tail_count.double(), skipped.double()]).tolist()
    return {"train_loss": total / count if count else math.nan, "nonfinite_steps": int(nonfinite)}


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """Logits at feature resolution → the label's size (bilinear / trilinear, as DeepLab upsamples its logits)."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return F.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)


def class_scores(matrix: torch.Tensor, metric: str) -> dict:
    """Per-class IoU (every class) and Dice (foreground classes; NaN where absent from the truth) from a
    ``C × (C + 1)`` confusion matrix (:func:`dints3d.evaluation.confusion.confusion_matrix`), their means over the defined
    values, and ``score``: the mean of ``metric`` (``"dice"`` or ``"iou"``, see
    :func:`dints3d.evaluation.validation.validation_metric`)."""
    m = matrix.double()
    tp, gt, pred = m.diagonal(), m.sum(1), m[:, : m.shape[0]].sum(0)
    dice = torch.where(gt > 0, 2 * tp / (gt + pred).clamp_min(1), torch.nan)[1:].tolist()
    iou = iou_per_class(matrix)
    means = {"mean_dice": mean_iou(dice), "mean_iou": mean_iou(iou)}  # mean_iou averages the non-NaN values
    return {"dice": dice, "iou": iou, **means, "score": means[f"mean_{metric}"]}


def cycling_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of ``(images[i], labels[i])``, a fresh seeded permutation per pass, on the tensors' device and
    in their dtype (cached float16 features stay float16: half the bytes to copy; :func:`train_steps` converts them
    on the device)."""
    rng = np.random.default_rng(seed)
    n = len(images)
    size = min(batch_size, n)
    while True:
        order = torch.as_tensor(rng.permutation(n)).to(images.device)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield images[idx], labels[idx]


#: cached features move to the GPU when they take at most this fraction of its free memory
DEVICE_CACHE_FRACTION = 0.25


def features_fit_on_device(nbytes: int, free_bytes: int) -> bool:
    """Whether ``nbytes`` of cached features should live on the GPU, given its ``free_bytes``."""
    return nbytes <= DEVICE_CACHE_FRACTION * free_bytes


def place_features(features, device: torch.device) -> None:
    """Put the cached tensors of ``features`` (``train_x``, ``train_y``, ``val_x``, ``val_y``) where the trials read
    them fastest: on a CUDA ``device`` when they fit (:func:`features_fit_on_device`), else in pinned host memory so
    the per-batch copies are asynchronous. On the CPU they stay as they are."""
    names = ("train_x", "train_y", "val_x", "val_y")
    if device.type != "cuda":
        return
    nbytes = sum(getattr(features, n).nbytes for n in names)
    on_device = features_fit_on_device(nbytes, torch.cuda.mem_get_info(device)[0])
    for n in names:
        tensor = getattr(features, n)
        setattr(features, n, tensor.to(device) if on_device else tensor.pin_memory())


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class HeadEvaluator:
    """Trains a DPC head on cached features (``features.train_x``, ``B C [feature spatial]``, float16) against the
    patches' labels and scores it on the cached validation features. The state returned is the head's. On a CUDA
    device the features are moved to it once (or pinned) by :func:`place_features`."""
    def __init__(self, features, plan: dict, schedule: Schedule, batch_size: int, runtime: Runtime):
        place_features(features, runtime.device)
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
        f, k, dev = self.features, self.num_classes, self.rt.device
        head.eval()
        total = torch.zeros(k, k + 1, dtype=torch.int64, device=dev)  # counted on the device, read once
        for start in range(0, len(f.val_x), self.batch_size):
            x = f.val_x[start : start + self.batch_size].to(dev, non_blocking=True).float()
            y = f.val_y[start : start + self.batch_size].to(dev, non_blocking=True)
            with self.rt.autocast(self.schedule.amp):
                logits = head(x)
            pred = resize_logits(logits.float(), y.shape[2:]).argmax(1)
            total += confusion_matrix(pred, y[:, 0], k)
        return class_scores(total.cpu(), self.metric)


class NetworkEvaluator:
    """Trains a whole discrete network (``arch.build(..., channel_mul=train.channel_mul)``, or the ``channel_mul``
    given to the call) on patches of the fold's training cases (both search halves) and scores it as the search
    validates (sliding windows; Dice or IoU)."""
    def __init__(self, cfg: Config, work, runtime: Runtime, plan: dict, patch: list[int]):
        self.cfg, self.rt, self.plan, self.patch = cfg, runtime, plan, patch
        d = cfg.data
        items = load_items(work, f"fold{d.fold}_train", d.max_cases)
        self.train_data = make_dataset(items, train_transforms(plan, patch, d.num_samples, d.augment),
                                       d.cache_rate, None, d.num_workers)
        val_items = load_items(work, f"fold{d.fold}_validation", d.max_cases)
        self.val_data = make_dataset(val_items, validation_transforms(plan), d.cache_rate, None, d.num_workers)
        self.schedule, self.loss_fn = Schedule.from_config(cfg), segmentation_loss(plan)

    def _batches(self, seed: int, iterations: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        d = self.cfg.data
        stream = PatchStream(self.train_data, seed, 0, iterations * d.batch_size)
        for batch in stream_loader(stream, d.batch_size, d.num_workers):
            yield batch["image"], batch["label"]

    def __call__(self, arch, iterations: int, seed: int, channel_mul: float | None = None) -> Evaluation:
        seed_everything(seed)
        in_channels, classes = int(self.plan["in_channels"]), int(self.plan["out_channels"])
        width = self.cfg.train.channel_mul if channel_mul is None else channel_mul
        net = arch.build(in_channels, classes, channel_mul=width).to(self.rt.device)
        log = train_steps(net, self._batches(seed, iterations), iterations, self.schedule, self.rt, self.loss_fn)
        s = self.cfg.search
        scores = validate_scores(self.plan, net, (self.val_data[i] for i in range(len(self.val_data))), self.patch,
                                 self.rt.device, self.rt.autocast(self.schedule.amp), s.val_sw_batch_size,
                                 s.val_overlap)
        return Evaluation(mean_iou(scores), {"scores": scores, **log, "parameters": _count(net)})
