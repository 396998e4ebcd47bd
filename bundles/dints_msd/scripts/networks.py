"""MONAI's DiNTS with a full-resolution skip: the stem's full-resolution features reach the output.

With ``use_downsample`` (the paper's stem), MONAI's DiNTS computes full-resolution features in its first stem
(``conv 3×3 → norm → act → conv 3×3 stride 2 → norm``) and then drops them: every searched cell runs at half
resolution or coarser, and the prediction is the half-resolution decoder output upsampled. Thin structures (a grey
matter ribbon, a small lesion) lose their edges there. :class:`DiNTSStemSkip` adds the first stem's normalised
full-resolution features to the upsampled decoder output before the final block, as a U-Net's first skip does. It
adds no parameter (the two summands both have ``filter_nums[0]`` channels) and one full-resolution feature map of
memory; the searched space, the cells and the weights' names are MONAI's, so a DiNTS state dict loads unchanged.

For anisotropic voxels (``stem_stride``, e.g. ``(2, 2, 1)`` for 0.8 × 0.8 × 2.8 mm) the stems halve only the finely
sampled axes, as nnU-Net's plans do: MONAI's stems halve every axis, so the coarse axis is undersampled from the
first cell on. The cells are unchanged (each later level halves every axis); only the strides of the stems' stride-2
convolutions and the last decoder upsampling follow ``stem_stride``.

Here, in the bundle's ``scripts/``, so that a bundle whose ``arch.json`` says ``"stem_skip": true`` builds with MONAI
alone (``_target_: scripts.networks.DiNTSStemSkip``). Shapes: ``B C_in [spatial]`` → ``B num_classes [spatial]``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from monai.networks.nets import DiNTS
from monai.networks.nets.dints import StemInterface


class DiNTSStemSkip(DiNTS):
    """``DiNTS`` whose prediction is ``stem_finals(decoder(x) + stem_0(x))``, ``stem_0`` the first stem's
    full-resolution ``conv → norm`` (``B filter_nums[0] [spatial]``). Needs ``use_downsample=True``: without the
    stride-2 stem the cells already run at full resolution. Arguments as MONAI's ``DiNTS``, and

    Args:
        stem_stride: the stems' downsampling per axis (each 1 or 2; ``None``: 2 on every axis, MONAI's). Depth d of
            the space then has ``spatial_a / (2^d · stem_stride_a)`` voxels along axis a.
    """

    def __init__(self, *args, stem_stride: Sequence[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if len(self.stem_down["0"].mod) != 6:
            raise ValueError("DiNTSStemSkip needs use_downsample=True (without the stride-2 stem there is no dropped "
                             "full-resolution level to skip)")
        if stem_stride is not None:
            stride = tuple(int(s) for s in stem_stride)
            if len(stride) != self._spatial_dims or not set(stride) <= {1, 2}:
                raise ValueError(f"stem_stride must be {self._spatial_dims} values of 1 or 2, got {list(stem_stride)}")
            for d in range(self.num_depths):
                self.stem_down[str(d)].mod[4].stride = stride
            self.stem_up["0"].mod[3].scale_factor = tuple(float(s) for s in stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B C_in [spatial]`` (each side a multiple of ``2 ** num_depths · stem_stride``) →
        ``B num_classes [spatial]``."""
        first = self.stem_down["0"].mod
        # the first stem, split after its full-resolution norm: that tensor is the skip (same ops as MONAI's stem)
        skip = first[2](first[1](first[0](x)))
        inputs = [first[5](first[4](first[3](skip)))]
        for d in range(1, self.num_depths):
            stem: StemInterface = self.stem_down[str(d)]
            out = stem.forward(x)
            inputs.append(out if self.node_a[0][d] else torch.zeros_like(out))
        if not self.node_a[0][0]:
            inputs[0] = torch.zeros_like(inputs[0])

        outputs = self.dints_space(inputs)

        last = self.num_blocks
        started = False
        decoded = torch.empty(0)
        for d in range(self.num_depths - 1, -1, -1):
            up: StemInterface = self.stem_up[str(d)]
            if started:
                decoded = up.forward(outputs[d] + decoded)
            elif self.node_a[last][d]:
                started = True
                decoded = up.forward(outputs[d])
        return self.stem_finals(decoded + skip)
