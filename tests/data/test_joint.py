"""Several datasets in one run (data/joint.py, the weighted epoch plan): classes united by name, every sample of
each dataset once per epoch at weight 1 (counted), other weights exact over their cycle, per-dataset validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from bloodcells_dist.cli import UserError
from bloodcells_dist.config import build_config
from bloodcells_dist.data.joint import open_joint_data, united_classes
from bloodcells_dist.data.plan import EpochPlan
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.train import trainer
from bloodcells_dist.train.rundir import RunDir
from bloodcells_dist.train.spec import load_model

TINY = {"image_size": "24,32", "widths": "4,8,8,8", "hidden": "16,16", "batch_size": "16", "tracker": "none",
        "workers": "0", "mixed_precision": "no", "log_every": "1", "lr": "0.05"}


def seen(plan: EpochPlan, epoch: int) -> Counter:
    """How often each position is trained on in an epoch, over every rank's micro-batches."""
    return Counter(torch.cat([b for r in range(plan.world_size) for b in plan.rank_batches(epoch, r)]).tolist())


def test_weighted_parts_give_each_dataset_its_share_of_every_epoch_exactly():
    parts = ((10, 1.0), (7, 0.5), (5, 2.0))  # rows 0-9, 10-16, 17-21
    plan = EpochPlan(10 + 4 + 10, batch_size=3, world_size=2, grad_accum=1, seed=3, parts=parts)
    assert plan.steps_per_epoch == 4 and plan.remainder == 0
    over_seven = Counter()
    for epoch in range(7):
        counts = seen(plan, epoch)
        assert all(counts[i] == 1 for i in range(10))  # weight 1: every sample exactly once
        assert all(counts[i] == 2 for i in range(17, 22))  # weight 2: every sample exactly twice
        assert sum(counts[i] for i in range(10, 17)) == 4  # weight 0.5: round(3.5) samples, drawn pass after pass
        over_seven.update(counts)
    assert all(over_seven[i] == 4 for i in range(10, 17))  # weight 0.5 (4 a epoch): 7 epochs = 4 whole passes
    assert not torch.equal(plan.order(0), plan.order(1))  # a new order every epoch
    with pytest.raises(ValueError, match="epoch's length"):
        EpochPlan(23, batch_size=3, world_size=2, parts=parts)


def test_classes_are_united_by_name_the_first_dataset_first(synthetic_shards, lab_shards):
    manifests = [ShardManifest.load(synthetic_shards), ShardManifest.load(lab_shards)]
    assert united_classes(manifests) == ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL", "basophil",
                                         "neutrophils"]


def test_two_datasets_in_one_epoch_every_sample_of_each_once(synthetic_shards, lab_shards):
    config = build_config(overrides={**TINY, "shards": f"{synthetic_shards},{lab_shards}"})
    manifests = [ShardManifest.load(synthetic_shards), ShardManifest.load(lab_shards)]
    classes = united_classes(manifests)
    data = open_joint_data(config, config.shard_folders(), manifests, classes, Accelerator(cpu=True))
    train = {name: manifests[i].split("train").samples for i, name in enumerate(("synthetic", "lab"))}
    assert data.plan.samples == sum(train.values()) and data.plan.remainder < data.plan.global_batch
    n = train["synthetic"]  # positions 0..n-1 are the synthetic set's training samples, the lab's after them
    for epoch in (0, 1):
        counts = seen(data.plan, epoch)
        assert set(counts.values()) == {1}  # nothing twice
        missed = [p for p in range(data.plan.samples) if p not in counts]
        assert len(missed) == data.plan.remainder  # fewer than processes x grad_accum left out, of either set
        assert sum(1 for p in counts if p < n) + sum(1 for p in missed if p < n) == n
    # labels in the united classes: the lab's 'eosinophil' is EOSINOPHIL, its 'basophil' a new class
    lab_labels = data.labels[data.train_rows[train["synthetic"]:]]
    assert set(lab_labels.tolist()) == {classes.index(c) for c in ("EOSINOPHIL", "LYMPHOCYTE", "basophil", "neutrophils")}
    assert list(data.extra_val) == ["lab"] and len(data.extra_val["lab"]) == manifests[1].split("val").samples
    assert len(data.val_rows) == manifests[0].split("val").samples


def test_a_joint_run_trains_on_both_and_validates_each(synthetic_shards, lab_shards, tmp_path):
    run = tmp_path / "run"
    config = build_config(overrides={**TINY, "shards": f"{synthetic_shards},{lab_shards}", "output_dir": str(run),
                                     "epochs": "1", "shard_weights": "1,0.5"})
    result = trainer.train(config)
    synthetic, lab = ShardManifest.load(synthetic_shards), ShardManifest.load(lab_shards)
    assert result["train_samples"] == synthetic.split("train").samples + round(0.5 * lab.split("train").samples)
    records = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    assert [r["val/lab/samples"] for r in records if "val/lab/samples" in r] == [lab.split("val").samples]
    assert result["last_validation"]["samples"] == synthetic.split("val").samples
    spec = load_model(run)[1]
    assert spec.dataset == "synthetic+lab" and len(spec.classes) == 6


def test_a_joint_run_refuses_the_stream_and_mismatched_weights(synthetic_shards, lab_shards, tmp_path):
    both = f"{synthetic_shards},{lab_shards}"
    with pytest.raises(UserError, match="one weight per shard folder"):
        build_config(overrides={"shards": both, "shard_weights": "1"})
    with pytest.raises(UserError, match="each shard folder once"):
        build_config(overrides={"shards": f"{synthetic_shards},{synthetic_shards}"})
    config = build_config(overrides={**TINY, "shards": both, "data": "stream", "output_dir": str(tmp_path / "r")})
    with pytest.raises(UserError, match="several shard folders train from the decoded cache"):
        trainer.train(config)


def test_a_recipe_may_list_its_shard_folders(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shards: [a, b]\nshard_weights: [1, 0.25]\n")
    config = build_config(recipe)
    assert config.shard_folders() == ["a", "b"] and config.shard_weights == (1.0, 0.25)
