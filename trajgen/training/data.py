"""Batch streams whose position is part of the checkpoint.

The Trainer accepts four kinds of ``data``; each becomes a stream with ``next()``,
``state_dict()`` and ``load_state_dict()``:

* ``sample_batch(generator) -> batch`` (a callable): the Trainer owns a CPU ``torch.Generator``
  seeded per rank; its state is checkpointed, so resume is exact. Preferred for synthetic data
  and simulators.
* a map-style ``Dataset`` (has ``__len__``): the Trainer builds a ``DataLoader`` with
  ``config.batch_size``, ``config.num_workers`` and a ``DistributedSampler`` (shuffle, seeded,
  ``drop_last``; it also partitions the data across torchrun ranks). Position = (epoch, batches
  into the epoch); resume is exact.
* a ``DataLoader`` you built: same (epoch, offset) bookkeeping. At each epoch start the Trainer
  calls ``sampler.set_epoch(epoch)`` if the sampler has it, or re-seeds a ``RandomSampler``'s
  generator from (seed, rank, epoch). Resume re-creates the epoch's iterator and skips the
  batches already used (they are loaded again, so this costs data-loading time). Exact when the
  loader's order is determined by its sampler; ``persistent_workers=True`` with random
  augmentation in workers is not exact. Under torchrun, pass a ``DistributedSampler`` to
  partition data across ranks (a re-seeded ``RandomSampler`` only gives each rank its own order).
* an ``IterableDataset``: batched by a ``DataLoader`` with ``config.batch_size`` and then treated
  like any other iterable (below); it must shard itself across ranks/workers.
* any other iterable: re-iterated each pass, resumed by skipping; exact only if every pass
  yields the same sequence. A one-shot iterator cannot be rewound: it continues where it is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``(seed, rank, stream_id)``)."""
    words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class BatchStream(Protocol):
    """What the Trainer pulls batches from."""

    def next(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SamplerStream:
    """Calls ``sample_batch(generator)`` with a generator seeded from ``seed``."""

    kind = "sampler"

    def __init__(self, sample_batch: Callable[[torch.Generator], Any], seed: int) -> None:
        self.sample_batch = sample_batch
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def next(self) -> Any:
        """One batch from ``sample_batch(self.generator)``."""
        return self.sample_batch(self.generator)

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "sampler", "generator": uint8 tensor}``."""
        return {"kind": self.kind, "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the generator state."""
        _check_kind(state, self.kind)
        self.generator.set_state(state["generator"])


class IterableStream:
    """Cycles over a re-iterable (DataLoader or other), tracking (epoch, offset)."""

    kind = "iterable"

    def __init__(self, iterable: Iterable[Any], seed: int, rank: int = 0) -> None:
        self.iterable = iterable
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.offset = 0
        self._iter: Iterator[Any] | None = None
        self._one_shot = iter(iterable) is iterable if not isinstance(iterable, DataLoader) else False

    def _start_epoch(self) -> Iterator[Any]:
        """Prepare the sampler for ``self.epoch`` and create the iterator without touching global RNG."""
        if isinstance(self.iterable, DataLoader):
            sampler = self.iterable.sampler
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            elif isinstance(sampler, RandomSampler):
                sampler.generator = torch.Generator().manual_seed(
                    derive_seed(self.seed, self.rank, self.epoch)
                )
        with torch.random.fork_rng(devices=[]):
            # DataLoader draws its workers' base seed from the global RNG here; pin it per epoch.
            torch.manual_seed(derive_seed(self.seed, self.rank, self.epoch, 1))
            return iter(self.iterable)

    def next(self) -> Any:
        """Next batch; starts a new pass (epoch) when the current one ends."""
        for _ in range(2):
            if self._iter is None:
                self._iter = self._start_epoch()
                self._skip(self.offset)
            try:
                batch = next(self._iter)
            except StopIteration:
                if self._one_shot:
                    raise RuntimeError(
                        "the data iterator is exhausted; pass a re-iterable, a Dataset or "
                        "a sample_batch(generator) callable to train for more steps"
                    ) from None
                self._iter, self.epoch, self.offset = None, self.epoch + 1, 0
                continue
            self.offset += 1
            return batch
        raise RuntimeError(
            "the data iterable yielded no batches (empty dataset, or drop_last with "
            "fewer samples than batch_size?)"
        )

    def _skip(self, n: int) -> None:
        """Advance the fresh iterator by ``n`` batches (resume within an epoch)."""
        assert self._iter is not None
        if n and self._one_shot:
            warnings.warn(
                "cannot rewind a one-shot iterator on resume; it continues from its current position",
                stacklevel=3,
            )
            return
        for i in range(n):
            try:
                next(self._iter)
            except StopIteration:
                raise RuntimeError(
                    f"data has only {i} batches per pass but the checkpoint was {n} batches "
                    "into one; did the dataset or batch size change?"
                ) from None

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "iterable", "epoch": int, "offset": int}``."""
        return {"kind": self.kind, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore (epoch, offset); the next ``next()`` re-creates that epoch and skips ``offset``."""
        _check_kind(state, self.kind)
        self.epoch, self.offset, self._iter = int(state["epoch"]), int(state["offset"]), None


def _check_kind(state: Mapping[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(
            f"checkpoint data state is of kind {state.get('kind')!r} but this Trainer's data is "
            f"{kind!r}; resume with the same kind of data source"
        )


def make_stream(
    data: Any, *, seed: int, rank: int, world_size: int, batch_size: int, num_workers: int, pin_memory: bool
) -> SamplerStream | IterableStream:
    """Wrap ``data`` (callable, Dataset, DataLoader or iterable) in a resumable stream.

    Args:
        data: see the module docstring.
        seed: run seed; streams derive per-rank seeds from (seed, rank).
        rank / world_size: this process's place in a torchrun job.
        batch_size / num_workers / pin_memory: used only when ``data`` is a map-style Dataset.
    """
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        sampler = DistributedSampler(
            data, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        return IterableStream(loader, seed, rank)
    if isinstance(data, IterableDataset):  # yields samples: batch them (order is the dataset's business)
        return IterableStream(
            DataLoader(data, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory),
            seed,
            rank,
        )
    if isinstance(data, DataLoader) or (isinstance(data, Iterable) and not callable(data)):
        return IterableStream(data, seed, rank)
    if callable(data):
        return SamplerStream(data, derive_seed(seed, rank, 0))
    raise TypeError(
        f"data must be a sample_batch(generator) callable, a Dataset, a DataLoader or an iterable; "
        f"got {type(data).__name__}"
    )
