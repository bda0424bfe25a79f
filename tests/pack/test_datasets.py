"""Any white-cell dataset (issue 18): layouts, CSV listings with groups, the audit, auto grouping, geometry,
and 8 classes through every tool. The published PBC sample is read as it is, where ../shared has it."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from bloodcells_dist.cli import UserError
from bloodcells_dist.data.preprocess import FILL, Preprocess, fit_to, window_side
from bloodcells_dist.pack import audit, shards
from bloodcells_dist.pack import shards as shards_cli
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards, verify_shards
from bloodcells_dist.pack.sources import HIDDEN, LINK_OUT, NOT_REGULAR, scan_images
from bloodcells_dist.pack.splits import FOLDS, assign_splits
from bloodcells_dist.pack.synthetic import generate_dataset
from bloodcells_dist.tools import evaluate, export, hub, predict
from bloodcells_dist.train import trainer

from ..helpers import REPO, cli, jpeg, make_root, one_error_line

PBC_SAMPLE = REPO.parent / "shared" / "datasets" / "pbc-sample"
PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def samples_of(folder: Path) -> list[dict]:
    """Every packed sample's metadata, with its split, key and sha256."""
    manifest = ShardManifest.load(folder)
    out = []
    for split in manifest.splits:
        for s in wds.WebDataset(manifest.shard_urls(folder, split), shardshuffle=False, empty_check=False):
            out.append({**json.loads(s["json"]), "key": s["__key__"], "label": int(s["cls"]),
                        "sha256": hashlib.sha256(s["jpg"]).hexdigest()})
    return out


@pytest.fixture(scope="module")
def pbc_sample_shards(tmp_path_factory) -> tuple[Path, object]:
    if not PBC_SAMPLE.is_dir():
        pytest.skip("the PBC sample is not at ../shared/datasets/pbc-sample")
    out = tmp_path_factory.mktemp("pbc") / "shards"
    proc = cli(shards.main, "pack", "--src", str(PBC_SAMPLE), "--out", str(out), "--test-fraction", "0.15",
               check=True)
    return out, proc


def test_the_pbc_sample_packs_as_class_folders_and_the_audit_lists_exactly_its_problems(pbc_sample_shards):
    out, proc = pbc_sample_shards
    manifest = verify_shards(out)
    assert manifest.layout == "classes" and manifest.classes == PBC_CLASSES  # as the folders spell them
    assert manifest.dataset == "pbc-sample" and set(manifest.splits) == {"train", "val", "test"}
    assert manifest.groups["method"] == "files" and manifest.groups["measured"]["share"] < 0.1
    assert "groups: files (auto: 0% of" in proc.stdout
    # As published: one non-image named .jpg, a byte-identical pair within basophil, one across two classes.
    assert manifest.skipped == [{"path": "neutrophil/.DS_169665.jpg", "reason": "not JPEG data (no JPEG start marker)"}]
    report = json.loads((out / "audit.json").read_text())
    sets = {tuple(f["path"] for f in g["files"]): g["kind"] for g in report["exact_duplicates"]["list"]}
    assert sets == {("basophil/BA_251042.jpg", "basophil/BA_988506.jpg"): "within_class",
                    ("eosinophil/EO_225902.jpg", "neutrophil/BNE_191112.jpg"): "across_classes"}
    assert [(e["path"], e["reason"].split(":")[0]) for e in manifest.excluded] == [
        ("basophil/BA_988506.jpg", "exact duplicate of basophil/BA_251042.jpg (one copy kept)"),
        ("eosinophil/EO_225902.jpg", "label conflict"), ("neutrophil/BNE_191112.jpg", "label conflict")]
    assert "across classes: eosinophil/EO_225902.jpg (eosinophil), neutrophil/BNE_191112.jpg (neutrophil)" in proc.stdout
    samples = samples_of(out)
    assert len(samples) == 196 - 1 - 3  # every file packed but the non-image and the three excluded
    splits_of = defaultdict(set)
    for s in samples:
        splits_of[s["sha256"]].add(s["split"])
    assert all(len(v) == 1 for v in splits_of.values()), "an image's bytes are in two splits"
    per_class = Counter((s["class_name"], s["split"]) for s in samples)
    for name in PBC_CLASSES:  # stratified: every class in every split, about 15% in test
        total = sum(per_class[(name, s)] for s in ("train", "val", "test"))
        assert per_class[(name, "test")] == round(0.15 * total) and per_class[(name, "val")] >= 1


def test_the_audit_command_reports_without_packing(tmp_path):
    if not PBC_SAMPLE.is_dir():
        pytest.skip("the PBC sample is not at ../shared/datasets/pbc-sample")
    report_file = tmp_path / "audit.json"
    proc = cli(audit.main, "--src", str(PBC_SAMPLE), "--out", str(report_file), check=True)
    report = json.loads(report_file.read_text())
    assert report["files"] == 196 and report["readable_images"] == 195
    assert report["exact_duplicates"]["within_class"] == 1 and report["exact_duplicates"]["across_classes"] == 1
    assert report["sizes"]["basophil"]["sizes"]["360x363"] == 22 and report["balance"]["images_per_class"]["ig"] == 25
    assert "1 across classes (label conflicts)" in proc.stdout and "class balance:" in proc.stdout


def test_the_audit_command_checks_its_outputs_before_the_work(tmp_path):
    src = make_root(tmp_path / "src", {f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(3)})
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    for flag, path, words in (("--out", tmp_path / "a-folder", "a-folder is a folder: give a file name"),
                              ("--out", tmp_path / "a-file" / "audit.json", "a-file is a file, not a folder"),
                              ("--html", tmp_path / "a-file" / "sub" / "audit.html", "a-file is a file, not a folder"),
                              ("--out", tmp_path / "missing" / "audit.json", "does not exist")):
        proc = cli(audit.main, "--src", str(src), flag, str(path), "--workers", "1")
        assert proc.returncode == 2 and proc.stdout == ""  # refused before the audit read a single image
        one_error_line(proc.stderr, f"{flag} {path}", words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder", "src"]
    assert list((tmp_path / "a-folder").iterdir()) == []


def patient_listing(root: Path, *, patients: int = 12, per_patient: int = 10) -> Path:
    """A lab-style listing: images in per-patient folders, each patient with cells of several classes."""
    rng = random.Random(1)
    rows = []
    for p in range(patients):
        for i in range(per_patient):
            rel = f"patient{p:02d}/img{i:03d}.jpg"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(p * 1000 + i, size=(40, 30)))
            rows.append((rel, rng.choice(["blast", "Lymphocyte", "neutrophil"]), f"P{p:02d}", 40 + p))
    listing = root / "listing.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group", "age"), *rows])
    return listing


def test_a_csv_listing_with_patient_groups_never_splits_a_patient(tmp_path):
    listing = patient_listing(tmp_path / "lab")
    out = tmp_path / "shards"
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(out), "--test-fraction", "0.2",
               "--val-fraction", "0.2", check=True)
    manifest = verify_shards(out)
    assert manifest.layout == "csv" and manifest.classes == ["Lymphocyte", "blast", "neutrophil"]
    assert manifest.groups["method"] == "csv" and "listing columns ignored: age" in proc.stderr
    samples = samples_of(out)
    assert len(samples) == 120
    split_of, fold_of = defaultdict(set), defaultdict(set)
    for s in samples:
        split_of[s["group"]].add(s["split"])
        fold_of[s["group"]].add(s["fold"])
    assert all(len(v) == 1 for v in split_of.values()) and all(len(v) == 1 for v in fold_of.values())
    patients = Counter(next(iter(v)) for v in split_of.values())
    assert patients["test"] >= 2 and patients["val"] >= 2 and patients["train"] >= 6  # 12 patients, whole
    assert sorted({s["fold"] for s in samples}) == list(range(FOLDS))


def cells_picture(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A picture unlike any other seed's: random coloured discs on a pale background."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (235, 220, 225))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y, r = rng.randrange(size[0]), rng.randrange(size[1]), rng.randrange(6, 20)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(40, 200) for _ in range(3)))
    return image


def encoded(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_rotated_and_flipped_copies_are_near_duplicates_and_across_classes_a_label_conflict(tmp_path):
    files = {f"{c}/{i}.jpg": encoded(cells_picture(10 * k + i)) for k, c in enumerate("AB") for i in range(6)}
    turned = cells_picture(0).transpose(Image.Transpose.ROTATE_90)  # A/0, turned and re-encoded, filed under B
    files["B/turned.jpg"] = encoded(turned, quality=60)
    files["A/mirrored.jpg"] = encoded(cells_picture(1).transpose(Image.Transpose.FLIP_LEFT_RIGHT), quality=70)
    root = make_root(tmp_path / "src", files)
    report_file = tmp_path / "audit.json"
    proc = cli(audit.main, "--src", str(root), "--out", str(report_file), "--workers", "1", check=True)
    near = {(p["a"], p["b"]): p["kind"] for p in json.loads(report_file.read_text())["near_duplicates"]["list"]}
    assert near == {("A/0.jpg", "B/turned.jpg"): "across_classes", ("A/1.jpg", "A/mirrored.jpg"): "within_class"}
    assert "near duplicates across classes: A/0.jpg and B/turned.jpg" in proc.stdout
    out = tmp_path / "out"
    manifest = pack_shards(root, out, workers=1)
    assert [(e["path"], e["reason"].split(":")[0]) for e in manifest.excluded] == [("A/0.jpg", "label conflict"),
                                                                                  ("B/turned.jpg", "label conflict")]
    packed_paths = {s["path"]: s for s in samples_of(out)}
    assert "A/0.jpg" not in packed_paths and "B/turned.jpg" not in packed_paths
    assert packed_paths["A/1.jpg"]["group"] == packed_paths["A/mirrored.jpg"]["group"]  # one group: one split


def given_split_listing(root: Path, extra: list[tuple[str, str, str, str]] = ()) -> Path:
    """Ten patients of three classes; P01 has two rows given val and three left blank, P02 one given test and
    two blank; `extra` rows (path, label, group, split) are added."""
    given = {"P01/0.jpg": "val", "P01/3.jpg": "val", "P02/2.jpg": "test"}
    rows = [(f"P{p:02d}/{i}.jpg", ["blast", "mono", "neutro"][(p + i) % 3], f"P{p:02d}", given.get(f"P{p:02d}/{i}.jpg", ""))
            for p in range(10) for i in range(5 if p != 2 else 3)] + list(extra)
    for n, (rel, *_) in enumerate(rows):
        make_root(root, {rel: jpeg(1000 + n, size=(40, 30))})
    listing = root / "listing.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group", "split"), *rows])
    return listing


def forge(out: Path, split: str, edit) -> None:
    """Rewrite the first sample of `split`'s first shard with edit(meta), and the manifest to match it (checksum,
    counts): what a packer that cut a group would have written."""
    data = json.loads((out / "manifest.json").read_text())
    info = data["splits"][split]
    shard = out / info["shards"][0]["file"]
    samples = list(wds.WebDataset(str(shard), shardshuffle=False, empty_check=False))
    with wds.TarWriter(str(shard), encoder=False) as tar:
        for i, s in enumerate(samples):
            meta = json.loads(s["json"])
            tar.write({"__key__": s["__key__"], "jpg": s["jpg"], "cls": s["cls"],
                       "json": json.dumps(edit(meta) if i == 0 else meta).encode()})
    info["shards"][0].update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    metas = [json.loads(s["json"]) for f in info["shards"]
             for s in wds.WebDataset(str(out / f["file"]), shardshuffle=False, empty_check=False)]
    info.update(shards_cli.recount(metas, data["classes"], data["folds"]))
    (out / "manifest.json").write_text(json.dumps(data))


def test_a_listing_group_stays_whole_across_given_and_blank_rows_and_verify_checks_it(tmp_path):
    listing = given_split_listing(tmp_path / "lab")
    out = tmp_path / "shards"
    pack_shards(listing, out, workers=1)
    verify_shards(out)
    split_of, fold_of = defaultdict(set), defaultdict(set)
    for s in samples_of(out):
        split_of[s["group"]].add(s["split"])
        fold_of[s["group"]].add(s["fold"])
    assert split_of["group:P01"] == {"val"} and split_of["group:P02"] == {"test"}  # blank rows follow given ones
    assert all(len(v) == 1 for v in split_of.values()) and all(len(v) == 1 for v in fold_of.values())
    # verify reads the group from the shards: a group in two splits (test included), or in two folds, fails
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    forge(broken, "train", lambda meta: {**meta, "group": "group:P02"})
    with pytest.raises(UserError, match="group group:P02 is in split "):
        verify_shards(broken)
    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    forge(broken, "train", lambda meta: {**meta, "fold": (meta["fold"] + 1) % FOLDS})
    with pytest.raises(UserError, match=r"is in folds \d and \d: grouped cross-validation would cut it"):
        verify_shards(broken)


def test_a_listing_giving_one_patient_two_splits_is_one_line_naming_it(tmp_path):
    listing = given_split_listing(tmp_path / "lab", [("P09/7.jpg", "mono", "P09", "train"),
                                                     ("P09/8.jpg", "mono", "P09", "val"),
                                                     ("P09/9.jpg", "mono", "P09", "test")])
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "group 'P09' is given 3 splits: test (line 52); train (line 50); val (line 51)")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_listing_keeps_rows_given_train_in_train_and_deals_only_blank_rows(tmp_path):
    """A listing's split column is kept, `train` included: only blank rows are dealt into val (a TRAIN folder,
    by contrast, is the pool val is cut from: test_the_kaggle_layout_splits_as_before)."""
    lab = tmp_path / "lab"
    rows = []
    for k, cls in enumerate("AB"):
        for p in range(21):  # patients 0-9 given train, 10-19 blank, 20: one row given train and one blank
            for i in range(2):
                rel = f"{cls}{p:02d}/{i}.jpg"
                make_root(lab, {rel: jpeg(1000 * k + 10 * p + i, size=(40, 30))})
                rows.append((rel, cls, f"{cls}{p:02d}", "train" if p < 10 or (p == 20 and i == 0) else ""))
    listing = lab / "listing.csv"
    with open(listing, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group", "split"), *rows])
    out = tmp_path / "shards"
    pack_shards(listing, out, workers=1)  # --val-fraction 0.2 by default: 2 of each class's 10 blank patients
    split_of = {s["path"]: s["split"] for s in samples_of(out)}
    given_train = [rel for rel, _, _, split in rows if split == "train"]
    assert {split_of[rel] for rel in given_train} == {"train"}
    assert split_of["A20/1.jpg"] == split_of["B20/1.jpg"] == "train"  # a blank row follows its patient's given one
    val_patients = {rel.split("/")[0] for rel, split in split_of.items() if split == "val"}
    assert len(val_patients) == 4 and all(10 <= int(p[1:]) < 20 for p in val_patients)
    # Every row given a split: nothing to deal. The default gives no val (with a note); a fraction is one line.
    listing.write_text("path,label,split\n" + "".join(f"{rel},{cls},{'test' if rel.endswith('1.jpg') else 'train'}\n"
                                                      for rel, cls, _, _ in rows))
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(tmp_path / "all-given"), check=True)
    assert "note: no val split" in proc.stderr
    assert sorted(ShardManifest.load(tmp_path / "all-given").splits) == ["test", "train"]
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(tmp_path / "s2"), "--val-fraction", "0.2")
    assert proc.returncode == 2
    one_error_line(proc.stderr, "--val-fraction 0.2: the data gives every image its split")


def test_a_listing_names_only_files_inside_its_folder_and_bad_rows_name_their_line(tmp_path):
    lab = tmp_path / "lab"
    (tmp_path / "secret.jpg").write_bytes(jpeg(1))
    make_root(lab, {"a/1.jpg": jpeg(2), "a/2.jpg": jpeg(3), "b/1.jpg": jpeg(4), "b/2.jpg": jpeg(5)})
    listing = lab / "list.csv"
    listing.write_text("path,label,split\na/1.jpg,A,\na/2.jpg,A,train\nb/1.jpg,B,\nb/2.jpg,B,test\n"
                       "../secret.jpg,A,\n/etc/passwd,B,\nmissing.jpg,B,\n")
    out = tmp_path / "shards"
    manifest = pack_shards(listing, out, val_fraction=0.0, workers=1)
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    assert reasons == {"../secret.jpg": "outside the listing's folder (not read)",
                       "/etc/passwd": "outside the listing's folder (not read)",
                       "missing.jpg": "listed in list.csv (line 8) but not a file"}
    assert {s["path"]: s["split"] for s in samples_of(out)} == {"a/1.jpg": "train", "a/2.jpg": "train",
                                                                 "b/1.jpg": "train", "b/2.jpg": "test"}
    for text, words in (("path,label\na/1.jpg,A\na/1.jpg,B\n", "listed twice (lines 2 and 3)"),
                        ("path,label,split\na/1.jpg,A,holdout\n", "line 2: split 'holdout'"),
                        ("path,label\na/1.jpg,A\n,B\n", "line 3 has an empty path or label"),
                        ("file,class\na/1.jpg,A\n", "missing path, label"),
                        ("path,label\na/1.jpg,A/B\n", "class name 'A/B'")):
        listing.write_text(text)
        with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
            pack_shards(listing, tmp_path / "s2", workers=1)
    listing.write_bytes(b"\x00\x01binary\xff")
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(tmp_path / "s3"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, str(listing))


def test_split_folders_at_the_root_with_a_val_folder_keep_their_splits(tmp_path):
    root = make_root(tmp_path / "src", {**{f"Train/{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("xy")
                                           for i in range(6)},
                                        **{f"val/{c}/{i}.jpg": jpeg(100 + 10 * k + i) for k, c in enumerate("xy")
                                           for i in range(2)},
                                        "TEST/x/0.jpg": jpeg(500), "TEST/y/0.jpg": jpeg(501)})
    manifest = pack_shards(root, tmp_path / "out", workers=1)
    assert manifest.layout == "splits" and manifest.classes == ["x", "y"]
    assert {k: v.samples for k, v in manifest.splits.items()} == {"train": 12, "val": 4, "test": 2}
    with pytest.raises(UserError, match="already gives a val split"):
        pack_shards(root, tmp_path / "out2", val_fraction=0.3, workers=1)
    with pytest.raises(UserError, match="already gives a test split"):
        pack_shards(root, tmp_path / "out3", test_fraction=0.2, workers=1)


def test_the_name_given_is_kept_beside_an_empty_class_folder(tmp_path):
    root = make_root(tmp_path / "src", {**{f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(4)},
                                        "C": None})
    manifest = pack_shards(root, tmp_path / "out", name="my-lab", workers=1)
    assert manifest.dataset == "my-lab" and manifest.classes == ["A", "B", "C"]
    assert "# my-lab, as WebDataset shards" in (tmp_path / "out" / "README.md").read_text()


def test_only_regular_files_are_read_a_named_pipe_is_listed_not_opened(tmp_path):
    root = make_root(tmp_path / "src", {f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(4)})
    os.mkfifo(root / "A" / "pipe.jpg")  # opening it for reading would wait for a writer for ever
    (root / "B" / "gone.jpg").symlink_to(root / "B" / "missing.jpg")
    (root / "B" / "out.jpg").symlink_to(tmp_path / "elsewhere.jpg")
    (tmp_path / "elsewhere.jpg").write_bytes(jpeg(99))
    scan = scan_images(root)  # lists, never reads: safe to assert on before anything opens a file
    assert "A/pipe.jpg" not in {i.rel_path for i in scan.images}
    assert {s.path: s.reason for s in scan.skipped} == {"A/pipe.jpg": NOT_REGULAR, "B/gone.jpg": NOT_REGULAR,
                                                        "B/out.jpg": LINK_OUT}
    assert cli(audit.main, "--src", str(root), "--workers", "1", check=True)
    manifest = pack_shards(root, tmp_path / "out", workers=1)
    assert {s["path"] for s in manifest.skipped} == {"A/pipe.jpg", "B/gone.jpg", "B/out.jpg"}
    assert sum(s.samples for s in manifest.splits.values()) == 8


def test_hidden_folders_are_no_class_and_are_listed(tmp_path):
    root = make_root(tmp_path / "src", {**{f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate("AB") for i in range(4)},
                                        ".ipynb_checkpoints/A-checkpoint.jpg": jpeg(50), ".DS_Store": None})
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), check=True)
    manifest = ShardManifest.load(out)
    assert manifest.classes == ["A", "B"]
    assert {s["path"]: s["reason"] for s in manifest.skipped} == {".DS_Store": HIDDEN, ".ipynb_checkpoints": HIDDEN}
    assert "skipped 2 (2 hidden folder(s))" in proc.stdout


@pytest.mark.parametrize("names", [("valid", "invalid"), ("train", "blast"), ("Test", "Control")])
def test_class_folders_named_like_splits_are_one_line_naming_the_ambiguity(names, tmp_path):
    root = make_root(tmp_path / "src", {f"{c}/{i}.jpg": jpeg(10 * k + i) for k, c in enumerate(names) for i in range(5)})
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, f"{names[0]} are named like split folders but hold images", "--layout classes")
    manifest = pack_shards(root, tmp_path / "out2", layout="classes", workers=1)
    assert manifest.classes == sorted(names) and sum(s.samples for s in manifest.splits.values()) == 10


def test_labels_differing_in_case_or_invisible_characters_are_one_class_with_a_note(tmp_path):
    labels = ["eos", "EOS", "EOS\u200b", "\ufeffeos", "EOS\u00a0", "neutro", "neutro", "neutro", "neutro"]
    make_root(tmp_path / "lab", {f"{i}.jpg": jpeg(i) for i in range(len(labels))})
    listing = tmp_path / "lab" / "listing.csv"
    with open(listing, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("path", "label"), *((f"{i}.jpg", label) for i, label in enumerate(labels))])
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(out), check=True)
    manifest = ShardManifest.load(out)
    assert manifest.classes == ["EOS", "neutro"]
    spellings = " and ".join(f"label {x!r}" for x in ("EOS", "EOS\u200b", "eos", "\ufeffeos"))  # shown escaped
    assert manifest.clashes == [{"paths": spellings.split(" and "), "conflict": "are one class 'EOS'",
                                 "resolution": "all read"}]
    assert f"warning: {spellings} are one class 'EOS': all read" in proc.stderr and "\\u200b" in spellings
    assert Counter(s["class_name"] for s in samples_of(out)) == {"EOS": 5, "neutro": 4}
    proc = cli(shards.main, "pack", "--src", str(listing), "--out", str(tmp_path / "strict"), "--strict")
    assert proc.returncode == 2


@pytest.mark.e2e  # two cell recoveries: seconds each
def test_auto_groups_finds_augmented_copies_and_originals(tmp_path):
    copies = tmp_path / "copies"
    generate_dataset(copies, per_class=32, seed=3, copies=8, test_per_class=0)
    manifest = pack_shards(copies, tmp_path / "a", workers=2)
    assert manifest.groups["method"] == "cells" and manifest.groups["measured"]["share"] > 0.5
    assert manifest.dataset == "synthetic"  # named by the generator's dataset.json
    originals = tmp_path / "originals"
    generate_dataset(originals, per_class=16, seed=3, copies=1, test_per_class=0)
    manifest = pack_shards(originals, tmp_path / "b", workers=2)
    assert manifest.groups["method"] == "files" and manifest.groups["measured"]["share"] < 0.1


def test_the_kaggle_layout_splits_as_before():
    """The per-class deal reproduces, group for group, what the packer did before groups were generalised
    (the old assign_splits, restated here), so the shipped blood-cells folds and figures stay as they were."""
    rng = random.Random(0)
    facts, groups = [], {}
    from bloodcells_dist.pack.audit import ImageFacts
    from bloodcells_dist.pack.sources import SourceImage
    for k in range(300):
        cls, split = rng.choice("ABC"), rng.choice(["train", "train", "train", "test"])
        image = SourceImage(Path(f"/x/{k}"), f"{split}/{cls}/{k}.jpeg", split, cls, f"{cls}/{k}")
        facts.append(ImageFacts(image, 4, 3, f"{k:064x}", 0))
        if split == "train":
            groups[image.rel_path] = f"{cls}/cell{rng.randrange(12):03d}"
    for seed in (0, 5):
        new = assign_splits(facts, groups, ["A", "B", "C"], seed=seed, val_fraction=0.2, test_fraction=0.0)
        old = {}
        for cls in "ABC":
            items = [f for f in facts if f.image.class_name == cls]
            cell_of = {f.image.rel_path: groups.get(f.image.rel_path, f.image.key) for f in items}
            names = sorted(set(cell_of.values()))
            random.Random(f"{seed}:folds:{cls}").shuffle(names)
            fold = {g: i % 5 for i, g in enumerate(names)}
            train_groups = sorted({cell_of[f.image.rel_path] for f in items if f.image.split == "train"})
            random.Random(f"{seed}:val:{cls}").shuffle(train_groups)
            val = set(train_groups[: round(0.2 * len(train_groups))])
            for f in items:
                split = "val" if f.image.split == "train" and cell_of[f.image.rel_path] in val else f.image.split
                old[f.image.rel_path] = (split, fold[cell_of[f.image.rel_path]])
        assert {s.facts.image.rel_path: (s.split, s.fold) for s in new} == old


def test_fit_keeps_the_aspect_and_the_window_can_be_relative():
    image = torch.arange(3 * 90 * 200, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 90, 200)
    crop, pad = fit_to(image, (64, 64), "crop"), fit_to(image, (64, 64), "pad")
    assert crop.shape == pad.shape == fit_to(image, (64, 64), "stretch").shape == (3, 64, 64)
    assert (pad[:, 0] == torch.tensor(FILL, dtype=torch.uint8)[:, None]).all()  # 200x90 fits as 64x29 + padding
    assert not (crop[:, 0] == torch.tensor(FILL, dtype=torch.uint8)[:, None]).all()
    # A frame of the target's aspect (the blood-cells 320x240 at 120x160) is resized alike by every fit.
    frame = image[:, :, :120][:, :90]
    assert torch.equal(fit_to(frame, (60, 80), "crop"), fit_to(frame, (60, 80), "stretch"))
    assert window_side(160, 240, 320) == window_side(0.667, 240, 320) == 160  # best.yaml's window, either way
    assert window_side(0.667, 363, 360) == 240  # the same share of a PBC frame
    with pytest.raises(ValueError, match="cell_crop=0.01"):
        Preprocess(image_size=(32, 32), cell_crop=0.01)


@pytest.mark.e2e
def test_eight_classes_through_train_evaluate_predict_export_and_hub(tmp_path):
    """A class-folder dataset of 8 classes (synthetic images, relabelled: the point is the plumbing)."""
    synthetic = tmp_path / "synthetic"
    generate_dataset(synthetic, per_class=24, seed=4, copies=1, test_per_class=0)
    names = ["Basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    images = sorted(synthetic.rglob("*.jpeg"))
    src = tmp_path / "lab"
    for k, path in enumerate(images):
        folder = src / names[k % 8]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / f"{k:03d}.jpg")
    shards, run = tmp_path / "shards", tmp_path / "run"
    cli(shards_cli.main, "pack", "--src", str(src), "--out", str(shards), "--test-fraction", "0.25",
        "--name", "eight-class-lab", check=True)
    cli(trainer.main, "--shards", str(shards), "--output-dir", str(run), "--image-size", "32,32",
        "--widths", "4,8,8,8", "--hidden", "16,16", "--batch-size", "8", "--epochs", "2", "--tracker", "none",
        "--workers", "0", "--mixed-precision", "no", check=True)
    cli(evaluate.main, "--model", str(run), "--shards", str(shards), "--split", "test", check=True)
    scored = json.loads((run / "eval-test.json").read_text())
    assert list(scored["per_class"]) == names and len(scored["confusion_matrix"]) == 8 and scored["samples"] == 24
    assert (run / "eval-test-confusion.png").stat().st_size > 5000
    preds = cli(predict.main, "--model", str(run), str(src / "ig"), check=True).stdout
    header, *rows = list(csv.reader(preds.splitlines()))
    assert header == ["path", "predicted_class", *(f"prob_{c}" for c in names), "error"] and len(rows) == 12
    assert all(r[1] in names and abs(sum(map(float, r[2:10])) - 1) < 1e-4 for r in rows)
    onnx = tmp_path / "model.onnx"
    cli(export.main, "--model", str(run), "--format", "onnx", "--out", str(onnx), check=True)
    exported = cli(predict.main, "--model", str(onnx), str(src / "ig"), check=True).stdout
    assert [r[1] for r in list(csv.reader(exported.splitlines()))[1:]] == [r[1] for r in rows]
    hub_dir = tmp_path / "hub"
    cli(hub.main, "save", "--model", str(run), "--out", str(hub_dir), check=True)
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["classes"] == names and config["num_classes"] == 8 and config["dataset"] == "eight-class-lab"
    card = (hub_dir / "README.md").read_text()
    assert "name: eight-class-lab" in card and "name: blood-cells" not in card and "recall platelet" in card
