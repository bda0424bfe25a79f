"""Experiment tracking: metrics.jsonl in the run folder always, W&B through Accelerate when asked."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from accelerate import Accelerator


def wandb_mode() -> str:
    """W&B's mode: what WANDB_MODE says, else online with an API key or a login, else offline (sync later)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    return "online" if os.environ.get("WANDB_API_KEY") or logged_in else "offline"


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every complete line of a JSON-lines file; a torn line (a run killed mid-write) is
    skipped with one warning on stderr."""
    records, torn = [], 0
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError:
            torn += 1
    if torn:
        print(f"warning: skipped {torn} unreadable (torn) line(s) of {path}", file=sys.stderr)
    return records


class MetricsLog:
    """Append-only JSON lines on the main process; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line, record in read_jsonl(path) if record.get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """One line; flushed so a killed run keeps what it logged."""
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Tracker:
    """W&B via Accelerate's tracker API, main process only. A failing tracker warns once and is switched off."""

    def __init__(self, accelerator: Accelerator, *, kind: str, project: str, config: dict, run_dir: Path) -> None:
        self.accelerator, self.enabled = accelerator, kind != "none"
        if not self.enabled:
            return
        self._guard(lambda: accelerator.init_trackers(
            project, config=config,
            init_kwargs={"wandb": {"dir": str(run_dir), "mode": wandb_mode(), "name": run_dir.name}},
        ))

    def _guard(self, call) -> None:
        if not self.enabled:
            return
        try:
            call()
        except Exception as err:  # the tracker is optional: never let it stop training
            self.enabled = False
            if self.accelerator.is_main_process:
                warnings.warn(f"experiment tracker disabled after an error: {type(err).__name__}: {err}", stacklevel=3)

    def log(self, values: dict, step: int) -> None:
        """Scalars at an optimizer step."""
        self._guard(lambda: self.accelerator.log(values, step=step))

    def log_confusion(self, matrix: list[list[int]], classes: list[str], step: int) -> None:
        """The confusion matrix as a W&B table (rows: true class)."""

        def call() -> None:
            import wandb

            table = wandb.Table(columns=["true", *classes], data=[[c, *row] for c, row in zip(classes, matrix)])
            self.accelerator.log({"val/confusion_matrix": table}, step=step)

        self._guard(call)

    def finish(self) -> None:
        """Flush and close the tracker."""
        self._guard(self.accelerator.end_training)
