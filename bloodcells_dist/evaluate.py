"""Evaluate a trained model on a shard split or a JPEG folder tree: metrics JSON and a confusion-matrix PNG.

    [accelerate launch ...] python -m bloodcells_dist.evaluate --model RUN_OR_FILE --shards DIR --split test [--tta]
    python -m bloodcells_dist.evaluate --model RUN_OR_FILE --images ROOT_OR_FOLDER [--split test] [--tta]
    python -m bloodcells_dist.evaluate --model CV/fold-K --shards DIR --split train,val --fold K [--tta]

--split takes several splits, comma-separated; --fold keeps only the cells of one cross-validation fold,
which scores a `bloodcells_dist.cv` fold's model on the cells it never saw.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator

from .checkpoint import load_model
from .cli import UserError, run_main
from .loader import EvalStream, decode_image, eval_loader, in_fold
from .manifest import ShardManifest
from .metrics import classification_metrics, confusion_matrix, format_metrics
from .sources import find_split_folders
from .transforms import build_transform


def tta_logits(model: torch.nn.Module, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """Logits, or with tta the mean logits over the identity, both flips and the 180-degree rotation."""
    if not tta:
        return model(images)
    views = (images, images.flip(-1), images.flip(-2), images.flip(-1, -2))
    return torch.stack([model(v).float() for v in views]).mean(0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, accelerator: Accelerator, classes: list[str],
             tta: bool = False) -> dict:
    """Metrics over every sample of every rank's batches, each counted once. Collective: one all-reduce."""
    model.eval()
    cm = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for images, labels, *_ in batches:
        with accelerator.autocast():
            logits = tta_logits(model, images.to(accelerator.device, non_blocking=True), tta)
        cm += confusion_matrix(labels, logits.argmax(1), len(classes))
    cm = accelerator.reduce(cm.to(accelerator.device), reduction="sum").cpu()
    return classification_metrics(cm, classes)


def folder_batches(root: Path, split: str, classes: list[str], transform, batch_size: int, rank: int,
                   world_size: int) -> tuple[Iterable, list[str]]:
    """Batches straight from JPEG files under ROOT (a dataset root, or a folder of class folders), and the
    files that could not be read (skipped, reported). Files are dealt to ranks round-robin."""
    if any((root / c).is_dir() for c in classes):
        class_roots = [root]
    else:  # every folder of the split, TRAIN and train alike
        class_roots = find_split_folders(root).get(split.lower(), [])
    if not class_roots:
        raise UserError(f"{root} has neither class folders ({', '.join(classes)}) nor a {split} split folder")
    files = sorted((p, classes.index(p.parent.name.upper())) for class_root in class_roots for p in class_root.glob("*/*")
                   if p.suffix.lower() in (".jpeg", ".jpg") and p.parent.name.upper() in classes)
    if not files:
        raise UserError(f"no .jpeg/.jpg images in class folders under {', '.join(map(str, class_roots))}")
    unreadable: list[str] = []

    def batches():
        images, labels = [], []
        for path, label in files[rank::world_size]:
            try:
                images.append(transform(decode_image(path.read_bytes())))
                labels.append(label)
            except (RuntimeError, ValueError, OSError):  # corrupt, zero-byte (ValueError), unreadable
                unreadable.append(str(path))
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels)
                images, labels = [], []
        if images:
            yield torch.stack(images), torch.tensor(labels)

    return batches(), unreadable


def save_confusion_png(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """The confusion matrix as an annotated heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), [c.title() for c in classes], rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), [c.title() for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_stem(split: str, fold: int, tta: bool) -> str:
    """File name stem of an evaluation's outputs, e.g. eval-test-tta or eval-train+val-fold2."""
    return f"eval-{split.replace(',', '+')}{f'-fold{fold}' if fold >= 0 else ''}{'-tta' if tta else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(prog="python -m bloodcells_dist.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="run folder (uses best.safetensors) or model file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", help="shard folder or URL prefix holding manifest.json")
    source.add_argument("--images", type=Path, help="dataset root or a folder of class folders of JPEGs")
    parser.add_argument("--split", default="test", help="split(s) to evaluate, comma-separated (default: test)")
    parser.add_argument("--fold", type=int, default=-1, help="only the samples of this cross-validation fold")
    parser.add_argument("--tta", action="store_true", help="average logits over flips and 180-degree rotation")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for the JSON and PNG (default: the model's folder)")
    parser.add_argument("--allow-pipe", action="store_true",
                        help="accept a pipe: shard location (webdataset runs it as a shell command); only if you trust it")
    args = parser.parse_args(argv)
    manifest = ShardManifest.load(args.shards, args.allow_pipe) if args.shards else None  # refuse bad shards early

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model, meta = load_model(args.model)
    model = model.to(accelerator.device)
    classes, transform = meta["classes"], build_transform(meta["image_size"], mean=meta["mean"], std=meta["std"])
    rank, world = accelerator.process_index, accelerator.num_processes
    unreadable: list[str] = []
    if manifest is not None:
        if manifest.classes != classes:
            raise UserError(f"shards hold classes {manifest.classes}, the model was trained on {classes}")
        if args.fold >= manifest.folds:
            raise UserError(f"--fold {args.fold}: the shards have folds 0..{manifest.folds - 1}")
        urls = [u for s in args.split.split(",") for u in manifest.shard_urls(args.shards, s, args.allow_pipe)]
        keep = partial(in_fold, fold=args.fold, keep=True) if args.fold >= 0 else None
        stream = EvalStream(urls, transform=transform, batch_size=args.batch_size, rank=rank, world_size=world,
                            sample_filter=keep)
        batches = eval_loader(stream, args.workers, accelerator.device.type == "cuda")
    elif args.fold >= 0:
        raise UserError("--fold needs --shards: JPEG folders carry no fold index")
    else:
        batches, unreadable = folder_batches(args.images, args.split, classes, transform, args.batch_size, rank, world)
    metrics = evaluate(model, batches, accelerator, classes, tta=args.tta)
    skipped = accelerator.reduce(torch.tensor(len(unreadable), device=accelerator.device), "sum").item()
    if metrics["samples"] == 0:  # on every rank alike: the counts are summed over all of them
        raise UserError(f"no sample could be evaluated ({skipped} unreadable image(s)"
                        + (f", e.g. {unreadable[0]})" if unreadable else ")"))
    metrics.update(split=args.split, fold=args.fold if args.fold >= 0 else None, tta=args.tta, model=str(args.model),
                   unreadable=int(skipped))
    if accelerator.is_main_process:
        out = args.out or (args.model if args.model.is_dir() else args.model.parent)
        out.mkdir(parents=True, exist_ok=True)
        stem = eval_stem(args.split, args.fold, args.tta)
        (out / f"{stem}.json").write_text(json.dumps(metrics, indent=1) + "\n")
        save_confusion_png(metrics["confusion_matrix"], classes, out / f"{stem}-confusion.png",
                           f"{args.split}: accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")
        print(format_metrics(metrics, classes))
        if skipped:
            print(f"warning: {skipped} unreadable image(s) skipped: " + ", ".join(unreadable[:5]), file=sys.stderr)
        print(f"wrote {out / (stem + '.json')} and {out / (stem + '-confusion.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
