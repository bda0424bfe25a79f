"""Read shards as they stream: the training stream (each sample at most once per epoch) and evaluation.

For datasets larger than memory and shards in object storage. Data workers decode and resize; the
augmentation runs on the batch in the training process (augment.py), so a sample is augmented the same
way here as from the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import decode_jpeg

from .plan import EpochPlan, slot_ranges, stable_seed
from .preprocess import Preprocess
from .selection import Selection


def decode_image(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 tensor (3, H, W) with libjpeg-turbo."""
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def decode_resized(data: bytes, preprocess: Preprocess) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, *image_size): the cell window (if any), then the resize (Preprocess.resize, as
    predict and evaluate --images do)."""
    return preprocess.resize(decode_image(data))


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
    """One epoch of one rank: each worker reads its own range of the epoch's samples once.

    positions[s] lists the training samples of shard s (by position in the tar; others are skipped
    unread). Batches are (uint8 images (B, 3, H, W), labels (B,), sample ids (B,)), or with a per-sample
    `transform`, (float images, labels, ids). `start` skips micro-batches an interrupted run consumed.
    """

    def __init__(self, urls: Sequence[str], positions: Sequence[Sequence[int]], *, plan: EpochPlan,
                 preprocess: Preprocess, epoch: int, rank: int, shuffle_buffer: int, start: int = 0) -> None:
        super().__init__()
        self.urls, self.positions, self.plan, self.preprocess = list(urls), positions, plan, preprocess
        self.epoch, self.rank, self.shuffle_buffer, self.start = epoch, rank, shuffle_buffer, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        worker, workers = worker_slot()
        # The DataLoader takes batch j from worker j % workers. Resuming at batch `start`, worker w must
        # produce what worker (w + start) % workers produced in an uninterrupted epoch.
        slot = (worker + self.start) % workers
        done = len(range(slot, self.start, workers))  # batches of this slot before `start`
        ranges = slot_ranges(self.positions, self.plan, epoch=self.epoch, rank=self.rank, workers=workers)[slot]
        wanted = {(shard, p) for shard, positions in ranges for p in positions}
        urls = [self.urls[shard] for shard, _ in ranges]
        shard_of = [shard for shard, _ in ranges]

        def read() -> Iterator[dict]:  # this slot's range of samples, in the epoch's shard order
            for i, position, sample in numbered(urls):
                if (shard_of[i], position) in wanted:
                    yield sample

        stages: list = [read]  # dicts: __key__, jpg, cls, json (bytes)
        if self.plan.shuffle:  # the buffer drains at the end of the range: nothing is carried over
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      seed=stable_seed(self.plan.seed, self.epoch, self.rank, slot)))
        stages += [
            wds.slice(done * self.plan.batch_size, None),  # resume: skip, before decoding, what was consumed
            wds.map(self.decode),  # (image, label, id)
            wds.batched(self.plan.batch_size, partial=False),  # (images, labels (B,), ids (B,))
        ]
        return iter(wds.DataPipeline(*stages))

    def decode(self, sample: dict) -> tuple[torch.Tensor, int, int]:
        """A sample's resized uint8 image, label and id."""
        return decode_resized(sample["jpg"], self.preprocess), int(sample["cls"]), sample_id(sample["__key__"])


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
