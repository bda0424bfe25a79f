"""Read shards as they stream: the training stream (each sample at most once per epoch) and evaluation.

For datasets larger than memory and shards in object storage. Data workers decode and resize; the
augmentation runs on the batch in the training process (augment.py), so a sample is augmented the same
way here as from the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .plan import EpochPlan, Segment, epoch_pool, slot_ranges, stable_seed
from .preprocess import Preprocess, decode_jpeg
from .selection import Selection


def decode_resized(data: bytes, preprocess: Preprocess) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, *image_size): the cell window (if any), then the resize (Preprocess.resize, as
    predict and evaluate --images do)."""
    return preprocess.resize(decode_jpeg(data))


def sample_id(key: str) -> int:
    """A sample's 63-bit id from its key: seeds its augmentation, whatever path or split list reads it."""
    return stable_seed("sample", key)


def worker_slot() -> tuple[int, int]:
    """(worker id, worker count) inside a DataLoader worker; (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def numbered(urls: Sequence[str]) -> Iterator[tuple[int, int, dict]]:
    """(shard index, position in the shard, sample) for every sample of the shards, in order."""
    for shard, url in enumerate(urls):
        for position, sample in enumerate(wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples())):
            yield shard, position, sample


class TrainStream(IterableDataset):
    """One epoch (or its last segment) of one rank: each worker reads its own range of the pool once.

    pool: the (shard, position) samples left to the segment (unread_pool), shards in the epoch's order; others
    are skipped unread. Batches are (uint8 images (B, 3, H, W), labels (B,), sample ids (B,)), B as the plan
    splits each step. first_step: the segment's first optimizer step; step: where to start (resuming it).
    """

    def __init__(self, urls: Sequence[str], pool: Sequence[tuple[int, int]], *, plan: EpochPlan,
                 preprocess: Preprocess, epoch: int, rank: int, shuffle_buffer: int, first_step: int = 0,
                 step: int = 0) -> None:
        super().__init__()
        self.urls, self.pool, self.plan, self.preprocess = list(urls), pool, plan, preprocess
        self.epoch, self.rank, self.shuffle_buffer = epoch, rank, shuffle_buffer
        self.first_step, self.step = first_step, step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        worker, workers = worker_slot()
        # The DataLoader takes batch j from worker j % workers. Resuming at batch `start` of the segment, worker w
        # must produce what worker (w + start) % workers produced in an uninterrupted segment.
        start = (self.step - self.first_step) * self.plan.grad_accum
        slot = (worker + start) % workers
        done = len(range(slot, start, workers))  # batches of this slot before `start`
        sizes = self.plan.rank_sizes(self.rank, self.first_step)[slot::workers]
        piece = slot_ranges(self.pool, self.plan, rank=self.rank, workers=workers, step=self.first_step)[slot]
        shards, wanted = list(dict.fromkeys(shard for shard, _ in piece)), set(piece)

        def read() -> Iterator[dict]:  # this slot's range of samples, in the pool's order
            for i, position, sample in numbered([self.urls[shard] for shard in shards]):
                if (shards[i], position) in wanted:
                    yield sample

        stages: list = [read]  # dicts: __key__, jpg, cls, json (bytes)
        if self.plan.shuffle:  # the buffer drains at the end of the range: nothing is carried over
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.slot_seed(slot)))
        stages += [
            wds.slice(sum(sizes[:done]), None),  # resume: skip, before decoding, what was consumed
            wds.map(self.decode),  # (image, label, id)
            batched_by(sizes[done:]),  # (images, labels (B,), ids (B,)), B as the plan splits each step
        ]
        return iter(wds.DataPipeline(*stages))

    def slot_seed(self, slot: int) -> int:
        """The shuffle buffer's seed of one slot of this segment."""
        later = (self.first_step,) if self.first_step else ()  # the first segment's seed as before segments existed
        return stable_seed(self.plan.seed, self.epoch, self.rank, slot, *later)

    def read_order(self, piece: Sequence[tuple[int, int]], slot: int) -> Iterator[tuple[int, int]]:
        """The order in which a slot hands out its range (the shuffle buffer replayed on the bare keys)."""
        if not self.plan.shuffle:
            return iter(piece)
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.slot_seed(slot))(iter(piece))

    def decode(self, sample: dict) -> tuple[torch.Tensor, int, int]:
        """A sample's resized uint8 image, label and id."""
        return decode_resized(sample["jpg"], self.preprocess), int(sample["cls"]), sample_id(sample["__key__"])


def batched_by(sizes: Sequence[int]):
    """A pipeline stage: (image, label, id) samples into batches of the given sizes, in turn."""
    def stage(source: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        samples = iter(source)
        for size in sizes:
            batch = list(itertools.islice(samples, size))
            if len(batch) < size:
                return
            images, labels, ids = zip(*batch)
            yield torch.stack(images), torch.tensor(labels), torch.tensor(ids)
    return stage


def unread_pool(urls: Sequence[str], positions: Sequence[Sequence[int]], plan: EpochPlan, *, epoch: int,
                segments: Sequence[Segment], preprocess: Preprocess, shuffle_buffer: int) -> list[tuple[int, int]]:
    """What the epoch's stream leaves to its last segment: the epoch's pool less what every earlier segment's slots
    read before the next one began (their ranges, shuffle buffers and batch counts replayed; nothing decoded)."""
    pool = epoch_pool(positions, plan, epoch)
    for segment, following in zip(segments, segments[1:]):
        past = dataclasses.replace(plan, world_size=segment.processes, grad_accum=segment.grad_accum,
                                   step_samples=plan.global_batch, short_step=plan.has_short_step)
        done = (following.step - segment.step) * segment.grad_accum  # micro-batches each rank ran
        read: set[tuple[int, int]] = set()
        for rank in range(segment.processes):
            sizes = past.rank_sizes(rank, segment.step)
            stream = TrainStream(urls, pool, plan=past, preprocess=preprocess, epoch=epoch, rank=rank,
                                 shuffle_buffer=shuffle_buffer, first_step=segment.step)
            ranges = slot_ranges(pool, past, rank=rank, workers=segment.workers, step=segment.step)
            for slot, piece in enumerate(ranges):
                read.update(itertools.islice(stream.read_order(piece, slot), sum(sizes[slot:done:segment.workers])))
        pool = [sample for sample in pool if sample not in read]
    return pool


class EvalStream(IterableDataset):
    """Every sample of this rank's shards exactly once, in fixed order: (uint8 images, labels, keys)."""

    def __init__(self, urls: Sequence[str], *, preprocess: Preprocess, batch_size: int, rank: int,
                 world_size: int, selection: Selection | None = None) -> None:
        super().__init__()
        self.urls, self.preprocess, self.batch_size = list(urls)[rank::world_size], preprocess, batch_size
        self.selection = selection  # None: every sample of the shards

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        worker, workers = worker_slot()
        if not self.urls[worker::workers]:  # more ranks than shards: this one has nothing to count
            return iter(())
        stages = [
            wds.SimpleShardList(self.urls[worker::workers]),  # this worker's shards, read once
            wds.tarfile_to_samples(),  # dicts: __key__, jpg, cls, json (bytes)
        ]
        if self.selection is not None and self.selection.fold >= 0:
            stages.append(wds.select(self.selection.accepts))  # only the selected fold (or all but it)
        stages += [
            wds.map(lambda s: (decode_resized(s["jpg"], self.preprocess), int(s["cls"]), s["__key__"])),
            wds.batched(self.batch_size, partial=True),  # (images, labels, keys); the last batch may be short
        ]
        return iter(wds.DataPipeline(*stages))


def stream_loader(dataset: IterableDataset, workers: int, pin_memory: bool) -> DataLoader:
    """DataLoader over a stream that batches itself; an EvalStream never gets more workers than shards."""
    if isinstance(dataset, EvalStream):
        workers = min(workers, len(dataset.urls))
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory)
