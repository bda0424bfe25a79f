"""Which split and cross-validation fold each image goes to, by whole groups, stratified by class.

Splits the data gives (a TEST folder, a listing's split column, `train` included) are kept, and a group some of
whose images the data puts in a split takes its other images with it (a patient with rows given `val` and rows
left blank is all val); the data giving one group two splits is an error. The rest, the pool (a TRAIN folder,
what val is cut from in the Kaggle layout, or images with no split), is cut by group: `test_fraction` of the
groups to test (only where the data gives no test split), then `val_fraction` of them to val (only where it gives
no val split), the rest to train.
Every group also gets one of FOLDS folds for grouped k-fold cross-validation.

Groups of one class (cells, files) are dealt per class: the class's groups in a seeded order, the first
round(fraction x groups) to each held-out split, folds round-robin: exactly what earlier versions did with
TRAIN's cells, so the same data and seed give the same splits. Groups holding several classes (patients in
a listing) are dealt greedily, largest first, each to the split (or fold) that most needs its classes.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ..cli import UserError
from .audit import ImageFacts
from .sources import SourceImage

FOLDS = 5  # every group gets a fold index for grouped k-fold cross-validation
GROUPED = ("", "train")  # what cells and files grouping covers: the training side, where folds matter


def in_pool(image: SourceImage) -> bool:
    """Whether the packer deals this image to a split: one with no split, or a TRAIN folder's. A listing's row
    (line > 0) given `train` keeps it, as every split a listing gives is kept."""
    return image.split == "" or (image.split == "train" and not image.line)


@dataclass(frozen=True)
class Sample:
    """An image with its final split, label, group and fold."""

    facts: ImageFacts
    split: str
    label: int
    group: str
    fold: int


def deal_per_class(names: list[str], fractions: dict[str, float], seed: int, class_name: str) -> dict[str, str]:
    """Groups of one class -> held-out split, for the splits in `fractions` (in order: test, then val); each
    takes round(fraction x all the groups) from those not yet dealt."""
    out: dict[str, str] = {}
    for split, fraction in fractions.items():
        left = [g for g in names if g not in out]
        random.Random(f"{seed}:{split}:{class_name}").shuffle(left)
        out.update({g: split for g in left[:round(fraction * len(names))]})
    return out


def deal_greedy(counts: dict[str, Counter], shares: dict[str, float], seed: int, salt: str) -> dict[str, str]:
    """Groups holding several classes -> bin (a split or a fold): largest group first (ties in seeded order), each
    to the bin whose per-class totals, after taking it, stray least from its share of every class."""
    order = sorted(counts)
    random.Random(f"{seed}:{salt}").shuffle(order)
    order.sort(key=lambda g: -sum(counts[g].values()))
    totals: Counter = Counter()
    for c in counts.values():
        totals.update(c)
    have: dict[str, Counter] = {b: Counter() for b in shares}
    out: dict[str, str] = {}
    for group in order:
        def cost(b: str) -> float:  # squared shortfall against the target, each class weighted by its size
            return sum(((have[b][c] + n - shares[b] * totals[c]) ** 2 - (have[b][c] - shares[b] * totals[c]) ** 2)
                       / totals[c] for c, n in counts[group].items())
        best = min(shares, key=cost)
        have[best].update(counts[group])
        out[group] = best
    return out


def unmet_fractions(samples: Sequence[Sample], classes: list[str], held: dict[str, float]) -> list[str]:
    """One line per class and held-out split that a fraction asked for but that holds none of the class's images
    (too few groups: round(fraction x groups) is 0), and one per such split left empty."""
    lines = []
    for split, fraction in held.items():
        for name in classes:
            pool = {s.group for s in samples if s.facts.image.class_name == name and in_pool(s.facts.image)}
            if pool and not any(s.split == split and s.facts.image.class_name == name for s in samples):
                lines.append(f"class {name}: {split} holds none of its images: its {len(pool)} group(s) are too few "
                             f"for --{split}-fraction {fraction}")
        if not any(s.split == split for s in samples):
            lines.append(f"--{split}-fraction {fraction}: {split} is empty: every class has too few groups")
    return lines


def rows_of(images: Sequence[ImageFacts], limit: int = 5) -> str:
    """'lines 3, 7' where a listing names the images, else their paths; at most `limit`, then how many more."""
    lines = all(f.image.line for f in images)
    named = [str(n) for n in sorted(f.image.line for f in images)] if lines else sorted(f.image.rel_path for f in images)
    text = ", ".join(named[:limit]) + (f" and {len(named) - limit} more" if len(named) > limit else "")
    return f"line{'s' * (len(named) > 1)} {text}" if lines else text


def given_splits(facts: Sequence[ImageFacts], groups: dict[str, str]) -> dict[str, str]:
    """Group -> the held-out split (val, test...) the data gives some of its images, which the rest follow; a
    UserError naming the group and its rows where the data gives one group two splits. Only images `groups`
    names count: one outside the grouping (a TEST folder's, with cells) is a group of its own."""
    given: dict[str, dict[str, list[ImageFacts]]] = {}
    for f in facts:
        if f.image.split and f.image.rel_path in groups:
            given.setdefault(groups[f.image.rel_path], {}).setdefault(f.image.split, []).append(f)
    for group, by_split in sorted(given.items()):
        if len(by_split) > 1:
            parts = "; ".join(f"{split} ({rows_of(images)})" for split, images in sorted(by_split.items()))
            raise UserError(f"group {group.removeprefix('group:')!r} is given {len(by_split)} splits: {parts}; a "
                            "split never cuts a group: give its rows one split, or leave them empty")
    return {g: split for g, by_split in given.items() for split, images in by_split.items()
            if not any(in_pool(f.image) for f in images)}


def assign_splits(facts: Sequence[ImageFacts], groups: dict[str, str], classes: list[str], *, seed: int,
                  val_fraction: float, test_fraction: float, val_split: str = "group") -> list[Sample]:
    """Final split, label, group and fold of every image (see the module docstring). val_split='random' cuts
    val by image instead of by group, to show the leak of copies of one cell on both sides."""
    group_of = {f.image.rel_path: groups.get(f.image.rel_path, f.image.key) for f in facts}
    held = {"test": test_fraction, "val": val_fraction if val_split != "random" else 0.0}
    held = {k: v for k, v in held.items() if v > 0}
    members: dict[str, Counter] = {}  # group -> images per class
    for f in facts:
        members.setdefault(group_of[f.image.rel_path], Counter())[f.image.class_name] += 1
    single_class = all(len(c) == 1 for c in members.values())
    fold: dict[str, int] = {}
    pinned = given_splits(facts, groups)
    split_of: dict[str, str] = {}
    if single_class:
        for class_name in sorted({f.image.class_name for f in facts}):
            of_class = [f for f in facts if f.image.class_name == class_name]
            names = sorted({group_of[f.image.rel_path] for f in of_class})
            random.Random(f"{seed}:folds:{class_name}").shuffle(names)
            fold.update({g: i % FOLDS for i, g in enumerate(names)})
            pool = sorted({group_of[f.image.rel_path] for f in of_class if in_pool(f.image)} - set(pinned))
            split_of.update(deal_per_class(pool, held, seed, class_name))
    else:
        fold = {g: int(b) for g, b in deal_greedy(members, {str(k): 1 / FOLDS for k in range(FOLDS)}, seed,
                                                  "folds").items()}
        pooled = {group_of[f.image.rel_path] for f in facts if in_pool(f.image)} - set(pinned)
        shares = {**held, "train": 1 - sum(held.values())}
        dealt = deal_greedy({g: c for g, c in members.items() if g in pooled}, shares, seed, "splits")
        split_of = {g: s for g, s in dealt.items() if s != "train"}
    split_of.update(pinned)
    random_val: set[str] = set()
    if val_split == "random" and val_fraction > 0:  # image-level: leaks copies of one cell into both sides
        for class_name in sorted({f.image.class_name for f in facts}):
            items = [f.image.rel_path for f in facts if f.image.class_name == class_name and in_pool(f.image)
                     and split_of.get(group_of[f.image.rel_path]) is None]
            order = list(range(len(items)))
            random.Random(f"{seed}:val:{class_name}").shuffle(order)
            random_val.update(items[i] for i in order[:round(val_fraction * len(items))])
    samples = []
    for f in facts:
        group = group_of[f.image.rel_path]
        split = f.image.split
        if in_pool(f.image):
            split = "val" if f.image.rel_path in random_val else split_of.get(group, "train")
        samples.append(Sample(f, split, classes.index(f.image.class_name), group, fold[group]))
    return samples
