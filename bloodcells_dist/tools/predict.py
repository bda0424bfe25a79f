"""Predict the class of every image in files and folders: one CSV row per image, unreadable ones included.

    bloodcells predict --model RUN_OR_FILE PATH... [--out preds.csv] [--batch-size N] [--tta]

The model is a run folder, a Hub model folder (bloodcells_dist.hub) or .safetensors file, or a file written by
bloodcells_dist.export (.pt2, .onnx or .pt).
"""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..cli import Parser, UserError, output_file, run_main
from ..data.preprocess import UnreadableImage, read_rgb
from ..output import say
from ..train.scoring import logits as model_logits
from ..train.spec import ModelSpec, load_model
from .export import SUFFIXES, load_exported

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

Model = Callable[[torch.Tensor], torch.Tensor]


def find_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, and every .jpeg/.jpg/.png under each folder (recursive, sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"no such file or folder: {path}")
    if not found:
        raise UserError(f"no .jpeg/.jpg/.png images in {', '.join(map(str, paths))}")
    return found


def load_predictor(path: Path) -> tuple[Model, ModelSpec]:
    """A model by suffix: a run or Hub folder or .safetensors file, or an exported .pt2, .onnx or .pt file."""
    if path.suffix in SUFFIXES.values():
        return load_exported(path)
    if path.is_file() and path.suffix != ".safetensors":
        raise UserError(f"--model {path}: expected a run folder, a Hub model folder, or a .safetensors, .pt2, .onnx or .pt file")
    return load_model(path)


@torch.no_grad()
def predict_rows(model: Model, classes: Sequence[str], transform: Callable, files: Sequence[Path], *,
                 batch_size: int, tta: bool, device: torch.device) -> Iterator[list[str]]:
    """CSV rows in file order: path, predicted class, one probability per class, error text ('' if read)."""
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images, errors = [], {}
        for i, path in enumerate(chunk):
            try:
                image = read_rgb(path)
            except UnreadableImage as err:
                errors[i] = f"unreadable: {err}"  # one line for the CSV cell
                continue
            images.append(transform(image))  # outside the try: a failure here is a bug, with its traceback
        logits = model_logits(model, torch.stack(images).to(device), tta) if images else torch.empty(0, len(classes))
        probs = iter(zip(logits.float().softmax(1).cpu().tolist(), logits.isfinite().all(1).tolist()))
        for i, path in enumerate(chunk):
            if i in errors:
                yield [str(path), "", *[""] * len(classes), errors[i]]
                continue
            p, finite = next(probs)
            if finite:
                yield [str(path), classes[p.index(max(p))], *(f"{x:.6f}" for x in p), ""]
            else:  # a broken model (weights or preprocessing): no class to name
                yield [str(path), "", *[""] * len(classes), "the model's output is not finite (inf or nan)"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True,
                        help="run folder, Hub model folder, .safetensors model, or an exported .pt2 / .onnx / .pt file")
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files or folders of images")
    parser.add_argument("--out", type=Path, help="CSV file to write (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--tta", action="store_true", help="average logits over flips and 180-degree rotation")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} must be at least 1")

    if args.out:
        output_file(args.out, "--out")  # before the model and the images are read
    model, spec = load_predictor(args.model)
    transform, files, classes = spec.preprocess.transform(), find_images(args.paths), list(spec.classes)
    # ONNX runs on its CPU provider; an ExportedProgram (.pt2) stays on the device it was exported on.
    on_gpu = torch.cuda.is_available() and isinstance(model, torch.nn.Module) and args.model.suffix != SUFFIXES["export"]
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu and isinstance(model, torch.nn.Module):
        model = model.to(device)
    unreadable = broken = 0
    with open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "predicted_class", *(f"prob_{c}" for c in classes), "error"])
        rows = predict_rows(model, classes, transform, files, batch_size=args.batch_size, tta=args.tta,
                            device=device)
        for row in rows:
            writer.writerow(row)
            unreadable += row[-1].startswith("unreadable")
            broken += bool(row[-1]) and not row[-1].startswith("unreadable")
    say(f"{len(files)} images, {unreadable} unreadable" + (f", {broken} without a finite output" if broken else "")
        + (f"; wrote {args.out}" if args.out else ""), stderr=True)
    if broken:
        say(f"error: the model's output is not finite (inf or nan) for {broken} of {len(files)} image(s): its "
            "weights or preprocessing are broken", stderr=True)
        return 1
    if unreadable:  # the rows are written (with the reason), but a script must not take this run for a clean one
        say(f"error: {unreadable} of {len(files)} image(s) could not be read (their rows say why)", stderr=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
