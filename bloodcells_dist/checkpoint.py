"""Atomic checkpoints for exact resume, and the best model as safetensors with what a predictor needs."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .cli import UserError
from .model import BloodCellCNN
from .transforms import MEAN, STD, preprocess_from

STATE_NAME = "trainer_state.json"  # written last inside a checkpoint: its presence marks it complete
BEST_NAME = "best.safetensors"
LAST_NAME = "last.safetensors"  # the weights at the end of training


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, run_dir: Path, state: dict, keep: int) -> Path:
    """Save model, optimizer, scaler and RNG states of every rank; visible only once complete. Collective."""
    folder = checkpoint_dir(run_dir)
    final = folder / f"step-{state['step']:08d}"
    tmp = folder / f".tmp-step-{state['step']:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # main writes the weights, every rank its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_NAME, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, which resume ignores
        for old in sorted(folder.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder, or the newest complete one of a run folder."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    done = sorted(p for p in checkpoint_dir(path).glob("step-*") if (p / STATE_NAME).is_file())
    if not done:
        raise UserError(f"no complete checkpoint in {path} (looked for {checkpoint_dir(path)}/step-*/{STATE_NAME})")
    return done[-1]


def rng_isolated(batches: Iterable) -> Iterator:
    """The same batches, produced without moving the global torch RNG (a data loader starting draws its
    workers' base seed from it): dropout then draws the same masks whether an epoch ran whole or resumed."""
    source = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            try:
                batch = next(source)
            except StopIteration:
                return
        yield batch


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, layout: dict) -> dict:
    """Restore everything save_checkpoint saved; return the trainer state (step, best metrics...).

    `layout` (processes, batch_size, grad_accum, steps_per_epoch) must match the run's: the data order, the
    steps per epoch and the learning-rate schedule depend on it, so a change is refused, naming what changed.
    """
    state = json.loads((checkpoint / STATE_NAME).read_text())
    saved = state.get("layout", {})
    changed = [f"{k} {saved[k]} -> {v}" for k, v in layout.items() if k in saved and saved[k] != v]
    if changed:
        raise UserError(f"cannot resume {checkpoint} with another layout ({', '.join(changed)}): the data order, "
                        f"steps per epoch and learning-rate schedule depend on it; resume with "
                        f"{saved['processes']} process(es), batch_size {saved['batch_size']} and grad_accum "
                        f"{saved['grad_accum']}, as the run started")
    accelerator.load_state(str(checkpoint))
    return state


def check_shared_run_dir(accelerator: Accelerator, run_dir: Path) -> None:
    """Stop, naming the problem, when the machines of a run do not share its folder. Collective.

    Checkpoints are written by every rank into one folder and completed by the main process: a machine that
    cannot see that folder would be left with incomplete checkpoints it cannot resume from.
    """
    if accelerator.num_processes == 1:
        return
    name = [f".shared-check-{os.getpid()}-{time.time_ns()}" if accelerator.is_main_process else None]
    broadcast_object_list(name)
    marker = Path(run_dir) / name[0]
    if accelerator.is_main_process:
        marker.write_text("written by the main process; every machine must see it\n")
    accelerator.wait_for_everyone()
    blind = accelerator.is_local_main_process and not marker.exists()
    blind_machines = int(accelerator.reduce(torch.tensor(int(blind), device=accelerator.device), reduction="sum").item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if blind_machines:
        raise UserError(f"the run folder {run_dir} is not shared: {blind_machines} machine(s) cannot see what the main "
                        "process writes there, so their checkpoints could never be completed or resumed. Put "
                        "--output-dir on a file system every machine mounts at the same path")


def save_model(model: torch.nn.Module, path: Path, *, classes: list[str], config: dict, dataset: str = "",
               mean: list[float] = MEAN, std: list[float] = STD) -> None:
    """Weights plus class names, image size, cell window, fit, normalisation, model shape and the dataset's
    name, atomically."""
    metadata = {
        "classes": json.dumps(list(classes)),
        "image_size": json.dumps(list(config["image_size"])),
        "cell_crop": json.dumps(float(config.get("cell_crop", 0))),
        "fit": json.dumps(config.get("fit", "crop")),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "model": json.dumps({k: config[k] for k in ("widths", "hidden", "dropout")}),
        "config": json.dumps(config),
        "dataset": json.dumps(dataset),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_model(path: Path) -> tuple[BloodCellCNN, dict]:
    """A model saved by save_model, a run folder (its best.safetensors) or a Hugging Face Hub model folder
    (`bloodcells_dist.hub`), and its metadata, in eval mode."""
    path = Path(path)
    if path.is_dir() and not (path / BEST_NAME).is_file() and (path / "config.json").is_file():
        from .hub import from_pretrained  # hub.py builds on this module

        return from_pretrained(path)
    if path.is_dir():
        path = path / BEST_NAME
    if not path.is_file():
        raise UserError(f"no model at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        meta.setdefault("cell_crop", 0)  # models saved before cell windows existed saw the whole frame
        meta.setdefault("fit", "stretch")  # ...and before `fit` existed, images were stretched to the size
        meta.setdefault("dataset", "")
        preprocess_from(meta)  # a value no preprocessing can use is refused here, not at the first image
        model = BloodCellCNN(num_classes=len(meta["classes"]), image_size=meta["image_size"], **meta["model"])
        model.load_state_dict(load_file(str(path)))
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as err:
        raise UserError(f"{path} is not a bloodcells_dist model ({type(err).__name__}: {err})") from None
    return model.eval(), meta
