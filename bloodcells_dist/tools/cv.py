"""Grouped k-fold cross-validation of a recipe: one training run per fold, then the mean and spread.

    bloodcells cv --shards DIR --output-dir RUNS [--config RECIPE.yaml] [--folds 0,1,2,3,4]
        [--launcher "accelerate launch --config_file launch/cpu_2proc.yaml"] [--tta] [--key value ...]

Fold k trains on the other folds of train + val and validates on fold k (whole groups only, see the packer).
With several shard folders (`--shards OWN,OTHER`), the first is cross-validated and the others train in every fold.
Each fold runs in RUNS/fold-k; a finished fold (its final.json says so) is not run again, and an interrupted
fold resumes from its last checkpoint, so a long cross-validation can span several sittings. Writes
RUNS/cv.json with every fold's last-epoch metrics, the mean and standard deviation, per-class recall, the pooled
confusion matrix and the provenance. --tta also scores each fold's last weights with test-time augmentation.
Each fold's last weights also score its held-out images one by one: RUNS/oof-predictions.csv holds every
image's class probabilities from the model that never saw it (`bloodcells label-issues RUNS` reads it).
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import Parser, UserError, run_main
from ..data.selection import Selection
from ..files import write_json
from ..output import say
from ..pack.manifest import ShardManifest
from ..train.provenance import provenance
from ..train.rundir import RunDir
from ..train.scoring import eval_stem
from .evaluate import read_predictions, write_predictions

OOF_NAME = "oof-predictions.csv"  # every held-out image's class probabilities, all folds together


def fold_command(launcher: str, shards: str, run: Path, fold: int, config: Path | None, extra: Sequence[str]) -> list[str]:
    """The training command of one fold (resuming it when it has a checkpoint)."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    group = ["--wandb-group", run.resolve().parent.name]  # the folds of one cross-validation, together in W&B
    if RunDir(run).latest_checkpoint() is not None:
        return [*prefix, "-m", "bloodcells_dist.train", "--resume", str(run), *group, *extra]
    recipe = ["--config", str(config)] if config else []
    return [*prefix, "-m", "bloodcells_dist.train", "--shards", shards, "--output-dir", str(run), *recipe,
            "--train-splits", "train,val", "--val-fold", str(fold), "--overwrite", *group, *extra]


def fold_evaluation(shards: str, run: Path, fold: int, tta: bool, allow_pipe: bool = False) -> Path:
    """The fold's last weights scored on its held-out cells (evaluate, cached in the run): the evaluation JSON,
    with the per-image predictions beside it."""
    out = run / f"{eval_stem('train,val', fold, tta=tta)}.json"  # where evaluate writes it
    if not out.exists() or "predictions" not in json.loads(out.read_text()):
        command = [sys.executable, "-m", "bloodcells_dist", "evaluate", "--model", str(RunDir(run).last), "--shards",
                   shards, "--split", "train,val", "--fold", str(fold), "--out", str(run), *(["--tta"] if tta else []),
                   *(["--allow-pipe"] if allow_pipe else [])]
        if subprocess.run(command, stdout=subprocess.DEVNULL).returncode != 0:
            raise UserError(f"fold {fold}: evaluation{' with TTA' if tta else ''} failed (command: {shlex.join(command)})")
    return out


def out_of_fold(evaluations: dict[int, Path], path: Path) -> dict:
    """Every fold's held-out predictions in one CSV (each training image once, by the model that never saw it)."""
    classes: list[str] = []
    samples: list = []
    for evaluation in (evaluations[fold] for fold in sorted(evaluations)):
        classes, rows = read_predictions(evaluation.with_name(json.loads(evaluation.read_text())["predictions"]))
        samples += [(r["key"], classes.index(r["label"]), r["probs"]) for r in rows]
    write_predictions(path, samples, classes)
    return {"predictions": path.name, "samples": len(samples), "folds": sorted(evaluations)}


def summarize(results: dict[int, dict]) -> dict:
    """Per-fold accuracy and macro F1 of the last epoch, with mean and (sample) standard deviation; per class,
    the recall over the folds holding that class, and the confusion matrix of all folds pooled."""
    summary: dict = {"folds": {k: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "samples": r["samples"]}
                         for k, r in sorted(results.items())}}
    for metric in ("accuracy", "macro_f1"):
        summary[metric] = spread([r[metric] for r in results.values()])
    classes = list(next(iter(results.values()))["per_class"])
    summary["per_class"] = {c: {"recall": spread([r["per_class"][c]["recall"] for r in results.values()
                                                  if r["per_class"][c]["support"]]),
                                "support": sum(r["per_class"][c]["support"] for r in results.values())}
                            for c in classes}
    summary["confusion_matrix"] = [[sum(r["confusion_matrix"][i][j] for r in results.values())
                                    for j in range(len(classes))] for i in range(len(classes))]
    return summary


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value; NaN-free for none)."""
    return {"mean": statistics.fmean(values) if values else 0.0,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def report(summary: dict, label: str) -> str:
    """The summary as the lines cv prints."""
    acc, f1 = summary["accuracy"], summary["macro_f1"]
    lines = [f"{label}: accuracy {acc['mean']:.4f} +- {acc['std']:.4f}, macro F1 {f1['mean']:.4f} +- {f1['std']:.4f}",
             "  recall per class (mean +- sd over folds; images held out): " + ", ".join(
                 f"{c} {v['recall']['mean']:.3f} +- {v['recall']['std']:.3f} ({v['support']})"
                 for c, v in summary["per_class"].items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the missing folds, then write and print the summary."""
    parser = Parser(prog="bloodcells cv", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="recipe YAML")
    parser.add_argument("--folds", default="", help="comma-separated fold indices (default: all)")
    parser.add_argument("--launcher", default="", help="command prefix, e.g. 'accelerate launch --config_file ...'")
    parser.add_argument("--tta", action="store_true", help="also score each fold's last weights with TTA")
    parser.add_argument("--allow-pipe", action="store_true", help="accept a pipe: --shards (a shell command)")
    args, extra = parser.parse_known_args(argv)
    own = args.shards.split(",")[0].strip()  # with several shard folders (joint training), the first is cross-validated
    manifest = ShardManifest.load(own, args.allow_pipe)
    extra = [*extra, "--allow-pipe"] if args.allow_pipe else extra
    folds = [int(f) for f in args.folds.split(",") if f] or list(range(manifest.folds))
    if not all(0 <= f < manifest.folds for f in folds):
        raise UserError(f"--folds {args.folds}: the shards have folds 0..{manifest.folds - 1}")

    results, tta, held_out = {}, {}, {}
    for fold in folds:
        run = args.output_dir / f"fold-{fold}"
        if not RunDir(run).finished():
            say(f"fold {fold}: training in {run}")
            command = fold_command(args.launcher, args.shards, run, fold, args.config, extra)
            if subprocess.run(command).returncode != 0:
                raise UserError(f"fold {fold} failed (command: {shlex.join(command)}); rerun to resume it")
            if not RunDir(run).finished():  # stopped by a signal (preempted): checkpointed, exit 0 like the trainer
                say(f"fold {fold} stopped before its end (checkpointed in {run}); rerun this command to resume it; "
                    "no cv.json written")
                return 0
        results[fold] = RunDir(run).summary()["last_validation"]
        held_out[fold] = fold_evaluation(own, run, fold, tta=False, allow_pipe=args.allow_pipe)
        if args.tta:
            tta[fold] = json.loads(fold_evaluation(own, run, fold, tta=True, allow_pipe=args.allow_pipe).read_text())
    summary = summarize(results)
    if args.tta:
        summary["tta"] = summarize(tta)
    summary["out_of_fold"] = {**out_of_fold(held_out, args.output_dir / OOF_NAME), "shards": own,
                               "expected": Selection(("train", "val")).count(manifest) if len(folds) == manifest.folds
                               else None}
    summary["provenance"] = provenance()
    write_json(args.output_dir / "cv.json", summary)
    for k, r in summary["folds"].items():
        say(f"fold {k}: accuracy {r['accuracy']:.4f}  macro F1 {r['macro_f1']:.4f}  ({r['samples']} samples)")
    say(report(summary, f"{len(folds)} folds"))
    say(f"out-of-fold probabilities of {summary['out_of_fold']['samples']} images: {args.output_dir / OOF_NAME} "
        f"(bloodcells label-issues {args.output_dir} ranks the labels they contradict)")
    if args.tta:
        say(report(summary["tta"], "with TTA"))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
