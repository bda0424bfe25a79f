"""Groups, the unit a split never cuts: `--groups auto|cells|csv|files`.

- cells: the augmented copies of one source cell (recovered from the pixels, `cells.py`): datasets such as the
  Kaggle "blood-cells" TRAIN folder, made of rotated, flipped and shifted copies of a few hundred cells.
- csv: the listing's group column (patient, slide, smear): what a lab's data must be split by.
- files: every image its own group; exact duplicates never reach here (the audit keeps one copy), and near
  duplicates of one class (a re-saved copy, `audit.NEAR_BITS`) share a group.
- auto: csv when the listing has a group column; else it measures whether the data is made of augmented
  copies (the share of a sample of images with a near-copy in its class) and picks cells or files.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cli import UserError
from .audit import ImageFacts, near_pairs
from .cells import (
    COLOUR_SCALE,
    SIMILARITY_SCALE,
    describable,
    describe_images,
    read_mapping,
    recover_cells,
    ring_similarity,
)
from .splits import GROUPED

METHODS = ("auto", "cells", "csv", "files")
COPY_SAMPLE = 100  # images sampled per class to look for augmented copies
NEAR_COPY = 2.0  # cells.py distance under which two images show one cell: Kaggle copies median 0.4-1.9,
#                  distinct PBC cells 4 or more (median 5.5-8.8); measured on 100 images per class of each
COPY_SHARE = 0.10  # auto picks cells when this share of the sample has a near-copy (Kaggle TRAIN 63%, PBC 0%)


@dataclass(frozen=True)
class Grouping:
    """Each image's group, how it was chosen, and what was measured."""

    method: str  # cells | csv | files
    why: str
    groups: dict[str, str]  # relative path -> group id
    measured: dict = field(default_factory=dict)
    set_apart: list[str] = field(default_factory=list)  # images the cell recovery could not describe

    def record(self) -> dict:
        """What the manifest keeps of it."""
        return {"method": self.method, "why": self.why, "measured": self.measured, "set_apart": self.set_apart}


def measure_copies(facts: Sequence[ImageFacts], *, seed: int, pool: Executor, per_class: int = COPY_SAMPLE) -> dict:
    """The share of up to `per_class` images per class (seeded sample) with a near-copy among the sampled
    images of their class: the copies of one cell keep their nucleus colour and, up to a rotation or flip,
    the rings around it (cells.py); distinct cells do not."""
    by_class: dict[str, list[ImageFacts]] = {}
    for f in facts:
        by_class.setdefault(f.image.class_name, []).append(f)
    picks = {name: random.Random(f"{seed}:copies:{name}").sample(sorted(members, key=lambda f: f.image.rel_path),
                                                                 min(per_class, len(members)))
             for name, members in sorted(by_class.items())}
    listed = [(p.image.rel_path, name, p.image.path) for name, pick in picks.items() for p in pick]
    described = iter(describe_images(listed, pool=pool))  # one pass over every class: one pool, full chunks
    per_class_share, sampled, with_copy = {}, 0, 0
    for name, pick in picks.items():
        features = [f for f in (next(described) for _ in pick) if describable(f)]
        if len(features) < 2:
            continue
        colour = np.stack([f.colour for f in features])
        similarity = ring_similarity(np.stack([f.rings for f in features]))
        distance = np.hypot(np.clip(1 - similarity, 0, None) / SIMILARITY_SCALE,
                            np.sqrt(((colour[:, None] - colour[None]) ** 2).sum(-1)) / COLOUR_SCALE)
        np.fill_diagonal(distance, np.inf)
        copies = int((distance.min(1) < NEAR_COPY).sum())
        per_class_share[name] = round(copies / len(features), 3)
        sampled, with_copy = sampled + len(features), with_copy + copies
    return {"sampled": sampled, "with_near_copy": with_copy, "share": round(with_copy / max(sampled, 1), 3),
            "per_class": per_class_share, "near_copy_distance": NEAR_COPY, "threshold": COPY_SHARE}


def choose_method(requested: str, *, has_groups: bool, facts: Sequence[ImageFacts], seed: int,
                  pool: Executor) -> tuple[str, str, dict]:
    """(method, why, measurement) for `--groups requested` over the images the packer splits."""
    if requested not in METHODS:
        raise UserError(f"--groups {requested}: expected one of {', '.join(METHODS)}")
    if requested == "csv" and not has_groups:
        raise UserError("--groups csv needs a CSV listing with a group column (path,label,group[,split])")
    if requested != "auto":
        return requested, "as asked (--groups)", {}
    if has_groups:
        return "csv", "auto: the listing has a group column", {}
    measured = measure_copies(facts, seed=seed, pool=pool)
    share = f"{measured['share']:.0%} of {measured['sampled']} sampled images have a near-copy in their class"
    if measured["share"] >= COPY_SHARE:
        return "cells", f"auto: {share} (augmented copies of source cells; at least {COPY_SHARE:.0%} picks cells)", measured
    return "files", f"auto: {share} (originals, not augmented copies; under {COPY_SHARE:.0%} picks files)", measured


def cells_from_mapping(facts: Sequence[ImageFacts], mapping_file: Path) -> dict[str, str]:
    """Relative path -> cell, from a mapping written by `bloodcells cells`, checked against the
    images: every one listed, with these bytes, in a cell of its own class."""
    known = read_mapping(mapping_file)
    missing = [f.image.rel_path for f in facts if f.image.rel_path not in known]
    if missing:
        raise UserError(f"{mapping_file} has no cell for {len(missing)} image(s), first: {missing[0]} "
                        "(rerun bloodcells cells on this dataset)")
    stale = [f.image.rel_path for f in facts if f.sha256 != known[f.image.rel_path].sha256]
    if stale:
        raise UserError(f"{mapping_file} was made from other bytes for {len(stale)} image(s), first: "
                        f"{stale[0]} (line {known[stale[0]].line}; rerun bloodcells cells on this dataset)")
    wrong = [f for f in facts if known[f.image.rel_path].class_name != f.image.class_name]
    if wrong:
        row = known[wrong[0].image.rel_path]
        raise UserError(f"{mapping_file}: line {row.line} puts {wrong[0].image.rel_path} in class {row.class_name!r}, "
                        f"but its folder says {wrong[0].image.class_name!r}")
    return {f.image.rel_path: known[f.image.rel_path].cell for f in facts}


def merge_near_duplicates(facts: Sequence[ImageFacts]) -> dict[str, str]:
    """files grouping: every image its own group (its key), near duplicates within a class merged into the group
    of the first by path (union-find over the audit's near-duplicate pairs)."""
    parent = list(range(len(facts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in near_pairs(facts):
        if facts[i].image.class_name == facts[j].image.class_name:
            a, b = sorted((root(i), root(j)), key=lambda k: facts[k].image.rel_path)
            parent[b] = a
    return {f.image.rel_path: facts[root(i)].image.key for i, f in enumerate(facts)}


def group_images(kept: Sequence[ImageFacts], *, requested: str, has_groups: bool, cells_file: Path | None,
                 seed: int, pool: Executor, say: Callable[[str], None]) -> Grouping:
    """The group of every image (`kept`: after the audit's policy). The listing's groups cover every row, those
    the listing puts in a split too (splits.py keeps such a group whole); cells and files group the pool only."""
    if cells_file is not None and requested not in ("auto", "cells"):
        raise UserError(f"--cells gives recovered cells, but --groups is {requested}")
    facts = [f for f in kept if f.image.split in GROUPED]
    method, why, measured = ("cells", "as given (--cells)", {}) if cells_file is not None else \
        choose_method(requested, has_groups=has_groups, facts=facts, seed=seed, pool=pool)
    apart: list[str] = []
    if method == "cells" and cells_file is not None:
        groups = cells_from_mapping(facts, cells_file)
    elif method == "cells":
        say(f"recovering the source cells of {len(facts)} images from their pixels "
            "(bloodcells cells writes them once for reuse with --cells)")
        groups, apart = recover_cells([(f.image.rel_path, f.image.class_name, f.image.path) for f in facts],
                                      pool=pool, progress=say)
    elif method == "csv":
        groups = {f.image.rel_path: f"group:{f.image.group}" if f.image.group else f.image.key for f in kept}
    else:
        groups = merge_near_duplicates(facts)
    return Grouping(method, why, groups, measured, apart)
