"""`train(config, resume=...)`, the function the tests and other programs call, refuses what `bloodcells train
--resume` refuses, with the same words: the checks live in train(), not in the command line around it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bloodcells_dist.cli import UserError
from bloodcells_dist.config import build_config
from bloodcells_dist.train import trainer
from bloodcells_dist.train.rundir import RunDir

from ..helpers import cli

TINY = {"image_size": "24,32", "widths": "4,8,8,8", "hidden": "16,16", "batch_size": "16", "tracker": "none",
        "workers": "0", "mixed_precision": "no", "val_split": "", "epochs": "2"}


def contents(folder: Path) -> dict:
    """Every file under a folder and its bytes."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_refusal(config, resume: Path, argv: list[str], *, overwrite: bool = False) -> str:
    """The UserError train() raises, which must be the one `error:` line the command prints (exit 2)."""
    with pytest.raises(UserError) as refused:
        trainer.train(config, resume=resume, overwrite=overwrite)
    proc = cli(trainer.main, *argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {refused.value}"
    return str(refused.value)


@pytest.fixture
def stopped_run(synthetic_shards, tmp_path, monkeypatch) -> tuple[Path, object]:
    """A run stopped (checkpointed) at step 2 of 2 epochs, and its config."""
    run = tmp_path / "run"
    config = build_config(overrides={**TINY, "shards": str(synthetic_shards), "output_dir": str(run)})
    monkeypatch.setenv("BLOODCELLS_AT_STEP", "1:stop")
    assert trainer.train(config)["stopped"]
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    return run, config


def test_a_resume_that_changes_what_the_run_trains_is_refused_as_the_cli_refuses_it(stopped_run):
    run, config = stopped_run
    before = contents(run)
    text = same_refusal(dataclasses.replace(config, seed=3), run, ["--resume", str(run), "--seed", "3"])
    assert text.startswith("cannot resume with seed=3: the run was started with 0")
    text = same_refusal(dataclasses.replace(config, batch_size=8), run, ["--resume", str(run), "--batch-size", "8"])
    assert text.startswith("cannot resume with batch_size=8: the run was started with 16")
    assert contents(run) == before  # not a byte changed


def test_a_resume_writes_only_into_its_own_run_and_never_deletes_it(stopped_run, tmp_path):
    run, config = stopped_run
    before, other = contents(run), tmp_path / "other"
    text = same_refusal(dataclasses.replace(config, output_dir=str(other)), run,
                        ["--resume", str(run), "--output-dir", str(other)])
    assert text.startswith(f"--resume continues the run in {run} and writes only there: drop --output-dir {other}")
    assert not other.exists()  # refused before the folder was made
    text = same_refusal(config, run, ["--resume", str(run), "--overwrite"], overwrite=True)
    assert text == "--resume continues a run and --overwrite deletes it: pass one of them"
    missing = tmp_path / "not-a-run"
    missing.mkdir()
    text = same_refusal(dataclasses.replace(config, output_dir=str(missing)), missing, ["--resume", str(missing)])
    assert text.startswith(f"no complete checkpoint in {missing}")
    assert contents(run) == before and not any(missing.iterdir())
    assert trainer.train(config, resume=run)["steps"] > 2  # the run itself still resumes


def test_a_finished_run_is_never_resumed(stopped_run):
    run, config = stopped_run
    assert not trainer.train(config, resume=run).get("stopped") and RunDir(run).finished()
    before = contents(run)
    text = same_refusal(config, run, ["--resume", str(run)])
    assert text.startswith(f"{run} holds a finished run (final.json): a resume would rewrite its record")
    # named as a checkpoint folder too
    checkpoint = RunDir(run).latest_checkpoint()
    assert same_refusal(config, checkpoint, ["--resume", str(checkpoint)]) == text
    assert contents(run) == before
