"""label-issues per group: on a dataset of copies, one mislabelled cell is one entry (with its flagged share)."""

from __future__ import annotations

from html.parser import HTMLParser

from bloodcells_dist.tools import evaluate, label_issues
from bloodcells_dist.tools.label_issues import by_group, issues_page

from ..helpers import cli, one_error_line


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def flagged(rank: int, key: str, given: str, suggested: str, p: float) -> dict:
    return {"rank": rank, "key": key, "label": given, "suggested": suggested, "suggested_probability": p,
            "label_quality": 1 - p, "probs": []}


def test_flags_are_counted_per_group_most_flagged_first_with_the_group_size():
    metas = {f"m{i}": {"group": "MONO/cell1", "path": f"MONO/m{i}.jpg", "class_name": "MONO"} for i in range(4)}
    metas |= {f"n{i}": {"group": "NEUT/cell2", "path": f"NEUT/n{i}.jpg", "class_name": "NEUT"} for i in range(3)}
    metas |= {"e0": {"group": "EOS/cell3", "path": "EOS/e0.jpg", "class_name": "EOS"}}
    issues = [flagged(1, "e0", "EOS", "NEUT", 0.99), flagged(2, "m1", "MONO", "NEUT", 0.9),
              flagged(3, "m3", "MONO", "LYMPH", 0.8), flagged(4, "m0", "MONO", "NEUT", 0.7)]
    groups = by_group(issues, metas)
    assert [(g["group"], g["flagged"], g["images"], g["suggested"], g["first"]["rank"]) for g in groups] == [
        ("MONO/cell1", 3, 4, "NEUT", 2), ("EOS/cell3", 1, 1, "NEUT", 1)]
    # The page says it: one gallery tile per group, and the group count in the summary.
    uris = {key: f"data:image/jpeg;base64,{key}" for key in metas}
    page = issues_page("SRC", [{}] * 8, issues, uris, metas, max_shown=300)
    images = Images()
    images.feed(page)
    assert images.sources == [uris["m1"], uris["e0"]]  # each group's most suspect image, most flagged group first
    assert "2 of 3" in page and "3 of 4 flagged" in page and "4 images flagged in 2 group(s)" in page


def test_held_out_predictions_of_evaluate_are_ranked_like_out_of_fold_ones(untrained_model, synthetic_shards,
                                                                           tmp_path):
    """`--predictions`: a split scored by a model that never saw it (here an untrained one, which contradicts
    many labels), ranked without a cross-validation; CV_DIR and --predictions are one or the other."""
    cli(evaluate.main, "--model", str(untrained_model), "--shards", str(synthetic_shards), "--split", "test",
        "--out", str(tmp_path / "eval"), check=True)
    predictions = tmp_path / "eval" / "eval-test.predictions.csv"
    proc = cli(label_issues.main, "--predictions", str(predictions), "--shards", str(synthetic_shards), "--out",
               str(tmp_path / "issues"), check=True)
    scored = len(predictions.read_text().splitlines()) - 1
    flagged = len((tmp_path / "issues" / "label-issues.csv").read_text().splitlines()) - 1
    assert 0 < flagged <= scored and f"{flagged} of {scored} labels look wrong" in proc.stdout
    one_error_line(cli(label_issues.main, "--predictions", str(predictions)).stderr, "--predictions needs --shards")
    one_error_line(cli(label_issues.main).stderr, "give CV_DIR")
    one_error_line(cli(label_issues.main, str(tmp_path), "--predictions", str(predictions), "--shards",
                       str(synthetic_shards), "--out", str(tmp_path / "x")).stderr, "one of them")
