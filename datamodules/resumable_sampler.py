"""A shuffling sampler that can resume in the middle of an epoch, identically on every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized

import lightning as L
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, one shard per rank) that can skip the batches an
    interrupted run already trained on, so a run resumed mid-epoch sees exactly the batches the uninterrupted run
    would have seen. Being a ``DistributedSampler``, Lightning keeps it as is under DDP instead of wrapping it.

    With ``with_seeds=True`` it yields ``(index, (seed, epoch, index))`` pairs instead of indices: the entropy of
    the sample's own augmentation generator (``datamodules.xray_augment.sample_generator``), so augmentation does
    not depend on the global random state, on threads, on the number of workers or on prefetching, and a resumed
    run augments exactly as the uninterrupted one.

    ``samples_done`` is asked at the start of every epoch how many samples (on this rank) the epoch already
    trained on before an interruption; they are skipped.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 with_seeds: bool = False, samples_done: Callable[[], int] | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.with_seeds = with_seeds
        self.samples_done = samples_done

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, tuple[int, int, int]]]:
        indices = list(super().__iter__())
        skip = self.samples_done() if self.samples_done is not None else 0
        if not self.with_seeds:
            return iter(indices[skip:])
        return iter([(i, (self.seed, self.epoch, i)) for i in indices[skip:]])


def resumable_sampler(dataset: Sized, trainer: L.Trainer | None, batch_size: int, seed: int,
                      with_seeds: bool = False) -> ResumableSampler:
    """A sampler for the current trainer's rank layout that skips the batches already trained this epoch."""
    if trainer is None:
        return ResumableSampler(dataset, seed=seed, with_seeds=with_seeds)

    def samples_done() -> int:
        # Asked when an epoch's iterator is created. After a restore that is before Lightning resets its counters,
        # so ``processed`` counts the batches whose optimizer step is in the restored weights (a checkpoint written
        # in on_train_batch_end has processed = completed + 1).
        loop = trainer.fit_loop.epoch_loop
        return loop.batch_progress.current.processed * batch_size if loop.restarting else 0

    return ResumableSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, seed=seed,
                            with_seeds=with_seeds, samples_done=samples_done)
