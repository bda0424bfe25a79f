"""Source-cell recovery: checked against the synthetic generator's truth and against the real pixels."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from scipy.optimize import linear_sum_assignment

from bloodcells_dist.cli import UserError
from bloodcells_dist.pack import cells
from bloodcells_dist.pack.cells import image_features, read_mapping, recover_cells
from bloodcells_dist.pack.shards import pack_shards, verify_shards
from bloodcells_dist.pack.sources import scan_images
from bloodcells_dist.pack.synthetic import TRUTH_NAME, generate_dataset

from ..helpers import REAL_TRAIN, cli

pytestmark = pytest.mark.e2e  # seconds to minutes of cell recovery each: the slow layer


def train_images(root: Path) -> list[tuple[str, str, Path]]:
    images = scan_images(root).images
    return [(i.rel_path, i.class_name, i.path) for i in images if i.split == "train"]


@pytest.fixture(scope="module")
def copies16_root(tmp_path_factory) -> Path:
    """Synthetic TRAIN with 16 copies of every original, as the real data has at least (neutrophils)."""
    root = tmp_path_factory.mktemp("copies16")
    generate_dataset(root, per_class=96, seed=1, copies=16, test_per_class=0)
    return root


@pytest.mark.parametrize("which", ["copies16_root", "synthetic_root"])
def test_recovers_the_synthetic_cells(which, request):
    root = request.getfixturevalue(which)  # 16 copies per original; and the suite's 8 (some with only 4)
    with open(root / TRUTH_NAME, newline="") as f:
        truth = {row["path"]: row["cell"] for row in csv.DictReader(f)}
    mapping, apart = recover_cells(train_images(root))
    assert apart == []
    paths = sorted(mapping)
    assert paths == sorted(p for p in truth if "/TRAIN/" in p), "every TRAIN image gets exactly one cell"
    found, true = sorted(set(mapping.values())), sorted({truth[p] for p in paths})
    counts = np.zeros((len(found), len(true)))
    for p in paths:
        counts[found.index(mapping[p]), true.index(truth[p])] += 1
    rows, cols = linear_sum_assignment(-counts)  # best one-to-one match of found cells to true ones
    # 16 copies: >= 99% as the issue asks; 8 copies (cells of 3-4 copies look like fragments): >= 97%.
    target = 0.99 if which == "copies16_root" else 0.97
    assert counts[rows, cols].sum() / len(paths) >= target, f"{len(found)} cells found, {len(true)} true"
    for p in paths:  # no cell mixes classes: ids carry the class, and it is the image's own
        assert mapping[p].split("/")[0] == truth[p].split("/")[1]


def test_cells_cli_mapping_is_reused_by_pack_and_checked(synthetic_root, tmp_path):
    mapping_file, sheet = tmp_path / "cells.csv", tmp_path / "cells.png"
    proc = cli(cells.main, "--src", str(synthetic_root), "--out", str(mapping_file), "--sheet", str(sheet), check=True)
    assert re.search(r"400 images -> \d+ cells", proc.stdout) and sheet.stat().st_size > 10_000
    mapping = read_mapping(mapping_file)
    manifest = pack_shards(synthetic_root, tmp_path / "shards", cells=mapping_file)
    assert manifest.args["cells"] == str(mapping_file)
    packed = {}
    for split in ("train", "val"):
        for sample in wds.WebDataset(manifest.shard_urls(tmp_path / "shards", split), shardshuffle=False,
                                     empty_check=False):
            meta = json.loads(sample["json"])
            packed[meta["path"]] = meta["group"]
    assert packed == {path: row.cell for path, row in mapping.items()}
    # A mapping made from other bytes is refused rather than trusted.
    rows = mapping_file.read_text().splitlines()
    rows[1] = re.sub(r",[0-9a-f]{64}$", "," + "0" * 64, rows[1])
    mapping_file.write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match="made from other bytes"):
        pack_shards(synthetic_root, tmp_path / "shards2", cells=mapping_file)


@pytest.mark.skipif(not REAL_TRAIN.is_dir(), reason="real data not present at ../shared/blood-cells")
def test_real_subset_splits_by_cell_and_cells_are_tight(tmp_path):
    """500 real TRAIN images: no recovered cell on both sides or in two folds, and the pixels agree:
    a copy keeps its nucleus colour, so it varies far less within a recovered cell than within an `i`."""
    root = tmp_path / "real" / "TRAIN"
    for class_dir in sorted(REAL_TRAIN.iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.glob("*.jpeg"))[::19][:125]:
            shutil.copyfile(path, root / class_dir.name / path.name)
    out = tmp_path / "shards"
    manifest = pack_shards(root.parent, out, seed=0)
    verify_shards(out)
    side, fold, meta_of = defaultdict(set), defaultdict(set), {}
    for split in ("train", "val"):
        for sample in wds.WebDataset(manifest.shard_urls(out, split), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            side[meta["group"]].add(split)
            fold[meta["group"]].add(meta["fold"])
            meta_of[meta["path"]] = meta
    assert len(meta_of) == 500
    assert all(len(s) == 1 for s in side.values()), "a cell has copies in train and val"
    assert all(len(f) == 1 for f in fold.values()), "a cell is in two folds"
    colour = {p: image_features((root.parent / p).read_bytes()).colour[2] for p in meta_of}

    def within_sd(key) -> float:
        groups = defaultdict(list)
        for p, m in meta_of.items():
            groups[(m["class_name"], key(p, m))].append(colour[p])
        return float(np.median([np.std(v) for v in groups.values() if len(v) >= 3]))

    by_cell = within_sd(lambda p, m: m["group"])
    by_i = within_sd(lambda p, m: Path(p).stem.split("_")[1])
    assert by_cell < 0.25 * by_i, f"nucleus blue sd within cells {by_cell:.2f}, within i {by_i:.2f}"
