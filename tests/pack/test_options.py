"""Packing's options and what it tells other readers (issue 27, items 4, 7 and 8): PackOptions, the one output
channel, the dataset card that `datasets.load_dataset(DIR)["validation"]` reads, and the `--help` texts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcells_dist.cli import UserError
from bloodcells_dist.pack.interop import CARD, front_matter
from bloodcells_dist.pack.shards import PackOptions, main, pack_shards, verify_shards

CLASSES = ["blast", "lymphocyte"]


def tiny_source(root: Path, per_class: int = 10) -> Path:
    """Class folders of small distinct JPEGs (no copies: groups `files`)."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    src = tiny_source(tmp_path_factory.mktemp("tiny") / "src")
    out = tmp_path_factory.mktemp("tiny_shards")
    lines: list[str] = []
    pack_shards(src, out, PackOptions(groups="files", test_fraction=0.2, workers=1, license="cc-by-4.0"),
                say=lines.append)
    assert any(line.startswith("groups: files") for line in lines)  # every line for the user came through say
    return out


def test_hugging_face_datasets_reads_a_validation_split_with_an_image_and_named_classes(tiny_shards, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    manifest = verify_shards(tiny_shards)  # the card's new split name verifies
    ds = datasets.load_dataset(str(tiny_shards), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "validation", "test"}
    validation = ds["validation"]
    assert validation.num_rows == manifest.splits["val"].samples > 0
    assert isinstance(validation.features["jpg"], datasets.Image)  # the image column (`--image_column_name jpg`)
    assert validation.features["cls"].names == CLASSES  # a ClassLabel (`--label_column_name cls`)
    sample = validation[0]
    assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == (48, 40)
    assert validation.features["cls"].int2str(sample["cls"]) == sample["json"]["class_name"]


def test_the_card_carries_the_licence_and_the_reader_split_names(tiny_shards):
    header = front_matter((tiny_shards / CARD).read_text())
    assert header["license"] == "cc-by-4.0"
    assert [e["split"] for e in header["configs"][0]["data_files"]] == ["train", "validation", "test"]
    text = (tiny_shards / CARD).read_text()
    assert "--image_column_name jpg --label_column_name cls" in text.replace("\n", " ")


def test_a_card_of_an_earlier_pack_with_val_still_verifies(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    card = copy / CARD
    card.write_text(card.read_text().replace("- split: validation", "- split: val"))
    verify_shards(copy)
    card.write_text(card.read_text().replace("- split: val", "- split: elsewhere"))
    with pytest.raises(UserError, match="README.md disagrees"):
        verify_shards(copy)


@pytest.mark.parametrize("options, words", [
    (PackOptions(val_split="cells"), "--val-split cells: expected group or random (cell is group's former name)"),
    (PackOptions(workers=0), "--workers must be at least 1"),
    (PackOptions(license="cc by"), "--license 'cc by': one identifier"),
])
def test_options_pack_cannot_use_are_refused_before_reading(options, words, tmp_path):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        pack_shards(tmp_path / "nowhere", tmp_path / "out", options)


def help_of(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_pack_and_verify_help_explain_every_choice_and_default(capsys):
    pack = help_of("pack", capsys)
    assert "seed of the splits, folds and shard order (default: 0)" in pack
    assert "processes for checking and writing (default:" in pack
    assert "{group,random}" in pack and "cell, group's former name, still means group" in pack
    assert "--license" in pack
    verify = help_of("verify", capsys)
    assert "DIR a shard folder written by `bloodcells pack`" in verify


def test_say_sends_findings_to_stdout_and_doubts_to_stderr(capsys):
    from bloodcells_dist.pack.shards import say

    say("groups: files (as asked)")
    say("warning: skipped a.jpg: truncated")
    say("note: no test split")
    out, err = capsys.readouterr()
    assert out == "groups: files (as asked)\n" and err == "warning: skipped a.jpg: truncated\nnote: no test split\n"
