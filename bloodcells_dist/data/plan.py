"""The epoch plan: which samples each rank trains on at each micro-batch, for the cache and the stream.

Every optimizer step takes one global batch (`global_batch` samples) of the epoch's global order; the last step
of an epoch takes the remainder (a short step) where that gives every micro-batch of every rank a sample, so
fewer than processes x grad_accum samples sit out an epoch. A step's samples are split over (micro-batch, rank)
as evenly as possible (sizes differ by at most one); the trainer weighs each micro-batch's loss by its share of
the global batch, so a short or uneven step counts each sample as a full one does.

Cache: each epoch is one seeded permutation of all training samples (seed, epoch); step s takes positions
s x global_batch onwards, whatever the number of processes: resuming, on any number of processes, is an offset.

Stream: the epoch's shard order (seeded) lists the samples (the pool); each (rank, worker) slot reads one
contiguous, disjoint range of the pool, as long as the batches it must deliver, so every sample is read at
most once per epoch. A run resumed mid-epoch on another layout (processes, grad_accum, data workers) starts a
new segment: its pool is what the earlier segments left unread (stream.py replays them), dealt anew.
"""

from __future__ import annotations

import dataclasses
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
class Segment:
    """A stretch of an epoch trained on one layout: from the epoch's optimizer step `step` on, `processes` ranks of
    `grad_accum` micro-batches per step, each rank reading the stream with `workers` slots (data workers, at least 1)."""

    step: int
    processes: int
    grad_accum: int
    workers: int


@dataclass(frozen=True)
class EpochPlan:
    """Global-batch bookkeeping shared by both data paths: step counts, micro-batch sizes, the cache's order."""

    samples: int  # training samples
    batch_size: int  # per process, per micro-batch, as configured (what a micro-batch holds when the split is even)
    world_size: int
    grad_accum: int = 1
    seed: int = 0
    shuffle: bool = True
    # Several datasets in one run: per dataset (its training samples, its sampling weight), in the order their
    # rows are concatenated; `samples` is then the epoch's length, sum(round(weight x size)). Empty: one dataset,
    # every sample once per epoch.
    parts: tuple[tuple[int, float], ...] = ()
    step_samples: int = 0  # the global batch; 0: batch_size x world_size x grad_accum (a resumed run keeps its own)
    short_step: bool | None = None  # whether an epoch ends in a short step; None: where the remainder allows one

    def __post_init__(self) -> None:
        if self.parts and self.samples != sum(take_of(size, weight) for size, weight in self.parts):
            raise ValueError("samples must be the epoch's length, sum(round(weight x size)) over the parts")
        if self.short_step and self.samples % self.global_batch < self.slices:
            raise ValueError("a short step needs a sample for every micro-batch of every rank")
        if self.steps_per_epoch == 0:
            raise UserError(f"{self.samples} training samples are fewer than one optimizer step needs "
                            f"({self.world_size} process(es) x grad_accum {self.grad_accum} micro-batches, each of "
                            f"at least one sample, and batch_size {self.batch_size})")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step, all ranks together (a short last step takes fewer)."""
        return self.step_samples or self.batch_size * self.world_size * self.grad_accum

    @property
    def slices(self) -> int:
        """Micro-batches per step, all ranks together."""
        return self.world_size * self.grad_accum

    @property
    def has_short_step(self) -> bool:
        """Whether the epoch's last step takes the remainder of the global batches."""
        short = self.samples % self.global_batch
        return bool(short) and (self.short_step if self.short_step is not None else short >= self.slices)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the same on every rank."""
        return self.samples // self.global_batch + self.has_short_step

    @property
    def micro_batches(self) -> int:
        """Micro-batches each rank runs per epoch."""
        return self.steps_per_epoch * self.grad_accum

    @property
    def used(self) -> int:
        """Samples each epoch trains on."""
        return min(self.samples, self.steps_per_epoch * self.global_batch)

    @property
    def remainder(self) -> int:
        """Samples left out of each epoch (fewer than processes x grad_accum)."""
        return self.samples - self.used

    def step_split(self, step: int) -> list[int]:
        """Sizes of step `step`'s micro-batches in (micro-batch, rank) order, as even as can be."""
        n = min(self.global_batch, self.used - step * self.global_batch)
        base, extra = divmod(n, self.slices)
        return [base + (j < extra) for j in range(self.slices)]

    def rank_slices(self, rank: int, step: int = 0) -> list[slice]:
        """Where rank's micro-batches lie in the epoch's order, from optimizer step `step` on."""
        slices = []
        for s in range(step, self.steps_per_epoch):
            sizes, begin = self.step_split(s), s * self.global_batch
            for micro in range(self.grad_accum):
                j = micro * self.world_size + rank
                first = begin + sum(sizes[:j])
                slices.append(slice(first, first + sizes[j]))
        return slices

    def rank_sizes(self, rank: int, step: int = 0) -> list[int]:
        """Sizes of rank's micro-batches from optimizer step `step` on."""
        return [s.stop - s.start for s in self.rank_slices(rank, step)]

    def rank_batches(self, epoch: int, rank: int, step: int = 0) -> list[torch.Tensor]:
        """Sample positions of rank's micro-batches of the epoch from optimizer step `step` on."""
        order = self.order(epoch)
        return [order[s] for s in self.rank_slices(rank, step)]

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

    def resumed_on(self, saved: dict) -> EpochPlan:
        """This plan (built for this launch's processes) made to continue a run saved with `saved` layout: the run's
        global batch and steps per epoch kept; grad_accum as small as keeps micro-batches within batch_size (smaller
        where the short step needs it). Unchanged for the same number of processes."""
        if saved.get("processes", self.world_size) == self.world_size:
            return self
        total = saved.get("global_batch") or saved["batch_size"] * saved["processes"] * saved["grad_accum"]
        short = saved.get("steps_per_epoch", 0) > self.samples // total
        fewest = self.samples % total if short else total  # the smallest step's samples
        if fewest < self.world_size:
            raise UserError(f"cannot resume on {self.world_size} processes: a step of this run holds only {fewest} "
                            f"samples, fewer than one per process; resume on at most {fewest}")
        accum = min(-(-total // (self.world_size * self.batch_size)), fewest // self.world_size)
        return dataclasses.replace(self, grad_accum=accum, step_samples=total, short_step=short)

    def layout_line(self) -> str:
        """How a step's global batch is split over this plan's processes and micro-batches."""
        sizes = sorted(set(self.step_split(0)), reverse=True)
        return (f"global batch {self.global_batch} over {self.world_size} process(es) x grad_accum {self.grad_accum}: "
                f"micro-batches of {' or '.join(map(str, sizes))} (each loss weighted by its share)")


def take_of(size: int, weight: float) -> int:
    """Samples a part of `size` samples gives an epoch at sampling weight `weight` (at least one)."""
    return max(1, round(weight * size))


def shard_order(shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's order of shard indices, the same on every rank."""
    order = list(range(shards))
    if shuffle:
        random.Random(stable_seed(seed, epoch, "shards")).shuffle(order)
    return order


def epoch_pool(positions: Sequence[Sequence[int]], plan: EpochPlan, epoch: int) -> list[tuple[int, int]]:
    """The stream's epoch: (shard index, position in the tar) of every training sample, shards in the epoch's order,
    each shard's samples in tar order. positions[s] lists the selected (e.g. in-fold) samples of shard s."""
    order = shard_order(len(positions), seed=plan.seed, epoch=epoch, shuffle=plan.shuffle)
    return [(s, p) for s in order for p in sorted(positions[s])]


def slot_ranges(pool: Sequence[tuple[int, int]], plan: EpochPlan, *, rank: int, workers: int,
                step: int = 0) -> list[list[tuple[int, int]]]:
    """Per worker of `rank`: the (shard index, position) it reads from optimizer step `step` on, in reading order.

    The pool (epoch_pool, or what earlier segments left) is dealt in contiguous ranges: slot (rank, worker) gets
    the range after all slots of lower ranks and workers, as long as its batches need (the DataLoader takes batch
    j from worker j % workers)."""
    lengths = [sum(plan.rank_sizes(r, step)[w::workers]) for r in range(plan.world_size) for w in range(workers)]
    begin = sum(lengths[:rank * workers])
    ranges = []
    for w in range(workers):
        ranges.append(list(pool[begin: begin + lengths[rank * workers + w]]))
        begin += lengths[rank * workers + w]
    return ranges
