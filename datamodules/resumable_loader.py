"""Data loaders that Lightning can see are resumable mid-epoch: those over a :class:`ResumableSampler`."""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.resumable_sampler import ResumableSampler


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler`, with the ``state_dict`` / ``load_state_dict`` pair that
    tells Lightning it resumes mid-epoch (otherwise a mid-epoch resume warns "your dataloader is not resumable").

    The state is empty on purpose: the data position is Lightning's own loop counters, which the checkpoint
    already holds; the sampler reads them when the resumed epoch starts and skips the samples trained on.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load: the sampler finds its position from the restored loop counters."""


def data_loader(dataset: Dataset, sampler: Sampler | None = None, **kwargs: Any) -> DataLoader:
    """``DataLoader(dataset, sampler=sampler, **kwargs)``; a :class:`ResumableDataLoader` when ``sampler`` is a
    :class:`ResumableSampler` (the training split), a plain one otherwise."""
    cls = ResumableDataLoader if isinstance(sampler, ResumableSampler) else DataLoader
    return cls(dataset, sampler=sampler, **kwargs)
