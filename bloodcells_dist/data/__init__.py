"""The read side of the shards: which samples train and validate, in what order, from where, augmented how.

    data = open_training_data(config, manifest, accelerator)    # picks the cache or the stream, says which
    for images, labels in data.train_batches(epoch, start): ...  # this rank's micro-batches, model-ready
    metrics = score(model, data.eval_batches(), accelerator, classes)

plan.py     the epoch plan: sample order, global batches, each rank's slice, step counts, stream ranges
cache.py    the decoded cache (built once, saved, reused) and the sample index
stream.py   reading shards as they stream, for data larger than memory or in object storage
augment.py  batched augmentation on the device, seeded by (seed, epoch, sample id)
batches.py  an epoch's batches from the cache or the stream, through the same interface

The packer (writing shards) is bloodcells_dist/shards.py; per-sample transforms for single files
(predict, evaluate --images) are in bloodcells_dist/transforms.py.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..cli import UserError
from ..config import TrainConfig
from ..manifest import ShardManifest
from .augment import DeviceAugment
from .batches import CachedBatches, StreamedBatches, fold_filter, shard_positions
from .cache import cache_bytes, load_or_build, memory_budget
from .plan import EpochPlan

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/bloodcells_dist, else ~/.cache/bloodcells_dist."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bloodcells_dist"


def choose_path(config: TrainConfig, manifest: ShardManifest, splits: list[str],
                accelerator: Accelerator) -> tuple[str, str]:
    """("cache" or "stream", why), decided on the main process and shared, so every rank reads alike."""
    choice = [None]
    if accelerator.is_main_process:
        need = cache_bytes(manifest, splits, config.image_size)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        budget = memory_budget(accelerator.device, local, config.cache_max_mb)
        where = "GPU" if accelerator.device.type == "cuda" else "host"
        size = f"{need / 2**20:,.0f} MB of decoded images"
        if config.data == "stream":
            choice = [("stream", "as configured")]
        elif need <= budget:
            choice = [("cache", f"{size} in {where} memory")]
        else:
            limit = "cache_max_mb" if config.cache_max_mb else f"half the free {where} memory"
            short = (f"the decoded cache needs {need / 2**20:,.0f} MB, more than the {budget / 2**20:,.0f} MB "
                     f"this process may use ({limit})")
            choice = [("error" if config.data == "cache" else "stream", short)]
    kind, why = broadcast_object_list(choice)[0]
    if kind == "error":
        raise UserError(f"data: cache: {why}; use data: stream or auto, or raise cache_max_mb")
    return kind, why


def open_training_data(config: TrainConfig, manifest: ShardManifest, accelerator: Accelerator,
                       allow_pipe: bool = False) -> CachedBatches | StreamedBatches:
    """The training and validation batches of this rank, from the decoded cache when it fits, else the stream.
    allow_pipe: accept `pipe:` shard locations (see ShardManifest.shard_urls)."""
    fold = config.val_fold
    val_splits = list(config.train_splits) if fold >= 0 else ([config.val_split] if config.val_split else [])
    splits = list(dict.fromkeys([*config.train_splits, *val_splits]))
    kind, why = choose_path(config, manifest, splits, accelerator)
    started = time.perf_counter()
    # One process per machine builds the cache, with a data worker per CPU; the others wait and load its file.
    with accelerator.local_main_process_first():
        samples, path, built = load_or_build(manifest, config.shards, splits,
                                             config.preprocess() if kind == "cache" else None,
                                             cache_dir=Path(config.cache_dir or default_cache_dir()),
                                             workers=min(os.cpu_count() or 1, 16), allow_pipe=allow_pipe)
    train_rows = samples.select(config.train_splits, fold, keep=False)
    val_rows = samples.select(val_splits, fold, keep=True) if val_splits else torch.zeros(0, dtype=torch.long)
    plan = EpochPlan(len(train_rows), config.batch_size, accelerator.num_processes, config.grad_accum,
                     seed=config.seed, shuffle=config.shuffle)
    augment = DeviceAugment(flip=config.aug_flip, rot90=config.aug_rot90, affine=config.aug_affine,
                            color=config.aug_color, hue=config.aug_hue, gain=config.aug_gain, erase=config.aug_erase,
                            channels_last=config.channels_last,
                            dtype=DTYPES.get(accelerator.mixed_precision, torch.float32))
    device, rank = accelerator.device, accelerator.process_index
    seconds = time.perf_counter() - started
    if kind == "cache":
        accelerator.print(f"data: cache ({why}; {'built' if built else 'loaded'} {path} in {seconds:.1f} s), "
                          f"augmented in batches on {device.type}")
        return CachedBatches(samples.to(device), train_rows, val_rows, plan, augment, rank, device)
    accelerator.print(f"data: stream ({why}; {config.workers} data worker(s) per process decode, "
                      f"augmentation in batches on {device.type})")
    urls = lambda splits: [u for s in splits for u in manifest.shard_urls(config.shards, s, allow_pipe)]
    counts = {s: len(manifest.split(s).shards) for s in config.train_splits}
    return StreamedBatches(urls(config.train_splits), shard_positions(samples, counts, train_rows), urls(val_splits),
                           fold_filter(fold, keep=True), plan, augment, rank, device,
                           config.workers, config.shuffle_buffer, config.preprocess())
