"""Resumable, distributed batch samplers: fixed batch size (NeMo) or duration-bucketed (lhotse-style).

Both yield ``(epoch, batch_index, indices)`` keys for :class:`~nest_fast.data.dataset.SeededBatchDataset` and
hold only numpy arrays (a permutation, batch boundaries), never per-item Python objects.

* :class:`FixedBatchSampler` — ``torch.utils.data.DistributedSampler`` order (``randperm`` seeded with
  ``seed + epoch``; ``drop_last`` trims to a multiple of the world size, otherwise it pads by wrapping; rank
  ``r`` takes ``perm[r::world]``), cut into batches of ``batch_size`` (the last partial batch dropped when
  ``drop_last``). This is what NeMo's map-style loader does under Lightning DDP.
* :class:`BucketingBatchSampler` — sorts shuffled pools of items by duration and packs batches up to a total of
  ``batch_duration`` audio seconds (lhotse's ``batch_duration``), optionally capped at ``max_batch_size``;
  batch order is shuffled; rank ``r`` takes every ``world``-th batch (all ranks get the same count). Batches of
  similar lengths waste little padding.

Resume: ``set_position(epoch, next_batch)`` makes the next iteration of that epoch start at ``next_batch``.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch


class _ResumableSampler(torch.utils.data.Sampler):
    def __init__(self, shuffle: bool, seed: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, int(seed), int(rank), int(world_size)
        self.epoch = 0
        self._resume: Optional[Tuple[int, int]] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_position(self, epoch: int, next_batch: int) -> None:
        """Start epoch ``epoch`` at batch ``next_batch`` (once), e.g. when resuming from a checkpoint."""
        self._resume = (int(epoch), int(next_batch))

    def batches(self, epoch: int) -> List[np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.batches(self.epoch))

    def __iter__(self) -> Iterator[Tuple[int, int, List[int]]]:
        epoch = self.epoch
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
            self._resume = None
        for k, idx in enumerate(self.batches(epoch)):
            if k >= start:
                yield epoch, k, idx.tolist()

    def _perm(self, n: int, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n, dtype=np.int64)
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)
        return torch.randperm(n, generator=g).numpy()


class FixedBatchSampler(_ResumableSampler):
    """Batches of ``batch_size`` items in DistributedSampler order (see the module doc)."""

    def __init__(self, num_items: int, batch_size: int, shuffle: bool = True, drop_last: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(shuffle, seed, rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_items, self.batch_size, self.drop_last = int(num_items), int(batch_size), drop_last

    def batches(self, epoch: int) -> List[np.ndarray]:
        n, w = self.num_items, self.world_size
        perm = self._perm(n, epoch)
        if self.drop_last and n % w:
            perm = perm[: n - n % w]
        elif n % w:
            pad = w - n % w
            perm = np.concatenate([perm, np.resize(perm, pad)])
        mine = perm[self.rank::w]
        nb = len(mine) // self.batch_size if self.drop_last else -(-len(mine) // self.batch_size)
        return [mine[k * self.batch_size:(k + 1) * self.batch_size] for k in range(nb)]


class BucketingBatchSampler(_ResumableSampler):
    """Duration-budget batches (see the module doc). ``durations`` in seconds, one per item."""

    def __init__(self, durations, batch_duration: float, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, max_batch_size: Optional[int] = None, pool_size: int = 10000,
                 drop_last: bool = True):
        super().__init__(shuffle, seed, rank, world_size)
        self.durations = np.asarray(durations, dtype=np.float64)
        if np.isnan(self.durations).any():
            raise ValueError("duration bucketing needs a 'duration' for every manifest item "
                             f"({int(np.isnan(self.durations).sum())} items have none)")
        if batch_duration <= 0:
            raise ValueError(f"batch_duration must be > 0 seconds, got {batch_duration}")
        self.batch_duration, self.max_batch_size = float(batch_duration), max_batch_size
        self.pool_size, self.drop_last = int(pool_size), drop_last
        self._cache: Tuple[int, List[np.ndarray]] = (-1, [])

    def _all_batches(self, epoch: int) -> List[np.ndarray]:
        perm = self._perm(len(self.durations), epoch)
        out: List[np.ndarray] = []
        for p0 in range(0, len(perm), self.pool_size):
            pool = perm[p0:p0 + self.pool_size]
            pool = pool[np.argsort(self.durations[pool], kind="stable")]
            cur: List[int] = []
            total = 0.0
            for i in pool.tolist():
                d = self.durations[i]
                full = cur and (total + d > self.batch_duration
                                or (self.max_batch_size is not None and len(cur) >= self.max_batch_size))
                if full:
                    out.append(np.asarray(cur, dtype=np.int64))
                    cur, total = [], 0.0
                cur.append(i)
                total += d
            if cur:
                out.append(np.asarray(cur, dtype=np.int64))
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch + 7919)
            out = [out[j] for j in torch.randperm(len(out), generator=g).tolist()]
        return out

    def batches(self, epoch: int) -> List[np.ndarray]:
        if self._cache[0] != epoch:
            allb = self._all_batches(epoch)
            per_rank = len(allb) // self.world_size if self.drop_last else -(-len(allb) // self.world_size)
            mine = allb[self.rank::self.world_size][:per_rank]
            while len(mine) < per_rank:  # not drop_last: wrap around so every rank has the same count
                mine.append(allb[len(mine) % len(allb)])
            self._cache = (epoch, mine)
        return self._cache[1]
