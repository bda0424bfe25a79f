"""Evaluate a model on shards whose classes are not the model's: matched by name, as --init-from matches them. A
model of more classes (a joint run, or PBC's 8 on blood-cells' 4) scores a dataset of fewer; a class the model
has no output for is refused in one line."""

from __future__ import annotations

import json

import torch

from bloodcells_dist.data.preprocess import Preprocess
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.tools import evaluate
from bloodcells_dist.train.spec import ModelSpec, save_weights

from ..helpers import cli


def model_of(classes: tuple[str, ...], path, seed: int = 0):
    spec = ModelSpec(classes=classes, preprocess=Preprocess((24, 32)), widths=(4, 4, 4, 4), hidden=(8, 8))
    torch.manual_seed(seed)
    save_weights(spec.build(), spec, path)
    return path


def test_a_model_of_more_classes_scores_shards_of_fewer_with_labels_matched_by_name(synthetic_shards, tmp_path):
    """Shards EOSINOPHIL, LYMPHOCYTE, MONOCYTE, NEUTROPHIL; the model's rows in another order, spelt in lower case,
    plus a class the shards never hold: every sample counted under its own class, by name."""
    model = model_of(("neutrophil", "basophil", "eosinophil", "monocyte", "lymphocyte"), tmp_path / "m.safetensors")
    proc = cli(evaluate.main, "--model", str(model), "--shards", str(synthetic_shards), "--split", "test",
               "--workers", "0", "--out", str(tmp_path / "out"), check=True)
    assert "the model knows 1 class(es) these shards never hold (basophil)" in proc.stdout
    result = json.loads((tmp_path / "out" / "eval-test.json").read_text())
    held = ShardManifest.load(synthetic_shards).splits["test"].samples_per_class
    support = {c: v["support"] for c, v in result["per_class"].items()}
    assert support == {"neutrophil": held["NEUTROPHIL"], "basophil": 0, "eosinophil": held["EOSINOPHIL"],
                       "monocyte": held["MONOCYTE"], "lymphocyte": held["LYMPHOCYTE"]}
    # each image's true label, against an evaluation by a model of exactly the shards' classes
    same = model_of(tuple(ShardManifest.load(synthetic_shards).classes), tmp_path / "same.safetensors")
    cli(evaluate.main, "--model", str(same), "--shards", str(synthetic_shards), "--split", "test", "--workers", "0",
        "--out", str(tmp_path / "same"), check=True)
    labels = lambda folder: {r.split(",")[0]: r.split(",")[1].casefold()
                             for r in (folder / "eval-test.predictions.csv").read_text().splitlines()[1:]}
    assert labels(tmp_path / "out") == labels(tmp_path / "same") and len(labels(tmp_path / "out")) == sum(held.values())

def test_a_shard_class_the_model_has_no_output_for_is_refused(synthetic_shards, tmp_path):
    model = model_of(("EOSINOPHIL", "LYMPHOCYTE", "NEUTROPHIL"), tmp_path / "m.safetensors")
    proc = cli(evaluate.main, "--model", str(model), "--shards", str(synthetic_shards), "--split", "test",
               "--workers", "0", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.rstrip().endswith("it has no output for MONOCYTE")
    assert not (tmp_path / "out" / "eval-test.json").exists()
