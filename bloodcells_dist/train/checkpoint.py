"""Checkpoints for exact resume: model, optimizer, scaler and every rank's RNG state, plus the TrainState.

A checkpoint is written into a `.tmp-step-N` folder and renamed to `step-N` once complete (trainer_state.json,
written last, marks it), so a kill at any moment leaves either the previous checkpoints or a complete new one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from ..cli import UserError
from ..config import TrainConfig, build_config, check_resume_config, read_yaml
from ..data.plan import stable_seed
from ..files import remove_own_path, write_json
from .rundir import STATE_NAME, RunDir, read_run_json
from .state import TrainState


def save_checkpoint(accelerator: Accelerator, run: RunDir, state: TrainState, keep: int) -> Path:
    """Save everything a resume needs; visible only once complete; keep the newest `keep`. Collective."""
    final = run.checkpoint(state.step)
    tmp = run.partial_checkpoint(state.step)
    if accelerator.is_main_process:
        # What an earlier attempt (or anyone) left under these names goes; a link goes itself, never what it
        # points to (RunDir.create refused a `checkpoints` that is a link, so these names are the run's own).
        remove_own_path(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # main writes the weights, every rank its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_NAME, state.to_json())
        remove_own_path(final)
        os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, which resume ignores
        for old in run.complete_checkpoints()[:-keep]:
            remove_own_path(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(path: Path) -> Path:
    """A complete checkpoint folder, or the newest complete one of a run folder."""
    path = Path(path)
    if (path / STATE_NAME).is_file():
        return path
    latest = RunDir(path).latest_checkpoint()
    if latest is None:
        raise UserError(f"no complete checkpoint in {path} (looked for {RunDir(path).checkpoints}/step-*/{STATE_NAME})")
    return latest


def check_resume(config: TrainConfig, resume: Path, overwrite: bool) -> TrainState:
    """Before any work, what a resume may not do: delete the run it continues (overwrite), write into another
    folder than that run's, change a key that shapes the model, data or schedule (config.RESUMABLE says which may
    change), or rewrite a finished run's record. Returns the state of the checkpoint it continues from."""
    checkpoint = find_checkpoint(resume)
    run = RunDir.of_checkpoint(checkpoint)
    if Path(config.output_dir).resolve() != run.path.resolve():  # never into (or over) another run's folder
        raise UserError(f"--resume continues the run in {run} and writes only there: drop --output-dir "
                        f"{config.output_dir} (to start another run, train without --resume)")
    if overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it: pass one of them")
    check_resume_config(build_config(base=read_yaml(run.config)), config)
    if run.finished():
        raise UserError(f"{run} holds a finished run (final.json): a resume would rewrite its record; evaluate "
                        "it as it is, or train a new run into another --output-dir")
    return read_state(checkpoint)


def check_classes(resume: Path, classes: list[str]) -> None:
    """A UserError when a resume would continue a run on shards whose classes (names and label order) differ from
    those it was trained on."""
    checkpoint = find_checkpoint(resume)
    state = read_state(checkpoint)
    if state.classes and state.classes != list(classes):
        raise UserError(f"cannot resume {checkpoint} on shards of classes {list(classes)}: the run was trained on "
                        f"{state.classes}, and label indices would change meaning; resume with the run's shards")


def read_state(checkpoint: Path) -> TrainState:
    """A complete checkpoint's trainer state."""
    return TrainState.from_json(read_run_json(checkpoint / STATE_NAME))


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, layout: dict, seed: int) -> TrainState:
    """Restore everything save_checkpoint saved; return the trainer state.

    `layout` (processes, batch_size, grad_accum, steps_per_epoch, global_batch) may differ from the run's in its
    processes and grad_accum only (the plan keeps the global batch): the data order, the steps per epoch and the
    learning-rate schedule depend on the rest, so a change there is refused, naming what changed. Every rank's
    random state is restored when the processes are as many as saved; otherwise a saved state has no rank to go
    to, and every rank is reseeded from (seed, step, rank) instead (dropout masks then depend on the step).
    """
    state = read_state(checkpoint)
    saved = {"global_batch": state.layout.get("batch_size", 0) * state.layout.get("processes", 0)
             * state.layout.get("grad_accum", 0), **state.layout}
    changed = [f"{k} {saved[k]} -> {v}" for k, v in layout.items()
               if k in saved and saved[k] != v and k not in ("processes", "grad_accum")]
    if changed:
        raise UserError(f"cannot resume {checkpoint} with another layout ({', '.join(changed)}): the data order, "
                        f"steps per epoch and learning-rate schedule depend on it; resume with batch_size "
                        f"{saved['batch_size']} and the run's shards, as the run started")
    accelerator.load_state(str(checkpoint))
    if saved.get("processes", accelerator.num_processes) != accelerator.num_processes:
        set_seed(stable_seed(seed, "resumed", state.step, accelerator.process_index) % 2**32)
    return state


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


def check_shared_run_dir(accelerator: Accelerator, run: RunDir) -> None:
    """Stop, naming the problem, when the machines of a run do not share its folder. Collective.

    Checkpoints are written by every rank into one folder and completed by the main process: a machine that
    cannot see that folder would be left with incomplete checkpoints it cannot resume from.
    """
    if accelerator.num_processes == 1:
        return
    name: list[str] = [f".shared-check-{os.getpid()}-{time.time_ns()}" if accelerator.is_main_process else ""]
    broadcast_object_list(name)
    marker = run.path / name[0]
    if accelerator.is_main_process:
        marker.write_text("written by the main process; every machine must see it\n")
    accelerator.wait_for_everyone()
    blind = accelerator.is_local_main_process and not marker.exists()
    blind_machines = int(accelerator.reduce(torch.tensor(int(blind), device=accelerator.device), reduction="sum").item())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink()
    if blind_machines:
        raise UserError(f"the run folder {run.path} is not shared: {blind_machines} machine(s) cannot see what the "
                        "main process writes there, so their checkpoints could never be completed or resumed. Put "
                        "--output-dir on a file system every machine mounts at the same path")
