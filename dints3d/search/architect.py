"""The update rule of the bilevel search (DARTS' ``architect``): one weight step and one architecture step.

- Weight step: SGD with momentum on the supernet's weights (architecture frozen) minimising the segmentation loss of
  a batch from the ``weights`` half.
- Architecture step: Adam on each group of architecture parameters (α, β; weights frozen) minimising
  ``L_seg + ramp · Σ regularizers`` on a batch from the ``arch`` half (first-order: no unrolled weight step).

Both run under the run's autocast policy with their own GradScaler (fp16 on CUDA), average gradients over the ranks,
and skip the update without touching parameters or optimizer state when the loss is not finite on every rank.
"""

from __future__ import annotations

from typing import Callable

import torch

from dints3d.config import SearchConfig
from dints3d.spaces.base import SearchSpace
from dints3d.utils.runtime import Runtime


class Architect:
    """The optimizers of a search space and the two steps that use them.

    Args:
        space: the supernet.
        loss_fn: segmentation loss, ``(logits B K [spatial], labels B 1 [spatial]) → scalar``.
        settings: the run's ``search:`` section (learning rates, momentum, Adam settings, amp).
        runtime: device, autocast policy and ranks; learning rates scale with the number of ranks when
            ``settings.scale_lr``.
    """

    def __init__(self, space: SearchSpace, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 settings: SearchConfig, runtime: Runtime):
        self.space, self.loss_fn, self.settings, self.rt = space, loss_fn, settings, runtime
        scale = runtime.world_size if settings.scale_lr else 1
        self.base_lr = settings.lr * scale
        self.arch_lr = settings.arch_lr * scale
        self.weight_params = space.weight_parameters()
        self.opt_w = torch.optim.SGD(self.weight_params, lr=self.base_lr, momentum=settings.momentum,
                                     weight_decay=settings.weight_decay)
        arch_groups = space.arch_parameter_groups()
        self.arch_params = [p for group in arch_groups.values() for p in group]
        self.opt_arch = {
            name: torch.optim.Adam(params, lr=self.arch_lr, betas=tuple(settings.arch_betas),
                                   weight_decay=settings.arch_weight_decay)
            for name, params in arch_groups.items()
        }
        self.scaler_w = runtime.grad_scaler(settings.amp)
        self.scaler_a = runtime.grad_scaler(settings.amp)

    def _set_trainable(self, weights: bool) -> None:
        for p in self.weight_params:
            p.requires_grad_(weights)
        for p in self.arch_params:
            p.requires_grad_(not weights)

    def _finite(self, loss: torch.Tensor) -> bool:
        """Whether ``loss`` is finite on every rank (one host sync)."""
        return self.rt.all_true(bool(torch.isfinite(loss).item()))

    def weight_step(self, image: torch.Tensor, label: torch.Tensor, lr: float) -> torch.Tensor | None:
        """One SGD step on the weights at learning rate ``lr``; the detached loss, or ``None`` if it was not finite
        (nothing updated). ``image`` ``B C [patch]``, ``label`` ``B 1 [patch]``."""
        self._set_trainable(weights=True)
        for group in self.opt_w.param_groups:
            group["lr"] = lr
        self.opt_w.zero_grad(set_to_none=True)
        with self.rt.autocast(self.settings.amp):
            loss = self.loss_fn(self.space(image), label)
        if not self._finite(loss):
            return None
        self.scaler_w.scale(loss).backward()
        self.rt.average_gradients(self.weight_params)
        self.scaler_w.step(self.opt_w)
        self.scaler_w.update()
        return loss.detach()

    def arch_step(self, image: torch.Tensor, label: torch.Tensor, ramp: float) -> dict[str, torch.Tensor] | None:
        """One Adam step on the architecture parameters; the detached terms (``arch_seg`` and each regularizer),
        or ``None`` if the loss was not finite (nothing updated)."""
        self._set_trainable(weights=False)
        for opt in self.opt_arch.values():
            opt.zero_grad(set_to_none=True)
        with self.rt.autocast(self.settings.amp):
            seg = self.loss_fn(self.space(image), label)
        terms = self.space.regularizers(tuple(image.shape))
        loss = seg.float() + ramp * sum(terms.values())
        if not self._finite(loss):
            return None
        self.scaler_a.scale(loss).backward()
        self.rt.average_gradients(self.arch_params)
        for opt in self.opt_arch.values():
            self.scaler_a.step(opt)
        self.scaler_a.update()
        return {"arch_seg": seg.detach(), **{k: v.detach() for k, v in terms.items()}}

    def state_dict(self) -> dict:
        """The optimizers' and scalers' states (checkpoint keys ``opt_w``, ``opt_arch``, ``scaler_w``, ``scaler_a``)."""
        return {"opt_w": self.opt_w.state_dict(), "opt_arch": {k: o.state_dict() for k, o in self.opt_arch.items()},
                "scaler_w": self.scaler_w.state_dict(), "scaler_a": self.scaler_a.state_dict()}

    def load_state_dict(self, saved: dict) -> None:
        """Restore :meth:`state_dict`'s keys of a checkpoint, keeping this run's architecture learning rate (a resume
        may lower ``search.arch_lr`` or run on another number of processes; the weight step sets its own)."""
        self.opt_w.load_state_dict(saved["opt_w"])
        for k, o in self.opt_arch.items():
            o.load_state_dict(saved["opt_arch"][k])
            for group in o.param_groups:
                group["lr"] = self.arch_lr
        for scaler, key in ((self.scaler_w, "scaler_w"), (self.scaler_a, "scaler_a")):
            if saved[key] or not scaler.is_enabled():  # a run that turns amp on starts with a fresh scaler
                scaler.load_state_dict(saved[key])
