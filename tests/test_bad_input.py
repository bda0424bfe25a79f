"""Bad input, all the way through (issue 12): nothing lost, nothing wrong let through, no command run, no traceback.

Small hand-made source folders (a few 32x24 JPEGs) keep these fast; the packer, verify and the command
lines run for real.
"""

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
from bloodcells_dist.pack import shards
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards, verify_shards
from bloodcells_dist.tools import evaluate
from bloodcells_dist.train import trainer as train
from bloodcells_dist.train.tracking import MetricsLog

from .conftest import cli, run_cli

TINY_CPU = ["--epochs", "1", "--image-size", "24,32", "--widths", "4,4,4,4", "--hidden", "8,8", "--batch-size", "4",
            "--workers", "0", "--tracker", "none"]  # if a refused run started anyway, it ends in seconds
ON_LINUX_SYSFS = Path("/sys/kernel").is_dir()  # /sys refuses new folders, even to root: a folder we cannot write


def jpeg(seed: int, size: tuple[int, int] = (32, 24), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small real image (smooth gradient plus noise) encoded as `fmt`."""
    rng = random.Random(seed)
    w, h = size
    image = Image.new("RGB", size)
    image.putdata([((x * 255 // max(w - 1, 1) + rng.randrange(40)) % 256, (y * 255 // max(h - 1, 1)) % 256,
                    rng.randrange(256)) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    image.convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def make_root(root: Path, files: dict[str, bytes | None]) -> Path:
    """Files (relative path -> bytes; None makes a folder) under `root`."""
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


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


def one_error_line(stderr: str, *needles: str) -> str:
    """The last stderr line is the one `error:` line (progress bars may come before), with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert line.startswith("error: "), stderr[-3000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


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


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Two classes x 12 cells x 2 copies in TRAIN (train, val, five folds) and a TEST split."""
    root = tmp_path_factory.mktemp("small-src")
    files = {f"TRAIN/{c}/_{i}_{r}.jpeg": jpeg(100 * k + 10 * i + r) for k, c in enumerate("AB") for i in range(12)
             for r in range(2)}
    files.update({f"TEST/{c}/_{i}_0.jpeg": jpeg(1000 + 10 * k + i) for k, c in enumerate("AB") for i in range(4)})
    make_root(root, files)
    out = tmp_path_factory.mktemp("small-shards")
    pack_shards(root, out, workers=1, shard_size=10)
    return out


def edit_manifest(folder: Path, change) -> None:
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


def test_val_fold_out_of_range_is_an_error(small_shards, tmp_path, capsys):
    argv = ["--shards", str(small_shards), "--output-dir", str(tmp_path / "run"), "--val-fold", "7",
            "--train-splits", "train,val", *TINY_CPU]
    assert run_main(train.main, argv) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --val-fold 7: the shards have folds 0..4"
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_evaluate_images_counts_a_zero_byte_jpeg_and_refuses_all_unreadable(untrained_model, tmp_path):
    folder = make_root(tmp_path / "images", {"MONOCYTE/a.jpeg": jpeg(0), "MONOCYTE/b.jpeg": jpeg(1),
                                             "NEUTROPHIL/empty.jpeg": b""})
    proc = cli(evaluate.main, "--model", str(untrained_model), "--images", str(folder), "--out", str(tmp_path / "eval"),
               check=True)
    result = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert result["samples"] == 2 and result["unreadable"] == 1 and "1 unreadable image(s) skipped" in proc.stderr
    bad = make_root(tmp_path / "bad", {"MONOCYTE/empty.jpeg": b"", "NEUTROPHIL/junk.jpeg": b"\xff\xd8\xffjunk"})
    proc = cli(evaluate.main, "--model", str(untrained_model), "--images", str(bad), "--out", str(tmp_path / "eval2"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "no sample could be evaluated", "2 unreadable")


# ---------------------------------------------------------------- commands from data


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


def error_cases(tmp: Path, src: Path, shard_folder: Path) -> dict[str, tuple]:
    """name -> (main, argv, words the error line must hold)."""
    a_file = tmp / "a-file"
    a_file.write_text("x")
    run = ["--shards", str(shard_folder), "--output-dir", str(tmp / "run"), *TINY_CPU]
    cases = {
        "train_output_dir_is_a_file": (train.main, [*run, "--output-dir", str(a_file)], ["--output-dir", "is a file"]),
        "train_output_dir_under_a_file": (train.main, [*run, "--output-dir", str(a_file / "run")], ["cannot create"]),
        "train_negative_lr": (train.main, [*run, "--lr", "-0.5"], ["lr=-0.5"]),
        "train_nan_lr": (train.main, [*run, "--lr", ".nan"], ["lr=nan"]),
        "train_dropout": (train.main, [*run, "--dropout", "1.5"], ["dropout=1.5"]),
        "train_zero_width": (train.main, [*run, "--widths", "0,8,8,8"], ["widths=[0, 8, 8, 8]"]),
        "train_label_smoothing": (train.main, [*run, "--label-smoothing", "2"], ["label_smoothing=2"]),
        "train_negative_workers": (train.main, [*run, "--workers", "-1"], ["workers=-1"]),
        "train_hue_too_large": (train.main, [*run, "--aug-hue", "0.7"], ["aug_hue=0.7", "[0, 0.5]"]),
        "train_tiny_cell_window": (train.main, [*run, "--cell-crop", "8"], ["cell_crop=8", "16 to 4096"]),
        "train_negative_cell_window": (train.main, [*run, "--cell-crop", "-5"], ["cell_crop=-5"]),
        "train_huge_cell_window": (train.main, [*run, "--cell-crop", "100000"], ["cell_crop=100000"]),
        "pack_out_is_a_file": (shards.main, ["pack", "--src", str(src), "--out", str(a_file)], ["is a file"]),
        "pack_zero_workers": (shards.main, ["pack", "--src", str(src), "--out", str(tmp / "o"), "--workers", "0"],
                              ["--workers"]),
    }
    if ON_LINUX_SYSFS:
        cases["train_output_dir_not_writable"] = (train.main, [*run, "--output-dir", "/sys/bcd-run"], ["--output-dir"])
        cases["pack_out_not_writable"] = (shards.main, ["pack", "--src", str(src), "--out", "/sys/bcd-shards"],
                                          ["/sys/bcd-shards"])
    return cases


CASES = ["train_output_dir_is_a_file", "train_output_dir_under_a_file", "train_output_dir_not_writable",
         "train_negative_lr", "train_nan_lr", "train_dropout", "train_zero_width", "train_label_smoothing",
         "train_negative_workers", "train_hue_too_large", "train_tiny_cell_window", "train_negative_cell_window",
         "train_huge_cell_window",
         "pack_out_is_a_file", "pack_out_not_writable", "pack_zero_workers"]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_and_exit_2(case, small_src, small_shards, tmp_path, capsys):
    cases = error_cases(tmp_path, small_src, small_shards)
    if case not in cases:
        pytest.skip("needs Linux /sys for a folder that cannot be written, even by root")
    main, argv, words = cases[case]
    assert run_main(main, argv) == 2
    one_error_line(capsys.readouterr().err, *words)


@pytest.mark.e2e
def test_export_onnx_without_the_optional_packages_names_the_extra(untrained_model, tmp_path):
    # None in sys.modules: `import onnx` raises ModuleNotFoundError and find_spec says "not installed",
    # exactly as on a machine without the packages.
    blocker = ("import sys\n"
               "sys.modules.update(onnx=None, onnxruntime=None)\n"
               "from bloodcells_dist.cli import run_main\n"
               "from bloodcells_dist.tools import export\n"
               "sys.exit(run_main(export.main, sys.argv[1:]))\n")
    proc = run_cli("-c", blocker, "--model", str(untrained_model), "--format", "onnx", "--out",
                   str(tmp_path / "m.onnx"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "pip install 'bloodcells_dist[export]'")
    assert not (tmp_path / "m.onnx").exists()


def test_resume_skips_a_torn_last_line_of_metrics_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.9}\n{"step": 15, "trai')
    MetricsLog(path, enabled=True, resume_step=10)
    assert path.read_text() == '{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.9}\n'
    assert "skipped 1 unreadable (torn) line" in capsys.readouterr().err


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
    from .conftest import REPO

    text = (REPO / "docs" / "data.md").read_text()
    table = text[text.index("## Bad input: what each case does"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input |")]
    defined = {m for path in (REPO / "tests").glob("test_*.py")
               for m in re.findall(r"^def (test_\w+)\(", path.read_text(), flags=re.M)}
    assert len(rows) >= 30
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row.rsplit(" | ", 1)[-1])
        assert named, f"the row names no test: {row[:80]}"
        assert set(named) <= defined, f"{sorted(set(named) - defined)} named in docs/data.md do not exist"
