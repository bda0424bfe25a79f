"""One self-contained HTML page per run or evaluation: recipe, curves, confusion matrix with its images, errors.

    bloodcells report RUN [--wandb] [--out PAGE.html]        a run folder of bloodcells_dist.train
    bloodcells report EVAL.json [--out PAGE.html]            an output of `bloodcells evaluate` (test split, JPEGs)

For a run, also writes RUN/curves.png (loss and learning rate per step, validation accuracy and macro F1 per epoch)
and RUN/confusion.png (the validation epoch whose weights were kept); --wandb logs both to an offline W&B run in RUN.
The page (RUN/report.html, or EVAL.html beside EVAL.json) holds the run's provenance and recipe, those curves, the
confusion matrix (each cell links to its images), the misclassified images most confident first, per-class
precision, recall and F1, and a reliability diagram with the expected calibration error. Per-image predictions
come from evaluate's .predictions.csv; for a run that has none, its validation split is evaluated first.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import pages
from ..cli import Parser, UserError, run_main
from ..files import atomic_path, read_user_yaml, write_atomic
from ..output import say, warn
from ..pack.manifest import ShardManifest
from ..pages import Raw, Tile, esc
from ..train.rundir import RunDir
from ..train.scoring import eval_stem, save_confusion_png
from ..train.spec import load_model
from ..train.tracking import read_jsonl

MAX_ERRORS = 200  # thumbnails in the error gallery (the most confident errors; all are counted)
CELL_BUDGET = 1500  # thumbnails over all confusion cells together (each cell gets 2..24)
BINS = 10  # confidence bins of the reliability diagram


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


def kept_epoch(run: Path, val: list[dict]) -> dict:
    """The validation record whose weights were kept (best.safetensors: final.json's best epoch, else the first
    with the highest macro F1, as the trainer picks); the last where that epoch is unknown."""
    epoch = (RunDir(run).summary().get("best") or {}).get("epoch")
    if epoch is None and RunDir(run).best.is_file():
        epoch = max(val, key=lambda r: r["val/macro_f1"])["epoch"]
    return next((r for r in val if r["epoch"] == epoch), val[-1])


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
        say(f"logged {', '.join(images)} to an offline W&B run in {run / 'wandb'}")
    except Exception as err:  # a broken W&B install or config must not cost the user the PNGs
        warn(f"W&B logging failed: {type(err).__name__}: {err}")


def run_pngs(run: Path) -> tuple[dict[str, Path], dict | None]:
    """Write RUN/curves.png and RUN/confusion.png (the kept epoch); return them and that epoch's record."""
    train, val = split_records(read_metrics(RunDir(run).metrics))
    images = {"curves": RunDir(run).curves}
    save_curves(train, val, images["curves"])
    kept = kept_epoch(run, val) if val else None
    if kept:
        images["confusion"] = RunDir(run).confusion
        which = "kept weights" if RunDir(run).best.is_file() else "last epoch"
        save_confusion_png(kept["val"]["confusion_matrix"], class_names(run, kept["val"]), images["confusion"],
                           f"epoch {kept['epoch']} of {val[-1]['epoch']} ({which}): accuracy "
                           f"{kept['val/accuracy']:.3f}, macro F1 {kept['val/macro_f1']:.3f}")
    else:
        say("note: no validation epochs logged, so no confusion matrix", stderr=True)
    say(f"{len(train)} training and {len(val)} validation records; wrote " + " and ".join(map(str, images.values())))
    return images, kept


def validation_evaluation(run: Path) -> tuple[Path | None, str]:
    """The run's validation split scored with its kept weights (evaluate, into RUN, unless already there):
    the evaluation JSON, or None and why not."""
    from . import evaluate

    raw = read_user_yaml(RunDir(run).config, "config") if RunDir(run).config.is_file() else {}
    config = raw if isinstance(raw, dict) else {}
    fold, shards = int(config.get("val_fold", -1)), str(config.get("shards", "")).split(",")[0].strip()
    split = ",".join(config.get("train_splits", ["train"])) if fold >= 0 else config.get("val_split", "")
    if not split or not shards:
        return None, "the run does not validate"
    out = RunDir(run).evaluation(eval_stem(split, fold, tta=False))
    weights = RunDir(run).weights()
    if out.is_file() and weights.is_file() and out.stat().st_mtime >= weights.stat().st_mtime \
            and "predictions" in json.loads(out.read_text()):
        return out, ""
    argv = ["--model", str(run), "--shards", shards, "--split", split, "--out", str(run), "--workers", "1",
            *(["--fold", str(fold)] if fold >= 0 else [])]
    say(f"scoring the validation images: bloodcells evaluate {' '.join(argv)}")
    if run_main(evaluate.main, argv) != 0:
        return None, f"evaluating the validation split of {shards} failed (see above)"
    return out, ""


def thumbnails(evaluation: dict, keys: set[str]) -> dict[str, str]:
    """Thumbnails (data URIs) of the evaluated images named by `keys`: from the shards (read once, in order), or
    from the files of a JPEG folder evaluation."""
    from ..data.stream import numbered

    source = evaluation.get("source", {})
    if "images" in source:
        return {key: pages.file_thumbnail(Path(key)) for key in keys}
    shards = source.get("shards")
    if not shards:
        return {}
    manifest = ShardManifest.load(shards)
    urls = [u for s in evaluation["split"].split(",") for u in manifest.shard_urls(shards, s)]
    found: dict[str, str] = {}
    for _, _, sample in numbered(urls):
        if sample["__key__"] in keys:
            found[sample["__key__"]] = pages.thumbnail(sample["jpg"])
            if len(found) == len(keys):
                break
    return found


def calibration(rows: list[dict]) -> tuple[list[tuple[float, float, int]], float]:
    """(mean confidence, accuracy, count) per confidence bin, and the expected calibration error."""
    bins: list[list[dict]] = [[] for _ in range(BINS)]
    for r in rows:
        bins[min(int(r["confidence"] * BINS), BINS - 1)].append(r)
    stats = [(sum(r["confidence"] for r in b) / len(b), sum(r["label"] == r["predicted"] for r in b) / len(b), len(b))
             if b else (0.0, 0.0, 0) for b in bins]
    ece = sum(abs(conf - acc) * n for conf, acc, n in stats) / max(len(rows), 1)
    return stats, ece


def reliability_svg(stats: list[tuple[float, float, int]], size: int = 300) -> str:
    """Accuracy per confidence bin as bars against the diagonal of perfect calibration (inline SVG)."""
    pad, inner = 40, size - 50
    parts = [f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" stroke="#999" stroke-dasharray="4"/>',
             f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#333"/>']
    for i, (_, acc, n) in enumerate(stats):
        if n:
            h = inner * acc
            parts.append(f'<rect x="{pad + inner * i / BINS + 1:.1f}" y="{pad + inner - h:.1f}" width="{inner / BINS - 2:.1f}" '
                         f'height="{h:.1f}" fill="#4a7ab5"><title>confidence {i / BINS:.1f}-{(i + 1) / BINS:.1f}: '
                         f'accuracy {acc:.3f} of {n} images</title></rect>')
    parts += [f'<text x="{pad + inner / 2}" y="{size - 5}" text-anchor="middle">confidence</text>',
              f'<text x="12" y="{pad + inner / 2}" transform="rotate(-90 12 {pad + inner / 2})" '
              'text-anchor="middle">accuracy</text>',
              f'<text x="{pad}" y="{pad + inner + 14}" text-anchor="middle">0</text>',
              f'<text x="{pad + inner}" y="{pad + inner + 14}" text-anchor="middle">1</text>']
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" font-size="12" '
            f'font-family="sans-serif">{"".join(parts)}</svg>')


def confusion_table(matrix: list[list[int]], classes: list[str], linked: set[tuple[int, int]]) -> str:
    """The confusion matrix as a table; a cell with images on the page links to them."""
    rows = []
    for i, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for j, v in enumerate(row):
            shade = f"rgba(74,122,181,{v / total:.2f})"
            text = f'<a href="#cell-{i}-{j}">{v}</a>' if (i, j) in linked else str(v)
            cells.append(Raw(f'<span style="display:block;background:{shade}">{text}</span>'))
        rows.append([classes[i], *cells, sum(row)])
    return pages.table(["true \\ predicted", *classes, "images"], rows)


def tile(row: dict, uris: dict[str, str]) -> Tile:
    """An evaluated image: its thumbnail, true and predicted class and the probability given to the prediction."""
    return Tile(uris.get(row["key"], ""), [f"true {row['label']}", f"predicted {row['predicted']}",
                                           f"p = {row['confidence']:.3f}"], row["key"])


def evaluation_sections(evaluation: dict, classes: list[str], rows: list[dict],
                        max_errors: int) -> list[tuple[str, str, str]]:
    """Confusion matrix with its images, error gallery, per-class scores and reliability diagram of an evaluation."""
    errors = sorted((r for r in rows if r["label"] != r["predicted"]), key=lambda r: -r["confidence"])
    index = {c: i for i, c in enumerate(classes)}
    cells: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        cells.setdefault((index[r["label"]], index[r["predicted"]]), []).append(r)
    per_cell = max(2, min(24, CELL_BUDGET // max(len(cells), 1)))
    shown = {}
    for (i, j), members in cells.items():  # errors: most confident first; correct: least confident (borderline) first
        shown[i, j] = sorted(members, key=lambda r: -r["confidence"] if i != j else r["confidence"])[:per_cell]
    started = time.perf_counter()
    uris = thumbnails(evaluation, {r["key"] for r in errors[:max_errors]} | {r["key"] for m in shown.values() for r in m})
    say(f"{len(uris)} thumbnails in {time.perf_counter() - started:.1f} s")
    matrix = [[len(cells.get((i, j), [])) for j in range(len(classes))] for i in range(len(classes))]
    by_cell = "".join(
        f'<div id="cell-{i}-{j}"><h3>true {esc(classes[i])}, predicted {esc(classes[j])}: {len(cells[i, j])} '
        f"image(s){'' if len(shown[i, j]) == len(cells[i, j]) else f', the {len(shown[i, j])} '}"
        f"{('most confident' if i != j else 'least confident') if len(shown[i, j]) < len(cells[i, j]) else ''}"
        f"</h3>{pages.gallery(tile(r, uris) for r in shown[i, j])}</div>"
        for i, j in sorted(cells, key=lambda c: (c[0] == c[1], c)))
    gallery = (f'<p>{len(errors)} of {len(rows)} images misclassified'
               f'{f"; the {max_errors} most confident shown" if len(errors) > max_errors else ""}, most confident first.</p>'
               + pages.gallery(tile(r, uris) for r in errors[:max_errors]))
    per_class = pages.table(["class", "precision", "recall", "F1", "images"],
                            [[c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
                             for c, m in evaluation["per_class"].items()])
    stats, ece = calibration(rows)
    reliability = (f"<p>Expected calibration error (ECE, {BINS} bins): <b>{ece:.4f}</b> — the mean gap between the "
                   "probability of the predicted class and how often it is right.</p>" + reliability_svg(stats)
                   + pages.table(["confidence", "images", "mean confidence", "accuracy"],
                                 [[f"{i / BINS:.1f}-{(i + 1) / BINS:.1f}", n, f"{c:.3f}" if n else "-",
                                   f"{a:.3f}" if n else "-"] for i, (c, a, n) in enumerate(stats)]))
    return [("confusion", "Confusion matrix", "<p>Rows: true class; columns: predicted. A number links to its "
             "images.</p>" + confusion_table(matrix, classes, set(cells))),
            ("errors", "Misclassified images", gallery),
            ("per-class", "Per-class precision, recall and F1", per_class),
            ("calibration", "Reliability diagram", reliability),
            ("cells", "Images by confusion cell", by_cell)]


def summary_html(evaluation: dict, ece: float | None) -> str:
    """The evaluation in one table: what was scored, on what, and the headline figures."""
    source = evaluation.get("source", {})
    facts = [("model", evaluation.get("model")), ("weights", evaluation.get("weights")),
             ("split", evaluation.get("split")), ("fold", evaluation.get("fold")), ("TTA", evaluation.get("tta")),
             ("images from", source.get("shards") or source.get("images")), ("images", evaluation["samples"]),
             ("unreadable", evaluation.get("unreadable")), ("accuracy", f"{evaluation['accuracy']:.4f}"),
             ("macro F1", f"{evaluation['macro_f1']:.4f}"), ("ECE", None if ece is None else f"{ece:.4f}")]
    return pages.table(["", "value"], [[k, v] for k, v in facts if v is not None], left=2)


def recipe_html(run: Path) -> str:
    """The run's resolved config (headed by its provenance) and its final summary."""
    config = RunDir(run).config.read_text() if RunDir(run).config.is_file() else "(no config.yaml)"
    final = RunDir(run).summary()
    best = final.get("best") or {}
    facts = [("run folder", str(run)), ("finished", "yes" if final else "no (no final.json)"),
             ("steps", final.get("steps")), ("epochs", final.get("epochs")),
             ("training time", f"{final['train_seconds']:.0f} s" if "train_seconds" in final else None),
             ("kept weights", f"epoch {best['epoch']} (best validation macro F1 {best['macro_f1']:.4f})" if best
              else "last epoch")]
    return (pages.table(["", "value"], [[k, v] for k, v in facts if v is not None], left=2)
            + f"<h3>config.yaml (provenance first)</h3><pre>{esc(config)}</pre>")


def build_page(*, title: str, run: Path | None, curves: Path | None, evaluation: dict | None,
               predictions: tuple[list[str], list[dict]] | None, note: str = "", max_errors: int = MAX_ERRORS) -> str:
    """The whole report page."""
    sections: list[tuple[str, str, str]] = []
    ece = calibration(predictions[1])[1] if predictions else None
    if evaluation:
        sections.append(("summary", "Evaluation", summary_html(evaluation, ece)))
    if run is not None:
        sections.append(("recipe", "Provenance and recipe", recipe_html(run)))
    if curves is not None and curves.is_file():
        sections.append(("curves", "Loss, learning rate and validation curves",
                         f'<img src="{pages.png_uri(curves.read_bytes())}" alt="training curves" width="900">'))
    if evaluation and predictions:
        sections += evaluation_sections(evaluation, predictions[0], predictions[1], max_errors)
    intro = f'<p class="note">{esc(note)}</p>' if note else ""
    return pages.page(title, sections, intro)


def load_evaluation(path: Path) -> tuple[dict, tuple[list[str], list[dict]] | None]:
    """An evaluate output and its per-image predictions (None where it has none)."""
    from .evaluate import read_predictions

    try:
        evaluation = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as an evaluation of bloodcells evaluate: {err}") from None
    if not isinstance(evaluation, dict) or "confusion_matrix" not in evaluation:
        raise UserError(f"{path} is not an evaluation of bloodcells evaluate (no confusion_matrix)")
    csv_path = path.parent / evaluation["predictions"] if evaluation.get("predictions") else None
    return evaluation, (read_predictions(csv_path) if csv_path and csv_path.is_file() else None)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line."""
    parser = Parser(prog="bloodcells report", description=__doc__.split("\n")[0])
    parser.add_argument("target", type=Path, metavar="RUN_OR_EVAL",
                        help="run folder of bloodcells_dist.train, or an eval-*.json of bloodcells evaluate")
    parser.add_argument("--out", type=Path, help="HTML page to write (default: RUN/report.html or EVAL.html)")
    parser.add_argument("--max-errors", type=int, default=MAX_ERRORS, help="misclassified images shown (most confident)")
    parser.add_argument("--wandb", action="store_true", help="also log the PNGs to an offline W&B run in RUN")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    note, curves, run = "", None, None
    images: dict[str, Path] = {}
    evaluation: dict | None
    predictions: tuple[list[str], list[dict]] | None
    if args.target.is_file():
        evaluation, predictions = load_evaluation(args.target)
        model = Path(str(evaluation.get("model", ""))) if isinstance(evaluation.get("model"), str) else None
        run = model if model is not None and RunDir(model).metrics.is_file() else None
        out, title = args.out or args.target.with_suffix(".html"), f"evaluation: {args.target.name}"
        if predictions is None:
            note = "no per-image predictions beside this evaluation (evaluate it again to list them)"
    else:
        run = args.target
        images, _ = run_pngs(run)
        curves = images["curves"]
        eval_path, why = validation_evaluation(run)
        evaluation, predictions = load_evaluation(eval_path) if eval_path else (None, None)
        note = f"no per-image predictions: {why}" if why else ""
        out, title = args.out or run / "report.html", f"run: {run.resolve().name}"
    if run is not None and curves is None and RunDir(run).metrics.is_file():
        curves = run / "curves.png"
        save_curves(*split_records(read_metrics(RunDir(run).metrics)), curves)
    html = build_page(title=title, run=run, curves=curves, evaluation=evaluation, predictions=predictions, note=note,
                      max_errors=args.max_errors)
    write_atomic(out, html)
    say(f"wrote {out} ({len(html.encode()) / 2**20:.1f} MB) in {time.perf_counter() - started:.1f} s")
    if args.wandb and images and run is not None:
        log_to_wandb(run, images)
    for wandb_run in sorted((run / "wandb").glob("*run-*")) if run is not None else []:
        upload = f"; upload: wandb sync {wandb_run}" if wandb_run.name.startswith("offline-") else ""
        say(f"W&B run: {wandb_run}{upload}")
    return 0


def split_records(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a metrics.jsonl."""
    return [r for r in records if "train/loss" in r], [r for r in records if "val" in r]


if __name__ == "__main__":
    sys.exit(run_main(main))
