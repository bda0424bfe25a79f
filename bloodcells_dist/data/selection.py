"""Which samples a run reads: the one place that knows about splits and cross-validation folds."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..pack.manifest import ShardManifest


@dataclass(frozen=True)
class Selection:
    """The samples of `splits`; with fold >= 0 only that fold's samples (keep) or all but them (not keep).
    Used alike by the manifest's counts, the cache's rows and the stream's filter."""

    splits: tuple[str, ...]
    fold: int = -1  # -1: every sample of the splits
    keep: bool = True

    def count(self, manifest: ShardManifest) -> int:
        """How many samples this selects, from the manifest's counts."""
        total = 0
        for name in self.splits:
            split = manifest.split(name)
            in_fold = split.samples_per_fold.get(str(self.fold), 0)
            total += split.samples if self.fold < 0 else in_fold if self.keep else split.samples - in_fold
        return total

    def rows(self, split_index: torch.Tensor, folds: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Indices of the selected rows of a table whose rows carry a split index (into `names`) and a fold."""
        mask = torch.isin(split_index, torch.tensor([list(names).index(s) for s in self.splits]))
        if self.fold >= 0:
            mask &= (folds == self.fold) if self.keep else (folds != self.fold)
        return mask.nonzero().flatten()

    def accepts(self, sample: dict) -> bool:
        """Whether a streamed sample (of one of the splits) is selected; picklable, for data workers."""
        return self.fold < 0 or (json.loads(sample["json"])["fold"] == self.fold) == self.keep


def training_selections(train_splits: Sequence[str], val_split: str, val_fold: int) -> tuple[Selection, Selection | None]:
    """(what trains, what validates or None): with val_fold >= 0, that fold of the training splits validates
    and the other folds train (grouped k-fold cross-validation); else val_split validates (if any)."""
    splits = tuple(train_splits)
    if val_fold >= 0:
        return Selection(splits, val_fold, keep=False), Selection(splits, val_fold, keep=True)
    return Selection(splits), (Selection((val_split,)) if val_split else None)


def group_subset(rows: torch.Tensor, groups: Sequence[str], labels: torch.Tensor, fraction: float,
                 seed: int) -> torch.Tensor:
    """The rows of a seeded share `fraction` of their groups, class by class (a group's class: its most common
    label), at least one group a class: a training set of fewer cells or patients, for a learning curve. The
    draw for a smaller fraction is a subset of a larger one's (one seeded order per class, cut shorter)."""
    members: dict[str, list[int]] = {}
    for row in rows.tolist():
        members.setdefault(groups[row], []).append(row)
    by_class: dict[int, list[str]] = {}
    for group, group_rows in sorted(members.items()):
        label = Counter(int(labels[r]) for r in group_rows).most_common(1)[0][0]
        by_class.setdefault(label, []).append(group)
    kept: set[str] = set()
    for label, names in sorted(by_class.items()):
        random.Random(f"{seed}:subset:{label}").shuffle(names)
        kept.update(names[:max(1, round(fraction * len(names)))])
    return torch.tensor([r for r in rows.tolist() if groups[r] in kept], dtype=rows.dtype)


def train_subset(rows: torch.Tensor, groups: Sequence[str] | None, labels: torch.Tensor, fraction: float,
                 seed: int) -> tuple[torch.Tensor, str]:
    """group_subset of the training rows, and the line that says what was kept."""
    if groups is None:
        raise ValueError("train_fraction needs the samples' groups (a cache of format 2 or later)")
    kept = group_subset(rows, groups, labels, fraction, seed)
    count = lambda r: len({groups[i] for i in r.tolist()})
    return kept, (f"data: train_fraction {fraction:g}: {count(kept)} of {count(rows)} training groups, "
                  f"{len(kept)} of {len(rows)} samples")
