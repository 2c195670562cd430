"""A shuffling sampler that can resume in the middle of an epoch, identically on every rank."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import lightning as L
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, one shard per rank) that can skip the batches an
    interrupted run already trained on, so a run resumed mid-epoch sees exactly the batches the uninterrupted run
    would have seen. Being a ``DistributedSampler``, Lightning keeps it as is under DDP instead of wrapping it.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # only the first epoch after a resume is shortened
        return iter(indices[skip:])


def resumable_sampler(dataset: Sized, trainer: L.Trainer | None, batch_size: int, seed: int) -> ResumableSampler:
    """A sampler for the current trainer's rank layout that skips the batches already trained this epoch."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=seed)
    if trainer is not None and trainer.fit_loop.restarting:
        sampler.skip = trainer.fit_loop.epoch_loop.batch_progress.current.completed * batch_size
    return sampler
