"""The names of every file a run keeps, and of a Hugging Face Hub model folder: `RunDir` and `HubDir`, and the one
place that knows what older versions called things. A run folder holds one training at a time (a lock).

    RUN/config.yaml          the resolved TrainConfig, headed by its provenance (comments: still a usable recipe)
    RUN/metrics.jsonl        one JSON line per log step and per validation
    RUN/checkpoints/step-N/  exact-resume checkpoints; trainer_state.json inside is written last (in .tmp-step-N/,
                             renamed once complete)
    RUN/best.safetensors     the weights of the best validation epoch (a run that validates)
    RUN/last.safetensors     the weights at the end of training (every run)
    RUN/final.json           the run's summary, written last: its presence (with "finished": true) means done
    RUN/eval-*.json          `bloodcells evaluate` results written beside the weights (scoring.eval_stem)
    RUN/curves.png, RUN/confusion.png   `bloodcells report`'s figures
    RUN/wandb/, RUN/wandb_run_id   the W&B run (offline unless logged in) and its id, kept across resumes
    RUN/.lock                held by the training that owns the folder
    RUN/.answered/RANK       where the survivors of a failed collective say so (preemption.silent_ranks)

    HUB/config.json          the whole ModelSpec (huggingface_hub's name: from_pretrained reads it)
    HUB/model.safetensors    the weights (huggingface_hub's name)
    HUB/README.md            the model card

Version 0.2 reads none of version 0.1's files, and says so in one line (`version_0_1`) rather than failing on a
missing key. How to tell them:

    final.json, trainer_state.json   the last validation under "final" (now "last_validation")
    a weights file's metadata        classes, image_size, mean, std, model and config apart (now one "spec")
    a model description              no "fit" (0.1 stretched every image): a Hub config.json, an export's meta.json

The lock is a POSIX record lock (`fcntl.lockf`), taken by the main process before the run writes anything.
Such a lock belongs to the process that took it: forked data workers do not hold it, and the kernel drops it
when that process ends, however it ends (SIGKILL included), so a killed run never blocks the next start. It
works on NFS too (through the lock daemon), where multi-machine runs keep their folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .. import __version__
from ..cli import UserError, writable_folder
from ..files import open_own_file, remove_own_path, write_atomic, write_json

STATE_NAME = "trainer_state.json"  # inside a checkpoint, written last: its presence marks the checkpoint complete
RUN_KEYS_0_1 = {"final": "last_validation"}  # version 0.1's keys in final.json and trainer_state.json -> today's
WEIGHTS_KEYS_0_1 = ("classes", "image_size", "model")  # a weights file's metadata before specs (any one tells)
SPEC_KEY_SINCE_0_2 = "fit"  # every model description since 0.2 holds it


def version_0_1(what: str) -> str:
    """The one line for a file of version 0.1 (`what` names it and the key that tells)."""
    return (f"{what}: written by bloodcells_dist 0.1, which version {__version__} does not read; train the model "
            "again with this version, or read it with version 0.1")


def refuse_version_0_1(path: Path, raw: dict) -> dict:
    """`raw` (a run's JSON read from `path`), or a UserError naming version 0.1 when it uses that version's keys."""
    old = [k for k in RUN_KEYS_0_1 if k in raw and RUN_KEYS_0_1[k] not in raw]
    if old:
        raise UserError(version_0_1(f"{path} (key {old[0]!r}, now {RUN_KEYS_0_1[old[0]]!r})"))
    return raw


def read_run_json(path: Path) -> dict:
    """A JSON object a run wrote (final.json, a checkpoint's trainer_state.json), or a UserError in one line:
    unreadable, not an object, or written by version 0.1."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") \
            from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a run's record (a JSON {type(raw).__name__}, not an object)")
    return refuse_version_0_1(path, raw)


class RunDir:
    """One run folder and everything a run keeps in it."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.best = self.path / "best.safetensors"
        self.last = self.path / "last.safetensors"
        self.final = self.path / "final.json"
        self.curves = self.path / "curves.png"
        self.confusion = self.path / "confusion.png"
        self.wandb_id = self.path / "wandb_run_id"
        self.lock_file = self.path / ".lock"
        self.answered = self.path / ".answered"

    def __str__(self) -> str:
        return str(self.path)

    @classmethod
    def of_checkpoint(cls, checkpoint: Path) -> RunDir:
        """The run folder a checkpoint folder belongs to."""
        return cls(Path(checkpoint).parent.parent)

    def create(self) -> None:
        """Make the folder, or a UserError saying why it cannot be (a file there, no permission, a `checkpoints`
        entry that is a symbolic link or not a folder: checkpoints are never written or removed through a link)."""
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--output-dir {self.path} is a file, not a folder")
        writable_folder(self.path, "--output-dir")
        if self.checkpoints.is_symlink():
            raise UserError(f"{self.checkpoints} is a symbolic link: a run writes and removes checkpoints only in a "
                            "folder of its own, never through a link; remove it")
        if self.checkpoints.exists() and not self.checkpoints.is_dir():
            raise UserError(f"{self.checkpoints} is not a folder (a file?): a run keeps its checkpoints there; remove it")

    def run_files(self) -> list[Path]:
        """What an earlier run left here (a new run refuses the folder, or with --overwrite removes them)."""
        return [p for p in (self.metrics, self.final, self.checkpoints, self.best, self.last) if p.exists()]

    def refuse_earlier_run(self, overwrite: bool) -> None:
        """UserError when an earlier run is here and `overwrite` was not given: checked before any expensive work
        (and again under the lock, before anything is removed)."""
        old = self.run_files()
        if old and not overwrite:
            raise UserError(f"{self} already holds a run ({', '.join(p.name for p in old)}): "
                            f"--resume {self} continues it, --overwrite replaces it")

    def clear(self) -> None:
        """Remove an earlier run's files (not the lock, not W&B's folder)."""
        for path in self.run_files():
            remove_own_path(path)  # a link goes itself, never what it points to

    def finished(self) -> bool:
        """Whether a run completed here: final.json is written last and atomically, and says so."""
        try:
            return bool(json.loads(self.final.read_text()).get("finished"))
        except (OSError, ValueError, AttributeError):
            return False

    def summary(self) -> dict:
        """final.json's contents ({} before the run has finished); a UserError for an unreadable one, or one
        version 0.1 wrote."""
        return read_run_json(self.final) if self.final.is_file() else {}

    def weights(self) -> Path:
        """The run's model: its best weights where it validated, else its last (a run on train + val)."""
        return self.best if self.best.is_file() else self.last

    def evaluation(self, stem: str) -> Path:
        """Where `evaluate --out RUN` writes the result named `stem` (scoring.eval_stem)."""
        return self.path / f"{stem}.json"

    def evaluations(self) -> list[Path]:
        """The `evaluate` results written into this folder, by name."""
        return sorted(self.path.glob("eval-*.json"))

    def checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint at an optimizer step."""
        return self.checkpoints / f"step-{step:08d}"

    def partial_checkpoint(self, step: int) -> Path:
        """Where the checkpoint at `step` is written until it is complete (then renamed to `checkpoint(step)`)."""
        return self.checkpoints / f".tmp-{self.checkpoint(step).name}"

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (an interrupted save leaves a .tmp folder, never listed)."""
        return sorted(p for p in self.checkpoints.glob("step-*") if (p / STATE_NAME).is_file())

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete_checkpoints()
        return done[-1] if done else None

    def write_config(self, yaml_text: str, provenance_header: str) -> None:
        """config.yaml: the provenance as comments, then the resolved config."""
        write_atomic(self.config, provenance_header + yaml_text)

    def write_final(self, summary: dict) -> None:
        """final.json, the run's last write."""
        write_json(self.final, {**summary, "finished": True})

    def lock(self) -> RunLock:
        """The folder's lock (not yet taken)."""
        return RunLock(self.lock_file)


class HubDir:
    """A Hugging Face Hub model folder, as huggingface_hub's PyTorchModelHubMixin names its files."""

    CONFIG = "config.json"
    WEIGHTS = "model.safetensors"
    CARD = "README.md"
    NAMES = (CONFIG, WEIGHTS, CARD)

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.config = self.path / self.CONFIG
        self.weights = self.path / self.WEIGHTS
        self.card = self.path / self.CARD

    def __str__(self) -> str:
        return str(self.path)

    def holds_model(self) -> bool:
        """Whether a model was saved here (save_pretrained, `hub save`, or a download of a Hub repo)."""
        return self.config.is_file() and self.weights.is_file()

    def files(self) -> list[Path]:
        """The files of a saved model, those present."""
        return [p for p in (self.config, self.weights, self.card) if p.exists()]


class RunLock:
    """An exclusive lock on a run folder for one run's life (module docstring); `acquire` refuses a busy folder
    naming the holder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError saying which process (pid, host, start time) holds it."""
        fd = open_own_file(self.path, os.O_RDWR | os.O_CREAT)  # not through a link, not a folder or a pipe
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by a live process
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent} is in use by another training ({holder}); wait for it to end, "
                            "or give another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: the next run takes it again)."""
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None
