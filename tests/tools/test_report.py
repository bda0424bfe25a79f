"""The pages: the report of an evaluation or a run (with evaluate's per-image predictions) and the audit page,
read with an HTML parser."""

from __future__ import annotations

import csv
import html as html_lib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from bloodcells_dist.pack import audit
from bloodcells_dist.pack.shards import pack_shards
from bloodcells_dist.tools import evaluate, report
from bloodcells_dist.train import trainer

from ..helpers import REPO, assert_self_contained, cli, parse, train_args

PBC_SAMPLE = REPO.parent / "shared" / "datasets" / "pbc-sample"

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]


@pytest.mark.parametrize("source", ["shards", "images"])
def test_report_page_of_an_evaluation_shows_every_error_and_cell(source, untrained_model, synthetic_shards,
                                                                 synthetic_root, tmp_path):
    where = ["--shards", str(synthetic_shards)] if source == "shards" else ["--images", str(synthetic_root)]
    cli(evaluate.main, "--model", str(untrained_model), *where, "--split", "test", "--out", str(tmp_path), check=True)
    with open(tmp_path / "eval-test.predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 99 and len({r["key"] for r in rows}) == 99  # every test image once
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1, abs=1e-3) and r["predicted"] == CLASSES[probs.index(max(probs))]
    if source == "images":
        assert all(Path(r["key"]).is_file() for r in rows)
    proc = cli(report.main, str(tmp_path / "eval-test.json"), check=True)
    page = parse(tmp_path / "eval-test.html")
    assert str(tmp_path / "eval-test.html") in proc.stdout
    assert_self_contained(page)
    assert page.sections[:1] == ["summary"] and {"confusion", "errors", "per-class", "calibration"} <= set(page.sections)
    errors = sum(r["label"] != r["predicted"] for r in rows)
    assert errors > 0 and page.figures["errors"] == min(errors, report.MAX_ERRORS)
    matrix = json.loads((tmp_path / "eval-test.json").read_text())["confusion_matrix"]
    nonzero = {f"#cell-{i}-{j}" for i, row in enumerate(matrix) for j, v in enumerate(row) if v}
    shown = sum(min(v, 24) for row in matrix for v in row)  # up to 24 images of each cell
    assert set(page.links) >= nonzero and page.figures["cells"] == shown and shown > 80
    text = " ".join(page.text)
    assert all(c in text for c in CLASSES) and "Monocyte" not in text  # class names as the data spells them
    assert "Expected calibration error" in text and f"{errors} of 99 images misclassified" in text


def test_report_page_stays_small_for_thousands_of_images_and_30_classes(synthetic_root, tmp_path):
    files = sorted(synthetic_root.rglob("*.jpeg"))
    classes = [f"class-{k:02d}" for k in range(30)]
    rows = []
    for n in range(3000):  # a real JPEG for each, the prediction right 70% of the time
        label, predicted = n % 30, (n % 30 if n % 10 < 7 else (n * 7) % 30)
        probs = [0.3 / 29] * 30
        probs[predicted] = 0.7
        rows.append({"key": str(files[n % len(files)]), "label": classes[label], "predicted": classes[predicted],
                     "confidence": 0.7, "probs": probs})
    evaluation = {"samples": 3000, "accuracy": 0.7, "macro_f1": 0.7, "split": "test", "source": {"images": "x"},
                  "per_class": {c: {"precision": 0.7, "recall": 0.7, "f1": 0.7, "support": 100} for c in classes}}
    started = time.perf_counter()
    html = report.build_page(title="many", run=None, curves=None, evaluation=evaluation, predictions=(classes, rows))
    seconds = time.perf_counter() - started
    (tmp_path / "many.html").write_text(html)
    page = parse(tmp_path / "many.html")
    assert len(html.encode()) < 20 * 2**20 and seconds < 120, (len(html), seconds)
    assert page.figures["errors"] == report.MAX_ERRORS and len(page.images) <= report.MAX_ERRORS + 2 * report.CELL_BUDGET
    assert_self_contained(page)
    assert sum(1 for h in page.links if h.startswith("#cell-")) == 30 + len({(r["label"], r["predicted"]) for r in rows}) - 30


@pytest.mark.e2e
def test_report_of_a_short_run_has_curves_the_kept_epoch_and_its_validation_images(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    # fewer steps per epoch than log_every: the epoch's last step is logged all the same
    cli(trainer.main, *train_args(synthetic_shards, run, "--epochs", "2", "--log-every", "1000", "--batch-size", "32",
                                  "--workers", "0")[2:], check=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["epoch"] for r in records if "train/loss" in r} == {1, 2}
    proc = cli(report.main, str(run), check=True)
    final = json.loads((run / "final.json").read_text())
    page = parse(run / "report.html")
    assert_self_contained(page)
    assert {"recipe", "curves", "confusion", "errors", "calibration"} <= set(page.sections)
    text = " ".join(page.text)
    assert f"epoch {final['best']['epoch']} (best validation macro F1" in text and "shards:" in text
    evaluation = json.loads((run / "eval-val.json").read_text())  # the validation split, scored by the kept weights
    assert evaluation["samples"] == final["best"]["samples"] and evaluation["weights"] == "best.safetensors"
    assert evaluation["confusion_matrix"] == final["best"]["confusion_matrix"]
    assert (run / "confusion.png").is_file() and "report.html" in proc.stdout


def test_audit_page_shows_duplicates_conflicts_unreadable_files_and_samples(tmp_path):
    if not PBC_SAMPLE.is_dir():
        pytest.skip("the PBC sample is not at ../shared/datasets/pbc-sample")
    proc = cli(audit.main, "--src", str(PBC_SAMPLE), "--out", str(tmp_path / "audit.json"), "--html",
               str(tmp_path / "audit.html"), check=True)
    report_json = json.loads((tmp_path / "audit.json").read_text())
    page = parse(tmp_path / "audit.html")
    assert f"wrote {tmp_path / 'audit.html'}" in proc.stdout
    excluded = report_json["excluded"]
    assert "before exclusions" in proc.stdout and f"after the {len(excluded)} exclusion(s)" in proc.stdout
    assert_self_contained(page)
    exact = report_json["exact_duplicates"]["list"]
    assert page.figures["duplicates"] == sum(len(g["files"]) for g in exact) == 4  # each set side by side
    conflicts = [e for e in excluded if e["reason"].startswith("label conflict")]
    assert conflicts and page.figures["conflicts"] == sum(len(e["copies"]) for e in conflicts)  # each copy shown
    text = " ".join(page.text)
    assert report_json["unreadable"][0]["path"] in text and report_json["unreadable"][0]["reason"] in text
    per_class = report_json["sizes"]
    assert page.figures["samples"] == sum(min(audit.SAMPLES_PER_CLASS, s["images"]) for s in per_class.values())
    assert all(c in text for c in report_json["classes"]) and "packed (after exclusions)" in text


def test_pack_writes_the_audit_page_beside_audit_json(synthetic_root, tmp_path):
    pack_shards(synthetic_root, tmp_path, seed=0, groups="files")
    page = parse(tmp_path / audit.AUDIT_PAGE)
    assert_self_contained(page)
    assert page.figures["near"] == 2 * json.loads((tmp_path / "audit.json").read_text())["near_duplicates"]["pairs"]


PROBE = """<script>window.__errors = []; addEventListener("error", e => __errors.push(String(e.message || e.target.src)), true);
addEventListener("load", () => { const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0));
document.documentElement.setAttribute("data-probe", JSON.stringify({images: document.images.length,
broken: broken.length, errors: __errors})); });</script>"""


def chromium() -> str:
    """The headless browser, or a skip saying how to get it (.ci/run installs it)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("no chromium on this machine (apt-get install chromium; .ci/run installs it where it can)")
    return found


def browse(page: Path, tmp_path: Path) -> tuple[dict, Path]:
    """Open the page in headless Chromium: what a probe script saw once it loaded (images, broken images, script
    errors; the probe goes into a copy, the page itself has no script) and a screenshot of its top."""
    browser, flags = chromium(), ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, f"the page did not finish loading in Chromium: {dom[:300]}"
    shot = tmp_path / f"{page.stem}.png"
    subprocess.run([browser, *flags, "--window-size=1200,1500", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    return json.loads(html_lib.unescape(found.group(1))), shot


@pytest.mark.e2e
def test_pages_load_every_image_without_errors_in_chromium(untrained_model, synthetic_shards, synthetic_root,
                                                           tmp_path):
    cli(evaluate.main, "--model", str(untrained_model), "--shards", str(synthetic_shards), "--out", str(tmp_path),
        check=True)
    cli(report.main, str(tmp_path / "eval-test.json"), check=True)
    cli(audit.main, "--src", str(synthetic_root), "--html", str(tmp_path / "audit.html"), check=True)
    for name in ("eval-test.html", "audit.html"):
        seen, shot = browse(tmp_path / name, tmp_path)
        assert seen["images"] == len(parse(tmp_path / name).images) > 0 and seen["broken"] == 0, seen
        assert seen["errors"] == [], seen
        with Image.open(shot) as image:  # a screenshot of the page as a user sees it
            assert image.size == (1200, 1500) and len(image.getcolors(2**16) or range(300)) > 50
