"""Bad input to the packer, verify and the cells command: nothing lost, nothing wrong let through, no command run
from data, one `error:` line and exit code 2. Small hand-made source folders (a few 32x24 JPEGs) keep these fast;
the packer, verify and the command lines run for real."""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import simplejpeg
import webdataset as wds
from PIL import Image

from bloodcells_dist.cli import UserError, run_main
from bloodcells_dist.pack import cells, shards
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards, verify_shards
from bloodcells_dist.tools import evaluate
from bloodcells_dist.train import trainer as train

from ..helpers import REPO, TINY_CPU, cli, jpeg, make_root, one_error_line, refused, true_cells

ON_LINUX_SYSFS = Path("/sys/kernel").is_dir()  # /sys refuses new folders, even to root: a folder we cannot write


def packed(folder: Path) -> dict[str, list[dict]]:
    """Source path -> the samples holding it (with their bytes and key), over every shard of every split."""
    manifest = ShardManifest.load(folder)
    found: dict[str, list[dict]] = {}
    for split in manifest.splits:
        for s in wds.WebDataset(manifest.shard_urls(folder, split), shardshuffle=False, empty_check=False):
            meta = json.loads(s["json"])
            found.setdefault(meta["path"], []).append({"key": s["__key__"], "jpg": s["jpg"], "label": int(s["cls"]),
                                                       **meta})
    return found


# ---------------------------------------------------------------- lost or changed without a word


def test_split_folders_differing_in_case_are_both_read(tmp_path):
    root = make_root(tmp_path / "src", {**{f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(6)},
                                        **{f"train/A/_{i}_2.jpeg": jpeg(10 + i) for i in range(4)},
                                        "train/B/_0_1.jpeg": jpeg(20)})
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), check=True)
    assert set(packed(out)) == {p.relative_to(root).as_posix() for p in root.rglob("*.jpeg")}  # all 11
    assert "TRAIN and train are one split 'train'" in proc.stderr
    assert ShardManifest.load(out).clashes[0]["paths"] == ["TRAIN", "train"]
    assert "1 name clash(es)" in proc.stdout
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(tmp_path / "s"), "--strict")
    assert proc.returncode == 2
    one_error_line(proc.stderr, "TRAIN and train")


def test_bad_only_and_empty_class_folders_keep_the_class_list_and_strays_are_listed(tmp_path):
    root = make_root(tmp_path / "src", {
        **{f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(5)},
        "TRAIN/B/_0_1.jpeg": b"",  # every file of B is bad
        "TRAIN/B/_1_1.jpeg": jpeg(1)[:100],
        **{f"TRAIN/C/_{i}_1.jpeg": jpeg(10 + i) for i in range(5)},
        "TRAIN/D": None,  # empty class folder
        "README.txt": b"notes beside the split folders",
        "extra": None,  # a folder that is not a split
        "TRAIN/notes.txt": b"stray beside the class folders",
    })
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), check=True)
    manifest = ShardManifest.load(out)
    assert manifest.classes == ["A", "B", "C", "D"]  # B and D keep their places: C is still label 2
    assert {s["label"] for p, [s] in packed(out).items() if p.startswith("TRAIN/C/")} == {2}
    skipped = {s["path"]: s["reason"] for s in manifest.skipped}
    assert set(skipped) == {"TRAIN/B/_0_1.jpeg", "TRAIN/B/_1_1.jpeg", "TRAIN/D", "README.txt", "extra",
                            "TRAIN/notes.txt"}
    assert "class folder without" in skipped["TRAIN/D"]
    assert "beside the split folders" in skipped["README.txt"] and "beside the split folders" in skipped["extra"]
    assert "class B has no usable images" in proc.stderr and "class D has no usable images" in proc.stderr
    assert f"skipped {len(skipped)}" in proc.stdout
    verify_shards(out)


KEY_CLASHES = {
    "suffix_and_case": ["TRAIN/A/_1_2.jpeg", "TRAIN/A/_1_2.JPEG", "TRAIN/A/_1_2.jpg"],
    "dot_and_underscore": ["TRAIN/A/a.b.jpeg", "TRAIN/A/a_b.jpeg"],
    "class_folder_case": ["TRAIN/A/_5_1.jpeg", "TRAIN/a/_5_1.jpeg"],
}


@pytest.mark.parametrize("case", sorted(KEY_CLASHES))
def test_key_clashes_are_an_error_with_strict_naming_both_files(case, tmp_path):
    names = KEY_CLASHES[case]
    root = make_root(tmp_path / "src", {name: jpeg(i) for i, name in enumerate(names)})
    with pytest.raises(UserError, match="--strict") as err:
        pack_shards(root, tmp_path / "out", strict=True, workers=1)
    # the two files, or for class folders A/ and a/ the two folders
    both = ["TRAIN/A", "TRAIN/a"] if case == "class_folder_case" else sorted(names)[:2]
    assert f"{both[0]} and {both[1]}" in str(err.value)
    assert not list((tmp_path / "out").glob("*"))


def test_key_clashes_without_strict_lose_nothing_whatever_the_seed(tmp_path):
    names = [n for group in KEY_CLASHES.values() for n in group] + ["TRAIN/A/_1_2-2.jpeg"]  # also takes a new key
    names += [f"TRAIN/A/_{i}_9.jpeg" for i in range(10, 20)]
    root = make_root(tmp_path / "src", {name: jpeg(i) for i, name in enumerate(names)})
    for seed in range(3):
        out = tmp_path / f"out{seed}"
        manifest = pack_shards(root, out, seed=seed, val_fraction=0.3, workers=1)
        verify_shards(out)
        found = packed(out)
        assert sorted(found) == sorted(names)  # every file once, with its own bytes
        assert all(len(v) == 1 and v[0]["jpg"] == (root / p).read_bytes() for p, v in found.items())
        keys = [v[0]["key"] for v in found.values()]
        assert len(set(keys)) == len(keys)
        # the documented rule: the first path (sorted) keeps the key, the others get the first free "-N"
        key_of = {p: v[0]["key"] for p, v in found.items()}
        assert key_of["TRAIN/A/_1_2.JPEG"] == "A/_1_2" and key_of["TRAIN/A/_1_2.jpeg"] == "A/_1_2-3"
        assert key_of["TRAIN/A/_1_2-2.jpeg"] == "A/_1_2-2" and key_of["TRAIN/A/_1_2.jpg"] == "A/_1_2-4"
        assert key_of["TRAIN/A/a.b.jpeg"] == "A/a_b" and key_of["TRAIN/A/a_b.jpeg"] == "A/a_b-2"
        assert key_of["TRAIN/A/_5_1.jpeg"] == "A/_5_1" and key_of["TRAIN/a/_5_1.jpeg"] == "A/_5_1-2"
        assert manifest.classes == ["A"] and len(manifest.clashes) == 5


def test_a_one_pixel_jpeg_is_packed(tmp_path):
    root = make_root(tmp_path / "src", {"TRAIN/A/_0_1.jpeg": jpeg(0, size=(1, 1)), "TRAIN/A/_1_1.jpeg": jpeg(1)})
    manifest = pack_shards(root, tmp_path / "out", workers=1, strict=True)
    assert not manifest.skipped and [s["width"] for s in packed(tmp_path / "out")["TRAIN/A/_0_1.jpeg"]] == [1]


def test_an_evenly_coloured_image_is_set_apart_not_fatal_to_cell_recovery(synthetic_root, tmp_path):
    train = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    src = tmp_path / "src"
    for cls in ("EOSINOPHIL", "LYMPHOCYTE"):
        make_root(src, {f"TRAIN/{cls}/{p.name}": p.read_bytes() for p in sorted((train / cls).glob("*.jpeg"))[:24]})
    purple = src / "TRAIN" / "EOSINOPHIL" / "_purple.jpeg"
    Image.new("RGB", (320, 240), (128, 40, 160)).save(purple, quality=95)
    manifest = pack_shards(src, tmp_path / "out", groups="cells", workers=1)
    assert manifest.groups["set_apart"] == ["TRAIN/EOSINOPHIL/_purple.jpeg"]
    proc = cli(cells.main, "--src", str(src), "--out", str(tmp_path / "cells.csv"), check=True)
    assert "TRAIN/EOSINOPHIL/_purple.jpeg has no cell features" in proc.stderr and "1 set apart" in proc.stdout


# ---------------------------------------------------------------- let through


def garbled(data: bytes) -> bytes:
    """`data` with 8 bytes flipped mid-stream, at the first place from the middle where libjpeg-turbo warns."""
    for start in range(len(data) // 2, len(data) - 16):
        bad = bytearray(data)
        bad[start:start + 8] = bytes(b ^ 0xFF for b in bad[start:start + 8])
        try:
            simplejpeg.decode_jpeg(bytes(bad), strict=True)
        except ValueError:
            return bytes(bad)
    raise AssertionError("no flip made the decoder warn")


def test_jpegs_the_decoder_warns_about_are_skipped(tmp_path):
    good = jpeg(0, size=(160, 120))
    half_with_end = good[: len(good) // 2] + b"\xff\xd9"
    flipped = garbled(good)
    for data in (half_with_end, flipped):  # what let them through before: PIL decodes both without a word
        Image.open(io.BytesIO(data)).load()
    root = make_root(tmp_path / "src", {"TRAIN/A/_0_1.jpeg": good, "TRAIN/A/_1_1.jpeg": half_with_end,
                                        "TRAIN/A/_2_1.jpeg": flipped})
    manifest = pack_shards(root, tmp_path / "out", workers=1)
    assert {s["path"]: s["reason"].split(" (")[0] for s in manifest.skipped} == {
        "TRAIN/A/_1_1.jpeg": "corrupt JPEG", "TRAIN/A/_2_1.jpeg": "corrupt JPEG"}
    assert list(packed(tmp_path / "out")) == ["TRAIN/A/_0_1.jpeg"]
    with pytest.raises(UserError, match="--strict"):
        pack_shards(root, tmp_path / "strict", workers=1, strict=True)


def edit_manifest(folder: Path, change) -> None:
    """Apply `change` to the manifest.json of `folder`, in place."""
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


MANIFEST_EDITS = {
    "split_total": (lambda m: m["splits"]["train"].update(samples=4000), "samples"),
    "per_class": (lambda m: m["splits"]["train"]["samples_per_class"].update(A=1), "samples_per_class"),
    "per_fold": (lambda m: m["splits"]["train"]["samples_per_fold"].update({"0": 0, "1": 99}), "samples_per_fold"),
    "cells": (lambda m: m["splits"]["val"]["groups_per_class"].update(B=9), "groups_per_class"),
    "deleted_split": (lambda m: m["splits"].pop("val"), "not in the manifest"),
    "folds": (lambda m: m.update(folds=7), "7 folds"),
    "renamed_split": (lambda m: m["splits"].update(val2=m["splits"].pop("val")), "unknown split"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_verify_recounts_what_the_trainer_relies_on(case, small_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    verify_shards(folder)
    change, message = MANIFEST_EDITS[case]
    edit_manifest(folder, change)
    with pytest.raises(UserError, match=message):
        verify_shards(folder)


@pytest.mark.parametrize("name, message", [("../../../etc/passwd", r"\.\."), ("/etc/passwd", "absolute"),
                                           ("train-00000.tgz", "not a .tar"), ("a b;x.tar", "plain file name")])
def test_manifest_shard_files_must_be_plain_tar_names_in_the_folder(name, message, small_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(small_shards, folder)
    edit_manifest(folder, lambda m: m["splits"]["test"]["shards"][0].update(file=name))
    with pytest.raises(UserError, match=message):
        ShardManifest.load(folder)
    proc = cli(shards.main, "verify", str(folder))
    assert proc.returncode == 2 and "not a valid shard manifest" in one_error_line(proc.stderr)


def test_a_cells_file_naming_a_path_twice_or_another_class_is_refused_with_its_lines(synthetic_root, tmp_path):
    mapping = true_cells(synthetic_root, tmp_path / "cells.csv")  # as `bloodcells cells` writes it
    lines = mapping.read_text().splitlines()
    twice = tmp_path / "twice.csv"
    path, cls, _, sha = lines[3].split(",")
    twice.write_text("\n".join([*lines, f"{path},{cls},{cls}/cell999,{sha}"]) + "\n")
    with pytest.raises(UserError, match=rf"listed twice \(lines 4 and {len(lines) + 1}\)"):
        pack_shards(synthetic_root, tmp_path / "a", cells=twice, workers=1)
    other = tmp_path / "other.csv"
    other_class = "LYMPHOCYTE" if cls != "LYMPHOCYTE" else "MONOCYTE"
    other.write_text("\n".join([*lines[:3], f"{path},{other_class},{other_class}/cell000,{sha}", *lines[4:]]) + "\n")
    with pytest.raises(UserError, match=f"line 4 puts {path} in class '{other_class}'"):
        pack_shards(synthetic_root, tmp_path / "b", cells=other, workers=1)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match="not a cell mapping"):
        pack_shards(synthetic_root, tmp_path / "c", cells=binary, workers=1)


# ---------------------------------------------------------------- commands from data, links out of the source


def test_pipe_locations_are_refused_without_the_opt_in(small_shards, tmp_path, capsys):
    pwned = tmp_path / "PWNED"
    pipe = f"pipe:touch {pwned}; cat {small_shards}/manifest.json #://x"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"shards: '{pipe}'\n")
    saved = tmp_path / "saved-run"  # a run folder from someone else: its config.yaml points at a command
    (saved / "checkpoints" / "step-00000001").mkdir(parents=True)
    (saved / "checkpoints" / "step-00000001" / "trainer_state.json").write_text("{}")
    (saved / "config.yaml").write_text(f"shards: '{pipe}'\ntracker: none\noutput_dir: {saved}\n")
    calls = [["--shards", pipe, "--output-dir", str(tmp_path / "r1"), *TINY_CPU],
             ["--config", str(recipe), "--output-dir", str(tmp_path / "r2")],
             ["--resume", str(saved)]]
    for argv in calls:
        assert run_main(train.main, argv) == 2, argv
        one_error_line(capsys.readouterr().err, "pipe:", "--allow-pipe")
    proc = cli(evaluate.main, "--model", str(tmp_path / "none"), "--shards", pipe)
    assert proc.returncode == 2 and "--allow-pipe" in one_error_line(proc.stderr)
    assert not pwned.exists(), "a pipe: location ran its command"
    # with the opt-in, the user's own command is what reads the shards
    manifest = ShardManifest.load(f"pipe:cat {small_shards}", allow_pipe=True)
    assert manifest.shard_urls(f"pipe:cat {small_shards}", "test")[0].startswith("pipe:cat ")  # as it was loaded
    with pytest.raises(UserError, match="--allow-pipe"):  # only the location the user allowed
        manifest.shard_urls(f"pipe:sh -c 'touch {pwned}' {small_shards}", "test")
    with pytest.raises(UserError, match="--allow-pipe"):
        ShardManifest.load(small_shards).shard_urls(f"pipe:cat {small_shards}", "test")
    # the permission is the caller's, never the file's: a manifest.json that claims it grants nothing
    forged = tmp_path / "forged"
    shutil.copytree(small_shards, forged)
    (forged / "manifest.json").write_text(json.dumps({**json.loads((forged / "manifest.json").read_text()),
                                                      "allowed_pipe": f"pipe:cat {forged}"}))
    with pytest.raises(UserError, match="--allow-pipe"):
        ShardManifest.load(forged).shard_urls(f"pipe:cat {forged}", "test")
    assert not pwned.exists()


def test_links_out_of_the_source_root_are_not_followed(tmp_path):
    outside = make_root(tmp_path / "outside", {f"X/_{i}_1.jpeg": jpeg(50 + i) for i in range(3)})
    root = make_root(tmp_path / "src", {f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(4)})
    (root / "TRAIN" / "LINKED").symlink_to(outside / "X")  # a class folder leading out
    (root / "TRAIN" / "A" / "_9_1.jpeg").symlink_to(outside / "X" / "_0_1.jpeg")  # a file leading out
    (root / "TRAIN" / "A" / "_8_1.jpeg").symlink_to(root / "TRAIN" / "A" / "_0_1.jpeg")  # inside: followed
    out = tmp_path / "out"
    proc = cli(shards.main, "pack", "--src", str(root), "--out", str(out), check=True)
    manifest = ShardManifest.load(out)
    assert {s["path"] for s in manifest.skipped} == {"TRAIN/LINKED", "TRAIN/A/_9_1.jpeg"}
    assert sorted(packed(out)) == [f"TRAIN/A/_{i}_1.jpeg" for i in (0, 1, 2, 3)]
    # the link inside the root was followed: its bytes are _0_1's, so the audit keeps one copy and lists it
    assert [(e["path"], e["kept"]) for e in manifest.excluded] == [("TRAIN/A/_8_1.jpeg", "TRAIN/A/_0_1.jpeg")]
    assert manifest.classes == ["A"]
    assert "2 symbolic link(s) leading out of the source root, not followed" in proc.stdout


# ---------------------------------------------------------------- one `error:` line, exit code 2


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("src"), {f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(3)})


def pack_errors(tmp: Path, src: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (`bloodcells pack` argv, words the error line must hold)."""
    a_file = tmp / "a-file"
    a_file.write_text("x")
    cases = {
        "out_is_a_file": (["pack", "--src", str(src), "--out", str(a_file)], ["is a file"]),
        "zero_workers": (["pack", "--src", str(src), "--out", str(tmp / "o"), "--workers", "0"], ["--workers"]),
    }
    if ON_LINUX_SYSFS:
        cases["out_not_writable"] = (["pack", "--src", str(src), "--out", "/sys/bcd-shards"], ["/sys/bcd-shards"])
    return cases


@pytest.mark.parametrize("case", ["out_is_a_file", "out_not_writable", "zero_workers"])
def test_pack_user_errors_are_one_line_and_exit_2(case, small_src, tmp_path, capsys):
    cases = pack_errors(tmp_path, small_src)
    if case not in cases:
        pytest.skip("needs Linux /sys for a folder that cannot be written, even by root")
    argv, words = cases[case]
    assert run_main(shards.main, argv) == 2
    one_error_line(capsys.readouterr().err, *words)


def test_pack_refuses_an_out_folder_inside_the_source_or_at_a_system_root(tmp_path, capsys):
    src = make_root(tmp_path / "src", {f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(3)})
    refused(shards.main, ["pack", "--src", str(src), "--out", str(src / "shards")], "inside the source", capsys=capsys)
    refused(shards.main, ["pack", "--src", str(src), "--out", "/"], "system or home folder", capsys=capsys)
    refused(shards.main, ["pack", "--src", str(src), "--out", "/usr"], "system or home folder", capsys=capsys)
    assert not (src / "shards").exists()


def test_cells_command_checks_its_outputs_before_the_work(synthetic_root, tmp_path, capsys):
    refused(cells.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "missing" / "c.csv")],
            "does not exist", capsys=capsys)
    refused(cells.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "c.csv"), "--sheet",
                         str(tmp_path / "sheet.xyz")], ".xyz", capsys=capsys)
    assert list(tmp_path.iterdir()) == []  # no .tmp left behind


# ---------------------------------------------------------------- property: nothing lost, nothing doubled


def random_source(root: Path, rng: random.Random) -> tuple[set[str], set[str]]:
    """A random mix of good and bad files (with clashing names) under root; returns (good paths, bad paths)."""
    good_data = [jpeg(rng.randrange(10**6), size=(rng.choice([1, 8, 32]), rng.choice([1, 6, 24])))
                 for _ in range(6)]
    sample = jpeg(7, size=(64, 48))
    bad_data = [b"", sample[:200], sample[: len(sample) // 2] + b"\xff\xd9", b"not an image",
                jpeg(3, mode="L"), jpeg(4, fmt="PNG")]
    good, bad = set(), set()
    for k, cls in enumerate("ABC"):  # an image of its own per class: there is always something to train on
        make_root(root, {f"TRAIN/{cls}/own.jpeg": jpeg(10**6 + k, size=(32, 24))})
        good.add(f"TRAIN/{cls}/own.jpeg")
    for _ in range(rng.randrange(20, 40)):
        split = rng.choice(["TRAIN", "TRAIN", "train", "TEST"])
        cls = rng.choice(["A", "B", "b", "C"])
        stem = rng.choice(["_1_2", "_1_3", "a.b", "a_b", f"_{rng.randrange(99)}_{rng.randrange(9)}"])
        rel = f"{split}/{cls}/{stem}{rng.choice(['.jpeg', '.JPEG', '.jpg'])}"
        if rel in good | bad:
            continue
        is_good = rng.random() < 0.7
        make_root(root, {rel: rng.choice(good_data) if is_good else rng.choice(bad_data)})
        (good if is_good else bad).add(rel)
    return good, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_mix_every_good_file_in_one_shard_every_bad_one_listed_once(seed, tmp_path):
    rng = random.Random(seed)
    root = tmp_path / "src"
    good, bad = random_source(root, rng)
    out = tmp_path / "out"
    manifest = pack_shards(root, out, seed=seed, shard_size=rng.choice([1, 3, 50]), workers=1)
    verify_shards(out)
    found = packed(out)
    # The good files reuse 6 payloads, so many are duplicates: each good file is packed once or excluded once,
    # with its reason; never both, never neither.
    excluded = [e["path"] for e in manifest.excluded]
    assert sorted(set(found) | set(excluded)) == sorted(good) and not set(found) & set(excluded)
    assert len(excluded) == len(set(excluded)) and all(len(v) == 1 for v in found.values())
    assert all(v[0]["jpg"] == (root / p).read_bytes() for p, v in found.items())
    listed = [s["path"] for s in manifest.skipped]
    assert sorted(listed) == sorted(bad)  # each bad file once, nothing else (no empty folders here)
    # What stayed: no bytes under two classes, no bytes twice on the training side
    by_bytes: dict[bytes, list[dict]] = {}
    for [v] in found.values():
        by_bytes.setdefault(v["jpg"], []).append(v)
    for copies in by_bytes.values():
        assert len({c["class_name"] for c in copies if c["split"] != "test"}) <= 1
        assert sum(c["split"] != "test" for c in copies) <= 1
    shard_of = {}
    for split in manifest.splits.values():
        for shard in split.shards:
            for s in wds.WebDataset(str(out / shard.file), shardshuffle=False, empty_check=False):
                shard_of.setdefault(json.loads(s["json"])["path"], []).append(shard.file)
    assert all(len(v) == 1 for v in shard_of.values()) and set(shard_of) == set(found)


# ---------------------------------------------------------------- the docs' table cannot drift from the tests


def test_every_bad_input_row_names_a_test_that_exists():
    """docs/data.md's bad-input table: every row names, in its last column, tests that exist under tests/."""
    text = (REPO / "docs" / "data.md").read_text()
    table = text[text.index("## Bad input: what each case does"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input |")]
    defined = {m for path in (REPO / "tests").rglob("test_*.py")
               for m in re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.M)}
    assert len(rows) >= 30
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row.rsplit(" | ", 1)[-1])
        assert named, f"the row names no test: {row[:80]}"
        assert set(named) <= defined, f"{sorted(set(named) - defined)} named in docs/data.md do not exist"
