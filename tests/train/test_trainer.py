"""The step-loop trainer in-process on a tiny model (fast): the run folder, the schedule, validation every N
epochs, the modes, a stop and an exact resume, mixup. The launched, multi-process cases are in test_train.py."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bloodcells_dist.cli import UserError
from bloodcells_dist.config import build_config
from bloodcells_dist.data.plan import EpochPlan
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards
from bloodcells_dist.train import trainer
from bloodcells_dist.train.rundir import RunDir
from bloodcells_dist.train.schedule import lr_at
from bloodcells_dist.train.spec import load_model

from ..helpers import cli, jpeg, make_root, stopped_and_resumed

TINY = {"image_size": "24,32", "widths": "4,8,8,8", "hidden": "16,16", "batch_size": "16", "tracker": "none",
        "workers": "0", "mixed_precision": "no", "log_every": "1", "lr": "0.05"}


def tiny(shards: Path, run: Path, **overrides: object) -> dict:
    """A tiny config as build_config takes it (text values, as typed)."""
    return {**TINY, "shards": str(shards), "output_dir": str(run), **{k: str(v) for k, v in overrides.items()}}


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]


def learned(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------- the learning-rate schedule, one test per kind


def test_cosine_warms_up_linearly_then_falls_to_zero():
    rates = [lr_at(s, schedule="cosine", peak=0.1, total=100, warmup=10) for s in range(101)]
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)  # (step + 1) / warmup of the peak
    assert rates[10] == pytest.approx(0.1) and rates[55] == pytest.approx(0.05) and rates[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_constant_warms_up_then_holds_the_peak():
    rates = [lr_at(s, schedule="constant", peak=0.1, total=50, warmup=4) for s in range(50)]
    assert rates[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1]) and set(rates[4:]) == {0.1}
    assert lr_at(0, schedule="constant", peak=0.1, total=50, warmup=0) == 0.1  # no warm-up


def test_onecycle_ramps_from_a_25th_over_30_percent_then_anneals():
    total = 200
    rates = [lr_at(s, schedule="onecycle", peak=0.1, total=total, warmup=999) for s in range(total + 1)]
    assert rates[0] == pytest.approx(0.004) and rates[60] == pytest.approx(0.1)  # warm-up is ignored
    assert max(rates) == pytest.approx(0.1) and rates.index(max(rates)) == 60
    assert rates[130] == pytest.approx(0.05) and rates[total] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, schedule="linear", peak=0.1, total=10, warmup=0)


# ---------------------------------------------------------------- one run, in-process


@pytest.fixture(scope="module")
def tiny_run(synthetic_shards, tmp_path_factory) -> tuple[Path, dict]:
    """4 epochs, validation every 2, a checkpoint every 5 steps: the in-process reference run."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    config = build_config(overrides=tiny(synthetic_shards, run, epochs=4, eval_every=2, checkpoint_every=5))
    return run, trainer.train(config)


def test_a_run_writes_its_folder_and_logs_the_schedule(tiny_run, synthetic_shards):
    run, result = tiny_run
    folder, manifest = RunDir(run), ShardManifest.load(synthetic_shards)
    assert folder.finished() and json.loads(folder.final.read_text()) == {**result, "finished": True}
    steps_per_epoch = EpochPlan(manifest.split("train").samples, 16, 1).steps_per_epoch  # the last one short
    assert result["steps"] == 4 * steps_per_epoch and result["train_samples"] == manifest.split("train").samples
    # validated at epochs 2 and 4 only (eval_every 2; the last epoch always)
    val = [r for r in records(run) if "val" in r]
    assert [r["epoch"] for r in val] == [2, 4] and result["last_validation"] == val[-1]["val"]
    assert result["last_validation"]["samples"] == manifest.split("val").samples
    # every logged learning rate is the schedule's (cosine, warm-up 0.5 epoch)
    train = [r for r in records(run) if "train/lr" in r]
    assert len(train) == result["steps"]
    for r in train:
        assert r["train/lr"] == pytest.approx(lr_at(r["step"] - 1, schedule="cosine", peak=0.05,
                                                    total=result["steps"], warmup=steps_per_epoch // 2))
    assert all(math.isfinite(r["train/loss"]) for r in train)
    # the config, headed by the provenance, and still a recipe
    text = folder.config.read_text()
    assert text.startswith("# bloodcells_dist: ") and "# git_commit: " in text and "# device: 1 x cpu" in text
    assert build_config(folder.config).epochs == 4
    assert result["provenance"]["torch"] == torch.__version__.split("+")[0]
    # weights: the best validated epoch's and the last; two newest checkpoints kept
    assert result["weights"] == {"last": "last.safetensors", "best": "best.safetensors"}
    model, spec = load_model(run)  # the run's model: its best weights
    assert spec.classes == tuple(manifest.classes) and spec.dataset == "synthetic"
    assert spec.provenance["git_commit"] == result["provenance"]["git_commit"]
    assert model(torch.zeros(2, 3, 24, 32)).shape == (2, 4)
    assert [p.name for p in folder.complete_checkpoints()][-1] == f"step-{result['steps']:08d}"
    assert len(folder.complete_checkpoints()) == 2


def test_a_stopped_run_resumes_exactly_where_the_uninterrupted_one_goes(tiny_run, synthetic_shards, tmp_path,
                                                                         monkeypatch):
    reference, expected = tiny_run
    run = tmp_path / "run"
    config = build_config(overrides=tiny(synthetic_shards, run, epochs=4, eval_every=2, checkpoint_every=5))
    stop_at = expected["steps"] // 2 + 3  # mid-epoch, between checkpoints
    monkeypatch.setenv("BLOODCELLS_AT_STEP", f"{stop_at}:stop")
    stopped = trainer.train(config)
    assert stopped == {"stopped": True, "steps": stop_at + 1}  # the stop is agreed at the next step's boundary
    assert not RunDir(run).finished() and RunDir(run).latest_checkpoint().name == f"step-{stop_at + 1:08d}"
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    result = trainer.train(config, resume=run)
    assert result["last_validation"] == expected["last_validation"] and result["best"] == expected["best"]
    a, b = learned(RunDir(reference).last), learned(RunDir(run).last)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in records(run)] == [r["step"] for r in records(reference)]  # no step twice or missing


def test_the_stream_path_stopped_mid_epoch_resumes_exactly_too(synthetic_shards, tmp_path, monkeypatch):
    """The stream (2 data workers reading their own ranges), stopped between checkpoints and resumed: the same
    validation and weights as the uninterrupted stream run."""
    def run_to(folder: Path, stop_at: int | None) -> dict:
        config = build_config(overrides=tiny(synthetic_shards, folder, epochs=2, data="stream", workers=2,
                                            checkpoint_every=4))
        return stopped_and_resumed(trainer.train, config, stop_at, monkeypatch) if stop_at else trainer.train(config)

    whole, resumed = run_to(tmp_path / "whole", None), run_to(tmp_path / "resumed", 25)
    assert resumed["last_validation"] == whole["last_validation"] and resumed["steps"] == whole["steps"]
    a, b = learned(RunDir(tmp_path / "whole").last), learned(RunDir(tmp_path / "resumed").last)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_on_train_and_val_keeps_only_the_last_weights(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    result = trainer.train(build_config(overrides=tiny(synthetic_shards, run, epochs=1, train_splits="train,val",
                                                       val_split="")))
    splits = ShardManifest.load(synthetic_shards).splits
    assert result["train_samples"] == splits["train"].samples + splits["val"].samples
    assert result["last_validation"] is None and result["best"] is None
    assert result["weights"] == {"last": "last.safetensors", "best": None}
    assert not RunDir(run).best.exists() and load_model(run)[1].classes  # the run's model is its last weights


def test_a_folder_holding_a_run_is_refused_unless_overwritten(tiny_run, synthetic_shards, tmp_path):
    run = tmp_path / "run"
    config = build_config(overrides=tiny(synthetic_shards, run, epochs=1, val_split=""))
    trainer.train(config)
    before = RunDir(run).metrics.read_text()
    with pytest.raises(UserError, match="already holds a run"):
        trainer.train(config)
    assert RunDir(run).metrics.read_text() == before  # untouched
    trainer.train(config, overwrite=True)
    steps = [r["step"] for r in records(run)]
    assert steps == sorted(steps) and len(steps) == len(before.splitlines())  # one run's log, not two


def small_shards(folder: Path, classes: str) -> Path:
    """Shards of 6 small JPEGs per class, the same images whatever the class names."""
    files = {f"TRAIN/{c}/_{i}_1.jpeg": jpeg(10 * k + i) for k, c in enumerate(classes.split(",")) for i in range(6)}
    pack_shards(make_root(folder.with_name(folder.name + "-src"), files), folder, workers=1, log=lambda line: None)
    return folder


def test_a_resume_compares_classes_and_never_rewrites_a_finished_run(tmp_path, monkeypatch):
    shards, renamed = small_shards(tmp_path / "abcd", "A,B,C,D"), small_shards(tmp_path / "wxyz", "W,X,Y,Z")
    run = tmp_path / "run"
    config = build_config(overrides=tiny(shards, run, epochs=2, val_split="", batch_size=4))
    monkeypatch.setenv("BLOODCELLS_AT_STEP", "1:stop")
    assert trainer.train(config)["stopped"]
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    with pytest.raises(UserError, match=r"classes \['W', 'X', 'Y', 'Z'\].*\['A', 'B', 'C', 'D'\]"):
        trainer.train(dataclasses.replace(config, shards=str(renamed)), resume=run)
    assert trainer.train(config, resume=run)["steps"] > 2  # the run's own shards: it goes on
    record = {p: p.read_bytes() for p in RunDir(run).path.iterdir() if p.is_file()}
    elsewhere = shutil.copytree(shards, tmp_path / "moved")
    proc = cli(trainer.main, "--resume", str(run), "--shards", str(elsewhere))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "finished run" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in RunDir(run).path.iterdir() if p.is_file()} == record  # not a byte changed


def test_resume_auto_starts_fresh_resumes_and_leaves_a_finished_run_alone(tmp_path, monkeypatch):
    """The same command, requeued blindly: a fresh start, then a resume from the newest checkpoint, then a no-op."""
    shards, run = small_shards(tmp_path / "shards", "A,B,C,D"), tmp_path / "run"
    command = ["--resume", "auto", "--shards", str(shards), "--output-dir", str(run), "--epochs", "2",
               "--val-split", "", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "batch_size"],
               "--batch-size", "4"]
    monkeypatch.setenv("BLOODCELLS_AT_STEP", "2:stop")
    cli(trainer.main, *command, check=True)  # an empty folder: a fresh start, stopped at step 3
    assert not RunDir(run).finished() and RunDir(run).latest_checkpoint().name == "step-00000003"
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    resumed = cli(trainer.main, *command, check=True)
    assert "resumed from" in resumed.stdout and RunDir(run).finished()
    assert [r["step"] for r in records(run)] == list(range(1, json.loads(RunDir(run).final.read_text())["steps"] + 1))
    record = {p: p.read_bytes() for p in RunDir(run).path.iterdir() if p.is_file()}
    again = cli(trainer.main, *command, check=True)
    assert again.returncode == 0 and "holds a finished run (final.json): nothing to do" in again.stdout
    assert {p: p.read_bytes() for p in RunDir(run).path.iterdir() if p.is_file()} == record  # not a byte changed


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    config = build_config(overrides=tiny(synthetic_shards, run, epochs=1, lr="1e6", checkpoint_every=2))
    with pytest.raises(UserError, match=r"non-finite loss \(inf or nan\) at step \d+ .*lower --lr") as err:
        trainer.train(config)
    step = int(str(err.value).split(" at step ")[1].split()[0])
    kept = [p.name for p in RunDir(run).complete_checkpoints()]
    assert kept and all(int(name[5:]) < step for name in kept) and kept[-1] in str(err.value)
    assert not RunDir(run).best.exists() and not RunDir(run).finished()
    losses = [r["train/loss"] for r in records(run)]
    assert len(losses) == step - 1 and all(math.isfinite(x) for x in losses)  # nothing logged from the bad step


# ---------------------------------------------------------------- mixup


class Recorder(torch.nn.Module):
    """A linear classifier that keeps the last images it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 4)

    def forward(self, images):
        self.seen = images.detach().clone()
        return self.fc(images.flatten(1))


def test_mixup_blends_each_image_with_a_partner_and_the_loss_by_the_same_amount():
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 4, 4), torch.arange(16) % 4
    model, plain = Recorder(), build_config(overrides={"label_smoothing": "0.1"})
    loss = trainer.mixup_loss(model, images, labels, plain, (5, 0, 0))
    assert torch.equal(model.seen, images)  # mixup off: the batch as it is
    assert loss == torch.nn.functional.cross_entropy(model(images), labels, label_smoothing=0.1)
    config = build_config(overrides={"mixup": "0.4", "label_smoothing": "0.1"})
    loss = trainer.mixup_loss(model, images, labels, config, (5, 0, 0))
    mixed, logits = model.seen, model.fc(model.seen.flatten(1))
    # Each image is lam x itself + (1 - lam) x one partner (itself, for a fixed point of the pairing).
    found = []
    for i in range(16):
        if torch.allclose(mixed[i], images[i], atol=1e-5):
            found.append((i, None))
            continue
        for j in set(range(16)) - {i}:
            d = images[i] - images[j]
            lam = float(((mixed[i] - images[j]) * d).sum() / (d * d).sum())  # the best lam for partner j
            if torch.allclose(lam * images[i] + (1 - lam) * images[j], mixed[i], atol=1e-5):
                found.append((j, lam))
                break
    assert len(found) == 16
    pair = torch.tensor([j for j, _ in found])
    lams = [lam for _, lam in found if lam is not None]
    lam = lams[0]
    assert 0 < lam < 1 and max(lams) - min(lams) < 1e-4 and len(lams) > 8
    assert sorted(pair.tolist()) == list(range(16))  # a permutation: every image is someone's partner
    ce = lambda y: torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.allclose(loss, lam * ce(labels) + (1 - lam) * ce(labels[pair]), atol=1e-5)
    again = trainer.mixup_loss(model, images, labels, config, (5, 0, 0))
    assert torch.equal(model.seen, mixed) and torch.equal(again, loss)  # the same key mixes alike (resume)
    trainer.mixup_loss(model, images, labels, config, (6, 0, 0))
    assert not torch.equal(model.seen, mixed)  # the next step draws anew


def test_recipe_yaml_round_trips_through_the_run_folder(tiny_run):
    run, _ = tiny_run
    saved = yaml.safe_load(RunDir(run).config.read_text())
    assert saved["widths"] == [4, 8, 8, 8] and saved["eval_every"] == 2 and "provenance" not in saved


def test_a_folder_holding_a_run_is_refused_before_the_cache_is_built(tmp_path):
    shards, run = small_shards(tmp_path / "shards", "A,B,C,D"), tmp_path / "run"
    RunDir(run).create()
    RunDir(run).metrics.write_text('{"step": 1}\n')  # what an earlier run left
    config = build_config(overrides=tiny(shards, run, epochs=1, val_split="", data="cache",
                                         cache_dir=tmp_path / "cache"))
    with pytest.raises(UserError, match="already holds a run"):
        trainer.train(config)
    assert not (tmp_path / "cache").exists()  # refused before any decoding


def test_small_data_keeps_the_last_short_step_of_every_epoch(tmp_path):
    """A global batch that fits a set once and a bit: the rest trains as a short step instead of sitting out."""
    shards = small_shards(tmp_path / "shards", "A,B,C,D")
    samples = ShardManifest.load(shards).split("train").samples
    batch = samples // 2 + 1  # before: one step per epoch, nearly half the samples left out
    proc = cli(trainer.main, "--shards", str(shards), "--output-dir", str(tmp_path / "run"), "--epochs", "1",
               "--val-split", "", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "batch_size"],
               "--batch-size", str(batch), check=True)
    assert f"{samples} training samples (0 left out of each epoch)" in proc.stdout
    assert "left out of every epoch" not in proc.stderr  # no warning left to give
    assert json.loads(RunDir(tmp_path / "run").final.read_text())["steps"] == 2
