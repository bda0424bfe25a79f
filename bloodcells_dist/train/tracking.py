"""Experiment tracking: metrics.jsonl in the run folder always, W&B through Accelerate when asked."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from accelerate import Accelerator

from ..cli import debugging
from ..files import open_own_file, write_atomic
from ..output import warn
from .rundir import RunDir


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
        warn(f"skipped {torn} unreadable (torn) line(s) of {path}")
    return records


class MetricsLog:
    """Append-only JSON lines on the main process; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None) -> None:
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line, record in read_jsonl(path) if record.get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """One line; flushed so a killed run keeps what it logged."""
        if self.enabled:
            with os.fdopen(open_own_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a") as f:
                f.write(json.dumps(record) + "\n")


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of a run folder, created on first use: a resumed or requeued run continues that W&B run."""
    path = RunDir(run_dir).wandb_id
    saved = path.read_text().strip() if path.is_file() else ""
    if saved:
        return saved
    run_id = secrets.token_hex(4)  # W&B ids are letters and digits, unique within the project
    write_atomic(path, run_id + "\n")
    return run_id


class Tracker:
    """W&B via Accelerate's tracker API, main process only. W&B is optional: an error inside W&B (a broken install,
    a bad setting, a full disk) warns once and switches the tracker off; our own code around it is not guarded,
    so its bugs keep their traceback (and BLOODCELLS_DEBUG=1 lets W&B's through too)."""

    def __init__(self, accelerator: Accelerator, *, kind: str, project: str, config: dict, run_dir: Path,
                 group: str = "") -> None:
        self.accelerator, self.enabled = accelerator, kind != "none" and accelerator.is_main_process
        if not self.enabled:
            return
        wandb = {"dir": str(run_dir), "mode": wandb_mode(), "name": Path(run_dir).name, "id": wandb_run_id(run_dir),
                 "resume": "allow", "group": group or None}
        self._call(accelerator.init_trackers, project, config=config, init_kwargs={"wandb": wandb})

    def _call(self, function, *args, **kwargs) -> None:
        """Call into the tracker; the first error from it disables tracking with one warning."""
        if not self.enabled:
            return
        try:
            function(*args, **kwargs)
        except Exception as err:  # W&B raises many types; none of them may stop training
            if debugging():
                raise
            self.enabled = False
            warn(f"experiment tracker disabled after an error: {type(err).__name__}: {err}")

    def log(self, values: dict, step: int) -> None:
        """Scalars at an optimizer step."""
        self._call(self.accelerator.log, values, step=step)

    def log_validation(self, metrics: dict, classes: list[str], *, step: int, epoch: int) -> None:
        """Accuracy, macro F1, per-class precision / recall / F1 and the confusion-matrix chart of an epoch."""
        if not self.enabled:
            return
        values = {"epoch": epoch, "val/accuracy": metrics["accuracy"], "val/macro_f1": metrics["macro_f1"]}
        for c, m in metrics["per_class"].items():
            values.update({f"val/precision_{c}": m["precision"], f"val/recall_{c}": m["recall"], f"val/f1_{c}": m["f1"]})
        # W&B's chart takes one (true, predicted) pair per sample: expand the counts.
        pairs = [(t, p) for t, row in enumerate(metrics["confusion_matrix"]) for p, n in enumerate(row) for _ in range(n)]

        def chart_and_log() -> None:
            import wandb

            values["val/confusion_matrix"] = wandb.plot.confusion_matrix(
                y_true=[t for t, _ in pairs], preds=[p for _, p in pairs], class_names=classes,
                title=f"confusion matrix, epoch {epoch}")
            self.accelerator.log(values, step=step)

        self._call(chart_and_log)

    def finish(self) -> None:
        """Flush and close the tracker."""
        self._call(self.accelerator.end_training)
