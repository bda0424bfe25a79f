"""Bad input, second pass (issue 20): one test per case that used to lose data, let a mistake through or end in a
traceback. Small hand-made sources and tiny models keep these fast; the command lines run for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bloodcells_dist.cli import UserError, run_main
from bloodcells_dist.data.cache import load_or_build
from bloodcells_dist.data.preprocess import Preprocess
from bloodcells_dist.pack import cells, shards
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards
from bloodcells_dist.tools import evaluate, export, predict
from bloodcells_dist.train import trainer as train

from .conftest import REPO, cli, train_args, true_cells
from .test_bad_input import jpeg, make_root, one_error_line

QUICK = ["--epochs", "1", "--workers", "0"]


def refused(main, argv, *needles: str, capsys) -> str:
    """Run a command line in-process: exit code 2 and one `error:` line holding the needles, no traceback."""
    assert run_main(main, argv) == 2
    return one_error_line(capsys.readouterr().err, *needles)


# ---------------------------------------------------------------- 1. two trainings in one folder


@pytest.mark.e2e
def test_a_second_training_into_a_busy_folder_is_refused_and_a_killed_runs_lock_is_not(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BLOODCELLS_AT_STEP": "2:pause"}
    first = subprocess.Popen([sys.executable, *train_args(synthetic_shards, run, *QUICK)], cwd=REPO, env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # blocking reads until the run holds the folder and waits at step 2
            if line.startswith("paused at step 2"):
                break
        assert first.poll() is None, "the first run ended before its pause"
        second = cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--overwrite")[2:])  # this process
        assert second.returncode == 2
        one_error_line(second.stderr, str(run), "in use by another training", f"pid {first.pid}")
        assert not (run / "final.json").exists()
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    # The kernel dropped the killed run's lock with the process: the next run starts at once.
    third = cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--overwrite")[2:], check=True)
    assert (run / "final.json").is_file() and "in use" not in third.stderr


# ---------------------------------------------------------------- 2. one odd image stops a whole pack


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


# ---------------------------------------------------------------- 3. validating on training data


def test_validating_on_training_samples_is_refused_unless_asked_and_then_recorded(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    for extra in (["--val-split", "train"], ["--train-splits", "train,val", "--val-split", "val"]):
        refused(train.main, [*train_args(synthetic_shards, run, *QUICK)[2:], *extra], "also in train_splits",
                "validate_on_train", capsys=capsys)
    assert not run.exists() or not any(run.iterdir())
    proc = cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--val-split", "train", "--validate-on-train",
                                       "true")[2:], check=True)
    assert json.loads((run / "final.json").read_text())["validated_on_training_data"] is True
    assert "validate_on_train" in proc.stderr


# ---------------------------------------------------------------- 4. a trusted cache


def test_an_edited_or_foreign_cache_file_is_rebuilt_not_trusted(synthetic_shards, tmp_path, capsys):
    manifest, cache = ShardManifest.load(synthetic_shards), tmp_path / "cache"
    preprocess = Preprocess((24, 32))
    good, path, built = load_or_build(manifest, str(synthetic_shards), ["train"], preprocess, cache_dir=cache, workers=1)
    assert built
    labels, keys = good.labels.clone(), list(good.keys)
    edits = {
        "labels edited": lambda raw: raw["labels"].fill_(0),
        "a row lost": lambda raw: raw.update({k: raw[k][1:] for k in ("shard", "position", "split", "labels", "folds",
                                                                          "ids", "images")} | {"keys": raw["keys"][1:]}),
        "another image size": lambda raw: raw.update(images=torch.zeros(len(raw["keys"]), 3, 12, 16, dtype=torch.uint8)),
        "not a dict": lambda raw: None,
    }
    for name, edit in edits.items():
        raw = torch.load(path, weights_only=True)
        edit(raw)
        torch.save(raw if name != "not a dict" else [1, 2, 3], path)
        again, _, built = load_or_build(manifest, str(synthetic_shards), ["train"], preprocess, cache_dir=cache, workers=1)
        assert built, name
        assert torch.equal(again.labels, labels) and again.keys == keys, name
        assert "is not used" in capsys.readouterr().err, name


def test_an_unwritable_cache_folder_costs_a_rebuild_not_the_run(synthetic_shards, tmp_path):
    a_file = tmp_path / "cache-is-a-file"
    a_file.write_text("x")
    run = tmp_path / "run"
    proc = cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--cache-dir", str(a_file))[2:], check=True)
    assert "cannot save the decoded cache" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "final.json").is_file()


# ---------------------------------------------------------------- 5. evaluate counts and reads


def test_evaluate_refuses_a_split_twice_and_a_negative_fold(untrained_model, synthetic_shards, capsys):
    base = ["--model", str(untrained_model), "--shards", str(synthetic_shards)]
    refused(evaluate.main, [*base, "--split", "test,test"], "--split test,test", "once", capsys=capsys)
    refused(evaluate.main, [*base, "--split", "train,val", "--fold", "-3"], "--fold -3", capsys=capsys)


def test_evaluate_and_predict_read_a_cmyk_and_a_png_named_jpeg_alike(untrained_model, synthetic_root, tmp_path):
    test = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    folder = tmp_path / "images"
    for cls in ("EOSINOPHIL", "MONOCYTE"):
        (folder / cls).mkdir(parents=True)
        first = sorted((test / cls).glob("*.jpeg"))[0]
        Image.open(first).convert("CMYK").save(folder / cls / "cmyk.jpeg", "JPEG")
        Image.open(first).save(folder / cls / "png-inside.jpeg", "PNG")
    predicted = cli(predict.main, "--model", str(untrained_model), str(folder), check=True)
    assert "4 images, 0 unreadable" in predicted.stderr
    out = tmp_path / "eval"
    cli(evaluate.main, "--model", str(untrained_model), "--images", str(folder), "--out", str(out), check=True)
    scored = json.loads((out / "eval-test.json").read_text())
    assert scored["samples"] == 4 and scored["unreadable"] == 0
    rows = [line.split(",") for line in predicted.stdout.strip().splitlines()[1:]]
    right = sum(Path(r[0]).parent.name == r[1] for r in rows)
    assert scored["accuracy"] == pytest.approx(right / 4)  # the same four predictions


# ---------------------------------------------------------------- 6. --cells let through


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


# ---------------------------------------------------------------- 7. a broken Hub folder


@pytest.fixture(scope="module")
def hub_folder(untrained_model, tmp_path_factory) -> Path:
    from bloodcells_dist.tools import hub

    out = tmp_path_factory.mktemp("hub") / "model"
    cli(hub.main, "save", "--model", str(untrained_model), "--out", str(out), check=True)
    return out


HUB_EDITS = {
    "negative window": (lambda c: c.update(cell_crop=-5), "cell_crop=-5"),
    "zero std": (lambda c: c.update(std=[0.2, 0.0, 0.2]), "std="),
    "text mean": (lambda c: c.update(mean=["a", "b", "c"]), "mean"),
    "labels disagree": (lambda c: c.update(id2label={"0": "MONOCYTE", "1": "LYMPHOCYTE", "2": "EOSINOPHIL",
                                                     "3": "NEUTROPHIL"}), "id2label"),
    "no mean": (lambda c: c.pop("mean"), "mean"),
    "a list": (lambda c: None, "list"),
}


@pytest.mark.parametrize("case", sorted(HUB_EDITS))
def test_a_hub_folder_with_unusable_values_is_refused_by_every_tool(case, hub_folder, synthetic_root, tmp_path, capsys):
    edit, needle = HUB_EDITS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "README.md"):
        (folder / name).write_bytes((hub_folder / name).read_bytes())
    config = json.loads((hub_folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps([config] if case == "a list" else config))
    images = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    refused(predict.main, ["--model", str(folder), str(images)], needle, capsys=capsys)
    refused(evaluate.main, ["--model", str(folder), "--images", str(images.parent.parent.parent)], needle, capsys=capsys)
    refused(export.main, ["--model", str(folder), "--format", "torchscript", "--out", str(tmp_path / "m.pt")], needle,
            capsys=capsys)
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- 8. pack --out where it does harm


def test_pack_refuses_an_out_folder_inside_the_source_or_at_a_system_root(tmp_path, capsys):
    src = make_root(tmp_path / "src", {f"TRAIN/A/_{i}_1.jpeg": jpeg(i) for i in range(3)})
    refused(shards.main, ["pack", "--src", str(src), "--out", str(src / "shards")], "inside the source", capsys=capsys)
    refused(shards.main, ["pack", "--src", str(src), "--out", "/"], "system or home folder", capsys=capsys)
    refused(shards.main, ["pack", "--src", str(src), "--out", "/usr"], "system or home folder", capsys=capsys)
    assert not (src / "shards").exists()


# ---------------------------------------------------------------- 9. tracebacks instead of one line


def test_resuming_with_a_changed_shape_names_the_key(synthetic_shards, tmp_path, capsys):
    run = tmp_path / "run"
    cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--val-split", "")[2:], check=True)
    refused(train.main, ["--resume", str(run), "--image-size", "40,40"], "image_size=[40, 40]", "[48, 64]",
            capsys=capsys)
    refused(train.main, ["--resume", str(run), "--seed", "3"], "seed=3", capsys=capsys)


TRACEBACKS = {
    "seed -1": ["--seed", "-1"],
    "seed 2**64": ["--seed", str(2**64)],
    "one image size": ["--image-size", "32"],
}


@pytest.mark.parametrize("case", sorted(TRACEBACKS))
def test_config_values_that_crashed_are_one_line(case, synthetic_shards, tmp_path, capsys):
    argv = [*train_args(synthetic_shards, tmp_path / "run", *QUICK)[2:], *TRACEBACKS[case]]
    refused(train.main, argv, TRACEBACKS[case][0].lstrip("-").replace("-", "_"), capsys=capsys)


def test_cells_command_checks_its_outputs_before_the_work(synthetic_root, tmp_path, capsys):
    refused(cells.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "missing" / "c.csv")],
            "does not exist", capsys=capsys)
    refused(cells.main, ["--src", str(synthetic_root), "--out", str(tmp_path / "c.csv"), "--sheet",
                         str(tmp_path / "sheet.xyz")], ".xyz", capsys=capsys)
    assert list(tmp_path.iterdir()) == []  # no .tmp left behind


# ---------------------------------------------------------------- 10. numbers as users write them: test_config.py
