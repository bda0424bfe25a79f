"""Every measured figure in README.md and docs/ comes from results/*.json: rendered there by scripts/render_docs.py
(tables between `<!-- results: NAME -->` markers, single figures between `<!--r NAME:PATH:FORMAT-->` markers),
with a provenance whose commit is in this repository; and nothing measurement-shaped is written by hand outside
them, but for the short lists below."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "config.md")]


def script(name: str):
    """A module of scripts/ (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


render_docs = script("render_docs")

# What looks like a measurement: a percentage, a spread, a throughput, a duration, a size, a figure of 3 or more
# decimals (an F1, a recall), a test count.
MEASUREMENT = re.compile(r"\d[\d,.]* ?%|±|\d[\d,.]* ?(?:img/s|images/s|s/epoch)|"
                         r"\d[\d,.]* ?(?:ms|s|min|minutes|seconds|hours?|MB|GB)\b|\b0\.\d{3,}\b|\d+ tests")

# Figures that are not measurements: settings, thresholds, aims. (file, the words around the figure): why.
NOT_MEASURED = {
    ("README.md", "at 10% or more"): "the threshold of --groups auto (a constant of the code)",
    ("README.md", "(the 0.975 aim)"): "an aim, not a result",
    ("README.md", "short of 98%"): "an aim, not a result",
    ("README.md", "The 98% aim"): "an aim, not a result",
    ("docs/data.md", "At 10% or more"): "the threshold of --groups auto",
    ("docs/data.md", "`0.667`"): "a cell_crop value",
    ("docs/training.md", "90% of them"): "a description of where the cells sit (from the issue, not a run)",
    ("docs/training.md", "shift 5%"): "an augmentation setting",
    ("docs/training.md", "2-20% of the frame"): "an augmentation setting",
    ("docs/training.md", "every 30 seconds"): "the progress line's interval (a setting)",
    ("docs/training.md", "3 minutes"): "the SLURM signal's lead time (a setting)",
    ("docs/training.md", "30 minutes"): "collective_timeout's default (a setting)",
    ("docs/training.md", "min(30 s, 2 s + timeout/10)"): "the grace period's formula",
    ("docs/training.md", "15 s"): "a timeout in a table of settings",
    ("docs/training.md", "well under 1%"): "an estimate from the figures next to it",
    ("docs/tools.md", "under\n20 MB"): "the bound a test checks",
    ("docs/tools.md", "subset, 3%"): "the share of labels the benchmark flips (a setting)",
    ("docs/validation.md", "The aim of\n95%"): "an aim",
    ("docs/validation.md", "far from 90%"): "an aim",
    ("docs/validation.md", "the 10% draw is part of\nthe 25% one"): "train_fraction settings",
    ("docs/validation.md", "--cell-crop 0.667"): "a cell_crop setting in a command",
}

# Measured figures still written by hand, each with the results file it should move to. The list may only shrink:
# a new hand-written measurement fails the test, and so does an entry whose figure has gone.
NOT_YET_MOVED: dict[tuple[str, str], str] = {}


def hand_written(text: str) -> str:
    """The text with every rendered block and inline figure blanked (line numbers kept)."""
    def blank(match: re.Match) -> str:
        return "\n" * match.group(0).count("\n")
    return render_docs.INLINE.sub(blank, render_docs.BLOCK.sub(blank, text))


def unexplained_figures() -> tuple[list[str], set]:
    """Measurement-shaped figures outside the rendered parts and not in the lists above; the list entries used."""
    allowed = {**NOT_MEASURED, **NOT_YET_MOVED}
    found, used = [], set()
    for path in DOCS:
        name = str(path.relative_to(REPO))
        text = hand_written(path.read_text())
        spans = [(key, m.start(), m.end()) for key in allowed if key[0] == name
                 for m in re.finditer(re.escape(key[1]), text)]
        for match in MEASUREMENT.finditer(text):
            cover = [key for key, start, end in spans if start <= match.start() and match.end() <= end]
            used.update(cover)
            if not cover:
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{name}:{line}: {match.group(0)!r} in {text.splitlines()[line - 1].strip()[:100]!r}")
    return found, used


def test_every_table_and_figure_is_what_its_results_file_renders():
    """`render_docs.py --check`: README.md and docs/ are exactly what results/*.json (and the config) render."""
    done = subprocess.run([sys.executable, "scripts/render_docs.py", "--check"], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_measured_figure_is_written_by_hand():
    found, used = unexplained_figures()
    assert not found, "figures outside results/ (render them from a results/*.json):\n" + "\n".join(found)
    stale = sorted((set(NOT_MEASURED) | set(NOT_YET_MOVED)) - used)
    assert not stale, f"allow-list entries that match no figure any more (remove them): {stale}"


def test_the_scan_catches_a_figure_written_by_hand(tmp_path, monkeypatch):
    """The scan is a real check: a percentage typed into a doc is reported, the same one rendered is not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("Accuracy 91.3% on TEST.\n<!--r x:a:pct1-->91.3%<!--/r--> rendered.\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [tmp_path / "README.md"])
    found, _ = unexplained_figures()
    assert len(found) == 1 and found[0].startswith("README.md:1: '91.3%'")


def test_inline_figures_and_tables_are_rendered_from_their_json(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "x.json").write_text(json.dumps({"a": {"rate": 1234.5, "share": 0.4567}, "r": [0.5, 0.25]}))
    monkeypatch.setattr(render_docs, "REPO", tmp_path)
    text = "<!--r x:a/rate:f0-->99<!--/r--> img/s, <!--r x:a/share:pct1-->stale<!--/r-->, <!--r x:r/1:f2--><!--/r-->"
    assert render_docs.render_tables(text) == ("<!--r x:a/rate:f0-->1,234<!--/r--> img/s, "
                                               "<!--r x:a/share:pct1-->45.7%<!--/r-->, <!--r x:r/1:f2-->0.25<!--/r-->")
    rows = {"rows": [{"name": "a b (c)", "v": 1}, {"name": "b.yaml --x", "v": 2}, {"name": "b.yaml", "v": 3}]}
    (tmp_path / "results" / "y.json").write_text(json.dumps(rows))
    assert render_docs.render_tables("<!--r y:rows/name=b.yaml/v-->?<!--/r--> <!--r y:rows/name^=a b (/v-->?<!--/r-->") \
        == "<!--r y:rows/name=b.yaml/v-->3<!--/r--> <!--r y:rows/name^=a b (/v-->1<!--/r-->"
    points = {"p": [{"start": "pbc", "f": 0.5, "v": 1}, {"start": "scratch", "f": 0.1, "v": 2},
                    {"start": "scratch", "f": 0.5, "v": 3}]}  # several keys name one row, whatever the order
    (tmp_path / "results" / "z.json").write_text(json.dumps(points))
    assert render_docs.render_tables("<!--r z:p/start=scratch&f=0.5/v--><!--/r-->") \
        == "<!--r z:p/start=scratch&f=0.5/v-->3<!--/r-->"
    with pytest.raises(SystemExit, match="no item with start=scratch&f=0.25"):
        render_docs.render_tables("<!--r z:p/start=scratch&f=0.25/v--><!--/r-->")
    with pytest.raises(SystemExit, match="results/missing.json"):
        render_docs.render_tables("<!--r missing:a-->1<!--/r-->")
    assert "(not measured yet" in render_docs.render_tables("<!-- results: nothing -->\n<!-- /results -->")


def named_commits(value: object) -> list[str]:
    """Every commit a results file names in a provenance (commit, git_commit)."""
    if isinstance(value, dict):
        own = [v for k, v in value.items() if k in ("commit", "git_commit") and isinstance(v, str)]
        return own + [c for v in value.values() for c in named_commits(v)]
    if isinstance(value, list):
        return [c for v in value for c in named_commits(v)]
    return []


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_every_commit_a_result_names_is_in_the_repository():
    missing = []
    for path in sorted((REPO / "results").glob("*.json")):
        for commit in set(named_commits(json.loads(path.read_text()))):
            found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True)
            if found.returncode != 0:
                missing.append(f"{path.name}: {commit}")
    assert not missing, f"commits not in this repository: {missing}"


def test_the_normalisation_constants_are_the_published_ones():
    from bloodcells_dist.data.preprocess import MEAN, STD
    found = json.loads((REPO / "results" / "normalisation.json").read_text())
    assert (list(MEAN), list(STD)) == (found["published"]["mean"], found["published"]["std"])
    if "recomputed" in found:  # a fresh sample of the same images lands within a hundredth
        assert np.allclose(found["recomputed"]["mean"], MEAN, atol=0.01)
        assert np.allclose(found["recomputed"]["std"], STD, atol=0.01)


def test_channel_statistics_of_known_images():
    """scripts/normalisation.py on two flat images: the pooled mean and std come out exactly."""
    def jpeg_free(colour: tuple[int, int, int]) -> bytes:
        import io
        out = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(out, format="PNG")
        return out.getvalue()
    mean, std = script("normalisation").channel_statistics([jpeg_free((0, 255, 51)), jpeg_free((255, 255, 51))])
    assert np.allclose(mean, [0.5, 1.0, 0.2]) and np.allclose(std, [0.5, 0.0, 0.0])


def test_test_counts_from_junit_xml(tmp_path):
    suite = ET.Element("testsuites")
    ET.SubElement(suite, "testsuite", tests="10", skipped="2", failures="1", errors="0", time="65.4")
    ET.SubElement(suite, "testsuite", tests="5", skipped="0", failures="0", errors="1", time="10")
    ET.ElementTree(suite).write(tmp_path / "j.xml")
    assert script("test_figures").junit_counts(tmp_path / "j.xml") == \
        {"tests": 15, "passed": 11, "skipped": 2, "failed": 2, "seconds": 75}
