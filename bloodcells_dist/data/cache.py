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
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader, IterableDataset

from ..files import atomic_path
from ..output import say, warn
from ..pack.manifest import ShardManifest
from .preprocess import Preprocess
from .selection import Selection
from .stream import decode_resized, numbered, sample_id, worker_slot

FORMAT = 2  # 2: the groups column


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bloodcells_dist, else ~/.cache/bloodcells_dist."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bloodcells_dist"


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
    groups: list[str] | None = None  # each sample's group (cell, patient, file): what a split never cuts

    def select(self, selection: Selection) -> torch.Tensor:
        """Row indices of the selected samples."""
        return selection.rows(self.split, self.folds, self.splits)

    def to(self, device: torch.device) -> DecodedSamples:
        """The images on `device` (the index stays on the host)."""
        if self.images is not None:
            self.images = self.images.to(device)
        return self


class ShardReader(IterableDataset):
    """Whole shards dealt to data workers: per shard its rows (and resized uint8 images when decoding)."""

    def __init__(self, urls: Sequence[str], preprocess: Preprocess | None) -> None:
        super().__init__()
        self.urls, self.preprocess = list(urls), preprocess

    def __iter__(self) -> Iterator[dict]:
        worker, workers = worker_slot()
        for shard in range(worker, len(self.urls), workers):
            rows = [(position, s["__key__"], int(s["cls"]), meta["fold"],
                     decode_resized(s["jpg"], self.preprocess) if self.preprocess else None,
                     str(meta.get("group", s["__key__"])))
                    for _, position, s in numbered([self.urls[shard]]) for meta in [json.loads(s["json"])]]
            yield {"shard": shard, "position": [r[0] for r in rows], "keys": [r[1] for r in rows],
                   "labels": [r[2] for r in rows], "folds": [r[3] for r in rows], "groups": [r[5] for r in rows],
                   "images": torch.stack([r[4] for r in rows if r[4] is not None]) if self.preprocess and rows else None}


def read_samples(manifest: ShardManifest, shards: str, splits: Sequence[str], preprocess: Preprocess | None,
                 workers: int) -> DecodedSamples:
    """Read (and with a preprocessing, decode) every sample of the splits with `workers` data workers."""
    columns: dict[str, list] = {k: [] for k in ("shard", "position", "split", "labels", "folds", "keys", "groups",
                                                "images")}
    for index, split in enumerate(splits):
        urls = manifest.shard_urls(shards, split)
        loader = DataLoader(ShardReader(urls, preprocess), batch_size=None, num_workers=min(workers, len(urls)))
        for part in sorted(loader, key=lambda p: p["shard"]):
            n = len(part["keys"])
            columns["shard"] += [part["shard"]] * n
            columns["split"] += [index] * n
            for k in ("position", "labels", "folds", "keys", "groups"):
                columns[k] += part[k]
            if part["images"] is not None:
                columns["images"].append(part["images"])
    tensor = lambda k: torch.tensor(columns[k], dtype=torch.int64)
    return DecodedSamples(splits=list(splits), shard=tensor("shard"), position=tensor("position"),
                          split=tensor("split"), labels=tensor("labels"), folds=tensor("folds"),
                          ids=torch.tensor([sample_id(k) for k in columns["keys"]], dtype=torch.int64),
                          keys=columns["keys"], images=torch.cat(columns["images"]) if columns["images"] else None,
                          groups=columns["groups"])


def built_from(manifest: ShardManifest, splits: Sequence[str], preprocess: Preprocess | None) -> dict:
    """What a cache is made of: its format, the preprocessing (None: the index alone) and every shard's sha256."""
    return {"format": FORMAT, "preprocess": preprocess.to_dict() if preprocess else None,
            "splits": {s: [sh.sha256 for sh in manifest.split(s).shards] for s in splits}}


def cache_path(cache_dir: Path, manifest: ShardManifest, splits: Sequence[str], preprocess: Preprocess | None) -> Path:
    """The cache file of these splits with this preprocessing (None: the index alone): named after their shards'
    sha256 and the preprocessing, so a changed shard, size, window or fit builds another file."""
    content = json.dumps(built_from(manifest, splits, preprocess))
    digest = hashlib.sha256(content.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{'+'.join(splits)}-{preprocess.tag() if preprocess else 'index'}-{digest}.pt"


def content_digest(samples: DecodedSamples) -> str:
    """blake2b of everything a cache holds (index, keys, images): an edited label or image, a lost row, shows."""
    digest = hashlib.blake2b(digest_size=16)
    for name in ("shard", "position", "split", "labels", "folds", "ids"):
        digest.update(getattr(samples, name).contiguous().numpy().tobytes())
    digest.update("\n".join(samples.splits + samples.keys + (samples.groups or [])).encode())
    if samples.images is not None:
        digest.update(samples.images.contiguous().numpy().data.cast("B"))  # a view: no copy of the images
    return digest.hexdigest()


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


def save_samples(samples: DecodedSamples, path: Path, source: dict) -> str:
    """Write atomically, with what it was built from and a digest of its contents; '' or why it was not saved
    (an unwritable cache folder costs a rebuild next run, not this run)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({**vars(samples), "format": FORMAT, "built_from": source, "digest": content_digest(samples)}, tmp)
    except OSError as err:
        return f"cannot save the decoded cache in {path.parent} ({err.strerror or err}); it is rebuilt next run"
    return ""


def load_samples(path: Path, source: dict, preprocess: Preprocess | None) -> tuple[DecodedSamples | None, str]:
    """A saved cache (memory-mapped: processes of one machine share its pages) if it is what `source` says and its
    contents match their digest; else (None, why it is not used)."""
    try:
        raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        return None, f"unreadable ({type(err).__name__})"
    if not isinstance(raw, dict) or raw.pop("format", None) != FORMAT or raw.pop("built_from", None) != source:
        return None, "built from other shards or settings"
    digest = raw.pop("digest", None)
    try:
        samples = DecodedSamples(**raw)
    except TypeError:
        return None, "not a cache of this version"
    n = len(samples.keys)
    rows = [getattr(samples, k) for k in ("shard", "position", "split", "labels", "folds", "ids")]
    shape = None if preprocess is None else (n, 3, *preprocess.image_size)
    if any(len(t) != n for t in rows) or (None if samples.images is None else tuple(samples.images.shape)) != shape:
        return None, "rows or image size do not match"
    if digest != content_digest(samples):
        return None, "its contents do not match their digest (edited or damaged)"
    return samples, ""


def load_or_build(manifest: ShardManifest, shards: str, splits: Sequence[str], preprocess: Preprocess | None,
                  *, cache_dir: Path, workers: int) -> tuple[DecodedSamples, Path, bool]:
    """The cached samples of the splits, built and saved first if missing; (samples, file, built)."""
    path, source = cache_path(cache_dir, manifest, splits, preprocess), built_from(manifest, splits, preprocess)
    samples, why = load_samples(path, source, preprocess) if path.is_file() else (None, "")
    if samples is not None:
        return samples, path, False
    if why:
        say(f"data: the cache {path} is not used ({why}): rebuilding it", every_rank=True, stderr=True)  # the builder
    samples = read_samples(manifest, shards, splits, preprocess, workers)
    problem = save_samples(samples, path, source)
    if problem:
        warn(problem, every_rank=True)  # the process that built it
    return samples, path, True
