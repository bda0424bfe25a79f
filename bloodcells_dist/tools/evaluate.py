"""Evaluate a trained model on a shard split or a JPEG folder tree: metrics JSON, per-image predictions, a confusion PNG.

    [accelerate launch ... -m] bloodcells evaluate --model RUN_OR_FILE --shards DIR --split test [--tta]
    bloodcells evaluate --model RUN_OR_FILE --images ROOT_OR_FOLDER [--split test] [--tta]
    bloodcells evaluate --model CV/fold-K --shards DIR --split train,val --fold K [--tta]
    bloodcells evaluate --model CV/fold-0 ... --model CV/fold-4 --shards DIR --split test [--tta]

--split takes several splits, comma-separated; --fold keeps only the cells of one cross-validation fold,
which scores a `bloodcells_dist.cv` fold's model on the cells it never saw. Several --model score an
ensemble (the mean of their class probabilities), written as eval-SPLIT-ensembleN.json. Beside the JSON,
eval-SPLIT.predictions.csv holds one row per image (key or path, true and predicted class, every probability):
`bloodcells report eval-SPLIT.json` makes a page of it, with the misclassified images.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator

from ..cli import Parser, UserError, output_folder, run_main
from ..data import open_eval_data
from ..data.preprocess import UnreadableImage, read_rgb
from ..data.selection import Selection
from ..files import read_user_text, write_atomic, write_json
from ..output import say, warn
from ..pack.manifest import ShardManifest
from ..pack.sources import scan_images
from ..train.metrics import format_metrics
from ..train.model import Ensemble
from ..train.rundir import HubDir, RunDir
from ..train.scoring import eval_stem, save_confusion_png, score
from ..train.spec import ModelSpec, load_model
from ..train.transfer import ClassMatch, match_classes


def folder_files(root: Path, split: str, classes: list[str]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, label) of the labelled JPEGs under ROOT: a dataset root's split folder (`split`), a folder of class
    folders, or a CSV listing (its rows of `split`, or all rows where it gives no split); class names match in
    any case. Also the files left out, with why (not an image name, a class the model does not know)."""
    scan = scan_images(root)
    label_of = {c.lower(): i for i, c in enumerate(classes)}
    given = {img.split for img in scan.images}
    wanted = [img for img in scan.images if scan.layout == "classes" or given == {""} or img.split == split]
    if not wanted:
        raise UserError(f"{root} has no images of split {split!r} (it has: {', '.join(sorted(given - {''})) or 'none'})")
    files = [(img.path, label_of[img.class_name.lower()]) for img in wanted if img.class_name.lower() in label_of]
    left_out = [f"{s.path} ({s.reason})" for s in scan.skipped]
    left_out += [f"{img.rel_path} (class {img.class_name!r} is not one of the model's)" for img in wanted
                 if img.class_name.lower() not in label_of]
    if not files:
        raise UserError(f"no images of the model's classes ({', '.join(classes)}) under {root}")
    return sorted(files), left_out


def folder_batches(files: list[tuple[Path, int]], transform, batch_size: int, rank: int,
                   world_size: int) -> tuple[Iterable, list[str]]:
    """(images, labels, paths) batches straight from the files (dealt to ranks round-robin), read as predict reads
    them, and the files that could not be read (skipped, reported)."""
    unreadable: list[str] = []

    def batches():
        images, labels, paths = [], [], []
        for path, label in files[rank::world_size]:
            try:
                image = read_rgb(path)
            except UnreadableImage as err:
                unreadable.append(f"{path} ({err})")
                continue
            images.append(transform(image))  # outside the try: a bug here is ours, not an unreadable file
            labels.append(label)
            paths.append(str(path))
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels), paths
                images, labels, paths = [], [], []
        if images:
            yield torch.stack(images), torch.tensor(labels), paths

    return batches(), unreadable


def write_predictions(path: Path, samples: list[tuple[str, int, list[float]]], classes: list[str]) -> None:
    """One CSV row per sample, sorted by key: key (shard key, or the file's path), true label, predicted label,
    its probability, and every class's probability (class names as the data spells them)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["key", "label", "predicted", "confidence", *(f"prob_{c}" for c in classes)])
    for key, label, probs in sorted(samples, key=lambda s: s[0]):
        best = max(range(len(probs)), key=probs.__getitem__)
        writer.writerow([key, classes[label], classes[best], f"{probs[best]:.5f}", *(f"{p:.5f}" for p in probs)])
    write_atomic(path, out.getvalue())


def read_predictions(path: Path) -> tuple[list[str], list[dict]]:
    """(classes, rows) of a predictions CSV: each row has key, label, predicted, confidence and probs (a list)."""
    text = read_user_text(path, "a predictions CSV of bloodcells evaluate")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if header[:4] != ["key", "label", "predicted", "confidence"] or len(header) < 5:
        raise UserError(f"{path} is not a predictions CSV of bloodcells evaluate (header: {','.join(header[:6])})")
    classes = [h.removeprefix("prob_") for h in header[4:]]
    rows = [{"key": r[0], "label": r[1], "predicted": r[2], "confidence": float(r[3]),
             "probs": [float(p) for p in r[4:]]} for r in reader if r]
    return classes, rows


def load_models(paths: Sequence[Path]) -> tuple[torch.nn.Module, ModelSpec]:
    """One model, or several as an Ensemble; they must agree on classes and preprocessing."""
    loaded = [load_model(p) for p in paths]
    spec = loaded[0][1]
    for path, (_, other) in zip(paths[1:], loaded[1:]):
        for key in ("classes", "preprocess"):
            if getattr(other, key) != getattr(spec, key):
                raise UserError(f"{path} has {key} {getattr(other, key)}, but {paths[0]} has {getattr(spec, key)}: "
                                "an ensemble's models must agree")
    return (loaded[0][0] if len(loaded) == 1 else Ensemble([m for m, _ in loaded]).eval()), spec


def shard_labels_to_model(shard_classes: list[str], model_classes: list[str]) -> ClassMatch | None:
    """None when the shards' classes are the model's, in its order; else --init-from's match by name (case aside):
    `rows` is the model's output for each shard label, `dropped` the model classes the shards never hold. A model
    of more classes (a joint run, PBC's 8 on blood-cells' 4) scores a dataset of fewer; a shard class the model
    has no output for is refused."""
    if shard_classes == model_classes:
        return None
    match = match_classes(model_classes, shard_classes, {})
    if match.fresh:
        raise UserError(f"shards hold classes {shard_classes}, the model was trained on {model_classes}: it has no "
                        f"output for {', '.join(match.fresh)}")
    return match


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, action="append",
                        help="run folder (its best weights, else its last), weights file, Hub folder or hf://USER/NAME; "
                             "repeat it to score an ensemble")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard folder or URL prefix holding manifest.json")
    source.add_argument("--images", type=Path, help="dataset root or a folder of class folders of JPEGs")
    parser.add_argument("--split", default="test", help="split(s) to evaluate, comma-separated (default: test)")
    parser.add_argument("--fold", type=int, help="only the samples of this cross-validation fold (0..folds-1)")
    parser.add_argument("--tta", action="store_true", help="average logits over flips and 180-degree rotation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for the JSON and PNG (default: the model's folder)")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="accept a pipe: shard location (webdataset runs it as a shell command); only if you trust it")
    args = parser.parse_args(argv)
    splits = args.split.split(",")
    if "" in splits or len(set(splits)) != len(splits):
        raise UserError(f"--split {args.split}: name each split once (a split twice would count its samples twice)")
    if args.fold is not None and args.fold < 0:
        raise UserError(f"--fold {args.fold}: folds are numbered from 0; leave --fold out to score every sample")
    args.fold = -1 if args.fold is None else args.fold
    if args.batch_size < 1 or args.workers < 0:
        raise UserError(f"--batch-size must be at least 1 and --workers at least 0 (got {args.batch_size}, {args.workers})")
    manifest = ShardManifest.load(args.shards, args.allow_pipe) if args.shards else None  # refuse bad shards early

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, spec = load_models(args.model)
    folders = [m if m.is_dir() else Path() if str(m).startswith("hf:") else m.parent for m in args.model]
    out = args.out or (folders[0] if len(folders) == 1 else Path(os.path.commonpath([f.resolve() for f in folders])))
    if accelerator.is_main_process:
        output_folder(out, "--out")  # before the evaluation: a read-only run folder is refused at once
    model = model.to(accelerator.device)
    classes = list(spec.classes)
    rank, world = accelerator.process_index, accelerator.num_processes
    unreadable: list[str] = []
    batches: Iterable
    if manifest is not None:
        match = shard_labels_to_model(manifest.classes, classes)
        if args.fold >= manifest.folds:
            raise UserError(f"--fold {args.fold}: the shards have folds 0..{manifest.folds - 1}")
        batches = open_eval_data(args.shards, manifest, Selection(tuple(splits), args.fold), spec.preprocess,
                                 accelerator, batch_size=args.batch_size, workers=args.workers)
        if match is not None:
            if match.dropped and accelerator.is_main_process:
                say(f"the model knows {len(match.dropped)} class(es) these shards never hold "
                    f"({', '.join(match.dropped)}): a prediction of one counts as an error")
            to_model = torch.tensor(match.rows)
            batches = ((images, to_model.to(labels.device)[labels], keys) for images, labels, keys in batches)
    elif args.fold >= 0:
        raise UserError("--fold needs --shards: JPEG folders carry no fold index")
    else:
        files, left_out = folder_files(args.images, args.split, classes)
        if left_out and accelerator.is_main_process:
            warn(f"{len(left_out)} file(s) left out: " + "; ".join(left_out[:5]))
        batches, unreadable = folder_batches(files, spec.preprocess.transform(), args.batch_size, rank, world)
    samples: list = []
    metrics = score(model, batches, accelerator, classes, tta=args.tta, samples=samples)
    skipped = accelerator.reduce(torch.tensor(len(unreadable), device=accelerator.device), "sum").item()
    if metrics["samples"] == 0:  # on every rank alike: the counts are summed over all of them
        raise UserError(f"no sample could be evaluated ({skipped} unreadable image(s)"
                        + (f", e.g. {unreadable[0]})" if unreadable else ")"))
    if metrics["nonfinite_outputs"]:
        raise UserError(f"the model's output is not finite (inf or nan) for {metrics['nonfinite_outputs']} of "
                        f"{metrics['samples']} samples: its weights or preprocessing are broken")
    models = [str(m) for m in args.model]
    scored = [RunDir(m).weights().name if m.is_dir() and not HubDir(m).holds_model() else m.name for m in args.model]
    metrics.update(split=args.split, fold=args.fold if args.fold >= 0 else None, tta=args.tta,
                   model=models[0] if len(models) == 1 else models, weights=scored[0] if len(scored) == 1 else scored,
                   unreadable=int(skipped),
                   source={"shards": args.shards} if args.shards else {"images": str(args.images.resolve())})
    if accelerator.is_main_process:
        stem = eval_stem(args.split, args.fold, args.tta) + (f"-ensemble{len(models)}" if len(models) > 1 else "")
        write_predictions(out / f"{stem}.predictions.csv", samples, classes)
        metrics["predictions"] = f"{stem}.predictions.csv"
        write_json(out / f"{stem}.json", metrics)
        save_confusion_png(metrics["confusion_matrix"], classes, out / f"{stem}-confusion.png",
                           f"{args.split}: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")
        say(format_metrics(metrics, classes))
        if skipped:
            warn(f"{skipped} unreadable image(s) skipped: " + ", ".join(unreadable[:5]))
        say(f"wrote {out / (stem + '.json')}, {out / (stem + '.predictions.csv')} (one row per image) and "
            f"{out / (stem + '-confusion.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
