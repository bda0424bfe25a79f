"""Train the blood-cell CNN from WebDataset shards with Accelerate: CPU, one GPU, many GPUs or machines.

    accelerate launch [--config_file launch/X.yaml] -m bloodcells_dist.train --shards DIR --output-dir RUN \
        [--config RECIPE.yaml] [--key value ...] [--resume RUN_OR_CHECKPOINT] [--overwrite]

Writes RUN/config.yaml, RUN/metrics.jsonl, RUN/checkpoints/, RUN/best.safetensors and RUN/final.json.
A new run never mixes with an earlier one: a folder that already holds a run is an error unless --resume
continues it or --overwrite deletes its run files first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, broadcast_object_list, set_seed

from .checkpoint import (BEST_NAME, LAST_NAME, STATE_NAME, check_shared_run_dir, checkpoint_dir, find_checkpoint,
                         load_checkpoint, rng_isolated, save_checkpoint, save_model)
from .cli import UserError, run_main, writable_folder
from .config import TrainConfig, build_config, check_resume_config, parse_overrides, read_yaml, to_dict
from .data import open_training_data
from .data.plan import split_size, stable_seed
from .manifest import ShardManifest
from .metrics import format_metrics
from .model import BloodCellCNN
from .precision import detect_hardware, launch_precision, resolve_precision, warn_if_emulated
from .preemption import COLLECTIVE_TIMEOUT, StopSignal, lost_peer
from .progress import eta_line, progress, start_summary
from .rundir import RunLock
from .scoring import score
from .tracking import MetricsLog, Tracker


def lr_at(step: int, total: int, warmup: int, config: TrainConfig) -> float:
    """Learning rate at an optimizer step: linear warm-up, then cosine to zero (or constant / one-cycle)."""
    if config.schedule == "onecycle":  # 30% linear ramp from lr/25, then cosine down to ~0
        ramp = max(1, int(0.3 * total))
        if step < ramp:
            return config.lr * (0.04 + 0.96 * step / ramp)
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, total - ramp)))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def sync_batchnorm_stats(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (DDP ranks drift after the last step)."""
    for buffer in model.buffers():
        buffer.copy_(broadcast(buffer.clone(), from_process=0))


NO_STEP = 2**62  # "no step": larger than any step number


def stop_if_nonfinite(accelerator: Accelerator, first_bad: torch.Tensor, state: dict, run_dir: Path) -> None:
    """Stop every rank with one error naming the first step whose loss was inf/nan. Collective (a gather)."""
    step = int(accelerator.gather(first_bad.reshape(1)).min().item())
    if step != NO_STEP:
        done = sorted(p for p in checkpoint_dir(run_dir).glob("step-*") if (p / STATE_NAME).is_file())
        kept = f"the last good checkpoint is {done[-1]}" if done else "no checkpoint was written before it"
        raise UserError(f"non-finite loss (inf or nan) at step {step} (epoch {state['epoch'] + 1}): training stopped, "
                        f"{kept}; lower --lr or check the data")


def check_output_dir(run_dir: Path) -> None:
    """Create the run folder, or a UserError if it is a file or cannot be written (on every rank, early)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file, not a folder")
    writable_folder(run_dir, "--output-dir")


def mixup_loss(model, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, key: tuple) -> torch.Tensor:
    """Cross-entropy of the micro-batch, or with config.mixup > 0 of its mixup (Zhang et al. 2018): images
    blended with a shuffled copy of the batch by lam ~ Beta(mixup, mixup), the loss blended by the same lam.
    lam and the pairing are a pure function of key (seed, step, micro-batch, rank): a resumed run mixes alike."""
    if not config.mixup:
        return F.cross_entropy(model(images).float(), labels, label_smoothing=config.label_smoothing)
    draw = random.Random(stable_seed(config.seed, "mixup", *key))
    lam = draw.betavariate(config.mixup, config.mixup)
    pair = torch.randperm(len(labels), generator=torch.Generator().manual_seed(draw.getrandbits(63))).to(labels.device)
    logits = model(images.lerp(images[pair], 1 - lam)).float()
    return (lam * F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            + (1 - lam) * F.cross_entropy(logits, labels[pair], label_smoothing=config.label_smoothing))


def train_one_epoch(model, optimizer, batches: Iterable, accelerator: Accelerator, *, config: TrainConfig,
                    state: dict, schedule: tuple[int, int], run_dir: Path, log: MetricsLog, tracker: Tracker,
                    stop: StopSignal) -> None:
    """Run the epoch's micro-batches (model-ready, on the device); state['step'] counts optimizer steps.

    Returns early, after a checkpoint, when a stop signal reached any rank. state['train_seconds'] is
    brought up to date before every checkpoint, so a resumed run counts the interrupted part too.
    """
    total_steps, warmup = schedule
    model.train()
    window_loss, window_batches, window_start = torch.zeros((), device=accelerator.device), 0, time.perf_counter()
    # The first optimizer step whose loss was inf/nan (NO_STEP if none), kept on the device: no sync per step.
    first_bad = torch.full((), NO_STEP, device=accelerator.device)
    clock = time.perf_counter()

    def checkpoint() -> None:
        nonlocal clock
        stop_if_nonfinite(accelerator, first_bad, state, run_dir)  # never checkpoint a diverged model
        state["train_seconds"] += time.perf_counter() - clock
        save_checkpoint(accelerator, run_dir, state, config.keep_checkpoints)
        clock = time.perf_counter()

    batches = rng_isolated(batches)  # the data side never moves the RNG dropout draws from
    bar = progress(batches, desc=f"epoch {state['epoch'] + 1}/{config.epochs}", unit="batch",
               disable=not accelerator.is_main_process, leave=False)
    micro = 0  # micro-batch within the optimizer step
    for images, labels in bar:
        with accelerator.accumulate(model):
            loss = mixup_loss(model, images, labels, config, (state["step"], micro, accelerator.process_index))
            micro = 0 if accelerator.sync_gradients else micro + 1
            first_bad = torch.minimum(first_bad, torch.where(loss.isfinite(), NO_STEP, state["step"] + 1))
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the last micro-batch of an optimizer step
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["step"], total_steps, warmup, config)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach()
        window_batches += 1
        if not accelerator.sync_gradients:
            continue
        state["step"] += 1
        stop.at_step(state["step"])  # the interruption tests' hook (no-op unless BLOODCELLS_AT_STEP is set)
        if state["step"] % config.log_every == 0:
            stop_if_nonfinite(accelerator, first_bad, state, run_dir)  # before logging or saving anything
            # A collective every log_every steps, on every rank alike: the mean loss over all ranks.
            mean_loss = accelerator.reduce(window_loss / window_batches, reduction="mean").item()
            seconds = time.perf_counter() - window_start
            rate = window_batches * config.batch_size * accelerator.num_processes / seconds
            record = {"step": state["step"], "epoch": state["epoch"] + 1, "train/loss": mean_loss,
                      "train/lr": optimizer.param_groups[0]["lr"], "train/images_per_s": rate}
            log.write(record)
            tracker.log({k: v for k, v in record.items() if k != "step"}, step=state["step"])
            bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{rate:.0f}", refresh=False)  # shown at the next redraw
            window_loss.zero_()
            window_batches, window_start = 0, time.perf_counter()
        if stop.requested(accelerator):  # every rank agrees at this step boundary
            checkpoint()
            break
        if config.checkpoint_every and state["step"] % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    stop_if_nonfinite(accelerator, first_bad, state, run_dir)  # before validation and the epoch's checkpoint
    state["train_seconds"] += time.perf_counter() - clock


def make_accelerator(config: TrainConfig, precision: str) -> Accelerator:
    """The one Accelerator: device, precision, process group and gradient accumulation live here."""
    env = os.environ
    if env.get("MASTER_ADDR") and not any(env.get(v) for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        raise UserError("this is a single process of a multi-process launch: `accelerate launch --cpu "
                        "--num_processes N` starts only one process without mpirun. For N CPU processes use "
                        "`accelerate launch --config_file launch/cpu_2proc.yaml` (torchrun + gloo)")
    # With no GPU, torchrun-launched processes must be told they are CPU processes to form a gloo group.
    no_gpu = not torch.cuda.is_available()
    try:
        return Accelerator(cpu=no_gpu, mixed_precision=precision,
                           gradient_accumulation_steps=config.grad_accum,
                           log_with=None if config.tracker == "none" else config.tracker,
                           dynamo_backend="inductor" if config.compile else "no",
                           kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"cannot set up Accelerate: {err}") from None


def plain_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare BloodCellCNN under DDP and torch.compile wrappers: its weights load anywhere."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def claim_run_dir(accelerator: Accelerator, run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier run, or (overwrite) delete that run's files on the main process."""
    written = [run_dir / "metrics.jsonl", run_dir / "final.json", checkpoint_dir(run_dir), run_dir / BEST_NAME,
               run_dir / LAST_NAME]  # what a run writes
    old = [path for path in written if path.exists()]
    if old and not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(p.name for p in old)}): "
                        f"--resume {run_dir} continues it, --overwrite replaces it")
    if old and accelerator.is_main_process:
        for path in old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    accelerator.wait_for_everyone()


def lock_run_dir(accelerator: Accelerator, run_dir: Path) -> RunLock:
    """The main process takes the run folder's lock; every rank raises the same UserError if another run holds
    it. Collective when there are several processes."""
    lock, refusal = RunLock(run_dir), [None]
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except UserError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise UserError(refusal[0])
    return lock


def train(config: TrainConfig, resume: Path | None = None, overwrite: bool = False, allow_pipe: bool = False) -> dict:
    """Train as configured (continuing from a checkpoint if given); return the contents of final.json.
    allow_pipe: accept `pipe:` shard locations (shell commands); never from a config file."""
    # User errors first, on every rank, before Accelerate starts a process group.
    run_dir = Path(config.output_dir)
    check_output_dir(run_dir)
    manifest = ShardManifest.load(config.shards, allow_pipe)
    fold = config.val_fold
    if fold >= manifest.folds:
        raise UserError(f"--val-fold {fold}: the shards have folds 0..{manifest.folds - 1}")
    if fold >= 0 and split_size(manifest, config.train_splits, fold, keep=True) == 0:
        raise UserError(f"--val-fold {fold}: fold {fold} of {', '.join(config.train_splits)} holds no samples")
    hardware = detect_hardware()
    precision, why = resolve_precision(config.mixed_precision, hardware, launch_precision())
    accelerator = make_accelerator(config, precision)
    lock = lock_run_dir(accelerator, run_dir)  # before anything is written into the folder
    if accelerator.is_main_process:
        warn_if_emulated(precision, hardware)
        if config.validate_on_train and config.val_split in config.train_splits and config.val_fold < 0:
            warnings.warn(f"validate_on_train: validation on {config.val_split!r} scores samples the model trains "
                          "on; its figures (and the best weights it picks) are optimistic", stacklevel=2)
    classes = manifest.classes
    world = accelerator.num_processes

    # Data: which samples train and which validate, from the decoded cache or the stream (data/).
    data = open_training_data(config, manifest, accelerator, allow_pipe)
    n_train, steps_per_epoch = data.plan.samples, data.plan.steps_per_epoch
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_epochs * steps_per_epoch)

    # Model and optimizer: identical initial weights on every rank from the seed.
    set_seed(config.seed)
    model = BloodCellCNN(num_classes=len(classes), image_size=config.image_size, widths=config.widths,
                         hidden=config.hidden, dropout=config.dropout)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Now each rank its own random stream (dropout masks): DDP has already broadcast rank 0's weights, and
    # resume restores every rank's RNG state from the checkpoint.
    set_seed(config.seed, device_specific=True)

    # state["epoch"]: the epoch in progress, counted from 0; it moves on once the epoch's end work is done.
    layout = {"processes": world, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
              "steps_per_epoch": steps_per_epoch}
    state = {"step": 0, "epoch": 0, "best_macro_f1": -1.0, "best": None, "final": None, "train_seconds": 0.0}
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(accelerator, checkpoint, layout)
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    else:
        claim_run_dir(accelerator, run_dir, overwrite)
    state["layout"] = layout
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())
    check_shared_run_dir(accelerator, run_dir)
    log = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, state["step"] if resume else None)
    tracker = Tracker(accelerator, kind=config.tracker, project=config.wandb_project, config=to_dict(config),
                      run_dir=run_dir, group=config.wandb_group)
    accelerator.print(start_summary(accelerator, precision=precision, why=why, batch_size=config.batch_size,
                                    grad_accum=config.grad_accum, steps_per_epoch=steps_per_epoch,
                                    epochs=config.epochs,
                                    data=f"{config.shards}: {n_train} training samples ({data.plan.remainder} left "
                                         f"out of each epoch) from the {data.kind}"))
    stop = StopSignal()  # before any data worker starts, so that workers inherit it

    first_epoch = state["epoch"]
    for epoch in range(first_epoch, config.epochs):
        state["epoch"] = epoch
        start = (state["step"] - epoch * steps_per_epoch) * config.grad_accum  # micro-batches already done
        epoch_start = time.perf_counter()
        if start < steps_per_epoch * config.grad_accum:  # stopped on the epoch's last step: only its end is left
            train_one_epoch(model, optimizer, data.train_batches(epoch, start), accelerator, config=config,
                            state=state, schedule=(total_steps, warmup), run_dir=run_dir, log=log, tracker=tracker,
                            stop=stop)
        if stop.stopping:  # checkpointed at the step where the signal was seen
            break
        last = epoch + 1 == config.epochs
        if data.validates and ((epoch + 1) % config.eval_every == 0 or last):
            sync_batchnorm_stats(model)
            metrics = score(accelerator.unwrap_model(model), data.eval_batches(), accelerator, classes)
            state["final"] = metrics
            log.write({"step": state["step"], "epoch": epoch + 1, "epoch_seconds": time.perf_counter() - epoch_start,
                       **{f"val/{k}": metrics[k] for k in ("accuracy", "macro_f1", "samples")}, "val": metrics})
            tracker.log_validation(metrics, classes, step=state["step"], epoch=epoch + 1)
            accelerator.print(f"epoch {epoch + 1}: " + format_metrics(metrics, classes))
            if metrics["macro_f1"] > state["best_macro_f1"]:
                state.update(best_macro_f1=metrics["macro_f1"], best={**metrics, "epoch": epoch + 1})
                if accelerator.is_main_process:
                    save_model(plain_model(accelerator, model), run_dir / BEST_NAME, classes=classes,
                               config=to_dict(config), dataset=manifest.dataset)
        elif last and not data.validates:  # final mode: no validation, keep the last weights
            sync_batchnorm_stats(model)  # collective: every rank
            if accelerator.is_main_process:
                save_model(plain_model(accelerator, model), run_dir / BEST_NAME, classes=classes,
                           config=to_dict(config), dataset=manifest.dataset)
        state["epoch"] = epoch + 1  # the epoch end is done: a resume starts the next epoch
        save_checkpoint(accelerator, run_dir, state, config.keep_checkpoints)
        if epoch == first_epoch and not last:
            accelerator.print(eta_line(time.perf_counter() - epoch_start, config.epochs - epoch - 1))

    if stop.stopping:
        tracker.finish()
        lock.release()
        accelerator.print(f"stopped by a signal ({stop.received or 'on another process'}) at step {state['step']}: "
                          f"checkpoint written; `--resume {run_dir}` continues the run")
        return {"stopped": True, "steps": state["step"]}
    if accelerator.is_main_process:  # the last epoch's weights, whatever validation said (cv --tta scores them)
        save_model(plain_model(accelerator, model), run_dir / LAST_NAME, classes=classes, config=to_dict(config),
                   dataset=manifest.dataset)
    tracker.finish()
    final = {"final": state["final"], "best": state["best"], "steps": state["step"], "epochs": config.epochs,
             "processes": world, "train_seconds": state["train_seconds"], "train_samples": n_train,
             "validated_on_training_data": bool(config.validate_on_train and config.val_fold < 0
                                                and config.val_split in config.train_splits)}
    if accelerator.is_main_process:
        (run_dir / "final.json").write_text(json.dumps(final, indent=1) + "\n")
    lock.release()
    if state["best"]:
        accelerator.print(f"best val macro F1 {state['best']['macro_f1']:.4f} (accuracy {state['best']['accuracy']:.4f}) "
                          f"at epoch {state['best']['epoch']}; run folder {run_dir}")
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fixed flags plus `--key value` overrides of any TrainConfig field."""
    parser = argparse.ArgumentParser(prog="bloodcells_dist.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="recipe YAML (keys of TrainConfig)")
    parser.add_argument("--resume", type=Path, help="run folder or checkpoint folder to continue from")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run in --output-dir (checkpoints, metrics, weights) and start anew")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="accept a pipe: shard location (webdataset runs it as a shell command); only if you trust it")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(rest)
    base = None
    if args.resume is not None:
        checkpoint = find_checkpoint(args.resume)
        resumed_dir = checkpoint.parent.parent
        base = read_yaml(resumed_dir / "config.yaml")
        # Resume writes only into the run it continues: never into (or over) another run's folder.
        if "output_dir" in overrides and Path(overrides["output_dir"]).resolve() != resumed_dir.resolve():
            raise UserError(f"--resume continues the run in {resumed_dir} and writes only there: drop --output-dir "
                            f"{overrides['output_dir']} (to start another run, train without --resume)")
        overrides["output_dir"] = str(resumed_dir)
    config = build_config(args.config, overrides, base=base)
    if args.resume is not None and args.overwrite:
        raise UserError("--resume continues a run and --overwrite deletes it: pass one of them")
    if base is not None:
        check_resume_config(build_config(base=base), config)
    try:
        train(config, resume=args.resume, overwrite=args.overwrite, allow_pipe=args.allow_pipe)
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        print(f"error: lost contact with another process of this run ({str(err).strip().splitlines()[0][:300]}): it "
              f"was killed or crashed, see its log; `--resume {config.output_dir}` continues from the last checkpoint",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
