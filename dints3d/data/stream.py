"""Deterministic, resumable patch streams.

Sample ``k`` of a stream is a pure function of ``(seed, stream, k)``: which case it comes from (a seeded
permutation per epoch) and the random state of every random transform. A run that stops at iteration ``t`` and
resumes therefore sees exactly the patches an uninterrupted run would, without saving any loader or transform
state, with any number of loader workers. Under ``torchrun`` each rank reads every ``world_size``-th sample.
A resumed run passes the number of samples all ranks consumed before (``offset``, saved in the checkpoint), so
it continues with the next unseen sample whatever the number of processes was and is.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import Compose

from dints3d.data.dataset import make_loader


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)[0])


class PatchStream(torch.utils.data.Dataset):
    """Index ``i`` → the ``i``-th sample a rank reads (a list of ``num_samples`` patch dicts), which is sample
    ``k = offset + i·world_size + rank`` of the global sequence.

    Args:
        base: a MONAI (Cache/Persistent)Dataset whose ``transform`` is a ``Compose`` ending in random steps.
        seed, stream: identify the stream (e.g. stream 0 = weights half, 1 = arch half).
        length: number of samples this rank will read.
        rank, world_size: ranks interleave the global sample sequence.
        offset: global samples already consumed (by all ranks of earlier sessions together).
    """

    def __init__(self, base: torch.utils.data.Dataset, seed: int, stream: int, length: int,
                 rank: int = 0, world_size: int = 1, offset: int = 0):
        self.base, self.seed, self.stream, self.length = base, seed, stream, length
        self.rank, self.world_size, self.offset = rank, world_size, offset
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.length

    def case_index(self, k: int) -> int:
        n = len(self.base)
        epoch, offset = divmod(k, n)
        perm = self._permutations.get(epoch)
        if perm is None:
            perm = np.random.default_rng(_derived_seed(self.seed, self.stream, epoch)).permutation(n)
            self._permutations = {epoch: perm}
        return int(perm[offset])

    def __getitem__(self, i: int):
        k = self.offset + i * self.world_size + self.rank
        transform = getattr(self.base, "transform", None)
        if isinstance(transform, Compose):
            transform.set_random_state(seed=_derived_seed(self.seed, self.stream, k, 1))
        return self.base[self.case_index(k)]


def stream_loader(stream: PatchStream, batch_size: int, num_workers: int = 0, gpu_cache: bool = False):
    """A persistent loader over ``stream``'s batches in order (no shuffling: the stream is already shuffled
    deterministically; a resumed run starts the stream at its ``offset``)."""
    return make_loader(stream, batch_size=batch_size, shuffle=False, num_workers=num_workers, gpu_cache=gpu_cache)
