"""Evaluation of a trained model (shards or JPEG folders, 1 or 2 processes) and grouped k-fold folds (e2e)."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import defaultdict

import pytest
import torch
import webdataset as wds

from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.tools import cv, evaluate, export, hub, predict
from bloodcells_dist.train import trainer
from bloodcells_dist.train.metrics import classification_metrics, format_metrics
from bloodcells_dist.train.model import Ensemble
from bloodcells_dist.train.spec import load_model

from ..helpers import PORT, cli, launch, train_args

pytestmark = pytest.mark.e2e


def evaluation(folder, name="eval-test") -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def test_macro_f1_averages_the_classes_present_and_names_the_absent_ones():
    classes = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
    perfect = torch.tensor([[5, 0, 0, 0], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])  # only two classes in the split
    metrics = classification_metrics(perfect, classes)
    assert metrics["macro_f1"] == 1.0 and metrics["absent_classes"] == ["MONOCYTE", "NEUTROPHIL"]
    assert "macro F1 1.0000 (over 2 classes: MONOCYTE, NEUTROPHIL absent)" in format_metrics(metrics, classes)
    # a class only predicted (never true) is present, with F1 0, as scikit-learn counts it
    wrong = torch.tensor([[4, 0, 0, 1], [0, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    metrics = classification_metrics(wrong, classes)
    assert metrics["absent_classes"] == ["MONOCYTE"]
    assert metrics["macro_f1"] == pytest.approx((8 / 9 + 1 + 0) / 3)


def test_evaluate_counts_every_test_sample_once_with_one_and_two_processes(reference_run, synthetic_shards, tmp_path):
    expected = ShardManifest.load(synthetic_shards).splits["test"]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = cli(evaluate.main, "--model", str(reference_run), "--shards", str(synthetic_shards),
                   "--split", "test", "--out", str(one), check=True)
    assert "macro F1" in proc.stdout and "confusion matrix" in proc.stdout
    launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
           "-m", "bloodcells_dist", "evaluate", "--model", str(reference_run), "--shards", str(synthetic_shards),
           "--split", "test", "--out", str(two))
    a, b = evaluation(one), evaluation(two)
    assert a["samples"] == b["samples"] == expected.samples == 99
    assert a["confusion_matrix"] == b["confusion_matrix"]  # same predictions, each sample once
    for c, n in expected.samples_per_class.items():
        assert a["per_class"][c]["support"] == n
    assert (one / "eval-test-confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_from_jpeg_folders_matches_shards(reference_run, synthetic_root, synthetic_shards, tmp_path):
    cli(evaluate.main, "--model", str(reference_run), "--shards", str(synthetic_shards),
            "--out", str(tmp_path / "shards"), check=True)
    cli(evaluate.main, "--model", str(reference_run), "--images", str(synthetic_root),
            "--split", "test", "--out", str(tmp_path / "images"), check=True)
    assert evaluation(tmp_path / "shards")["confusion_matrix"] == evaluation(tmp_path / "images")["confusion_matrix"]
    proc = cli(evaluate.main, "--model", str(reference_run), "--shards", str(synthetic_shards),
                   "--tta", "--out", str(tmp_path / "tta"), check=True)
    assert evaluation(tmp_path / "tta", "eval-test-tta")["samples"] == 99 and "accuracy" in proc.stdout


def test_a_cell_window_model_crops_alike_in_evaluate_predict_export_and_the_hub(synthetic_shards, synthetic_root,
                                                                                tmp_path):
    run = tmp_path / "run"
    cli(trainer.main, *train_args(synthetic_shards, run, "--epochs", "2", "--cell-crop", "160", "--image-size", "48,48")[2:],
        check=True)
    assert load_model(run)[1].preprocess.cell_crop == 160
    cli(evaluate.main, "--model", str(run), "--shards", str(synthetic_shards),
            "--out", str(tmp_path / "shards"), check=True)
    cli(evaluate.main, "--model", str(run), "--images", str(synthetic_root),
            "--split", "test", "--out", str(tmp_path / "images"), check=True)
    confusion = evaluation(tmp_path / "shards")["confusion_matrix"]
    assert confusion == evaluation(tmp_path / "images")["confusion_matrix"]
    test = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    onnx, hub_dir = tmp_path / "model.onnx", tmp_path / "hub_dir"
    cli(export.main, "--model", str(run), "--format", "onnx", "--out", str(onnx), check=True)
    cli(hub.main, "save", "--model", str(run), "--out", str(hub_dir), check=True)
    assert "160x160-pixel window centred on the cell" in (hub_dir / "README.md").read_text()
    classes = ShardManifest.load(synthetic_shards).classes
    for model in (run, onnx, hub_dir):  # predict crops as training did: it reproduces evaluate's confusion matrix
        rows = cli(predict.main, "--model", str(model), str(test), check=True).stdout
        predicted = defaultdict(lambda: [0] * len(classes))
        for row in rows.splitlines()[1:]:
            path, guess = row.split(",")[:2]
            predicted[path.split("/")[-2]][classes.index(guess)] += 1
        assert [predicted[c] for c in classes] == confusion, model


def test_an_ensemble_averages_its_models_probabilities(reference_run, synthetic_shards, tmp_path):
    first, second = load_model(reference_run / "best.safetensors")[0], load_model(reference_run / "last.safetensors")[0]
    images = torch.randn(5, 3, 48, 64)
    with torch.no_grad():
        mean = (first(images).softmax(1) + second(images).softmax(1)) / 2
        assert torch.allclose(Ensemble([first, second])(images).exp(), mean, atol=1e-5)
    base = ["--shards", str(synthetic_shards), "--split", "test"]
    cli(evaluate.main, *base, "--model", str(reference_run), "--out", str(tmp_path / "one"), check=True)
    proc = cli(evaluate.main, *base, "--model", str(reference_run), "--model", str(reference_run / "best.safetensors"),
               "--out", str(tmp_path / "two"), check=True)
    pair = evaluation(tmp_path / "two", "eval-test-ensemble2")
    assert "accuracy" in proc.stdout and pair["samples"] == 99 and len(pair["model"]) == 2
    # A model with itself predicts what the model alone does.
    assert pair["confusion_matrix"] == evaluation(tmp_path / "one")["confusion_matrix"]
    other = tmp_path / "other"
    cli(trainer.main, *train_args(synthetic_shards, other, "--epochs", "1", "--image-size", "32,48")[2:], check=True)
    proc = cli(evaluate.main, *base, "--model", str(reference_run), "--model", str(other))
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {other} has preprocess ")
    assert "image_size=(32, 48)" in proc.stderr


def test_every_cell_has_exactly_one_fold_and_folds_are_dealt_evenly(synthetic_shards):
    manifest = ShardManifest.load(synthetic_shards)
    folds_of = defaultdict(set)
    groups_per_fold = defaultdict(lambda: defaultdict(set))
    for split in ("train", "val", "test"):
        for sample in wds.WebDataset(manifest.shard_urls(synthetic_shards, split), shardshuffle=False,
                                     empty_check=False):
            meta = json.loads(sample["json"])
            folds_of[meta["group"]].add(meta["fold"])
            groups_per_fold[meta["class_name"]][meta["fold"]].add(meta["group"])
    assert all(len(f) == 1 for f in folds_of.values()), "a cell is in two folds"
    assert {f for fs in folds_of.values() for f in fs} == set(range(manifest.folds))
    for name, per_fold in groups_per_fold.items():  # round-robin over the class's groups: within one of each other
        sizes = [len(per_fold[k]) for k in range(manifest.folds)]
        assert max(sizes) - min(sizes) <= 1, (name, sizes)


def test_val_fold_trains_on_the_other_folds(synthetic_shards, tmp_path):
    manifest = ShardManifest.load(synthetic_shards)
    in_fold = sum(manifest.splits[s].samples_per_fold["2"] for s in ("train", "val"))
    run = tmp_path / "run"
    proc = cli(trainer.main, *train_args(synthetic_shards, run, "--epochs", "1", "--workers", "1", "--val-fold", "2",
                                         "--train-splits", "train,val")[2:], check=True)
    result = json.loads((run / "final.json").read_text())
    assert result["last_validation"]["samples"] == in_fold
    assert result["train_samples"] == manifest.splits["train"].samples + manifest.splits["val"].samples - in_fold
    assert f"{result['train_samples']} training samples" in proc.stdout


def test_shards_stream_from_a_url(reference_run, synthetic_shards, tmp_path):
    """Manifest and shards read over HTTP (a stand-in for object storage), not from a file system."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(synthetic_shards))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # listening once constructed: no wait
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cli(evaluate.main, "--model", str(reference_run), "--shards", url, "--split", "test",
                "--out", str(tmp_path), check=True)
    finally:
        server.shutdown()
        thread.join()
    assert evaluation(tmp_path)["samples"] == 99


def test_cross_validation_runs_folds_and_summarises(synthetic_shards, tmp_path, monkeypatch):
    runs = tmp_path / "cv"
    args = ["-m", "bloodcells_dist", "cv", "--shards", str(synthetic_shards), "--output-dir", str(runs),
            "--folds", "0,3", "--tta", *train_args(synthetic_shards, runs, "--epochs", "1", "--workers", "1")[6:]]
    monkeypatch.setenv("BLOODCELLS_AT_STEP", "3:stop")  # fold 0 is preempted: cv stops too, and says so
    stopped = cli(cv.main, *args[3:], check=True)  # cv itself in-process; its folds train in their own processes
    assert "fold 0 stopped before its end" in stopped.stdout and not (runs / "cv.json").exists()
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    proc = cli(cv.main, *args[3:], check=True)  # resumes fold 0, then trains fold 3
    summary = json.loads((runs / "cv.json").read_text())
    assert set(summary["folds"]) == {"0", "3"}
    accs = [summary["folds"][k]["accuracy"] for k in ("0", "3")]
    assert summary["accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert "2 folds: accuracy" in proc.stdout and "with TTA: accuracy" in proc.stdout
    finals = [json.loads((runs / f"fold-{k}" / "final.json").read_text())["last_validation"] for k in (0, 3)]
    pooled = summary["confusion_matrix"]  # every held-out image of both folds, once
    assert sum(map(sum, pooled)) == sum(f["samples"] for f in finals)
    classes = ShardManifest.load(synthetic_shards).classes
    for i, name in enumerate(classes):
        recalls = [f["per_class"][name]["recall"] for f in finals if f["per_class"][name]["support"]]
        assert summary["per_class"][name]["recall"]["mean"] == pytest.approx(sum(recalls) / len(recalls))
        assert summary["per_class"][name]["support"] == sum(pooled[i])
    assert f"{classes[0]} " in proc.stdout.split("recall per class")[1]
    manifest = ShardManifest.load(synthetic_shards)
    for k in ("0", "3"):  # TTA scores the same held-out cells: every sample of fold k in train + val, once
        in_fold = sum(manifest.splits[s].samples_per_fold[k] for s in ("train", "val"))
        assert summary["folds"][k]["samples"] == summary["tta"]["folds"][k]["samples"] == in_fold
    again = cli(cv.main, *args[3:], check=True)  # finished folds are not trained again
    rewritten = json.loads((runs / "cv.json").read_text())
    assert "training in" not in again.stdout and rewritten.pop("provenance") and summary.pop("provenance")
    assert rewritten == summary
