"""Read shards into batches: a seeded, resumable training stream and an exactly-once evaluation stream.

Training: every epoch the shard list is shuffled with a seed shared by all ranks and dealt round-robin to
the (rank, worker) slots, so each rank reads its own shards (split by node and by worker). Each worker
cycles its shards until it has produced its quota of batches, so every rank runs exactly the number of
steps derived from the manifest and DDP never waits on a rank that ran out of data. With fewer shards than
ranks x workers, shards are dealt to more than one slot (resampled) and a warning says how many are needed.

Evaluation: shards are split by rank, then by worker, and read once, so every sample is counted exactly
once across all ranks with no padding.
"""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from itertools import cycle

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import decode_jpeg


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any values, the same in every process and Python run (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 tensor (3, H, W) with libjpeg-turbo."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def shards_for_slot(urls: Sequence[str], *, slot: int, slots: int, shuffle: bool, seed: int, epoch: int) -> list[str]:
    """The shards one (rank, worker) slot reads this epoch; fewer shards than slots are dealt out again."""
    order = list(urls)
    if shuffle:
        random.Random(stable_seed(seed, epoch, "shards")).shuffle(order)
    if len(order) < slots:
        order = [order[i % len(order)] for i in range(slots)]
    return order[slot::slots]


def worker_slot() -> tuple[int, int]:
    """(worker id, worker count) inside a DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def in_fold(sample: dict, fold: int, keep: bool) -> bool:
    """Whether a sample of fold `fold` is kept (keep=True) or dropped (keep=False) for k-fold CV."""
    return (json.loads(sample["json"])["fold"] == fold) == keep


class TrainStream(IterableDataset):
    """One epoch of training batches for one rank: exactly `steps` batches, resumable at any batch."""

    def __init__(self, urls: Sequence[str], *, transform: Callable, batch_size: int, steps: int, epoch: int,
                 seed: int, rank: int, world_size: int, shuffle: bool, shuffle_buffer: int, start: int = 0,
                 sample_filter: Callable[[dict], bool] | None = None) -> None:
        super().__init__()
        self.urls, self.transform, self.batch_size, self.steps = list(urls), transform, batch_size, steps
        self.epoch, self.seed, self.rank, self.world_size = epoch, seed, rank, world_size
        self.shuffle, self.shuffle_buffer, self.start, self.sample_filter = shuffle, shuffle_buffer, start, sample_filter

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = worker_slot()
        # The DataLoader takes batch j from worker j % workers. Resuming at batch `start`, worker w must
        # therefore produce what stream (w + start) % workers produced in an uninterrupted epoch.
        stream = (worker + self.start) % workers
        done = len(range(stream, self.start, workers))  # batches of this stream before `start`
        todo = len(range(stream, self.steps, workers)) - done
        slots = self.world_size * workers
        shards = shards_for_slot(self.urls, slot=self.rank * workers + stream, slots=slots,
                                 shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        tag = (self.seed, self.epoch, self.rank, stream)

        def augment(indexed: tuple[int, dict]) -> tuple[torch.Tensor, int]:
            # Per-sample seed from its position in the stream: skipping ahead on resume (before any
            # decoding) gives the same augmentation as the uninterrupted run.
            index, sample = indexed
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(stable_seed(*tag, index))
                return self.transform(decode_image(sample["jpg"])), int(sample["cls"])

        stages = [
            lambda: ({"url": url} for url in cycle(shards)),  # shard urls, repeated until the quota is met
            wds.tarfile_to_samples(),  # dicts: __key__, jpg, cls, json (bytes)
        ]
        if self.sample_filter is not None:
            stages.append(wds.select(self.sample_filter))  # only the folds being trained on
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=stable_seed(*tag)))
        stages += [
            enumerate_stage,  # (index, sample)
            wds.slice(done * self.batch_size, None),  # resume: skip what the interrupted run consumed
            wds.map(augment),  # (image float (3, H, W), label)
            wds.batched(self.batch_size, partial=False),  # (images (B, 3, H, W), labels (B,))
            wds.slice(todo),  # this worker's share of the epoch
        ]
        return iter(wds.DataPipeline(*stages))


def enumerate_stage(source: Iterator) -> Iterator[tuple[int, object]]:
    """Pipeline stage: number the samples."""
    return enumerate(source)


class EvalStream(IterableDataset):
    """Every sample of this rank's shards exactly once, in fixed order, with its key."""

    def __init__(self, urls: Sequence[str], *, transform: Callable, batch_size: int, rank: int, world_size: int,
                 sample_filter: Callable[[dict], bool] | None = None) -> None:
        super().__init__()
        self.urls, self.transform, self.batch_size = list(urls)[rank::world_size], transform, batch_size
        self.sample_filter = sample_filter

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, workers = worker_slot()
        if not self.urls[worker::workers]:  # more ranks than shards: this one has nothing to count
            return iter(())
        stages = [
            wds.SimpleShardList(self.urls[worker::workers]),  # this worker's shards, read once
            wds.tarfile_to_samples(),  # dicts: __key__, jpg, cls, json (bytes)
        ]
        if self.sample_filter is not None:
            stages.append(wds.select(self.sample_filter))  # only the validation fold
        stages += [
            wds.map(lambda s: (self.transform(decode_image(s["jpg"])), int(s["cls"]), s["__key__"])),
            wds.batched(self.batch_size, partial=True),  # (images, labels, keys); the last batch may be short
        ]
        return iter(wds.DataPipeline(*stages))


def train_loader(dataset: TrainStream, workers: int, pin_memory: bool) -> DataLoader:
    """DataLoader over a TrainStream; batching happens in the stream. Warns when shards must be reused."""
    slots = dataset.world_size * max(workers, 1)
    if len(dataset.urls) < slots:
        warnings.warn(f"{len(dataset.urls)} training shards for {dataset.world_size} rank(s) x {max(workers, 1)} "
                      f"worker(s): shards are reused within an epoch; pack at least {slots} shards "
                      "(--shard-size) to read each sample once per epoch", stacklevel=2)
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)


def eval_loader(dataset: EvalStream, workers: int, pin_memory: bool) -> DataLoader:
    """DataLoader over an EvalStream, never with more workers than this rank has shards."""
    return DataLoader(dataset, batch_size=None, num_workers=min(workers, len(dataset.urls)), pin_memory=pin_memory)
