"""The read side of the shards, through two front doors:

    data = open_training_data(config, manifest, accelerator)     # picks the cache or the stream, says which
    for images, labels in data.train_batches(epoch, start): ...   # this rank's micro-batches, model-ready
    metrics = score(model, data.eval_batches(), accelerator, classes)
    for images, labels, keys in open_eval_data(shards, manifest, selection, preprocess, accelerator, ...): ...  # evaluate

selection.py  which samples: splits and cross-validation folds (the one place that knows about folds)
preprocess.py window (centred on the nucleus: bloodcells_dist/nucleus.py), resize and normalisation of an image
              (what a model records and predict replays); read_rgb
plan.py       the epoch plan: sample order, global batches, each rank's slice, step counts, stream ranges
cache.py      the decoded cache (built once, checked, reused) and the sample index
stream.py     reading shards as they stream, for data larger than memory or in object storage
augment.py    batched augmentation on the device, seeded by (seed, epoch, sample id)
batches.py    an epoch's batches from the cache or the stream, through the same interface

The packer that writes the shards is bloodcells_dist/pack/.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..cli import UserError
from ..config import TrainConfig
from ..output import say
from ..pack.manifest import ShardManifest
from .augment import DeviceAugment, training_augment
from .batches import CachedBatches, StreamedBatches, shard_positions, streamed_eval_batches
from .cache import cache_bytes, default_cache_dir, load_or_build, memory_budget
from .plan import EpochPlan
from .preprocess import Preprocess
from .selection import Selection, train_subset, training_selections


def choose_path(config: TrainConfig, manifest: ShardManifest, splits: list[str],
                accelerator: Accelerator) -> tuple[str, str]:
    """("cache" or "stream", why), decided on the main process and shared, so every rank reads alike."""
    choice: list = [None]
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


def open_training_data(config: TrainConfig, manifest: ShardManifest,
                       accelerator: Accelerator) -> CachedBatches | StreamedBatches:
    """The training and validation batches of this rank, from the decoded cache when it fits, else the stream.
    (A `pipe:` shard location is read only if the manifest was loaded with allow_pipe.)"""
    train, val = training_selections(config.train_splits, config.val_split, config.val_fold)
    splits = list(dict.fromkeys([*train.splits, *(val.splits if val else ())]))
    preprocess = Preprocess.of(config)
    kind, why = choose_path(config, manifest, splits, accelerator)
    started = time.perf_counter()
    # One process per machine builds the cache, with a data worker per CPU; the others wait and load its file.
    with accelerator.local_main_process_first():
        samples, path, built = load_or_build(manifest, config.shards, splits, preprocess if kind == "cache" else None,
                                             cache_dir=Path(config.cache_dir or default_cache_dir()),
                                             workers=min(os.cpu_count() or 1, 16))
    train_rows = samples.select(train)
    if config.train_fraction < 1:
        train_rows, line = train_subset(train_rows, samples.groups, samples.labels, config.train_fraction, config.seed)
        say(line)
    val_rows = samples.select(val) if val else torch.zeros(0, dtype=torch.long)
    plan = EpochPlan(len(train_rows), config.batch_size, accelerator.num_processes, config.grad_accum,
                     seed=config.seed, shuffle=config.shuffle)
    augment = training_augment(config, preprocess, accelerator.mixed_precision)
    device, rank = accelerator.device, accelerator.process_index
    seconds = time.perf_counter() - started
    if kind == "cache":
        say(f"data: cache ({why}; {'built' if built else 'loaded'} {path} in {seconds:.1f} s), "
            f"augmented in batches on {device.type}")
        return CachedBatches(samples.to(device), train_rows, val_rows, plan, augment, rank, device)
    say(f"data: stream ({why}; {config.workers} data worker(s) per process decode, "
        f"augmentation in batches on {device.type})")
    urls = lambda names: [u for s in names for u in manifest.shard_urls(config.shards, s)]
    counts = {s: len(manifest.split(s).shards) for s in train.splits}
    return StreamedBatches(urls(train.splits), shard_positions(samples, counts, train_rows),
                           urls(val.splits) if val else [], val, plan, augment, rank, device, config.workers,
                           config.shuffle_buffer, preprocess)


def open_eval_data(shards: str, manifest: ShardManifest, selection: Selection, preprocess: Preprocess,
                   accelerator: Accelerator, *, batch_size: int,
                   workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """This rank's share of the selected samples, each counted once over all ranks, preprocessed as a model
    was trained and normalised on its device: (images, labels, keys) batches."""
    urls = [u for s in selection.splits for u in manifest.shard_urls(shards, s)]
    normalise = DeviceAugment(mean=preprocess.mean, std=preprocess.std)
    return streamed_eval_batches(urls, selection=selection, preprocess=preprocess, batch_size=batch_size,
                                 rank=accelerator.process_index, world_size=accelerator.num_processes, workers=workers,
                                 normalise=normalise, device=accelerator.device)
