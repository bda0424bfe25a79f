"""The ecosystem's own tools on our shards and models (issue 13's table, row by row): webdataset, Hugging Face
datasets, timm's wds reader, wids, torch.export / ONNX / TorchScript, safetensors + config.json, the Hub folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from bloodcells_dist.cli import UserError
from bloodcells_dist.pack.interop import CARD, TIMM_INFO, wids_index_name
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards, verify_shards
from bloodcells_dist.tools import evaluate, hub, predict

from ..helpers import cli, run_cli

pytestmark = pytest.mark.e2e  # the readers' own libraries and the command lines

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


@pytest.fixture(scope="module")
def four_split_shards(synthetic_root, tmp_path_factory) -> Path:
    """train, val, test and test_simple: the synthetic root plus a TEST_SIMPLE folder of 3 images per class."""
    root = tmp_path_factory.mktemp("four") / "root"
    images = synthetic_root / "dataset2-master" / "dataset2-master" / "images"
    shutil.copytree(images / "TRAIN", root / "TRAIN")
    shutil.copytree(images / "TEST", root / "TEST")
    for c in CLASSES:
        (root / "TEST_SIMPLE" / c).mkdir(parents=True)
        for path in sorted((images / "TEST" / c).glob("*.jpeg"))[:3]:
            shutil.copy(path, root / "TEST_SIMPLE" / c / path.name)
    out = tmp_path_factory.mktemp("four_shards")
    pack_shards(root, out, seed=0)
    return out


def test_pack_writes_descriptions_that_verify_checks(four_split_shards, tmp_path):
    manifest = verify_shards(four_split_shards)
    assert set(manifest.splits) == {"train", "val", "test", "test_simple"}
    info = json.loads((four_split_shards / TIMM_INFO).read_text())
    assert set(info["splits"]) == {"train", "validation", "test", "test_simple"}  # timm's default split names
    for name, split in manifest.splits.items():
        entry = info["splits"]["validation" if name == "val" else name]
        assert entry["num_samples"] == split.samples
        assert entry["filenames"] == [s.file for s in split.shards]
        assert entry["shard_lengths"] == [s.samples for s in split.shards]
        index = json.loads((four_split_shards / wids_index_name(name)).read_text())
        assert sum(s["nsamples"] for s in index["shardlist"]) == split.samples

    # verify: the card's prose may be edited; what the readers use may not, and nothing may be missing.
    copy = tmp_path / "copy"
    shutil.copytree(four_split_shards, copy)
    card = copy / CARD
    card.write_text(card.read_text() + "\nA note added by hand.\n")
    verify_shards(copy)
    card.write_text(card.read_text().replace("NEUTROPHIL", "BASOPHIL"))
    with pytest.raises(UserError, match="README.md disagrees"):
        verify_shards(copy)
    shutil.copy(four_split_shards / CARD, card)
    info["splits"]["train"]["num_samples"] += 1
    (copy / TIMM_INFO).write_text(json.dumps(info))
    with pytest.raises(UserError, match="_info.json disagrees"):
        verify_shards(copy)
    shutil.copy(four_split_shards / TIMM_INFO, copy / TIMM_INFO)
    (copy / wids_index_name("test_simple")).unlink()
    proc = run_cli("-m", "bloodcells_dist", "verify", str(copy))
    assert proc.returncode == 2 and "test_simple.wids.json is missing" in proc.stderr


def test_webdataset_brace_urls_and_webloader(four_split_shards):
    n = len(ShardManifest.load(four_split_shards).splits["val"].shards)
    url = f"{four_split_shards}/val-{{00000..{n - 1:05d}}}.tar"
    dataset = wds.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("jpg", "cls")
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=0)
    samples = list(loader)
    assert len(samples) == ShardManifest.load(four_split_shards).splits["val"].samples
    assert isinstance(samples[0][0], Image.Image) and samples[0][1] in range(4)


def test_hugging_face_datasets_reads_every_split_apart_with_class_names(four_split_shards, tmp_path):
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    manifest = ShardManifest.load(four_split_shards)
    ds = datasets.load_dataset(str(four_split_shards), cache_dir=str(tmp_path / "cache"))
    assert set(ds) == {"train", "val", "test", "test_simple"}  # test_simple is not merged into test
    for name, split in manifest.splits.items():
        assert ds[name].num_rows == split.samples
        assert ds[name].features["cls"].names == CLASSES
    sample = ds["test_simple"][0]
    assert isinstance(sample["jpg"], Image.Image) and sample["jpg"].size == (320, 240)
    assert ds["test_simple"].features["cls"].int2str(sample["cls"]) == sample["json"]["class_name"]
    assert sample["json"]["split"] == "test_simple"
    # The generic webdataset builder still works on the files, as before (integer labels, no names).
    files = {"val": [str(four_split_shards / s.file) for s in manifest.splits["val"].shards]}
    plain = datasets.load_dataset("webdataset", data_files=files, cache_dir=str(tmp_path / "cache2"))
    assert plain["val"].num_rows == manifest.splits["val"].samples


def test_timm_wds_reader_finds_train_and_validation(four_split_shards):
    timm_data = pytest.importorskip("timm.data", reason="the dev extra installs timm")
    manifest = ShardManifest.load(four_split_shards)
    # What `timm train.py --data-dir DIR --dataset wds/bloodcells` builds (default splits train / validation).
    train = timm_data.create_dataset("wds/bloodcells", root=str(four_split_shards), split="train", is_training=True,
                                     batch_size=8)
    val = timm_data.create_dataset("wds/bloodcells", root=str(four_split_shards), split="validation",
                                   is_training=False, batch_size=8)
    # (a training epoch is rounded up to whole batches per worker: len(train) may exceed the split)
    assert train.reader.split_info.num_samples == manifest.splits["train"].samples
    assert len(val) == manifest.splits["val"].samples
    labels = [target for _, target in val]
    assert len(labels) == manifest.splits["val"].samples and set(labels) == set(range(4))
    simple = timm_data.create_dataset("wds/bloodcells", root=str(four_split_shards), split="test_simple")
    assert len(simple) == manifest.splits["test_simple"].samples == 12


@pytest.mark.filterwarnings("ignore:String specifications for transformations:UserWarning")  # wids' own default
def test_wids_random_access_per_split(four_split_shards, tmp_path):
    wids = pytest.importorskip("wids", reason="the dev extra installs wids")
    manifest = ShardManifest.load(four_split_shards)
    dataset = wids.ShardListDataset(str(four_split_shards / wids_index_name("train")), cache_dir=str(tmp_path))
    assert len(dataset) == manifest.splits["train"].samples
    sample = dataset[len(dataset) - 1]  # wids decodes by extension: PIL image, int label, dict metadata
    assert isinstance(sample[".jpg"], Image.Image) and sample[".json"]["split"] == "train"
    assert CLASSES[sample[".cls"]] == sample[".json"]["class_name"]


@pytest.fixture(scope="module")
def hub_folder(reference_run, synthetic_shards, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the reference run, scored on test by `evaluate`, saved as a Hub folder: (run copy, Hub folder)."""
    run = tmp_path_factory.mktemp("hubrun") / "run"
    run.mkdir()
    for name in ("best.safetensors", "final.json", "config.yaml"):
        shutil.copy(reference_run / name, run / name)
    cli(evaluate.main, "--model", str(run), "--shards", str(synthetic_shards), check=True)
    hub_dir = tmp_path_factory.mktemp("hub") / "bloodcells-cnn"
    proc = cli(hub.main, "save", "--model", str(run), "--out", str(hub_dir), check=True)
    assert "hub push" in proc.stdout
    return run, hub_dir


def test_hub_folder_round_trip_without_the_run_folder(hub_folder, tmp_path):
    run, hub_dir = hub_folder
    assert sorted(p.name for p in hub_dir.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((hub_dir / "config.json").read_text())
    assert config["classes"] == CLASSES and config["id2label"]["3"] == "NEUTROPHIL"
    for key in ("architectures", "widths", "hidden", "image_size", "mean", "std"):
        assert config[key], key
    assert "shards" not in config["training_config"]  # no local paths in a public file
    moved = tmp_path / "elsewhere"
    shutil.copytree(hub_dir, moved)
    # A fresh process, the run folder out of reach: only the Hub folder is read, through the mixin's method.
    code = ("import sys, torch; from bloodcells_dist.train.model import BloodCellCNN; "
            "m = BloodCellCNN.from_pretrained(sys.argv[1]).eval(); x = torch.ones(2, 3, 48, 64); "
            "torch.save(m(x).detach(), sys.argv[2])")
    run_cli("-c", code, str(moved), str(tmp_path / "logits.pt"), check=True)
    from bloodcells_dist.train.spec import load_model

    model, spec = load_model(run)
    assert load_model(moved)[1].classes == tuple(CLASSES)
    with torch.no_grad():
        want = model(torch.ones(2, 3, *spec.preprocess.image_size))
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), want, atol=1e-6)


def test_model_card_has_metrics_with_splits_recipe_use_and_no_medical_claim(hub_folder):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    run, hub_dir = hub_folder
    card = huggingface_hub.ModelCard.load(hub_dir / "README.md")
    assert card.data.library_name == "bloodcells_dist" and card.data.pipeline_tag == "image-classification"
    assert card.data.license == "mit" and card.data.datasets == ["synthetic"]
    results = {r.dataset_split: r.metric_value for r in card.data.eval_results if r.metric_type == "accuracy"}
    test = json.loads((run / "eval-test.json").read_text())
    best = json.loads((run / "final.json").read_text())["best"]
    assert results == {"test": round(test["accuracy"], 4), "val": round(best["accuracy"], 4)}
    text = card.text
    for phrase in ("not a medical device", "Intended use", "Training recipe", "lr: ", "epochs: ", "| test |",
                   "mixup: ", "aug_hue: ", "git_commit: ", "without bias", "synthetic stand-in"):
        assert phrase in text, phrase


def test_the_model_card_leaves_out_an_ensembles_score(hub_folder, tmp_path):
    from bloodcells_dist.tools.hub import measured_metrics
    from bloodcells_dist.train.spec import load_model

    run, _ = hub_folder
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    alone = measured_metrics(copy, load_model(copy)[1])
    record = dict(json.loads((copy / "eval-test.json").read_text()), model=[str(copy), str(copy / "last.safetensors")])
    (copy / "eval-test-ensemble2.json").write_text(json.dumps(record))
    assert measured_metrics(copy, load_model(copy)[1]) == alone


def test_predict_and_evaluate_accept_a_hub_folder(hub_folder, synthetic_shards, synthetic_root, tmp_path):
    run, hub_dir = hub_folder
    proc = cli(evaluate.main, "--model", str(hub_dir), "--shards", str(synthetic_shards),
                   "--out", str(tmp_path), check=True)
    got, want = (json.loads(p.read_text()) for p in (tmp_path / "eval-test.json", run / "eval-test.json"))
    assert got["confusion_matrix"] == want["confusion_matrix"] and "accuracy" in proc.stdout
    images = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST" / "MONOCYTE"
    a = cli(predict.main, "--model", str(hub_dir), str(images), check=True).stdout
    b = cli(predict.main, "--model", str(run), str(images), check=True).stdout
    assert a == b and len(a.splitlines()) == 1 + len(list(images.glob("*.jpeg")))


def test_push_to_hub_offline_is_one_clear_error(hub_folder):
    _, hub_dir = hub_folder
    proc = run_cli("-m", "bloodcells_dist", "hub", "push", str(hub_dir), "--repo-id", "someone/bloodcells-cnn",
                   env={"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_not_a_real_token"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: push to someone/bloodcells-cnn")
