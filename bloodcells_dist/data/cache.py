"""The decoded cache: every image of the splits in use, decoded once and resized, as one uint8 tensor.

Built in parallel from the shards (one data worker per shard at a time) and saved to a file named after
the shards' sha256 and the image size, so a second run loads it in seconds and a changed shard or size
builds a new one. Without images (`decode=False`) the same pass gives the sample index the stream needs:
each sample's shard, position, label, fold and id.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..manifest import ShardManifest
from .stream import decode_resized, numbered, sample_id, worker_slot

FORMAT = 1


@dataclass
class DecodedSamples:
    """Rows in manifest order (split, shard, position): labels, folds, split indices, ids and keys; images
    (N, 3, H, W) uint8 when decoded."""

    splits: list[str]
    shard: torch.Tensor  # shard index within its split
    position: torch.Tensor  # position within the shard
    split: torch.Tensor  # index into splits
    labels: torch.Tensor
    folds: torch.Tensor
    ids: torch.Tensor  # 63-bit sample ids: seed each sample's augmentation
    keys: list[str]
    images: torch.Tensor | None = None

    def select(self, splits: Sequence[str], fold: int = -1, keep: bool = True) -> torch.Tensor:
        """Row indices of the given splits; with fold >= 0 only that fold's rows (keep) or the others."""
        wanted = torch.tensor([self.splits.index(s) for s in splits])
        mask = torch.isin(self.split, wanted)
        if fold >= 0:
            mask &= (self.folds == fold) if keep else (self.folds != fold)
        return mask.nonzero().flatten()

    def to(self, device: torch.device) -> DecodedSamples:
        """The images on `device` (the index stays on the host)."""
        if self.images is not None:
            self.images = self.images.to(device)
        return self


class ShardReader(IterableDataset):
    """Whole shards dealt to data workers: per shard its rows (and resized uint8 images when decoding)."""

    def __init__(self, urls: Sequence[str], image_size: Sequence[int] | None, cell_crop: int = 0) -> None:
        super().__init__()
        self.urls, self.image_size, self.cell_crop = list(urls), image_size, cell_crop

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        for shard in range(worker, len(self.urls), workers):
            rows = [(position, s["__key__"], int(s["cls"]), json.loads(s["json"])["fold"],
                     decode_resized(s["jpg"], self.image_size, self.cell_crop) if self.image_size else None)
                    for _, position, s in numbered([self.urls[shard]])]
            yield {"shard": shard, "position": [r[0] for r in rows], "keys": [r[1] for r in rows],
                   "labels": [r[2] for r in rows], "folds": [r[3] for r in rows],
                   "images": torch.stack([r[4] for r in rows]) if self.image_size and rows else None}


def read_samples(manifest: ShardManifest, shards: str, splits: Sequence[str], image_size: Sequence[int] | None,
                 workers: int, allow_pipe: bool = False, cell_crop: int = 0) -> DecodedSamples:
    """Read (and with image_size, decode) every sample of the splits with `workers` data workers."""
    columns: dict[str, list] = {k: [] for k in ("shard", "position", "split", "labels", "folds", "keys", "images")}
    for index, split in enumerate(splits):
        urls = manifest.shard_urls(shards, split, allow_pipe)
        loader = DataLoader(ShardReader(urls, image_size, cell_crop), batch_size=None, num_workers=min(workers, len(urls)))
        for part in sorted(loader, key=lambda p: p["shard"]):
            n = len(part["keys"])
            columns["shard"] += [part["shard"]] * n
            columns["split"] += [index] * n
            for k in ("position", "labels", "folds", "keys"):
                columns[k] += part[k]
            if part["images"] is not None:
                columns["images"].append(part["images"])
    tensor = lambda k: torch.tensor(columns[k], dtype=torch.int64)
    return DecodedSamples(splits=list(splits), shard=tensor("shard"), position=tensor("position"),
                          split=tensor("split"), labels=tensor("labels"), folds=tensor("folds"),
                          ids=torch.tensor([sample_id(k) for k in columns["keys"]], dtype=torch.int64),
                          keys=columns["keys"], images=torch.cat(columns["images"]) if columns["images"] else None)


def cache_path(cache_dir: Path, manifest: ShardManifest, splits: Sequence[str],
               image_size: Sequence[int] | None, cell_crop: int = 0) -> Path:
    """The cache file of these splits at this size (and cell window): named after their shards' sha256 and
    the size; without a cell window the name is what it was before windows existed."""
    crop = {"cell_crop": cell_crop} if cell_crop and image_size else {}
    content = json.dumps({"format": FORMAT, "size": list(image_size or []), **crop,
                          "splits": {s: [sh.sha256 for sh in manifest.split(s).shards] for s in splits}})
    digest = hashlib.sha256(content.encode()).hexdigest()[:20]
    size = ("x".join(map(str, image_size)) + (f"-cell{cell_crop}" if crop else "")) if image_size else "index"
    return Path(cache_dir) / f"{'+'.join(splits)}-{size}-{digest}.pt"


def cache_bytes(manifest: ShardManifest, splits: Sequence[str], image_size: Sequence[int]) -> int:
    """Bytes the decoded images of the splits take."""
    height, width = image_size
    return sum(manifest.split(s).samples for s in splits) * 3 * height * width


def memory_budget(device: torch.device, local_processes: int, limit_mb: int) -> int:
    """Bytes one process may give the cache: limit_mb if set, else half the free memory of its device
    (host memory shared by the processes of this machine)."""
    if limit_mb > 0:
        return limit_mb * 2**20
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return psutil.virtual_memory().available // (2 * max(local_processes, 1))


def save_samples(samples: DecodedSamples, path: Path) -> None:
    """Write atomically: a reader sees no file or the complete one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({**vars(samples), "format": FORMAT}, tmp)
    os.replace(tmp, path)


def load_samples(path: Path) -> DecodedSamples | None:
    """A saved cache (memory-mapped: processes of one machine share its pages), or None if unusable."""
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if raw.pop("format", None) != FORMAT:
        return None
    return DecodedSamples(**raw)


def load_or_build(manifest: ShardManifest, shards: str, splits: Sequence[str], image_size: Sequence[int] | None,
                  *, cache_dir: Path, workers: int, allow_pipe: bool = False,
                  cell_crop: int = 0) -> tuple[DecodedSamples, Path, bool]:
    """The cached samples of the splits, built and saved first if missing; (samples, file, built)."""
    path = cache_path(cache_dir, manifest, splits, image_size, cell_crop)
    samples = load_samples(path) if path.exists() else None
    if samples is not None:
        return samples, path, False
    samples = read_samples(manifest, shards, splits, image_size, workers, allow_pipe, cell_crop)
    save_samples(samples, path)
    return samples, path, True
