"""The sharding tool on real tar files: round trip, leak-free split, determinism, verify, bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest
import webdataset as wds
from PIL import Image

from bloodcells_dist.cli import UserError
from bloodcells_dist.pack import shards
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import PackOptions, pack_shards, verify_shards
from bloodcells_dist.pack.synthetic import TRUTH_NAME

from ..helpers import REAL_TRAIN, REPO, cli, jpeg, make_root, one_error_line, true_cells


def read_all(folder: Path) -> dict[str, list[dict]]:
    """Every sample of every split, read back with webdataset."""
    manifest = ShardManifest.load(folder)
    return {
        split: list(wds.WebDataset(manifest.shard_urls(folder, split), shardshuffle=False, empty_check=False))
        for split in manifest.splits
    }


def source_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpeg"))


def test_round_trip_every_image_once_bytes_and_labels(synthetic_root, synthetic_shards):
    samples = read_all(synthetic_shards)
    manifest = ShardManifest.load(synthetic_shards)
    seen = Counter()
    for split, items in samples.items():
        for s in items:
            meta = json.loads(s["json"])
            path = synthetic_root / meta["path"]
            assert s["jpg"] == path.read_bytes(), f"{meta['path']} bytes changed"
            assert manifest.classes[int(s["cls"])] == meta["class_name"] == path.parent.name
            assert meta["split"] == split
            assert (meta["width"], meta["height"]) == (320, 240)
            seen[meta["path"]] += 1
    files = {p.relative_to(synthetic_root).as_posix() for p in source_files(synthetic_root)}
    assert set(seen) == files
    assert set(seen.values()) == {1}
    assert manifest.classes == ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


def leaked_fraction(root: Path, samples: dict[str, list[dict]]) -> float:
    """Share of val images whose original cell (the generator's own record) also has copies in train."""
    with open(root / TRUTH_NAME, newline="") as f:
        truth = {row["path"]: row["cell"] for row in csv.DictReader(f)}
    cell = {split: [truth[json.loads(s["json"])["path"]] for s in items] for split, items in samples.items()}
    return sum(c in set(cell["train"]) for c in cell["val"]) / len(cell["val"])


def test_train_val_split_is_by_cell(synthetic_root, synthetic_shards):
    samples = read_all(synthetic_shards)
    cells = {split: {json.loads(s["json"])["group"] for s in items} for split, items in samples.items()}
    assert cells["train"] and cells["val"]
    assert not cells["train"] & cells["val"], "a recovered cell has copies on both sides of train/val"
    # The generator knows the truth: recovery is not perfect (>= 99%, test_cells), so a stray copy may
    # cross over, but nothing like the random split's leak (below).
    assert leaked_fraction(synthetic_root, samples) <= 0.10  # measured 0.045: one of 52 cells split 4 + 4
    manifest = ShardManifest.load(synthetic_shards)
    for c in manifest.classes:  # stratified: every class has val cells, about 20% of them
        n_val, n_train = manifest.splits["val"].groups_per_class[c], manifest.splits["train"].groups_per_class[c]
        assert n_val >= 1 and 0.1 <= n_val / (n_val + n_train) <= 0.35


def test_random_split_leaks_cells(synthetic_root, tmp_path):
    pack_shards(synthetic_root, tmp_path, PackOptions(seed=0, val_split="random"))
    samples = read_all(tmp_path)
    assert leaked_fraction(synthetic_root, samples) > 0.5, "a random split puts copies of a cell on both sides"


def test_manifest_counts(synthetic_root, synthetic_shards):
    manifest = ShardManifest.load(synthetic_shards)
    samples = read_all(synthetic_shards)
    assert sum(s.samples for s in manifest.splits.values()) == len(source_files(synthetic_root)) == 499
    for split, info in manifest.splits.items():
        assert info.samples == len(samples[split]) == sum(sh.samples for sh in info.shards)
        assert info.samples == sum(info.samples_per_class.values()) == sum(info.samples_per_fold.values())
        for shard in info.shards:
            data = (synthetic_shards / shard.file).read_bytes()
            assert len(data) == shard.bytes and hashlib.sha256(data).hexdigest() == shard.sha256
    assert manifest.splits["test"].samples == 99
    assert manifest.skipped == []


def test_a_manifest_written_before_warnings_still_loads_and_the_field_bumped_the_format(synthetic_shards, tmp_path):
    assert json.loads((synthetic_shards / "manifest.json").read_text())["format"] == "bloodcells-shards/4"
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_shards, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    for old in ({k: v for k, v in raw.items() if k != "warnings"},  # format 3 before the packer's warnings
                {**raw, "warnings": ["a note of the packer"]}):      # format 3 once they were added
        (copy / "manifest.json").write_text(json.dumps({**old, "format": "bloodcells-shards/3"}))
        manifest = verify_shards(copy)
        assert manifest.warnings == old.get("warnings", []) and manifest.splits == ShardManifest.load(
            synthetic_shards).splits
    (copy / "manifest.json").write_text(json.dumps({**raw, "format": "bloodcells-shards/5"}))
    proc = cli(shards.main, "verify", str(copy))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "format 'bloodcells-shards/5', this version reads bloodcells-shards/4")


def test_default_shard_counts(synthetic_root, tmp_path):
    """Splits over a few hundred samples get >= 16 shards (8 ranks x 2 workers); small ones keep >= 16 per shard."""
    manifest = pack_shards(synthetic_root, tmp_path, PackOptions(seed=0, val_fraction=0.1, groups="files"))
    assert manifest.splits["train"].samples > 256 and len(manifest.splits["train"].shards) == 16
    assert len(manifest.splits["test"].shards) == 99 // 16
    sizes = [s.samples for s in manifest.splits["train"].shards]
    assert max(sizes) - min(sizes) <= 1


def test_pack_is_deterministic(synthetic_root, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cells = true_cells(synthetic_root, tmp_path / "cells.csv")
    pack_shards(synthetic_root, a, PackOptions(seed=3, shard_size=40, cells=cells))
    pack_shards(synthetic_root, b, PackOptions(seed=3, shard_size=40, cells=cells, workers=1))
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir()) and "manifest.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between two packs"
    c = tmp_path / "c"
    pack_shards(synthetic_root, c, PackOptions(seed=4, shard_size=40, cells=cells))
    assert (a / "manifest.json").read_bytes() != (c / "manifest.json").read_bytes()


def test_verify_accepts_good_and_catches_flipped_byte_and_truncation(synthetic_root, tmp_path):
    pack_shards(synthetic_root, tmp_path, PackOptions(seed=0, groups="files"))
    verify_shards(tmp_path)
    shard = sorted(tmp_path.glob("train-*.tar"))[1]
    original = shard.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    proc = cli(shards.main, "verify", str(tmp_path))
    assert proc.returncode != 0
    assert shard.name in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(UserError, match=f"{shard.name}.*truncated"):
        verify_shards(tmp_path)

    shard.write_bytes(original)
    verify_shards(tmp_path)


BAD_CARD_HEADERS = {  # what each does to the dataset card's YAML header, and the words of verify's one line
    "a key given twice": (lambda h: h + "task_categories:\n- image-classification\n",
                          "key 'task_categories' given twice"),
    "an alias bomb": (lambda h: h + "bomb:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                      + "".join(f"  {n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcde", "bcdef")),
                      "aliases expand past"),
    "a list, not a mapping": (lambda h: "- " + h.replace("\n", "\n  ").rstrip() + "\n", "not a mapping"),
}


@pytest.mark.parametrize("case", sorted(BAD_CARD_HEADERS))
def test_a_dataset_card_with_a_bad_yaml_header_is_one_line_from_verify(case, synthetic_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(synthetic_shards, copy)
    card = copy / "README.md"
    edit, words = BAD_CARD_HEADERS[case]
    header, rest = card.read_text()[4:].split("\n---", 1)
    card.write_text("---\n" + edit(header + "\n") + "---" + rest)
    proc = cli(shards.main, "verify", str(copy))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "README.md is unreadable (its YAML header", words)


def test_verify_catches_bad_content_with_matching_checksum(synthetic_root, tmp_path):
    """A shard rewritten with a wrong label and its checksum updated still fails: labels are checked."""
    manifest = pack_shards(synthetic_root, tmp_path, PackOptions(seed=0, shard_size=50, groups="files"))
    shard = tmp_path / manifest.splits["test"].shards[0].file
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(shard), encoder=False) as tar:
        for i, s in enumerate(samples):
            tar.write({"__key__": s["__key__"], "jpg": s["jpg"], "json": s["json"],
                       "cls": str((int(s["cls"]) + (i == 0)) % 4).encode()})
    data = json.loads((tmp_path / "manifest.json").read_text())
    entry = data["splits"]["test"]["shards"][0]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="label"):
        verify_shards(tmp_path)


def make_bad_inputs(root: Path) -> dict[str, str]:
    """Add one of each kind of bad input to a copy of the dataset; returns relative path -> expected reason."""
    train = root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    good = next((train / "MONOCYTE").glob("*.jpeg")).read_bytes()
    bad = {
        "MONOCYTE/_90_1.jpeg": (good[: len(good) // 2], "truncated"),
        "MONOCYTE/_91_1.jpeg": (good[:600] + bytes(range(256)) * 8 + good[2648:], "corrupt"),
        "MONOCYTE/_92_1.jpeg": (b"", "zero-byte"),
        "MONOCYTE/_93_1.jpeg": (b"hello, not an image\n", "not JPEG"),
        "NEUTROPHIL/_94_1.jpeg": (None, "PNG"),
        "NEUTROPHIL/_95_1.jpeg": (None, "L image"),
        "NEUTROPHIL/notes.txt": (b"stray", "not a .jpeg"),
    }
    image = Image.open(io.BytesIO(good))
    for rel, (data, _) in bad.items():
        path = train / rel
        if rel.endswith("_94_1.jpeg"):
            image.save(path, format="PNG")
        elif rel.endswith("_95_1.jpeg"):
            image.convert("L").save(path, format="JPEG")
        else:
            path.write_bytes(data)
    (train / "LYMPHOCYTE" / "extra").mkdir()
    (train / "LYMPHOCYTE" / "extra" / "_0_1.jpeg").write_bytes(good)
    expected = {f"dataset2-master/dataset2-master/images/TRAIN/{rel}": reason for rel, (_, reason) in bad.items()}
    expected["dataset2-master/dataset2-master/images/TRAIN/LYMPHOCYTE/extra"] = "unexpected folder"
    return expected


@pytest.fixture
def bad_root(synthetic_root, tmp_path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "bad"
    shutil.copytree(synthetic_root, root)
    return root, make_bad_inputs(root)


def test_bad_inputs_are_skipped_counted_and_listed(bad_root, tmp_path):
    root, expected = bad_root
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), "--groups", "files", check=True)
    manifest = ShardManifest.load(out)
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    assert set(skipped) == set(expected)
    for path, reason in expected.items():
        assert reason in skipped[path], f"{path}: {skipped[path]!r} should mention {reason!r}"
        assert path in proc.stderr  # a warning per skipped file
    assert f"skipped {len(expected)}" in proc.stdout
    assert sum(s.samples for s in manifest.splits.values()) == 499  # every good image is still there
    verify_shards(out)


def test_strict_turns_bad_input_into_an_error_and_writes_nothing(bad_root, tmp_path):
    root, _ = bad_root
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), "--strict")
    assert proc.returncode != 0
    assert "--strict" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", ["missing", "empty", "no_images"])
def test_unusable_root_is_one_clear_error(case, tmp_path):
    root = tmp_path / "root"
    if case != "missing":
        root.mkdir()
    if case == "no_images":
        (root / "TRAIN" / "MONOCYTE").mkdir(parents=True)
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not out.exists()


def test_a_fraction_too_few_groups_cannot_honour_is_said_per_class(tmp_path):
    root = make_root(tmp_path / "src", {**{f"A/{i}.jpg": jpeg(i) for i in range(2)},
                                        **{f"B/{i}.jpg": jpeg(10 + i) for i in range(10)}})
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), "--test-fraction", "0.2", check=True)
    said = ["class A: test holds none of its images: its 2 group(s) are too few for --test-fraction 0.2",
            "class A: val holds none of its images: its 2 group(s) are too few for --val-fraction 0.2"]
    assert all(f"warning: {line}" in proc.stderr for line in said) and "--test-fraction is 0" not in proc.stderr
    assert ShardManifest.load(out).warnings == said
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(tmp_path / "few"), "--test-fraction", "0.2",
               "--val-fraction", "0.01", check=True)
    assert "warning: --val-fraction 0.01: val is empty: every class has too few groups" in proc.stderr


UNTRAINABLE = {  # name -> (source files, pack flags, words of the one error line)
    "class_only_in_test": ({**{f"TRAIN/{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(4)},
                            "TEST/C/0.jpg": jpeg(99)}, [], "class C has no training image (its 1 image(s) are all in test)"),
    "test_fraction_takes_all": ({f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(4)},
                                ["--test-fraction", "0.99", "--val-fraction", "0"], "no training image: --test-fraction 0.99"),
}


@pytest.mark.parametrize("case", sorted(UNTRAINABLE))
def test_splits_nothing_can_be_trained_on_are_refused_in_one_line(case, tmp_path):
    files, flags, words = UNTRAINABLE[case]
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(make_root(tmp_path / "src", files)), "--out", str(out), *flags)
    assert proc.returncode == 2
    one_error_line(proc.stderr, words)
    assert not (out / "manifest.json").exists()


def test_a_single_class_is_packed_with_a_warning_the_manifest_keeps(tmp_path):
    root = make_root(tmp_path / "src", {f"A/{i}.jpg": jpeg(i) for i in range(5)})
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(tmp_path / "out"), check=True)
    line = "only one class (A) has training images: a model of it learns nothing, and its accuracy and macro F1 are " \
           "1.0 by construction"
    assert f"warning: {line}" in proc.stderr and ShardManifest.load(tmp_path / "out").warnings == [line]


def test_a_write_error_mid_pack_is_one_line_and_leaves_no_partial_tar(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored, as the forked writers inherit both) makes the
    shard holding the one large image fail with an OSError (EFBIG), as a full disk fails with ENOSPC; the
    shards already written must go too."""
    noise = Image.frombytes("RGB", (400, 300), random.Random(0).randbytes(400 * 300 * 3))
    buf = io.BytesIO()
    noise.save(buf, "JPEG", quality=95)
    files = {f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(8)}
    root = make_root(tmp_path / "src", {**files, "A/large.jpg": buf.getvalue()})
    out = tmp_path / "out"
    limit = len(buf.getvalue()) // 2  # every shard of small images fits, the large image's does not
    old_handler, old_limit = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), "--shard-size", "2", "--workers", "2")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert proc.returncode == 2
    one_error_line(proc.stderr, f"cannot write shards to {out}: File too large (the partial shards were removed)")
    assert sorted(p.name for p in out.iterdir()) == []  # no .tar, no temporary file, no manifest


def test_existing_shards_need_overwrite(tmp_path):
    root = make_root(tmp_path / "src", {f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(20)})
    out = tmp_path / "out"
    pack_shards(root, out, PackOptions(seed=0, groups="files", shard_size=2))
    first = {p.name for p in out.glob("*.tar")}
    with pytest.raises(UserError, match="--overwrite"):
        pack_shards(root, out, PackOptions(seed=0, groups="files"))
    pack_shards(root, out, PackOptions(seed=1, shard_size=10, overwrite=True, groups="files"))
    verify_shards(out)
    manifest = ShardManifest.load(out)
    listed = {s.file for split in manifest.splits.values() for s in split.shards}
    assert len(first) > len(listed) and {p.name for p in out.glob("*.tar")} == listed  # no stale shards of the first


@pytest.mark.e2e
def test_interrupted_pack_leaves_nothing_verify_accepts(synthetic_root, tmp_path):
    """SIGKILL an overwriting pack once it has written 3 shards: the old manifest is gone, verify refuses, and
    no worker process outlives the packer."""
    out = tmp_path / "out"
    pack_shards(synthetic_root, out, PackOptions(seed=0, groups="files"))
    proc = subprocess.Popen([sys.executable, "-m", "bloodcells_dist", "pack", "--src", str(synthetic_root),
                             "--out", str(out), "--overwrite", "--shard-size", "5", "--groups", "files"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "BLOODCELLS_AT_SHARD": "3:pause"})
    for line in proc.stdout:  # blocking reads until the packer waits, 3 shards written
        if line.startswith("paused after 3 shards"):
            break
    else:
        raise AssertionError("the pack ended before its third shard")
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers, "the packer should be writing with worker processes"
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)  # PR_SET_PDEATHSIG: they die with the packer
    assert not alive, "the packer's worker processes outlived it"
    assert not (out / "manifest.json").exists() and len(list(out.glob("train-*.tar"))) >= 3
    with pytest.raises(UserError, match="manifest.json not found"):
        verify_shards(out)
    pack_shards(synthetic_root, out, PackOptions(seed=0, overwrite=True, groups="files"))  # a rerun cleans up and completes
    assert not list(out.glob(".*tmp*"))
    verify_shards(out)


@pytest.mark.e2e
@pytest.mark.skipif(not REAL_TRAIN.is_dir(), reason=f"real dataset not found at {REAL_TRAIN}")
def test_real_subset_packs_and_verifies(tmp_path):
    """200 real TRAIN images (50 per class, whole cells), copied into a temporary root (links out of a root
    are not followed)."""
    root = tmp_path / "real" / "TRAIN"
    for class_dir in sorted(REAL_TRAIN.iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for path in sorted(class_dir.glob("*.jpeg"))[:50]:
            shutil.copy(path, root / class_dir.name / path.name)
    out = tmp_path / "out"
    manifest = pack_shards(root.parent, out, PackOptions(seed=0, val_fraction=0.3))
    verify_shards(out)
    assert sum(s.samples for s in manifest.splits.values()) == 200 and not manifest.skipped
    samples = read_all(out)
    cells = {split: {json.loads(s["json"])["group"] for s in items} for split, items in samples.items()}
    assert not cells["train"] & cells["val"]
    first = samples["train"][0]
    assert first["jpg"] == (root.parent / json.loads(first["json"])["path"]).read_bytes()
