"""An epoch's model-ready batches, from the decoded cache or from the stream: the same interface for both.

Training batches are augmented on the device (augment.py) and validation batches normalised there; each
validation sample is counted exactly once across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .augment import DeviceAugment
from .cache import DecodedSamples
from .plan import EpochPlan, Segment
from .preprocess import Preprocess
from .selection import Selection
from .stream import EvalStream, TrainStream, stream_loader, unread_pool

Batches = Iterator[tuple]  # (images, labels) or, from the stream, (images, labels, keys)
# Test and debug hook: set to a path, every rank appends the ids of the samples it trains on, one line per
# micro-batch, to PATH.RANK (what the coverage tests count across interruptions). Unset: nothing is written.
SAMPLE_LOG_ENV = "BLOODCELLS_SAMPLE_LOG"


@dataclass
class CachedBatches:
    """Batches gathered from the decoded cache by the epoch plan."""

    samples: DecodedSamples  # images on the training device
    train_rows: torch.Tensor  # cache rows that train, in plan position order
    val_rows: torch.Tensor  # cache rows that validate
    plan: EpochPlan
    augment: DeviceAugment
    rank: int
    device: torch.device
    extra_val: dict[str, torch.Tensor] = field(default_factory=dict)  # further datasets' validation rows, by name
    kind: str = "cache"

    @property
    def validates(self) -> bool:
        """Whether there is anything to validate on."""
        return len(self.val_rows) > 0

    def __post_init__(self) -> None:
        if self.samples.images is None:
            raise ValueError("CachedBatches needs decoded samples (read_samples with a preprocessing)")
        self.images: torch.Tensor = self.samples.images
        # The index lives where the images do: gathering a batch then never waits on a host-to-GPU copy.
        device = self.images.device
        self.train_rows, self.val_rows = self.train_rows.to(device), self.val_rows.to(device)
        self.extra_val = {name: rows.to(device) for name, rows in self.extra_val.items()}
        self.labels, self.ids = self.samples.labels.to(device), self.samples.ids.to(device)

    def train_batches(self, epoch: int, step: int = 0, segments: Sequence[Segment] = ()) -> Batches:
        """This rank's micro-batches of the epoch from optimizer step `step` on: (images, labels). The cache's
        global order does not depend on the layout: earlier segments change nothing."""
        order, log = self.plan.order(epoch).to(self.train_rows.device), os.environ.get(SAMPLE_LOG_ENV)  # one copy
        for where in self.plan.rank_slices(self.rank, step):
            rows = self.train_rows[order[where]]
            if log:
                record_samples(log, self.rank, self.ids[rows])
            yield self.gather(rows, epoch)

    def eval_batches(self, dataset: str | None = None) -> Batches:
        """This rank's share of the validation rows (every row on exactly one rank), normalised: the run's own,
        or those of a further dataset (extra_val)."""
        rows = (self.val_rows if dataset is None else self.extra_val[dataset])[self.rank::self.plan.world_size]
        for begin in range(0, len(rows), self.plan.batch_size):
            yield self.gather(rows[begin:begin + self.plan.batch_size], None)

    def gather(self, rows: torch.Tensor, epoch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images of the rows, augmented for `epoch` (None: only normalised), and their labels."""
        images = self.images[rows].to(self.device, non_blocking=True)
        ids = None if epoch is None else self.ids[rows].to(self.device, non_blocking=True)
        return (self.augment(images, ids, seed=self.plan.seed, epoch=epoch or 0),
                self.labels[rows].to(self.device, non_blocking=True))


@dataclass
class StreamedBatches:
    """Batches read from the shards as they stream, decoded in data workers, augmented on the device."""

    train_urls: list[str]
    positions: list[list[int]]  # per training shard: positions of its training samples
    val_urls: list[str]
    val_selection: Selection | None
    plan: EpochPlan
    augment: DeviceAugment
    rank: int
    device: torch.device
    workers: int
    shuffle_buffer: int
    preprocess: Preprocess
    kind: str = "stream"
    extra_val: dict[str, torch.Tensor] = field(default_factory=dict)  # the stream reads one dataset: always empty

    @property
    def validates(self) -> bool:
        """Whether there is anything to validate on."""
        return bool(self.val_urls)

    def train_batches(self, epoch: int, step: int = 0, segments: Sequence[Segment] = ()) -> Batches:
        """This rank's micro-batches of the epoch from optimizer step `step` on: (images, labels). segments: the
        epoch's layouts so far, the last one this run's (a resume on another layout reads what they left)."""
        pool = unread_pool(self.train_urls, self.positions, self.plan, epoch=epoch, segments=segments,
                           preprocess=self.preprocess, shuffle_buffer=self.shuffle_buffer)
        stream = TrainStream(self.train_urls, pool, plan=self.plan, preprocess=self.preprocess, epoch=epoch,
                             rank=self.rank, shuffle_buffer=self.shuffle_buffer,
                             first_step=segments[-1].step if segments else 0, step=step)
        log = os.environ.get(SAMPLE_LOG_ENV)
        for images, labels, ids in stream_loader(stream, self.workers, self.device.type == "cuda"):
            if log:
                record_samples(log, self.rank, ids)
            images = images.to(self.device, non_blocking=True)
            yield (self.augment(images, ids.to(self.device, non_blocking=True), seed=self.plan.seed, epoch=epoch),
                   labels.to(self.device, non_blocking=True))

    def eval_batches(self, dataset: str | None = None) -> Batches:
        """This rank's validation shards, each sample once, normalised (the stream reads one dataset: `dataset`
        is always None)."""
        return streamed_eval_batches(self.val_urls, selection=self.val_selection, preprocess=self.preprocess,
                                     batch_size=self.plan.batch_size, rank=self.rank, world_size=self.plan.world_size,
                                     workers=self.workers, normalise=self.augment, device=self.device)


def record_samples(log: str, rank: int, ids: torch.Tensor) -> None:
    """The sample-id hook of the coverage tests: one line of the ids a rank trains on, appended to LOG.RANK."""
    with open(f"{log}.{rank}", "a") as f:
        f.write(" ".join(map(str, ids.tolist())) + "\n")


def streamed_eval_batches(urls: list[str], *, selection: Selection | None, preprocess: Preprocess, batch_size: int,
                          rank: int, world_size: int, workers: int, normalise: DeviceAugment,
                          device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Every selected sample of the shards exactly once over all ranks (this rank's shards), normalised on the
    device, with their keys: validation during training and `evaluate --shards` alike."""
    stream = EvalStream(urls, preprocess=preprocess, batch_size=batch_size, rank=rank, world_size=world_size,
                        selection=selection)
    for images, labels, keys in stream_loader(stream, workers, device.type == "cuda"):
        yield normalise(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True), keys


def shard_positions(index: DecodedSamples, shard_counts: dict[str, int], rows: torch.Tensor) -> list[list[int]]:
    """Per shard of the splits (shard_counts: split -> shards, in reading order), the rows' positions in it."""
    offsets, total = {}, 0
    for split, count in shard_counts.items():
        offsets[index.splits.index(split)] = total
        total += count
    positions: list[list[int]] = [[] for _ in range(total)]
    for split, shard, position in zip(index.split[rows].tolist(), index.shard[rows].tolist(),
                                      index.position[rows].tolist()):
        positions[offsets[split] + shard].append(position)
    return positions

