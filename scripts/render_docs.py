"""Write what the docs show from what it comes from, so that no table can drift from its source:

- docs/config.md: every TrainConfig key, from the dataclass (its type, default, comment and section);
- the result tables in README.md and docs/*.md, between `<!-- results: NAME -->` and `<!-- /results -->`,
  from results/NAME.json (measured figures with their provenance); `<!-- results: NAME:PART -->` renders one
  part of results/NAME.json (RENDERERS names them);
- every figure in the prose, between `<!--r NAME:PATH:FORMAT-->` and `<!--/r-->`: the value at PATH (keys and
  list positions joined by `/`) of results/NAME.json, written as FORMAT (FORMATS; a number as it is without one).

    python scripts/render_docs.py           # rewrite the files
    python scripts/render_docs.py --check   # exit 1 naming the first file that differs (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bloodcells_dist.config import field_docs  # noqa: E402

BLOCK = re.compile(r"(<!-- results: ([\w-]+)(?::([\w-]+))? -->\n)(.*?)(<!-- /results -->)", re.S)
INLINE = re.compile(r"(<!--r ([\w-]+):([^:>]+?)(?::(\w+))?-->)(.*?)(<!--/r-->)", re.S)


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def spread(value: dict | None, percent: bool = True) -> str:
    if not value:
        return "-"
    if percent:
        return f"{100 * value['mean']:.1f}% ± {100 * value['std']:.1f}"
    return f"{value['mean']:.3f} ± {value['std']:.3f}"


def where(provenance: dict) -> str:
    """Machine and precision, and the commit (or run) the figure comes from."""
    source = provenance.get("commit") or provenance.get("git_commit") or "?"
    dirty = " (with uncommitted changes)" if provenance.get("git_dirty") else ""
    dirty += f" ({provenance['commit_note']})" if provenance.get("commit_note") else ""
    precision = provenance.get("precision", "?")
    precision = "" if precision == "-" else f", {precision}"
    return f"{provenance.get('machine') or provenance.get('cpu', '?')}{precision}; `{source[:7]}`{dirty}"


def table(columns: list[str], rows: list[str]) -> str:
    """A markdown table: the header, its rule and the rows (each already `| a | b |`)."""
    return "\n".join([f"| {' | '.join(columns)} |", "|" + "---|" * len(columns), *rows])


def per_fold(folds: list) -> str:
    """Fold accuracies in percent, '-' for a fold not run yet."""
    return ", ".join("-" if f is None else f"{100 * f:.1f}" for f in folds)


def partial(folds: list) -> str:
    """' (k of n folds)' while a CV is under way, else nothing."""
    done = sum(f is not None for f in folds)
    return f" ({done} of {len(folds)} folds)" if done < len(folds) else ""


def blood_cells_cv(data: dict) -> str:
    """The recipes compared on the blood-cells TRAIN folder."""
    lines = []
    for row in data["rows"]:
        test = pct(row.get("test")) + (f" ({row['test_note']})" if row.get("test_note") else "")
        lines.append(f"| `{row['recipe']}` | **{spread(row['accuracy'])}**{partial(row['folds'])} | "
                     f"{spread(row['macro_f1'], False)} | {per_fold(row['folds'])} "
                     f"| {spread(row.get('leaky'))} | {test} | {row['epochs']} | {where(row['provenance'])} |")
    return table(["recipe", "honest CV (5 folds of cells)", "macro F1", "per fold", "leaky CV", "held-out TEST", "epochs",
                  "measured on"], lines)


def pbc(data: dict) -> str:
    """The PBC proof: the held-out test split and the CV folds."""
    classes = data["classes"]
    lines = []
    for row in data["rows"]:
        recall = " | ".join(f"{row['recall'][c]:.3f}" if row.get("recall") else "-" for c in classes)
        lines.append(f"| {row['what']} | {row.get('samples', '-'):,} | **{pct(row['accuracy'], 2)}** | "
                     f"{row['macro_f1']:.4f} | {recall} | {row.get('time', '-')} | {where(row['provenance'])} |")
    return table(["what", "images", "accuracy", "macro F1", *(f"recall {c}" for c in classes), "time", "measured on"],
                 lines)


def fold_check(data: dict) -> str:
    """The same fold, the same seed, the same machine, before and after a change of the code."""
    lines = []
    for row in data["rows"]:
        recall = ", ".join(f"{c[:3]} {v:.3f}" for c, v in row["recall"].items())
        lines.append(f"| {row['code']} | {row['fold']} | {pct(row['accuracy'], 2)} | {row['macro_f1']:.4f} | {recall} "
                     f"| {where(row['provenance'])} |")
    return table(["code", "fold", "accuracy", "macro F1", "recall per class", "measured on"], lines)


def label_issues(data: dict) -> str:
    """Flipped labels found by `bloodcells label-issues`: precision and recall of the flagged images."""
    lines = ["| what | flagged | precision | recall | measured on |", "|---|---|---|---|---|"]
    for name, label in (("top_ranked", "top-ranked, as many as the flips"), ("all_flagged", "every flagged image")):
        row = data[name]
        lines.append(f"| {label} | {row['flagged']} | {pct(row['precision'])} | {pct(row['recall'])} "
                     f"| {where(data['provenance'])} |")
    real = ["| dataset | predictions | images flagged | groups flagged | whole groups | measured on |",
            "|---|---|---|---|---|---|"]
    for row in data.get("real_datasets", []):
        real.append(f"| {row['dataset']} | {row['predictions']} | {row['flagged']:,} of {row['images']:,} | "
                    f"{row['flagged_groups']:,} of {row['groups']:,} | {row['whole_groups']} | {where(row['provenance'])} |")
    return (f"{data['what']}; cv accuracy {spread(data['cv_accuracy'])}. `{data['command']}`\n\n" + "\n".join(lines)
            + (f"\n\n{data['note']}" if data.get("note") else "")
            + ("\n\nOn the two real datasets, as published (no flips):\n\n" + "\n".join(real)
               if data.get("real_datasets") else ""))


def learning_curve(data: dict) -> str:
    """Honest CV accuracy against the cells each fold trained on, from scratch and from the PBC model."""
    lines = []
    starts = {"scratch": "from scratch (`best.yaml`)", "pbc": "from PBC (`bloodcells-finetune.yaml`)"}
    for row in sorted(data["points"], key=lambda r: (r["fraction"], r["start"])):
        cells = f"{min(row['cells'])}-{max(row['cells'])}" if min(row["cells"]) != max(row["cells"]) else str(row["cells"][0])
        steps = f"{min(row['steps'])}-{max(row['steps'])}" if row.get("steps") else "-"
        lines.append(f"| {starts[row['start']]} | {pct(row['fraction'], 0)} | {cells} | **{spread(row['accuracy'])}** | "
                     f"{per_fold(row['folds'])} | {spread(row['macro_f1'], False)} | {steps} | {where(row['provenance'])} |")
    return table(["start", "share of each fold's cells", "cells a fold trained on", "honest CV", "per fold", "macro F1",
                  "steps a fold", "measured on"], lines)


def transfer_controls(data: list) -> str:
    """The fine-tuning controls at 10% of the cells, one changed per row."""
    lines = []
    for row in data:
        flags = f"`{row['flags']}`" if row["flags"] else "-"
        lines.append(f"| {row['change']} | {flags} | **{spread(row['accuracy'])}**{partial(row['folds'])} | "
                     f"{per_fold(row['folds'])} | {spread(row['macro_f1'], False)} | {where(row['provenance'])} |")
    return table(["change", "flags", "honest CV (18 cells a fold)", "per fold", "macro F1", "measured on"], lines)


def transfer_joint(data: dict) -> str:
    """Joint training against pretrain-then-fine-tune and scratch, on one fold."""
    lines = []
    for row in data["rows"]:
        recall = f"{row['recall']['MONOCYTE']:.2f}" if row.get("recall") else "-"
        samples = f"{row['train_samples']:,}" if row.get("train_samples") else "-"
        minutes = f"{row['train_seconds'] / 60:.0f} min" if row.get("train_seconds") else "-"
        lines.append(f"| {row['run']} | **{pct(row['accuracy'])}** | {recall} | {samples} | {minutes} | "
                     f"{where(row['provenance'])} |")
    return table(["run", f"fold {data['fold']} accuracy", "monocyte recall", "samples an epoch", "training time",
                  "measured on"], lines)


def speed_finetune(data: dict) -> str:
    """Seconds per training step of fine-tuning against training from scratch, interleaved in one run."""
    lines = ["| run | s per step | against scratch | s for the whole command | measured on |", "|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['variant']} | {row['seconds_per_step']:.3f} | {row['per_step_vs_scratch']:.2f} x | "
                     f"{row['wall_seconds']:.0f} | {where(data['provenance'])} |")
    return f"`{data['command']}` ({data['rounds']} rounds, interleaved)\n\n" + "\n".join(lines)


def speed_rate(entry: dict) -> float:
    """A path's images/s: the median of its rounds, or the one figure recorded."""
    return statistics.median(entry["rounds"]) if entry.get("rounds") else entry["img_per_s"]


def speed_train(data: dict) -> str:
    """bench_train.py on one machine: every data path against the model alone (the first batch size recorded)."""
    paths = data["runs"][0]["paths"]
    ceiling = speed_rate(paths["model alone"])
    lines = ["| path | img/s | x model alone | rounds |", "|---|---|---|---|"]
    for name, entry in paths.items():
        rate, bold = speed_rate(entry), "**" if name == "cache" else ""
        rounds = ", ".join(f"{v:.1f}" for v in entry.get("rounds") or []) or "-"
        lines.append(f"| {bold}{entry.get('label', name)}{bold} | {bold}{rate:,.1f}{bold} | "
                     f"{bold}{rate / ceiling:.2f}{bold} | {rounds} |")
    return "\n".join(lines) + f"\n\n{where(data['provenance'])}: `{data['command']}`"


def speed_train_gpu(data: dict) -> str:
    """bench_train.py on one GPU at two batch sizes, side by side."""
    runs = data["runs"]
    head = " | ".join(f"batch {run['batch']} img/s | x model alone" for run in runs)
    lines = [f"| path | {head} |", "|---|" + "---|---|" * len(runs)]
    for name, entry in runs[0]["paths"].items():
        bold = "**" if name == "cache" else ""
        cells = []
        for i, run in enumerate(runs):
            rate, ceiling = speed_rate(run["paths"][name]), speed_rate(run["paths"]["model alone"])
            b = bold if i == 0 else ""
            cells.append(f"{b}{rate:,.0f}{b} | {b}{rate / ceiling:.2f}{b}")
        lines.append(f"| {bold}{entry.get('label', name)}{bold} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n\n{where(data['provenance'])}: `{data['command']}`"


def speed_precision(data: dict) -> str:
    """bench_precision.py: fp32 and bf16 autocast, contiguous and channels_last, at one or more batch sizes."""
    def cell(entry: dict, base: float) -> str:
        ratio = entry.get("x", entry["img_per_s"] / base)
        return f"{entry['img_per_s']:,.1f} img/s (x{ratio:.2f})" if entry["img_per_s"] < 1000 else \
            f"{entry['img_per_s']:,.0f} img/s (x{ratio:.2f})"
    runs = data["runs"]
    combos = ("fp32 contiguous", "fp32 channels_last", "bf16 contiguous", "bf16 channels_last")
    best = max(combos, key=lambda c: runs[0]["img_per_s"][c]["img_per_s"])
    lines = [f"| batch | {' | '.join(combos)} |", "|---|---|---|---|---|"]
    for run in runs:
        base = run["img_per_s"]["fp32 contiguous"]["img_per_s"]
        lines.append(f"| {run['batch']} | " + " | ".join(
            f"**{cell(run['img_per_s'][c], base)}**" if c == best else cell(run["img_per_s"][c], base)
            for c in combos) + " |")
    return "\n".join(lines) + f"\n\n{where(data['provenance'])}: `{data['command']}`"


def tests(data: dict) -> str:
    """The test suite: how many tests, how long, where."""
    lines = []
    for run in data["runs"].values():
        lines.append(f"| `{run['command']}` | {run['tests']} | {run.get('passed', '-')} | {run.get('skipped', '-')} | "
                     f"{run.get('failed', '-')} | {run['seconds']} s ({run['seconds'] / 60:.1f} min) | "
                     f"{where(run['provenance'])} |")
    return table(["layer", "tests", "passed", "skipped", "failed", "time", "measured on"], lines)


def single_fold(data: dict) -> str:
    """Changes tried one at a time on one fold, against the recipe they change."""
    classes = "/".join(c[:3] for c in data["recall_classes"])
    lines = [f"| change to `{data['base']['recipe']}` | flags | fold {data['fold']} | recall {classes} | measured on |",
             "|---|---|---|---|---|"]
    for row in [{"change": "none", "flags": "", **data["base"]}, *data["rows"]]:
        recall = " / ".join(f"{v:.2f}" for v in row["recall"]) if row.get("recall") else "-"
        flags = f"`{row['flags']}`" if row["flags"] else "-"
        lines.append(f"| {row['change']} | {flags} | {pct(row['accuracy'])} | {recall} | {where(row['provenance'])} |")
    return "\n".join(lines)


def cells(data: dict) -> str:
    """The recovered cells of the real TRAIN folder, per class, against the old file-name groups."""
    lines = ["| class | cells | copies per cell (min / median / max) | colour: cells | area: cells | colour: `i` "
             "| area: `i` |",
             "|---|---|---|---|---|---|---|"]
    for row in data["classes"]:
        lines.append(f"| {row['class']} | {row['cells']} | {' / '.join(map(str, row['copies']))} | {row['colour_cells']:.3f} "
                     f"| {row['area_cells']:.3f} | {row['colour_i']:.3f} | {row['area_i']:.3f} |")
    return "\n".join(lines) + f"\n\n{where(data['provenance'])}"


RENDERERS: dict[str, Callable[[Any], str]] = {
             "cells:train": cells, "single-fold": single_fold, "blood-cells-cv": blood_cells_cv, "pbc": pbc,
             "fold-check": fold_check, "label-issues": label_issues, "learning-curve": learning_curve,
             "transfer-controls:controls": transfer_controls, "transfer-controls:joint": transfer_joint,
             "speed:finetune": speed_finetune,
             "speed:train-cpu": speed_train, "speed:train-gpu": speed_train_gpu,
             "speed:precision-cpu": speed_precision, "speed:precision-gpu": speed_precision, "tests": tests}
# A part of a results file (NAME:PART) is rendered from that key of the file.
FORMATS = {
    **{f"pct{d}": (lambda d: lambda v: f"{100 * v:.{d}f}%")(d) for d in range(3)},
    **{f"f{d}": (lambda d: lambda v: f"{v:,.{d}f}")(d) for d in range(5)},
    "spread": spread,
    "spreadf1": lambda v: spread(v, False),
    "min": lambda v: f"{v / 60:.0f}",
    "commit": lambda v: f"`{v[:7]}`",
    "list": lambda v: ", ".join(map(str, v)),
    "count": lambda v: str(len(v)),
    "pcts": lambda v: ", ".join(f"{100 * x:.1f}" for x in v),
}


def row_tests(key: str, path: str) -> list[tuple[str, str, str]]:
    """`KEY=VALUE` or `KEY^=PREFIX` conditions joined by `&`, as (key, operator, value)."""
    tests = [re.fullmatch(r"([\w-]+)(\^?=)(.*)", part) for part in key.split("&")]
    if not all(tests):
        raise SystemExit(f"{key!r} in {path} is neither a position nor KEY=VALUE")
    return [test.groups() for test in tests]  # type: ignore[union-attr,misc]


def row_matches(item: dict, field: str, op: str, wanted: str) -> bool:
    value = str(item.get(field, ""))
    return value == wanted or (op == "^=" and value.startswith(wanted))


def lookup(data: object, path: str) -> object:
    """The value at a `/`-joined path of keys and list items: a position, `KEY=VALUE` (the item whose KEY is VALUE)
    or `KEY^=PREFIX` (the first whose KEY starts so), several joined by `&` (the item matching all); naming rows by
    what they are keeps a figure on its row when rows are added to the file."""
    for key in path.split("/"):
        if not isinstance(data, list):
            data = data[key]  # type: ignore[index]
        elif re.fullmatch(r"-?\d+", key):
            data = data[int(key)]
        else:
            tests = row_tests(key, path)
            found = [item for item in data if all(row_matches(item, *test) for test in tests)]
            if not found:
                raise SystemExit(f"no item with {key} in {path}")
            data = found[0]
    return data


def config_reference() -> str:
    """docs/config.md."""
    out = ["# Configuration reference", "",
           "<!-- written by scripts/render_docs.py from bloodcells_dist/config.py: edit the dataclass, not this file -->", "",
           "Every key of `TrainConfig` (`bloodcells_dist/config.py`), the one training configuration. Values layer",
           "as defaults < a recipe (`--config launch/recipes/X.yaml`) < flags (`--key value`, dashes or underscores;",
           "lists as `32,64,128,256`; numbers as you write them, `1e-3` included). Unknown keys and values that",
           "cannot work are refused with one line naming the key. A run saves the resolved config as",
           "`RUN/config.yaml`, headed by its provenance (as comments: the file stays a recipe).", ""]
    sections: dict[str, list] = {}
    for doc in field_docs():
        sections.setdefault(doc.section, []).append(doc)
    for section, docs in sections.items():
        out += [f"## {section[0].upper()}{section[1:]}", "", "| key | type | default | what it does |", "|---|---|---|---|"]
        for doc in docs:
            default = ",".join(map(str, doc.default)) if isinstance(doc.default, list) else json.dumps(doc.default)
            out.append(f"| `{doc.name}` | {doc.kind} | `{default}` | {doc.help.replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_tables(text: str) -> str:
    """Every results block and inline figure of a markdown text, rendered anew from its JSON."""
    def load(name: str) -> dict | None:
        source = REPO / "results" / f"{name}.json"
        return json.loads(source.read_text()) if source.is_file() else None

    def table(match: re.Match) -> str:
        name, part = match.group(2), match.group(3)
        data = load(name)
        if data is None:
            body = f"(not measured yet: there is no results/{name}.json)"
        else:
            body = RENDERERS[f"{name}:{part}" if part else name](data[part] if part else data)
        return f"{match.group(1)}{body}\n{match.group(5)}"

    def figure(match: re.Match) -> str:
        name, path, form = match.group(2), match.group(3), match.group(4)
        data = load(name)
        if data is None:
            raise SystemExit(f"an inline figure names results/{name}.json, which does not exist")
        value = lookup(data, path)
        return f"{match.group(1)}{FORMATS[form](value) if form else value}{match.group(6)}"

    return INLINE.sub(figure, BLOCK.sub(table, text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file would change")
    args = parser.parse_args()
    wanted = {REPO / "docs" / "config.md": config_reference()}
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.name != "config.md":
            wanted[path] = render_tables(path.read_text())
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(REPO)} is not what scripts/render_docs.py writes: run it")
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
