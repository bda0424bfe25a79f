"""Bad input to the trainer: refused in one `error:` line with exit code 2 before any work, or recorded when the
user asked for it; a busy run folder, a torn metrics line, values that used to crash."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bloodcells_dist.cli import run_main
from bloodcells_dist.train import trainer as train
from bloodcells_dist.train.tracking import MetricsLog

from ..helpers import REPO, TINY_CPU, cli, one_error_line, refused, train_args

QUICK = ["--epochs", "1", "--workers", "0"]
ON_LINUX_SYSFS = Path("/sys/kernel").is_dir()  # /sys refuses new folders, even to root: a folder we cannot write


def train_errors(tmp: Path, shard_folder: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (trainer argv, words the error line must hold)."""
    a_file = tmp / "a-file"
    a_file.write_text("x")
    run = ["--shards", str(shard_folder), "--output-dir", str(tmp / "run"), *TINY_CPU]
    cases = {
        "output_dir_is_a_file": ([*run, "--output-dir", str(a_file)], ["--output-dir", "is a file"]),
        "output_dir_under_a_file": ([*run, "--output-dir", str(a_file / "run")], ["cannot create"]),
        "negative_lr": ([*run, "--lr", "-0.5"], ["lr=-0.5"]),
        "nan_lr": ([*run, "--lr", ".nan"], ["lr=nan"]),
        "dropout": ([*run, "--dropout", "1.5"], ["dropout=1.5"]),
        "zero_width": ([*run, "--widths", "0,8,8,8"], ["widths=[0, 8, 8, 8]"]),
        "label_smoothing": ([*run, "--label-smoothing", "2"], ["label_smoothing=2"]),
        "negative_workers": ([*run, "--workers", "-1"], ["workers=-1"]),
        "hue_too_large": ([*run, "--aug-hue", "0.7"], ["aug_hue=0.7", "[0, 0.5]"]),
        "tiny_cell_window": ([*run, "--cell-crop", "8"], ["cell_crop=8", "16 to 4096"]),
        "negative_cell_window": ([*run, "--cell-crop", "-5"], ["cell_crop=-5"]),
        "huge_cell_window": ([*run, "--cell-crop", "100000"], ["cell_crop=100000"]),
    }
    if ON_LINUX_SYSFS:
        cases["output_dir_not_writable"] = ([*run, "--output-dir", "/sys/bcd-run"], ["--output-dir"])
    return cases


CASES = ["output_dir_is_a_file", "output_dir_under_a_file", "output_dir_not_writable", "negative_lr", "nan_lr",
         "dropout", "zero_width", "label_smoothing", "negative_workers", "hue_too_large", "tiny_cell_window",
         "negative_cell_window", "huge_cell_window"]


@pytest.mark.parametrize("case", CASES)
def test_train_user_errors_are_one_line_and_exit_2(case, small_shards, tmp_path, capsys):
    cases = train_errors(tmp_path, small_shards)
    if case not in cases:
        pytest.skip("needs Linux /sys for a folder that cannot be written, even by root")
    argv, words = cases[case]
    assert run_main(train.main, argv) == 2
    one_error_line(capsys.readouterr().err, *words)


def test_val_fold_out_of_range_is_an_error(small_shards, tmp_path, capsys):
    argv = ["--shards", str(small_shards), "--output-dir", str(tmp_path / "run"), "--val-fold", "7",
            "--train-splits", "train,val", *TINY_CPU]
    assert run_main(train.main, argv) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --val-fold 7: the shards have folds 0..4"
    assert not (tmp_path / "run" / "best.safetensors").exists()


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


def test_resume_skips_a_torn_last_line_of_metrics_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.9}\n{"step": 15, "trai')
    MetricsLog(path, enabled=True, resume_step=10)
    assert path.read_text() == '{"step": 5, "train/loss": 1.0}\n{"step": 10, "train/loss": 0.9}\n'
    assert "skipped 1 unreadable (torn) line" in capsys.readouterr().err


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
