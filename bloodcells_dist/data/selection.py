"""Which samples a run reads: the one place that knows about splits and cross-validation folds."""

from __future__ import annotations

import json
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
