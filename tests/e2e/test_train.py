"""The trainer as users launch it: plain python, `accelerate launch` over gloo, kill -9 and resume, W&B offline.

End-to-end (marked e2e): each test starts real processes. The in-process layer is test_trainer.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.pack.shards import pack_shards
from bloodcells_dist.pack.synthetic import generate_dataset
from bloodcells_dist.train import trainer as train
from bloodcells_dist.train.spec import load_model

from ..helpers import ACCELERATE, PORT, REF_EXTRA, REPO, cli, free_port, jpeg, launch, make_root, run_cli, train_args

pytestmark = pytest.mark.e2e


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


def weights(path: Path) -> dict[str, torch.Tensor]:
    """Learned parameters only (BatchNorm running statistics excluded)."""
    return {k: v for k, v in load_file(str(path)).items() if "running_" not in k and "num_batches" not in k}


def test_one_process_learns_and_writes_the_run_folder(reference_run, synthetic_shards):
    result = final(reference_run)
    manifest = ShardManifest.load(synthetic_shards)
    # 4 classes, 92 validation images: chance gets 23 +- 4.2 right, and 34 or more with p = 0.007. This run gets 38
    # (0.413), 4 images above the bar; the bar before (0.40, i.e. 37) left one image.
    right = round(result["best"]["accuracy"] * result["last_validation"]["samples"])
    assert right >= 34, f"no better than chance: {result['best']}"
    assert result["last_validation"]["samples"] == manifest.splits["val"].samples
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] and all(r["train/images_per_s"] > 0 for r in records if "train/loss" in r)
    assert len([r for r in records if "val/accuracy" in r]) == 8
    assert all(r["epoch_seconds"] > 0 for r in records if "val/accuracy" in r)  # each epoch's time, validation included
    saved = yaml.safe_load((reference_run / "config.yaml").read_text())
    assert saved["widths"] == [8, 16, 32, 32] and saved["epochs"] == 8 and saved["tracker"] == "none"
    model, spec = load_model(reference_run)
    assert list(spec.classes) == manifest.classes and spec.preprocess.image_size == (48, 64)
    assert model(torch.zeros(2, 3, 48, 64)).shape == (2, 4)
    last = load_file(str(reference_run / "last.safetensors"))  # the last epoch's weights, beside the best ones
    assert last.keys() == load_file(str(reference_run / "best.safetensors")).keys()
    checkpoints = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[-1] == f"step-{result['steps']:08d}"


def test_kill_9_mid_epoch_then_resume_matches_uninterrupted_run(reference_run, synthetic_shards, tmp_path):
    """The cache path, killed for real; the stream path's exact resume is tested in-process (test_trainer.py)."""
    data = "cache"
    run = tmp_path / "run"
    steps_per_epoch = final(reference_run)["steps"] // 8
    checkpointed = 7 * (2 * steps_per_epoch // 7 + 2)  # the second mid-epoch checkpoint of epoch 3
    assert checkpointed % steps_per_epoch and checkpointed // steps_per_epoch == 2
    # SIGKILL three steps past that checkpoint: those steps are lost and must be redone alike on resume.
    killed = run_cli(*train_args(synthetic_shards, run, *REF_EXTRA, "--data", data),
                     env={"BLOODCELLS_AT_STEP": f"{checkpointed + 3}:kill"})
    assert killed.returncode == -signal.SIGKILL and not (run / "final.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*"))[-1] == f"step-{checkpointed:08d}"

    resumed = cli(train.main, "--resume", str(run), check=True)
    assert "resumed from" in resumed.stdout and f"data: {data} (" in resumed.stdout
    ref, got = final(reference_run), final(run)
    assert got["last_validation"] == ref["last_validation"] and got["best"] == ref["best"]
    assert got["steps"] == ref["steps"]
    a, b = weights(reference_run / "best.safetensors"), weights(run / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    vals = lambda r: [json.loads(x)["val/accuracy"] for x in (r / "metrics.jsonl").read_text().splitlines()
                      if "val/accuracy" in x]
    assert vals(run) == vals(reference_run)  # no duplicated or missing epochs in the resumed log


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """DDP averages gradients: 2 processes x batch B == 1 process x 2B, given the same BatchNorm batches.

    BatchNorm normalises each process's micro-batch of B on its own, so the one-process run takes its 2B
    images as two accumulated micro-batches of B (Accelerate's gradient accumulation). Fixed data: no
    shuffle, no augmentation, 8 samples per shard so rank r's batch at step k is shard 2k + r.
    """
    generate_dataset(tmp_path / "data", per_class=20, copies=4, test_per_class=0)  # 80 images: 5 steps of 16
    shards = tmp_path / "shards"
    pack_shards(tmp_path / "data", shards, seed=0, val_fraction=0.0, shard_size=8)
    fixed = ["--epochs", "1", "--shuffle", "false", "--aug-flip", "false", "--aug-rot90", "false",
             "--aug-affine", "false", "--aug-color", "false", "--val-split", "", "--workers", "0"]
    launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
           *train_args(shards, tmp_path / "two", *fixed))
    # One thread, as each launched process has: then the reductions run in the same order and match exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli(train.main, *train_args(shards, tmp_path / "one", *fixed, "--grad-accum", "2")[2:], check=True)
    finally:
        torch.set_num_threads(threads)
    assert final(tmp_path / "two")["steps"] == final(tmp_path / "one")["steps"] == 80 // 16
    a, b = weights(tmp_path / "two" / "last.safetensors"), weights(tmp_path / "one" / "last.safetensors")
    assert a.keys() == b.keys() and len(a) == 18  # 4 x (conv, BN weight, BN bias) + 3 x (FC weight, bias)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=f"{k} differs")


def test_bf16_channels_last_on_cpu_runs_end_to_end(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    # Its own process: Accelerate fixes the precision once per process.
    run_cli(*train_args(synthetic_shards, run, "--epochs", "1", "--workers", "1", "--mixed-precision", "bf16",
                        "--channels-last", "true"), check=True)
    result = final(run)
    assert result["last_validation"]["samples"] == ShardManifest.load(synthetic_shards).splits["val"].samples
    losses = [json.loads(x)["train/loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    assert losses and all(x == x and x < 10 for x in losses)  # finite


def test_two_machines_on_loopback_stream_one_shard_to_two_ranks_times_two_workers(synthetic_root, tmp_path):
    """Machine ranks 0 and 1 on 127.0.0.1, one process each, as on two hosts sharing a file system. One shard
    per split, fewer than the (rank, worker) slots: each slot reads its own range of it, no sample reused."""
    shards = tmp_path / "shards"
    pack_shards(synthetic_root, shards, seed=0, shard_size=10_000)
    port, run = free_port(), tmp_path / "run"
    common = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network"]
    args = train_args(shards, run, "--epochs", "1", "--workers", "2", "--data", "stream")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([ACCELERATE, "launch", *common, "--machine_rank", str(r), *args], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "data: stream (as configured; 2 data worker(s) per process" in outs[0][0]
    manifest = ShardManifest.load(shards)
    assert len(manifest.splits["train"].shards) == 1 and final(run)["processes"] == 2
    samples = manifest.splits["train"].samples  # 312: 19 full steps of 2 x 8, then a short step of the other 8
    assert final(run)["steps"] == -(-samples // 16) and final(run)["train_samples"] == samples
    assert final(run)["last_validation"]["samples"] == manifest.splits["val"].samples


def test_two_processes_train_on_all_but_fewer_than_two_of_57_samples(tmp_path):
    """A lab's small set: 57 samples at a global batch of 32 (16 x 2 processes) left 25 out of every epoch; the
    last, short step (13 + 12 samples, each loss weighted by its share) keeps them."""
    files = {f"TRAIN/{c}/_{i}_1.jpeg": jpeg(100 * k + i) for k, c in enumerate("ABCD") for i in range(15 - (k > 0))}
    shards = tmp_path / "shards"
    pack_shards(make_root(tmp_path / "src", files), shards, val_fraction=0.0, groups="files", workers=1,
                log=lambda line: None)
    assert ShardManifest.load(shards).splits["train"].samples == 57
    log = tmp_path / "ids"
    proc = launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
                  *train_args(shards, tmp_path / "run", "--epochs", "2", "--batch-size", "16", "--val-split", "",
                              "--image-size", "24,32"), env={"BLOODCELLS_SAMPLE_LOG": str(log)})
    assert "57 training samples (0 left out of each epoch)" in proc.stdout
    ids = [int(n) for f in tmp_path.glob("ids.*") for n in f.read_text().split()]
    assert final(tmp_path / "run")["steps"] == 4  # 2 per epoch, on both ranks
    assert len(ids) == 2 * 57 and all(ids.count(i) == 2 for i in set(ids))  # each sample in each epoch, once


def test_a_broken_tracker_does_not_stop_training(synthetic_shards, tmp_path, monkeypatch):
    """(W&B offline by default, across a stop and resume: test_scale.py.)"""
    monkeypatch.setenv("WANDB_MODE", "no-such-mode")
    broken = tmp_path / "broken"
    proc = cli(train.main, *train_args(synthetic_shards, broken, "--epochs", "1", "--workers", "1",
                                       "--tracker", "wandb")[2:], check=True)
    assert "tracker disabled" in proc.stderr
    assert final(broken)["last_validation"]["samples"] > 0


@pytest.mark.parametrize("flags", [("--cpu",), ()], ids=["cpu-flag", "plain"])
def test_several_cpu_processes_without_torchrun_is_a_clear_error(synthetic_shards, tmp_path, flags):
    """Without a GPU, `accelerate launch [--cpu] --num_processes 2` starts one process (its CPU launcher needs
    mpirun): say which flag or launch file works instead of training alone."""
    proc = launch(*flags, "--num_processes", "2", *train_args(synthetic_shards, tmp_path / "run"), check=False)
    assert proc.returncode != 0
    assert "error: this is a single process of a multi-process launch" in proc.stderr
    assert "add --multi_gpu" in proc.stderr and "launch/cpu_2proc.yaml" in proc.stderr
    assert "bloodcells_dist/" not in proc.stderr  # no traceback of ours (the launcher prints its own)
