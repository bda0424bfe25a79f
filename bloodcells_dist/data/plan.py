"""The epoch plan: which samples each rank trains on at each micro-batch, for the cache and the stream.

Cache: each epoch is one seeded permutation of all training samples (seed, epoch), cut into global batches
of batch_size x processes x grad_accum; rank r takes its slice of each global batch. Every sample is used
exactly once per epoch except a remainder smaller than one global batch, which changes with the epoch.
The plan depends on the samples, seed, epoch, global batch and world size only, never on data workers;
resuming is an offset into it.

Stream: the epoch's shard order (seeded) lists the samples; each (rank, worker) slot reads one contiguous,
disjoint range of that list, as long as the batches it must deliver (the same on every rank), so every
sample is read at most once per epoch and the remainder is smaller than one global batch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..cli import UserError


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any values, the same in every process and Python run (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class EpochPlan:
    """Global-batch bookkeeping shared by both data paths: step counts and the cache's sample order."""

    samples: int  # training samples
    batch_size: int  # per process, per micro-batch
    world_size: int
    grad_accum: int = 1
    seed: int = 0
    shuffle: bool = True
    # Several datasets in one run: per dataset (its training samples, its sampling weight), in the order their
    # rows are concatenated; `samples` is then the epoch's length, sum(round(weight x size)). Empty: one dataset,
    # every sample once per epoch.
    parts: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.parts and self.samples != sum(take_of(size, weight) for size, weight in self.parts):
            raise ValueError("samples must be the epoch's length, sum(round(weight x size)) over the parts")
        if self.samples < self.global_batch:
            raise UserError(f"{self.samples} training samples are fewer than one optimizer step needs "
                            f"(batch_size {self.batch_size} x {self.world_size} process(es) x grad_accum "
                            f"{self.grad_accum})")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all ranks together."""
        return self.batch_size * self.world_size * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the same on every rank."""
        return self.samples // self.global_batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches each rank runs per epoch."""
        return self.steps_per_epoch * self.grad_accum

    @property
    def remainder(self) -> int:
        """Samples left out of each epoch (fewer than one global batch)."""
        return self.samples - self.steps_per_epoch * self.global_batch

    def left_out_warning(self, share: float = 0.1) -> str:
        """'' or one line when more than `share` of the samples sit out every epoch, naming the batch_size (at most
        this one) that leaves the fewest out."""
        if self.remainder <= share * self.samples:
            return ""
        per_sample = self.world_size * self.grad_accum  # a global batch is batch_size times this
        best = min(range(1, self.batch_size + 1), key=lambda b: (self.samples % (b * per_sample), -b))
        return (f"{self.remainder} of {self.samples} training samples ({self.remainder / self.samples:.0%}) are left "
                f"out of every epoch (a global batch of {self.global_batch} fits {self.steps_per_epoch} time(s)); "
                f"batch_size {best} would leave {self.samples % (best * per_sample)} out")

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of sample positions 0..samples-1 (identity without shuffle); with parts, the
        epoch's positions (weighted_positions) in a seeded order."""
        positions = self.weighted_positions(epoch) if self.parts else torch.arange(self.samples)
        if not self.shuffle:
            return positions
        generator = torch.Generator().manual_seed(stable_seed(self.seed, epoch, "plan"))
        return positions[torch.randperm(self.samples, generator=generator)]

    def weighted_positions(self, epoch: int) -> torch.Tensor:
        """The epoch's sample positions over the parts: part d (rows offset_d .. offset_d + size_d - 1) gives
        round(weight_d x size_d) samples, read from its endless sequence of seeded permutations, epoch after
        epoch. Weight 1: each sample of the part exactly once per epoch; 2: twice; 0.5: half of them, the other
        half the next epoch."""
        chunks, offset = [], 0
        for index, (size, weight) in enumerate(self.parts):
            take = take_of(size, weight)
            begin = epoch * take
            cycles = range(begin // size, (begin + take - 1) // size + 1)
            sequence = torch.cat([self.part_cycle(index, cycle, size) for cycle in cycles])
            start = begin - cycles[0] * size
            chunks.append(sequence[start:start + take] + offset)
            offset += size
        return torch.cat(chunks)

    def part_cycle(self, part: int, cycle: int, size: int) -> torch.Tensor:
        """The cycle-th pass over a part: a seeded permutation of 0..size-1 (in order without shuffle)."""
        if not self.shuffle:
            return torch.arange(size)
        return torch.randperm(size, generator=torch.Generator().manual_seed(stable_seed(self.seed, part, cycle, "part")))

    def rank_batches(self, epoch: int, rank: int, start: int = 0) -> torch.Tensor:
        """(micro_batches - start, batch_size) sample positions: rank's micro-batches from `start` on."""
        used = self.order(epoch)[: self.steps_per_epoch * self.global_batch]
        # (step, accumulation micro-batch, rank, sample): micro-batch m of rank r at step s.
        grid = used.view(self.steps_per_epoch, self.grad_accum, self.world_size, self.batch_size)
        return grid[:, :, rank].reshape(self.micro_batches, self.batch_size)[start:]


def take_of(size: int, weight: float) -> int:
    """Samples a part of `size` samples gives an epoch at sampling weight `weight` (at least one)."""
    return max(1, round(weight * size))


def shard_order(shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of shard indices, the same on every rank."""
    order = list(range(shards))
    if shuffle:
        random.Random(stable_seed(seed, epoch, "shards")).shuffle(order)
    return order


def stream_quota(micro_batches: int, worker: int, workers: int) -> int:
    """Batches worker `worker` of a rank delivers: the DataLoader takes batch j from worker j % workers."""
    return len(range(worker, micro_batches, workers))


def slot_ranges(positions: Sequence[Sequence[int]], plan: EpochPlan, *, epoch: int, rank: int,
                workers: int) -> list[list[tuple[int, list[int]]]]:
    """Per worker of `rank`: its (shard index, in-shard positions) to read this epoch, in reading order.

    positions[s] lists the selected (e.g. in-fold) samples of shard s by their position in the tar. The
    shards are concatenated in the epoch's order; slot (rank, worker) gets the contiguous range after all
    slots of lower ranks and workers, as long as its quota of batches needs.
    """
    order = shard_order(len(positions), seed=plan.seed, epoch=epoch, shuffle=plan.shuffle)
    sequence = [(s, p) for s in order for p in positions[s]]
    lengths = [stream_quota(plan.micro_batches, w, workers) * plan.batch_size
               for _ in range(plan.world_size) for w in range(workers)]
    slot = rank * workers
    begin = sum(lengths[:slot])
    ranges = []
    for w in range(workers):
        piece = sequence[begin: begin + lengths[slot + w]]
        begin += lengths[slot + w]
        grouped: list[tuple[int, list[int]]] = []
        for shard, position in piece:
            if not grouped or grouped[-1][0] != shard:
                grouped.append((shard, []))
            grouped[-1][1].append(position)
        ranges.append(grouped)
    return ranges
