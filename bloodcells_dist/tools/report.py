"""Plot a run from its metrics.jsonl: training curves and the last validation confusion matrix as PNGs.

    bloodcells report RUN [--wandb]

Writes RUN/curves.png (loss and learning rate per step, validation accuracy and macro F1 per epoch) and
RUN/confusion.png; --wandb also logs both images to an offline W&B run in RUN (`wandb sync` uploads it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ..cli import Parser, UserError, run_main
from ..files import atomic_path, read_user_yaml
from ..train.rundir import RunDir
from ..train.scoring import save_confusion_png
from ..train.spec import load_model
from ..train.tracking import read_jsonl


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a torn last line (a killed run) is skipped with a warning."""
    if not path.is_file() or not path.read_text().strip():
        raise UserError(f"no metrics in {path}: is this a run folder of bloodcells_dist.train?")
    return [record for _, record in read_jsonl(path)]


def class_names(run: Path, last_val: dict) -> list[str]:
    """Class names from the run's model, else from the order of the logged per-class metrics."""
    try:
        return list(load_model(run)[1].classes)
    except UserError:  # e.g. metrics copied without the model
        return list(last_val["per_class"])


def save_curves(train: list[dict], val: list[dict], path: Path) -> None:
    """2 x 2 panels: training loss and learning rate against step, val accuracy and macro F1 against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps, epochs = [r["step"] for r in train], [r["epoch"] for r in val]  # epochs are numbered from 1
    panels = [(steps, [r["train/loss"] for r in train], "training loss", "step"),
              (steps, [r["train/lr"] for r in train], "learning rate", "step"),
              (epochs, [r["val/accuracy"] for r in val], "validation accuracy", "epoch"),
              (epochs, [r["val/macro_f1"] for r in val], "validation macro F1", "epoch")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (x, y, title, unit) in zip(axes.flat, panels):
        ax.plot(x, y, marker="o", markersize=3)  # markers, because a one-epoch run is a single point
        ax.set_title(title)
        ax.set_xlabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:  # replaces a link at path, never writes through it
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def log_to_wandb(run: Path, images: dict[str, Path]) -> None:
    """Log the PNGs to a new offline W&B run in RUN; W&B is optional, so a failure is only a warning."""
    try:
        import wandb

        config = read_user_yaml(RunDir(run).config, "config") if RunDir(run).config.is_file() else {}
        project = config.get("wandb_project", "bloodcells_dist") if isinstance(config, dict) else "bloodcells_dist"
        with wandb.init(project=project, dir=str(run), mode="offline",
                        name=f"{run.name}-report", job_type="report") as wb:
            wb.log({name: wandb.Image(str(path)) for name, path in images.items()})
        print(f"logged {', '.join(images)} to an offline W&B run in {run / 'wandb'}")
    except Exception as err:  # a broken W&B install or config must not cost the user the PNGs
        print(f"warning: W&B logging failed: {type(err).__name__}: {err}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells report", description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, metavar="RUN", help="run folder written by bloodcells_dist.train")
    parser.add_argument("--wandb", action="store_true", help="also log the PNGs to an offline W&B run in RUN")
    args = parser.parse_args(argv)

    records = read_metrics(RunDir(args.run).metrics)
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val" in r]
    images = {"curves": args.run / "curves.png"}
    save_curves(train, val, images["curves"])
    if val:
        last = val[-1]
        images["confusion"] = args.run / "confusion.png"
        save_confusion_png(last["val"]["confusion_matrix"], class_names(args.run, last["val"]), images["confusion"],
                           f"epoch {last['epoch']}: accuracy {last['val/accuracy']:.3f}, "
                           f"macro F1 {last['val/macro_f1']:.3f}")
    else:
        print("note: no validation epochs logged, so no confusion matrix", file=sys.stderr)
    print(f"{len(train)} training and {len(val)} validation records; wrote " + " and ".join(map(str, images.values())))
    if args.wandb:
        log_to_wandb(args.run, images)
    for wandb_run in sorted((args.run / "wandb").glob("*run-*")):  # the training's W&B run (and report's own)
        upload = f"; upload: wandb sync {wandb_run}" if wandb_run.name.startswith("offline-") else ""
        print(f"W&B run: {wandb_run}{upload}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
