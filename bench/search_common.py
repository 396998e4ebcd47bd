"""Shared by the search benchmarks: the plain-MONAI baseline search step and our loop's step on the same inputs.

Baseline = MONAI used as the DiNTS reference search script uses it: ``TopologySearch`` + ``DiNTS`` with MONAI's own
forward, ``DiceCELoss``; weight step = freeze α/β, forward, backward, SGD (momentum 0.9, wd 4e-5, on
``model.weight_parameters()``), ``loss.item()``; architecture step = freeze the weights, ``get_prob_a(child=True)``,
the two entropies, ``get_topology_entropy``, ``get_ram_cost_usage`` (usage and full), forward, backward, one Adam
step each for α and β, ``loss.item()``. (The reference also wraps its loop in ``torch.autograd.set_detect_anomaly``
and never calls ``zero_grad`` in the weight step; the baseline does neither: both would only slow it down or change
the maths.)

Ours = :class:`dints3d.search.loop.SearchRun`'s own ``weight_step`` and ``arch_step`` on a run built from a tiny
synthetic task (the data pipeline is not used: both sides get the same tensors), or, without the run around them
(no task, no TensorBoard: ``bench/gpu_check.py``), :class:`ArchitectStep`: the :class:`~dints3d.search.architect.
Architect` those methods call.

On CUDA both sides autocast in fp16 with a GradScaler (the reference script's ``torch.cuda.amp``, and dints3d's
policy, :func:`dints3d.utils.runtime.amp_policy`); on the CPU in bf16 without one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import DiNTS, TopologySearch

from dints3d.config import load_config
from dints3d.cost.memory import proc_status_kib
from dints3d.data.losses import dice_ce_loss
from dints3d.search.architect import Architect
from dints3d.spaces.factory import build_search_space
from dints3d.utils.runtime import Runtime, amp_policy

NUM_BLOCKS, NUM_DEPTHS, CHANNEL_MUL, CLASSES = 12, 4, 0.5, 3
LR, ARCH_LR, RAM_COST_FACTOR = 0.025, 0.001, 0.8


class MonaiSearchStep:
    """One bilevel iteration the way the reference script drives MONAI's classes."""

    def __init__(self, our_space, amp: bool, num_blocks: int = NUM_BLOCKS, num_depths: int = NUM_DEPTHS,
                 device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI keeps its own device for the tensors it makes
            self.space = TopologySearch(channel_mul=CHANNEL_MUL, num_blocks=num_blocks, num_depths=num_depths,
                                        use_downsample=True, device=str(self.device))
        self.model = DiNTS(dints_space=self.space, in_channels=1, num_classes=CLASSES, use_downsample=True)
        if our_space is not None:  # same initial weights as ours
            self.space.load_state_dict(our_space.topology_space.state_dict())
            self.model.load_state_dict(our_space.net.state_dict())
        self.model.to(self.device)  # the space (α, β included) is a submodule of the model
        self.amp = amp
        self.dtype, scaling = amp_policy(self.device.type, amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=scaling)
        self.loss_fn = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, squared_pred=True,
                                  batch=True, smooth_nr=1e-5, smooth_dr=1e-5)
        self.opt = torch.optim.SGD(self.model.weight_parameters(), lr=LR, momentum=0.9, weight_decay=4e-5)
        self.opt_a = torch.optim.Adam([self.space.log_alpha_a], lr=ARCH_LR, betas=(0.5, 0.999), weight_decay=0.0)
        self.opt_c = torch.optim.Adam([self.space.log_alpha_c], lr=ARCH_LR, betas=(0.5, 0.999), weight_decay=0.0)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def weight_step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        for p in self.model.weight_parameters():
            p.requires_grad = True
        self.space.log_alpha_a.requires_grad = False
        self.space.log_alpha_c.requires_grad = False
        self.opt.zero_grad()
        with self._autocast():
            loss = self.loss_fn(self.model(image), label)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.item()

    def arch_step(self, image: torch.Tensor, label: torch.Tensor) -> float:
        for p in self.model.weight_parameters():
            p.requires_grad = False
        self.space.log_alpha_a.requires_grad = True
        self.space.log_alpha_c.requires_grad = True
        probs_a, _ = self.space.get_prob_a(child=True)
        entropy_a = -(probs_a * torch.log(probs_a + 1e-5)).mean()
        entropy_c = -(F.softmax(self.space.log_alpha_c, dim=-1) * F.log_softmax(self.space.log_alpha_c, dim=-1)).mean()
        topology = self.space.get_topology_entropy(probs_a)
        full = self.space.get_ram_cost_usage(image.shape, full=True)
        usage = self.space.get_ram_cost_usage(image.shape)
        ram_loss = torch.abs(RAM_COST_FACTOR - usage / full)
        self.opt_a.zero_grad()
        self.opt_c.zero_grad()
        with self._autocast():
            loss = self.loss_fn(self.model(image), label)
            loss = loss + (entropy_a + entropy_c) + ram_loss + 0.001 * topology
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt_a)
        self.scaler.step(self.opt_c)
        self.scaler.update()
        return loss.item()

    def step(self, batches) -> float:
        (image, label), (a_image, a_label) = batches
        self.weight_step(image, label)
        return self.arch_step(a_image, a_label)


class OurSearchStep:
    """``SearchRun.weight_step`` + ``SearchRun.arch_step`` (regularizer ramp 1, the configured learning rate)."""

    def __init__(self, run):
        self.run = run

    def step(self, batches) -> float:
        (image, label), (a_image, a_label) = batches
        self.run.weight_step(image, label, LR)
        terms = self.run.arch_step(a_image, a_label, 1.0)
        return float(terms["arch_seg"])  # one host sync per iteration, like the baseline's loss.item()


class ArchitectStep:
    """Our two steps without a :class:`SearchRun` around them: the DiNTS supernet of :func:`search_overrides` on
    ``device`` and dints3d's :class:`Architect` (what ``SearchRun.weight_step`` / ``arch_step`` call), DiceCE, the
    regularizer ramp at 1. Needs no task folder and no TensorBoard."""

    def __init__(self, device: str | torch.device, amp: bool, checkpoint_cells: bool = False, fraction: float = 1.0,
                 num_blocks: int = NUM_BLOCKS, num_depths: int = NUM_DEPTHS, routing: bool = True):
        overrides = search_overrides(32, amp, checkpoint_cells, fraction, num_blocks, routing, num_depths)
        cfg = load_config(None, [o for o in overrides if not o.startswith("device=")])
        runtime = Runtime(device=torch.device(device))
        self.space = build_search_space(cfg, 1, CLASSES).to(runtime.device)
        self.architect = Architect(self.space, dice_ce_loss(), cfg.search, runtime)

    def step(self, batches) -> float:
        (image, label), (a_image, a_label) = batches
        self.architect.weight_step(image, label, LR)
        terms = self.architect.arch_step(a_image, a_label, 1.0)
        return float(terms["arch_seg"]) if terms is not None else float("nan")


def search_overrides(side: int, amp: bool, checkpoint_cells: bool = False, fraction: float = 1.0,
                     num_blocks: int = NUM_BLOCKS, routing: bool = True, num_depths: int = NUM_DEPTHS) -> list[str]:
    return ["device=cpu", f"dints.num_blocks={num_blocks}", f"dints.num_depths={num_depths}",
            f"dints.channel_mul={CHANNEL_MUL}", f"data.patch_size=[{side},{side},{side}]", "data.max_cases=2",
            "data.num_samples=1", "data.batch_size=1", f"search.amp={str(amp).lower()}", f"search.lr={LR}",
            f"search.arch_lr={ARCH_LR}", f"search.ram_cost_factor={RAM_COST_FACTOR}",
            f"search.checkpoint_cells={str(checkpoint_cells).lower()}", f"search.checkpoint_fraction={fraction}",
            f"search.cpu_conv_routing={str(routing).lower()}",
            "search.iterations=10"]


@contextlib.contextmanager
def our_search_run(side: int, amp: bool, checkpoint_cells: bool = False, fraction: float = 1.0, seed: int = 0,
                   num_blocks: int = NUM_BLOCKS, routing: bool = True, num_depths: int = NUM_DEPTHS):
    """A :class:`SearchRun` on a 6-case synthetic task in a temporary folder (closed and removed afterwards)."""
    from dints3d.config import load_config
    from dints3d.data.prepare import prepare
    from dints3d.data.synthetic import make_msd_task
    from dints3d.search.loop import SearchRun
    from dints3d.utils.runtime import init_runtime

    with tempfile.TemporaryDirectory(prefix="dints3d-bench-") as tmp:
        root = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()):
            task = make_msd_task(root / "task", cases=6, test_cases=0, classes=CLASSES - 1, size=24, seed=seed)
            prepare(task, root / "work", folds=3, progress=False)
        cfg = load_config(None, search_overrides(side, amp, checkpoint_cells, fraction, num_blocks, routing,
                                                 num_depths))
        run = SearchRun(cfg, root / "work", root / "run", init_runtime("cpu"))
        try:
            yield run
        finally:
            run.close()


def make_batches(side: int, seed: int, device: str | torch.device = "cpu"):
    """Two (image, label) pairs (weights half, architecture half), ``1×1×side³`` and ``1×1×side³`` in 0..2, on
    ``device`` (drawn on the CPU, so the values do not depend on it)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 1, side, side, side, generator=g).to(device),
             torch.randint(0, CLASSES, (1, 1, side, side, side), generator=g).to(device)) for _ in range(2)]


def measure_step_peak(step, batches, warm_batches) -> dict:
    """One warm-up step on ``warm_batches`` (pages in kernels, creates the optimizer state), then one timed step on
    ``batches`` with the peak-RSS counter reset (``/proc/self/clear_refs``): ``peak_mib`` = VmHWM − VmRSS before
    the step, so activations, gradients and transient buffers count and the resident model does not. Linux only;
    run it in a fresh process (:func:`run_in_fresh_process`)."""
    step.step(warm_batches)
    rss = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    step.step(batches)
    seconds = time.perf_counter() - start
    return {"peak_mib": (proc_status_kib("VmHWM") - rss) / 1024, "seconds": seconds, "rss_before_mib": rss / 1024}


def run_in_fresh_process(script: str, spec: dict, threads: int) -> dict:
    """``python script --child JSON(spec)`` in a fresh interpreter; returns the JSON its last stdout line prints.

    ``MALLOC_MMAP_THRESHOLD_`` is fixed so freed tensors leave the RSS (and the peak measures live memory); it also
    makes every large allocation a fresh mmap, so times printed by such children are inflated."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, script, "--child", json.dumps(spec)], env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
