"""`bloodcells <command> ...` (or `python -m bloodcells_dist <command> ...`): every command of the framework.

    pack | verify | audit | cells | synthetic    the pack stage (bloodcells_dist/pack/)
    train                                        the trainer (also `accelerate launch -m bloodcells_dist.train`)
    evaluate | predict | export | hub | report | cv | label-issues   tools around a trained model (tools/)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from . import __version__

# command -> (module, argv prefix, what it does)
COMMANDS = {
    "pack": ("bloodcells_dist.pack.shards", ["pack"], "pack a folder of images or a CSV listing into verified shards"),
    "verify": ("bloodcells_dist.pack.shards", ["verify"], "re-read and check every shard of a folder"),
    "audit": ("bloodcells_dist.pack.audit", [], "duplicates, label conflicts, unreadable files, sizes, balance"),
    "cells": ("bloodcells_dist.pack.cells", [], "recover the augmented copies of each source cell (a mapping)"),
    "synthetic": ("bloodcells_dist.pack.synthetic", [], "write the synthetic stand-in dataset"),
    "train": ("bloodcells_dist.train.trainer", [], "train a model (every config key is a flag: train --help)"),
    "cv": ("bloodcells_dist.tools.cv", [], "grouped k-fold cross-validation of a recipe"),
    "evaluate": ("bloodcells_dist.tools.evaluate", [], "score a model on a split or a folder of images"),
    "predict": ("bloodcells_dist.tools.predict", [], "classify image files into a CSV"),
    "export": ("bloodcells_dist.tools.export", [], "export a model to torch.export, ONNX or TorchScript"),
    "hub": ("bloodcells_dist.tools.hub", [], "save a model as a Hugging Face Hub folder, or push one"),
    "report": ("bloodcells_dist.tools.report", [], "one HTML page of a run or an evaluation: curves, errors, calibration"),
    "label-issues": ("bloodcells_dist.tools.label_issues", [], "rank the labels a cross-validation contradicts (cleanlab)"),
}


def usage() -> str:
    """The list of commands."""
    width = max(map(len, COMMANDS))
    lines = [f"bloodcells_dist {__version__}: train a white-blood-cell classifier, from images to a published model.",
             "", "usage: bloodcells <command> [options]   (bloodcells <command> --help for its options)", ""]
    lines += [f"  {name:<{width}}  {what}" for name, (_, _, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to the command's own main (which turns user errors into one line)."""
    try:
        return dispatch(argv)
    except BrokenPipeError:  # `bloodcells --help | head`
        from .cli import closed_output

        return closed_output()


def dispatch(argv: Sequence[str] | None) -> int:
    """The command named first in argv, run with the rest; the usage for none or --help."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(__version__)
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, prefix, _ = COMMANDS[args[0]]
    from .cli import run_main

    command = importlib.import_module(module)
    return run_main(command.main, [*prefix, *args[1:]])


if __name__ == "__main__":
    sys.exit(main())
