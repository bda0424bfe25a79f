"""Several datasets in one run: a lab's own cells and public ones, trained together from the decoded cache.

    classes = united_classes(manifests)                  # the first dataset's classes, then new names
    data = open_joint_data(config, folders, manifests, classes, accelerator)

The first shard folder is the run's own data: its validation (val_split or val_fold) picks the best weights.
Every other folder trains on its train_splits (all folds: a cross-validation fold is the first dataset's) and,
where it has the run's val_split and does not train on it, is validated too, reported per dataset. Classes are
united by name (case aside, the first spelling kept). Each dataset's samples enter an epoch at its sampling
weight (plan.py): at weight 1 every sample exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator

from ..cli import UserError
from ..config import TrainConfig
from ..output import say
from ..pack.manifest import ShardManifest
from .augment import training_augment
from .batches import CachedBatches
from .cache import DecodedSamples, cache_bytes, default_cache_dir, load_or_build, memory_budget
from .plan import EpochPlan, take_of
from .preprocess import Preprocess
from .selection import Selection, train_subset, training_selections


def united_classes(manifests: list[ShardManifest]) -> list[str]:
    """The first dataset's classes in their order, then each further dataset's new names (case aside)."""
    classes: list[str] = []
    for manifest in manifests:
        known = {c.casefold() for c in classes}
        classes += [c for c in manifest.classes if c.casefold() not in known]
    return classes


def dataset_names(folders: list[str], manifests: list[ShardManifest]) -> list[str]:
    """Each dataset's name as its manifest records it (else its folder), made unique with #2, #3..."""
    names: list[str] = []
    for folder, manifest in zip(folders, manifests):
        name = manifest.dataset or folder
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    return names


def selections(config: TrainConfig, manifest: ShardManifest, first: bool) -> tuple[Selection, Selection | None]:
    """(what trains, what validates) of one dataset: the first as configured; the others train on the
    train_splits they have and validate on val_split where they have it and do not train on it."""
    if first:
        return training_selections(config.train_splits, config.val_split, config.val_fold)
    have = tuple(s for s in config.train_splits if s in manifest.splits)
    if not have:
        raise UserError(f"{manifest.dataset or 'a shard folder'}: none of train_splits {list(config.train_splits)} "
                        f"in its shards (it has {', '.join(manifest.splits)})")
    validates = config.val_split and config.val_split in manifest.splits and config.val_split not in have
    return Selection(have), (Selection((config.val_split,)) if validates else None)


def open_joint_data(config: TrainConfig, folders: list[str], manifests: list[ShardManifest], classes: list[str],
                    accelerator: Accelerator) -> CachedBatches:
    """The training batches of several datasets from one decoded cache each, their labels put in `classes`;
    validation per dataset (CachedBatches.extra_val). The stream reads one shard folder: several need the cache."""
    if config.data == "stream":
        raise UserError("several shard folders train from the decoded cache: set data to cache or auto "
                        "(data: stream reads one shard folder)")
    preprocess = Preprocess.of(config)
    plans = [(folder, manifest, *selections(config, manifest, i == 0))
             for i, (folder, manifest) in enumerate(zip(folders, manifests))]
    split_lists = [list(dict.fromkeys([*train.splits, *(val.splits if val else ())])) for _, _, train, val in plans]
    need = sum(cache_bytes(m, splits, config.image_size) for (_, m, _, _), splits in zip(plans, split_lists))
    budget = memory_budget(accelerator.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), config.cache_max_mb)
    if need > budget:
        raise UserError(f"the decoded caches of {len(folders)} shard folders need {need / 2**20:,.0f} MB, more than "
                        f"the {budget / 2**20:,.0f} MB this process may use; raise cache_max_mb")
    names = dataset_names(folders, manifests)
    images, labels, ids, train_parts, val_parts = [], [], [], [], {}
    offset = 0
    for (folder, manifest, train, val), splits, name in zip(plans, split_lists, names):
        with accelerator.local_main_process_first():
            samples, path, built = load_or_build(manifest, folder, splits, preprocess,
                                                 cache_dir=Path(config.cache_dir or default_cache_dir()),
                                                 workers=min(os.cpu_count() or 1, 16))
        say(f"data: {name}: cache {'built' if built else 'loaded'} ({path})")
        assert samples.images is not None
        to_united = torch.tensor([classes.index(next(c for c in classes if c.casefold() == name.casefold()))
                                  for name in manifest.classes])
        images.append(samples.images)
        labels.append(to_united[samples.labels])
        ids.append(samples.ids)
        rows = samples.select(train)
        if config.train_fraction < 1 and name == names[0]:  # the run's own data: its learning curve
            rows, line = train_subset(rows, samples.groups, samples.labels, config.train_fraction, config.seed)
            say(line)
        train_parts.append(rows + offset)
        if val is not None:
            val_parts[name] = samples.select(val) + offset
        offset += len(samples.labels)
    weights = config.shard_weights or (1.0,) * len(folders)
    parts = tuple((len(rows), w) for rows, w in zip(train_parts, weights))
    plan = EpochPlan(sum(take_of(n, w) for n, w in parts), config.batch_size, accelerator.num_processes,
                     config.grad_accum, seed=config.seed, shuffle=config.shuffle, parts=parts)
    united = DecodedSamples(splits=[], shard=torch.zeros(0), position=torch.zeros(0), split=torch.zeros(0),
                            labels=torch.cat(labels), folds=torch.zeros(0), ids=torch.cat(ids), keys=[],
                            images=torch.cat(images))
    augment = training_augment(config, preprocess, accelerator.mixed_precision)
    primary_val = val_parts.pop(names[0], torch.zeros(0, dtype=torch.long))
    return CachedBatches(united.to(accelerator.device), torch.cat(train_parts), primary_val, plan, augment,
                         accelerator.process_index, accelerator.device, extra_val=val_parts)

