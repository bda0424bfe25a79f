"""A Hub folder through Hugging Face's own round trip: `BloodCellCNN.from_pretrained` then `save_pretrained` keeps
the whole ModelSpec and the card, and `predict` reads the result with identical outputs (fast, in-process)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image

from bloodcells_dist.cli import run_main
from bloodcells_dist.tools import hub, predict
from bloodcells_dist.train.model import BloodCellCNN
from bloodcells_dist.train.rundir import HubDir
from bloodcells_dist.train.spec import load_model


@pytest.fixture()
def hub_folder(untrained_model, tmp_path) -> Path:
    """`bloodcells hub save` of the untrained model file."""
    assert run_main(hub.main, ["save", "--model", str(untrained_model), "--out", str(tmp_path / "hub")]) == 0
    return tmp_path / "hub"


def images(folder: Path) -> Path:
    """Five RGB images of other sizes than the model's (so that the fit and the resize run)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 50), (64, 64), (30, 90), (100, 80), (24, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"cell{i}.png")
    return folder


def predictions(model: Path, folder: Path, out: Path) -> list[dict]:
    """`bloodcells predict --model MODEL FOLDER --out OUT`'s rows."""
    assert run_main(predict.main, ["--model", str(model), str(folder), "--out", str(out)]) == 0
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def test_from_pretrained_then_save_pretrained_is_accepted_by_predict_with_identical_outputs(hub_folder, tmp_path):
    again = tmp_path / "again"
    BloodCellCNN.from_pretrained(hub_folder).save_pretrained(again)
    for name in HubDir.NAMES:  # the whole spec, the same weights, the same card: the same folder
        assert (again / name).read_bytes() == (hub_folder / name).read_bytes(), name
    assert load_model(again)[1] == load_model(hub_folder)[1]
    folder = images(tmp_path / "images")
    first = predictions(hub_folder, folder, tmp_path / "first.csv")
    second = predictions(again, folder, tmp_path / "second.csv")
    assert len(first) == 5 and first == second and all(row["predicted_class"] for row in first)


def test_changed_weights_get_the_spec_card_without_the_old_measurements(hub_folder, tmp_path):
    card = hub_folder / HubDir.CARD
    card.write_text(card.read_text().replace("license: mit", "license: cc-by-4.0") + "\nmeasured: 99%\n")
    model = BloodCellCNN.from_pretrained(hub_folder)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # e.g. fine-tuned further
    model.save_pretrained(tmp_path / "tuned")
    text = (tmp_path / "tuned" / HubDir.CARD).read_text()
    assert "measured: 99%" not in text and "Nothing was measured on these weights" in text
    assert ModelCard(text).data.license == "cc-by-4.0"  # the licence the card was published under stays
    spec = json.loads((tmp_path / "tuned" / HubDir.CONFIG).read_text())
    assert spec["classes"] == list(load_model(hub_folder)[1].classes) and spec["fit"] == "crop"


def test_a_network_from_its_spec_saves_the_whole_spec(untrained_model, tmp_path):
    model, spec = load_model(untrained_model)  # built by ModelSpec.build(): it carries the spec
    model.save_pretrained(tmp_path / "direct")
    assert load_model(tmp_path / "direct")[1] == spec
    assert "white blood cell" in (tmp_path / "direct" / HubDir.CARD).read_text().lower()


def test_hub_files_follow_the_umask_like_every_other_file(untrained_model, tmp_path):
    old = os.umask(0o027)
    try:
        assert run_main(hub.main, ["save", "--model", str(untrained_model), "--out", str(tmp_path / "hub")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hub").iterdir()}
    assert modes == {name: 0o640 for name in HubDir.NAMES}, modes


def test_hub_names_are_huggingface_hubs():
    assert (HubDir.CONFIG, HubDir.WEIGHTS) == (constants.CONFIG_NAME, constants.SAFETENSORS_SINGLE_FILE)
