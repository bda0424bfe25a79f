"""Train the white-cell CNN from WebDataset shards with Accelerate: CPU, one GPU, many GPUs or machines.

    accelerate launch [--config_file launch/X.yaml] -m bloodcells_dist.train --shards DIR --output-dir RUN \\
        [--config RECIPE.yaml] [--key value ...] [--resume RUN_OR_CHECKPOINT] [--overwrite]

`train()` reads top to bottom: the resume checks, setup (shards, Accelerator, the run folder and its lock, data,
model, optimizer, state), then `train_loop` (every epoch's steps, micro-batch by micro-batch, and the epoch's end
in `end_epoch`: validate, keep the best weights, checkpoint), and `finish` (the last weights, final.json).
What stays put is the frozen `Run`; what changes, and every checkpoint saves, is `TrainState`.
Weights: `best.safetensors` (the best validation epoch, in a run that validates) and `last.safetensors` (the end
of training, in every run). A run that trains on train + val has no validation and so only `last`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, broadcast_object_list, set_seed

from ..cli import Parser, UserError, run_main
from ..config import TrainConfig, add_config_arguments, build_config, config_overrides, read_yaml
from ..data import open_training_data
from ..data.batches import CachedBatches, StreamedBatches
from ..data.joint import dataset_names, open_joint_data, united_classes
from ..data.plan import Segment, stable_seed
from ..data.selection import training_selections
from ..output import say, warn
from ..pack.manifest import ShardManifest
from ..progress import device_name, eta_line, progress, start_summary
from .checkpoint import (
    check_classes,
    check_resume,
    check_shared_run_dir,
    find_checkpoint,
    load_checkpoint,
    rng_isolated,
    save_checkpoint,
)
from .metrics import format_metrics
from .precision import detect_hardware, launch_precision, resolve_precision, warn_if_emulated
from .preemption import StopSignal, lost_peer, silent_ranks
from .provenance import comment_block, provenance
from .rundir import RunDir
from .schedule import lr_at
from .scoring import score
from .spec import ModelSpec, save_weights
from .state import TrainState
from .tracking import MetricsLog, Tracker
from .transfer import feature_parameters, optimizer_groups, read_source, refit_batchnorm, start_from

NO_STEP = 2**62  # "no step": larger than any step number
LAYOUT_KEYS = ("processes", "grad_accum", "workers")  # what starts a new segment of an epoch when it changes
AUTO = "auto"  # --resume auto: the run folder's newest checkpoint, else a fresh start


@dataclass(frozen=True)
class Run:
    """What stays put while a run goes, shared by the loop and its helpers: these objects, never replaced (the
    model's weights and the optimizer's buffers change inside them). What changes, and is saved, is TrainState."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # prepared: under DDP and torch.compile where those apply
    optimizer: torch.optim.Optimizer
    data: CachedBatches | StreamedBatches
    folder: RunDir
    spec: ModelSpec  # what the saved weights are (classes, preprocessing, shape, recipe, provenance)
    log: MetricsLog
    tracker: Tracker
    stop: StopSignal
    total_steps: int
    warmup_steps: int

    def save(self, path: Path) -> None:
        """The plain network's weights (no DDP or compile wrapper) with the spec, from the main process."""
        if self.accelerator.is_main_process:
            save_weights(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), self.spec, path)


def train(config: TrainConfig, *, resume: Path | None = None, overwrite: bool = False, allow_pipe: bool = False) -> dict:
    """Train as configured (continuing from a checkpoint if given); return final.json's contents.
    allow_pipe: accept `pipe:` shard locations (shell commands); never from a config file."""
    # Setup. User errors first, on every rank, before Accelerate starts a process group.
    resumed = check_resume(config, resume, overwrite) if resume is not None else None  # the checkpoint's state
    if config.validate_on_train and config.val_fold < 0 and config.val_split in config.train_splits:
        warn(f"validate_on_train: validation on {config.val_split!r} scores samples the model trains on; its "
             "figures (and the best weights it picks) are optimistic; final.json says so")
    folder = RunDir(config.output_dir)
    folder.create()
    folders = config.shard_folders()
    manifests = [ShardManifest.load(folder, allow_pipe) for folder in folders]
    manifest = manifests[0]  # the run's own data: it validates
    check_fold(config, manifest)
    classes = united_classes(manifests)  # with several shard folders, united by name
    if resume is not None:
        check_classes(resume, classes)
    else:
        folder.refuse_earlier_run(overwrite)  # before the decoded cache is built
    # The model to start from, read (and refused if it is none) before any expensive work; a resume has its weights.
    source = read_source(config.init_from) if config.init_from and resume is None else None
    hardware = detect_hardware()
    precision, why = resolve_precision(config.mixed_precision, hardware, launch_precision())
    accelerator = make_accelerator(config, precision)
    with hold_folder(accelerator, folder):  # one training per run folder, before anything is written there
        warn_if_emulated(precision, hardware)
        origin = provenance(device=device_name(accelerator), precision=f"{precision} ({why})",
                            processes=accelerator.num_processes)
        data = (open_joint_data(config, folders, manifests, classes, accelerator) if len(manifests) > 1 or
                config.shard_weights else open_training_data(config, manifest, accelerator))
        # A resume on another number of processes keeps the run's global batch and steps (plan.py says how).
        data.plan = data.plan.resumed_on(resumed.layout if resumed is not None else {})
        accelerator.gradient_accumulation_steps = data.plan.grad_accum
        steps_per_epoch = data.plan.steps_per_epoch
        spec = ModelSpec.from_config(config.to_dict(), classes, provenance=origin,
                                     dataset="+".join(dataset_names(folders, manifests)) if len(manifests) > 1
                                     else manifest.dataset)
        model, optimizer, started_from = build_model(config, spec, accelerator, source)
        layout = {"processes": accelerator.num_processes, "batch_size": config.batch_size,
                  "grad_accum": data.plan.grad_accum, "steps_per_epoch": steps_per_epoch,
                  "global_batch": data.plan.global_batch}
        state = start_state(accelerator, folder, resume, overwrite, layout, config.seed)
        if resume is None:
            state.init_from = started_from
            if config.init_from and config.bn_refit:
                refit_statistics(model, data, accelerator, config.bn_refit)
        spec = dataclasses.replace(spec, init_from=state.init_from)  # a resumed run keeps its start's record
        state.classes = list(classes)  # what a resume compares its shards' classes with
        if accelerator.is_main_process:
            folder.write_config(config.to_yaml(), comment_block(origin))
        check_shared_run_dir(accelerator, folder)
        # A stop signal (SIGTERM, SIGUSR1) only sets a flag, read at every step; installed before any data worker
        # starts, so that workers inherit it, and taken down again at the end (an in-process caller keeps its own).
        with closing(StopSignal()) as stop:
            run = Run(config=config, accelerator=accelerator, model=model, optimizer=optimizer, data=data,
                      folder=folder, spec=spec, stop=stop,
                      log=MetricsLog(folder.metrics, accelerator.is_main_process, state.step if resume else None),
                      tracker=Tracker(accelerator, kind=config.tracker, project=config.wandb_project,
                                      config=config.to_dict(), run_dir=folder.path, group=config.wandb_group),
                      total_steps=steps_per_epoch * config.epochs,
                      warmup_steps=int(config.warmup_epochs * steps_per_epoch))
            say(start_summary(accelerator, precision=precision, why=why, batch_size=config.batch_size,
                              grad_accum=config.grad_accum, steps_per_epoch=steps_per_epoch, epochs=config.epochs,
                              data=f"{config.shards}: {data.plan.samples} training samples "
                                   f"({data.plan.remainder} left out of each epoch) from the {data.kind}"))
            train_loop(run, state)
            return finish(run, state, data.plan.samples)


def train_loop(run: Run, state: TrainState) -> None:
    """Every epoch's optimizer steps from where `state` stands, then the epoch's end (validation, the best weights,
    a checkpoint). A stop signal on any rank ends it at a step boundary, checkpointed. Collective."""
    config, accelerator, model, plan = run.config, run.accelerator, run.model, run.data.plan
    first_epoch, rank = state.epoch, accelerator.process_index
    for epoch in range(first_epoch, config.epochs):
        state.epoch, started = epoch, time.perf_counter()
        done = state.step - epoch * plan.steps_per_epoch  # the epoch's optimizer steps taken before
        if done < plan.steps_per_epoch:  # else stopped after the epoch's last step: only its end is left
            model.train()
            if epoch < config.freeze_epochs:  # the conv blocks stay as they are: BatchNorm uses its running statistics
                accelerator.unwrap_model(model).features.eval()
            first_bad = torch.full((), NO_STEP, device=accelerator.device)  # first inf/nan step, kept on the device
            window, micro, clock = LossWindow(accelerator.device), 0, time.perf_counter()  # micro: within the step
            bar = progress(epoch_batches(run, state, done), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                           disable=not accelerator.is_main_process, leave=False)
            for images, labels in bar:
                with accelerator.accumulate(model):  # the optimizer steps on a step's last micro-batch only
                    loss = mixup_loss(model, images, labels, config, (state.step, micro, rank))
                    first_bad = torch.minimum(first_bad, torch.where(loss.isfinite(), NO_STEP, state.step + 1))
                    # Weighted by the micro-batch's share of the global batch (1 when the step splits evenly): a
                    # short or uneven step then counts each sample as much as a full, even one does.
                    accelerator.backward(loss * (len(labels) * plan.slices / plan.global_batch))
                    stepped = accelerator.sync_gradients  # the last micro-batch of an optimizer step
                    if stepped:
                        rate = lr_at(state.step, schedule=config.schedule, peak=config.lr, total=run.total_steps,
                                     warmup=run.warmup_steps)
                        for group in run.optimizer.param_groups:
                            group["lr"] = rate * group.get("lr_scale", 1.0)
                        if epoch < config.freeze_epochs:  # no update, momentum or weight decay for the conv blocks
                            for parameter in feature_parameters(accelerator.unwrap_model(model)):
                                parameter.grad = None
                    run.optimizer.step()
                    run.optimizer.zero_grad(set_to_none=True)
                window.add(loss.detach())
                micro = 0 if stepped else micro + 1
                if not stepped:
                    continue
                state.step += 1
                # every log_every steps, and the epoch's last step: a run shorter than log_every still has a curve
                if state.step % config.log_every == 0 or state.step == (epoch + 1) * plan.steps_per_epoch:
                    log_training(run, state, window, first_bad, bar)
                if run.stop.requested(accelerator) or (config.checkpoint_every and state.step % config.checkpoint_every == 0):
                    state.train_seconds += time.perf_counter() - clock  # up to date in every checkpoint
                    checkpoint(run, state, first_bad)
                    clock = time.perf_counter()
                    if run.stop.stopping:  # every rank agreed at this step boundary
                        break
                run.stop.at_step(state.step, rank)  # the tests' hook: a no-op unless they set it
            bar.close()
            stop_if_nonfinite(run, state, first_bad)  # before validation and the epoch's checkpoint
            state.train_seconds += time.perf_counter() - clock
            if run.stop.stopping:
                return
        end_epoch(run, state, started)
        if epoch == first_epoch and epoch + 1 < config.epochs:
            say(eta_line(time.perf_counter() - started, config.epochs - epoch - 1))


def check_fold(config: TrainConfig, manifest: ShardManifest) -> None:
    """A cross-validation fold the shards have, and not an empty one."""
    fold = config.val_fold
    if fold >= manifest.folds:
        raise UserError(f"--val-fold {fold}: the shards have folds 0..{manifest.folds - 1}")
    _, val = training_selections(config.train_splits, config.val_split, fold)
    if fold >= 0 and val is not None and val.count(manifest) == 0:
        raise UserError(f"--val-fold {fold}: fold {fold} of {', '.join(config.train_splits)} holds no samples")


def make_accelerator(config: TrainConfig, precision: str) -> Accelerator:
    """The one Accelerator: device, precision, process group and gradient accumulation live here."""
    env = os.environ
    if env.get("MASTER_ADDR") and not any(env.get(v) for v in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        raise UserError("this is a single process of a multi-process launch: without a GPU (or with --cpu), "
                        "`accelerate launch --num_processes N` starts one process unless mpirun is set up. For N CPU "
                        "processes add --multi_gpu (torchrun; they join a gloo group on the CPU), or use "
                        "`accelerate launch --config_file launch/cpu_2proc.yaml`")
    # A group torchrun restarted (--max_restarts) in the launcher's own store finds the previous group's process
    # group keys there, and a rank may connect to a dead peer's address (pytorch/pytorch#135712).
    if (env.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and env.get("LOCAL_RANK", "0") == "0"):
        warn("this group was restarted in the launcher's store, which still holds the previous group's addresses: if "
             "it fails to connect, launch with --rdzv_backend c10d and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
             "(docs/training.md)", every_rank=True)  # each machine's first process: its own launcher's store
    # With no GPU, torchrun-launched processes must be told they are CPU processes to form a gloo group.
    try:
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision,
                           gradient_accumulation_steps=config.grad_accum,
                           log_with=None if config.tracker == "none" else config.tracker,
                           dynamo_backend="inductor" if config.compile else "no",
                           kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.collective_timeout))])
    except ValueError as err:  # e.g. fp16 without a GPU
        raise UserError(f"cannot set up Accelerate: {err}") from None


@contextmanager
def hold_folder(accelerator: Accelerator, folder: RunDir):
    """The main process holds the run folder's lock for the block; every rank raises the same UserError if
    another training holds it. Collective when there are several processes."""
    lock, refusal = folder.lock(), [""]
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except UserError as err:
            refusal = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0]:
        raise UserError(refusal[0])
    try:
        yield
    finally:
        lock.release()


def build_model(config: TrainConfig, spec: ModelSpec, accelerator: Accelerator,
                source: tuple[dict[str, torch.Tensor], ModelSpec] | None):
    """Model, optimizer and the init_from record, prepared: identical initial weights on every rank from the seed
    (or, given the source model read by transfer.read_source, from it), then each rank its own random stream
    (dropout masks; DDP has already broadcast rank 0's weights). A resumed run's weights come from its checkpoint."""
    set_seed(config.seed)
    model = spec.build()
    started_from: dict = {}
    if source is not None:
        started_from, line = start_from(model, spec, config.init_from, config.class_map, loaded=source)
        say(line)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(optimizer_groups(model, config.features_lr), lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(config.seed, device_specific=True)  # resume restores every rank's RNG state from the checkpoint
    return model, optimizer, started_from


def refit_statistics(model: torch.nn.Module, data: CachedBatches | StreamedBatches, accelerator: Accelerator,
                     batches: int) -> None:
    """BatchNorm statistics of the conv blocks re-estimated on `batches` of epoch 0's training batches, averaged
    over the ranks (so every rank starts alike). Collective."""
    features = accelerator.unwrap_model(model).features
    with accelerator.autocast():
        used = refit_batchnorm(features, rng_isolated(data.train_batches(0)), batches)
    for buffer in features.buffers():
        if buffer.is_floating_point():
            buffer.copy_(accelerator.reduce(buffer.clone(), reduction="mean"))
    say(f"bn_refit: BatchNorm statistics re-estimated on {used} training batch(es)")


def start_state(accelerator: Accelerator, folder: RunDir, resume: Path | None, overwrite: bool,
                layout: dict, seed: int) -> TrainState:
    """A new run's state (an earlier run in the folder refused, or with overwrite removed), or the resumed one."""
    if resume is not None:
        checkpoint = find_checkpoint(resume)
        state = load_checkpoint(accelerator, checkpoint, layout, seed)
        say(f"resumed from {checkpoint} at step {state.step}")
        if state.layout.get("processes", layout["processes"]) != layout["processes"]:
            say(f"resumed on {layout['processes']} process(es) where {state.layout['processes']} "
                              f"saved it: global batch {layout['global_batch']} kept, grad_accum "
                              f"{state.layout['grad_accum']} -> {layout['grad_accum']}, each micro-batch's loss "
                              f"weighted by its share; every rank's random stream reseeded from (seed, step, rank)")
    else:
        folder.refuse_earlier_run(overwrite)  # again, now under the lock
        if folder.run_files() and accelerator.is_main_process:
            folder.clear()
        accelerator.wait_for_everyone()
        state = TrainState()
    state.layout = layout
    return state


def epoch_batches(run: Run, state: TrainState, done: int) -> Iterator:
    """The epoch's micro-batches from its optimizer step `done` on, cut for this layout (processes, grad_accum,
    workers), which state.segments records: a new segment when a resume changed it mid-epoch. Drawing them never
    moves the global RNG (dropout's)."""
    accelerator, plan = run.accelerator, run.data.plan
    here = dataclasses.asdict(Segment(done if state.segments else 0, accelerator.num_processes, plan.grad_accum,
                                      max(run.config.workers, 1)))
    if not state.segments or any(state.segments[-1][k] != here[k] for k in LAYOUT_KEYS):
        state.segments.append(here)  # the epoch's first layout, or a new one from this step on
    segments = [Segment(**s) for s in state.segments]
    return rng_isolated(run.data.train_batches(state.epoch, done, segments))


def mixup_loss(model, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig, key: tuple) -> torch.Tensor:
    """Cross-entropy of the micro-batch, or with config.mixup > 0 of its mixup (Zhang et al. 2018): images
    blended with a shuffled copy of the batch by lam ~ Beta(mixup, mixup), the loss blended by the same lam.
    lam and the pairing are a pure function of key (step, micro-batch, rank) and the seed: a resumed run mixes alike."""
    if not config.mixup:
        return F.cross_entropy(model(images).float(), labels, label_smoothing=config.label_smoothing)
    draw = random.Random(stable_seed(config.seed, "mixup", *key))
    lam = draw.betavariate(config.mixup, config.mixup)
    pair = torch.randperm(len(labels), generator=torch.Generator().manual_seed(draw.getrandbits(63))).to(labels.device)
    logits = model(images.lerp(images[pair], 1 - lam)).float()
    return (lam * F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            + (1 - lam) * F.cross_entropy(logits, labels[pair], label_smoothing=config.label_smoothing))


class LossWindow:
    """The training loss summed on the device between log lines (no host sync per step), and the time."""

    def __init__(self, device: torch.device) -> None:
        self.total, self.batches, self.start = torch.zeros((), device=device), 0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss
        self.batches += 1

    def reset(self) -> None:
        self.total.zero_()
        self.batches, self.start = 0, time.perf_counter()


def log_training(run: Run, state: TrainState, window: LossWindow, first_bad: torch.Tensor, bar) -> None:
    """A metrics line (and a tracker point): the mean loss over all ranks since the last one. Collective."""
    stop_if_nonfinite(run, state, first_bad)  # before logging or saving anything
    accelerator, config = run.accelerator, run.config
    mean_loss = accelerator.reduce(window.total / window.batches, reduction="mean").item()
    rate = window.batches * config.batch_size * accelerator.num_processes / (time.perf_counter() - window.start)
    record = {"step": state.step, "epoch": state.epoch + 1, "train/loss": mean_loss,
              "train/lr": run.optimizer.param_groups[-1]["lr"], "train/images_per_s": rate}
    run.log.write(record)
    run.tracker.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
    bar.set_postfix(loss=f"{mean_loss:.3f}", img_s=f"{rate:.0f}", refresh=False)  # shown at the next redraw
    window.reset()


def stop_if_nonfinite(run: Run, state: TrainState, first_bad: torch.Tensor) -> None:
    """Stop every rank with one error naming the first step whose loss was inf/nan (first_bad on each rank, NO_STEP
    for none). Collective (a gather)."""
    step = int(run.accelerator.gather(first_bad.reshape(1)).min().item())
    if step != NO_STEP:
        latest = run.folder.latest_checkpoint()
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written before it"
        raise UserError(f"non-finite loss (inf or nan) at step {step} (epoch {state.epoch + 1}): training stopped, "
                        f"{kept}; lower --lr or check the data")


def checkpoint(run: Run, state: TrainState, first_bad: torch.Tensor) -> None:
    """A checkpoint of a model known to be finite. Collective."""
    stop_if_nonfinite(run, state, first_bad)
    save_checkpoint(run.accelerator, run.folder, state, run.config.keep_checkpoints)


def sync_batchnorm_stats(model: torch.nn.Module) -> None:
    """Give every rank rank 0's BatchNorm running statistics (DDP ranks drift after the last step). Collective."""
    for buffer in model.buffers():
        buffer.copy_(broadcast(buffer.clone(), from_process=0))


def end_epoch(run: Run, state: TrainState, started: float) -> None:
    """Validate (every eval_every epochs and at the last), keep the best weights, checkpoint. Collective.
    started: perf_counter() at the epoch's start; the validation record gives the epoch's seconds, validation included."""
    config, accelerator, epoch = run.config, run.accelerator, state.epoch
    if run.data.validates and ((epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs):
        sync_batchnorm_stats(run.model)
        metrics = score(accelerator.unwrap_model(run.model), run.data.eval_batches(), accelerator,
                        list(run.spec.classes))
        state.last_validation = metrics
        run.log.write({"step": state.step, "epoch": epoch + 1, "epoch_seconds": time.perf_counter() - started,
                       **{f"val/{k}": metrics[k] for k in ("accuracy", "macro_f1", "samples")}, "val": metrics})
        run.tracker.log_validation(metrics, list(run.spec.classes), step=state.step, epoch=epoch + 1)
        say(f"epoch {epoch + 1}: " + format_metrics(metrics, list(run.spec.classes)))
        for dataset in run.data.extra_val:  # further datasets, each on its own (they never pick the weights)
            extra = score(accelerator.unwrap_model(run.model), run.data.eval_batches(dataset), accelerator,
                          list(run.spec.classes))
            run.log.write({"step": state.step, "epoch": epoch + 1, "dataset": dataset,
                           **{f"val/{dataset}/{k}": extra[k] for k in ("accuracy", "macro_f1", "samples")}})
            run.tracker.log({f"val/{dataset}/{k}": extra[k] for k in ("accuracy", "macro_f1")}, step=state.step)
            say(f"epoch {epoch + 1}, {dataset}: accuracy {extra['accuracy']:.4f}  macro F1 "
                              f"{extra['macro_f1']:.4f}  ({extra['samples']} samples)")
        if metrics["macro_f1"] > state.best_macro_f1:
            state.best_macro_f1, state.best = metrics["macro_f1"], {**metrics, "epoch": epoch + 1}
            run.save(run.folder.best)
    state.epoch, state.segments = epoch + 1, []  # the epoch end is done: a resume starts the next epoch
    save_checkpoint(accelerator, run.folder, state, config.keep_checkpoints)


def finish(run: Run, state: TrainState, train_samples: int) -> dict:
    """The last weights and final.json (or, when stopped by a signal, only the word on how to resume)."""
    config, accelerator = run.config, run.accelerator
    if run.stop.stopping:
        run.tracker.finish()
        say(f"stopped by a signal ({run.stop.received or 'on another process'}) at step {state.step}: "
                          f"checkpoint written; `--resume {run.folder}` continues the run")
        return {"stopped": True, "steps": state.step}
    sync_batchnorm_stats(run.model)  # collective: every rank
    run.save(run.folder.last)  # the last epoch's weights, whatever validation said (cv --tta scores them)
    run.tracker.finish()
    on_training = config.validate_on_train and config.val_fold < 0 and config.val_split in config.train_splits
    summary = {"last_validation": state.last_validation, "best": state.best, "steps": state.step,
               "epochs": config.epochs, "processes": accelerator.num_processes, "train_seconds": state.train_seconds,
               "train_samples": train_samples, "validated_on_training_data": on_training,
               "weights": {"last": run.folder.last.name, "best": run.folder.best.name if state.best else None},
               "provenance": run.spec.provenance}
    if accelerator.is_main_process:
        run.folder.write_final(summary)
    if state.best:
        say(f"best val macro F1 {state.best['macro_f1']:.4f} (accuracy {state.best['accuracy']:.4f}) "
                          f"at epoch {state.best['epoch']}; run folder {run.folder}")
    return summary


def resume_auto(output_dir: str | None) -> tuple[Path | None, bool]:
    """`--resume auto`: (the run folder to resume, or None to start fresh; whether the run there has finished)."""
    if not output_dir:
        raise UserError("--resume auto resumes --output-dir: give --output-dir (and what a fresh start needs)")
    folder = RunDir(output_dir)
    if folder.finished():
        return None, True
    if folder.latest_checkpoint() is None:
        if folder.path.exists() and folder.run_files():  # an attempt killed before its first checkpoint
            say(f"--resume auto: no complete checkpoint in {folder}: starting fresh (removing "
                  f"{', '.join(p.name for p in folder.run_files())})")
        return None, False
    return folder.path, False


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: every TrainConfig key as a flag (see --help), plus --config, --resume and --overwrite."""
    parser = Parser(prog="bloodcells train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Values layer as defaults < --config recipe < flags; lists as 32,64,128,256.")
    parser.add_argument("--config", type=Path, help="recipe YAML (keys of TrainConfig)")
    parser.add_argument("--resume", type=Path,
                        help="run folder or checkpoint folder to continue from; `auto`: the newest complete checkpoint "
                             "of --output-dir, or a fresh start where there is none (a command to requeue blindly)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run in --output-dir (checkpoints, metrics, weights) and start anew")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="accept a pipe: shard location (webdataset runs it as a shell command); only if you trust it")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    overrides = config_overrides(args)
    auto = args.resume == Path(AUTO)
    if auto:
        args.resume, finished = resume_auto(overrides.get("output_dir"))
        if finished:
            say(f"{overrides['output_dir']} holds a finished run (final.json): nothing to do")
            return 0
    base = None
    if args.resume is not None:  # the run's own config, under the flags given; train() refuses what may not change
        resumed = RunDir.of_checkpoint(find_checkpoint(args.resume))
        base = read_yaml(resumed.config)
        overrides.setdefault("output_dir", str(resumed.path))
    config = build_config(args.config, overrides, base=base)
    try:
        # --resume auto with nothing to resume starts afresh over what a killed first attempt left
        train(config, resume=args.resume, overwrite=args.overwrite or (auto and args.resume is None),
              allow_pipe=args.allow_pipe)
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        silent = silent_ranks(Path(config.output_dir), rank, world, grace=min(30.0, 2 + config.collective_timeout / 10))
        who = f"rank {', '.join(map(str, silent))}" if silent else "a rank"
        say(f"error: lost contact with another process of this run: {who} stopped answering within "
            f"collective_timeout {config.collective_timeout:g} s, or died ({str(err).strip().splitlines()[0][:300]}); "
            f"see its log; `--resume {config.output_dir}` continues from the last checkpoint", every_rank=True,
            stderr=True)
        return 1
    if torch.distributed.is_initialized():  # rank 0 may host the launcher's store: leave the group before exiting
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
