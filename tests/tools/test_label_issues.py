"""cv keeps every held-out image's probabilities; label-issues ranks the labels they contradict (cleanlab), on real
shards with labels flipped on purpose, and its relabelled listing packs."""

from __future__ import annotations

import csv
import json
import random
import shutil

import pytest

from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import PackOptions, pack_shards
from bloodcells_dist.tools import cv, label_issues

from ..helpers import assert_self_contained, cli, parse, train_args

pytestmark = pytest.mark.e2e


def read_rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cross_validated_probabilities_find_flipped_labels(synthetic_root, tmp_path):
    train = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    files = sorted(train.glob("*/*.jpeg"))
    classes = sorted({p.parent.name for p in files})
    rng = random.Random(0)
    flipped = set(rng.sample(range(len(files)), 12))  # 3% of 400
    flips = {}
    for i, path in enumerate(files):
        given = rng.choice([c for c in classes if c != path.parent.name]) if i in flipped else path.parent.name
        (tmp_path / "data" / given).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "data" / given / path.name)
        if i in flipped:
            flips[f"{given}/{path.name}"] = path.parent.name
    shards, runs = tmp_path / "shards", tmp_path / "cv"
    pack_shards(tmp_path / "data", shards, PackOptions(seed=0, test_fraction=0.0, groups="files"))
    proc = cli(cv.main, "--shards", str(shards), "--output-dir", str(runs),
               *train_args(shards, runs, "--epochs", "3", "--workers", "0", "--batch-size", "16")[6:], check=True)
    assert "out-of-fold probabilities of" in proc.stdout
    oof = read_rows(runs / cv.OOF_NAME)
    manifest = ShardManifest.load(shards)
    packed = manifest.splits["train"].samples + manifest.splits["val"].samples
    assert len(oof) == len({r["key"] for r in oof}) == packed  # all folds together: every image once
    assert json.loads((runs / "cv.json").read_text())["out_of_fold"]["expected"] == packed

    proc = cli(label_issues.main, str(runs), check=True)
    issues = read_rows(runs / "label-issues.csv")
    assert f"{len(issues)} of {packed} labels look wrong" in proc.stdout
    quality = [float(r["label_quality"]) for r in issues]
    assert quality == sorted(quality) and [int(r["rank"]) for r in issues] == list(range(1, len(issues) + 1))
    found = {r["path"] for r in issues} & set(flips)
    assert len(found) >= 0.5 * len(flips), (len(found), len(issues))  # most flips among the flagged images
    for r in issues:
        if r["path"] in flips:
            assert r["given_label"] == r["path"].split("/")[0]
    page = parse(runs / "label-issues.html")
    assert_self_contained(page)
    assert page.figures["gallery"] == min(len({r["group"] for r in issues}), label_issues.MAX_SHOWN)  # a tile a group

    listing = read_rows(runs / "relabelled.csv")  # every packed image once; the flagged ones relabelled
    assert len(listing) == packed and list(listing[0]) == ["path", "label"]
    suggested = {r["path"]: r["suggested_label"] for r in issues}
    assert all(r["label"] == suggested.get(r["path"], r["path"].split("/")[0]) for r in listing)
    shutil.copy(runs / "relabelled.csv", tmp_path / "data" / "relabelled.csv")
    repacked = pack_shards(tmp_path / "data" / "relabelled.csv", tmp_path / "repacked",
                           PackOptions(seed=0, test_fraction=0.0, groups="files"))
    counts = {c: sum(1 for r in listing if r["label"] == c) for c in classes}
    assert {c: sum(repacked.splits[s].samples_per_class[c] for s in repacked.splits) for c in classes} == counts
