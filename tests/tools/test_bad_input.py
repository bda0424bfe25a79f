"""Bad input to evaluate, predict, export and the Hub folder: unreadable images counted, odd encodings read alike,
unusable model folders and a missing optional package refused in one `error:` line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from bloodcells_dist.tools import evaluate, export, predict

from ..helpers import cli, jpeg, make_root, one_error_line, refused, run_cli


def test_evaluate_images_counts_a_zero_byte_jpeg_and_refuses_all_unreadable(untrained_model, tmp_path):
    folder = make_root(tmp_path / "images", {"MONOCYTE/a.jpeg": jpeg(0), "MONOCYTE/b.jpeg": jpeg(1),
                                             "NEUTROPHIL/empty.jpeg": b""})
    proc = cli(evaluate.main, "--model", str(untrained_model), "--images", str(folder), "--out", str(tmp_path / "eval"),
               check=True)
    result = json.loads((tmp_path / "eval" / "eval-test.json").read_text())
    assert result["samples"] == 2 and result["unreadable"] == 1 and "1 unreadable image(s) skipped" in proc.stderr
    bad = make_root(tmp_path / "bad", {"MONOCYTE/empty.jpeg": b"", "NEUTROPHIL/junk.jpeg": b"\xff\xd8\xffjunk"})
    proc = cli(evaluate.main, "--model", str(untrained_model), "--images", str(bad), "--out", str(tmp_path / "eval2"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "no sample could be evaluated", "2 unreadable")


def test_evaluate_refuses_a_split_twice_and_a_fold_the_shards_lack(untrained_model, synthetic_shards, synthetic_root,
                                                                  tmp_path, capsys):
    base = ["--model", str(untrained_model), "--shards", str(synthetic_shards)]
    refused(evaluate.main, [*base, "--split", "test,test"], "--split test,test", "once", capsys=capsys)
    refused(evaluate.main, [*base, "--split", "train,val", "--fold", "-3"], "--fold -3", capsys=capsys)
    assert refused(evaluate.main, [*base, "--split", "train,val", "--fold", "5"], capsys=capsys) == \
        "error: --fold 5: the shards have folds 0..4"
    refused(evaluate.main, ["--model", str(untrained_model), "--images", str(synthetic_root), "--fold", "0"],
            "--fold needs --shards", capsys=capsys)
    refused(evaluate.main, ["--model", str(tmp_path / "nope"), "--shards", str(synthetic_shards)],
            f"no model at {tmp_path / 'nope'}", capsys=capsys)


def test_evaluate_and_predict_read_a_cmyk_and_a_png_named_jpeg_alike(untrained_model, synthetic_root, tmp_path):
    test = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    folder = tmp_path / "images"
    for cls in ("EOSINOPHIL", "MONOCYTE"):
        (folder / cls).mkdir(parents=True)
        first = sorted((test / cls).glob("*.jpeg"))[0]
        Image.open(first).convert("CMYK").save(folder / cls / "cmyk.jpeg", "JPEG")
        Image.open(first).save(folder / cls / "png-inside.jpeg", "PNG")
    predicted = cli(predict.main, "--model", str(untrained_model), str(folder), check=True)
    assert "4 images, 0 unreadable" in predicted.stderr
    out = tmp_path / "eval"
    cli(evaluate.main, "--model", str(untrained_model), "--images", str(folder), "--out", str(out), check=True)
    scored = json.loads((out / "eval-test.json").read_text())
    assert scored["samples"] == 4 and scored["unreadable"] == 0
    rows = [line.split(",") for line in predicted.stdout.strip().splitlines()[1:]]
    right = sum(Path(r[0]).parent.name == r[1] for r in rows)
    assert scored["accuracy"] == pytest.approx(right / 4)  # the same four predictions


@pytest.fixture(scope="module")
def hub_folder(untrained_model, tmp_path_factory) -> Path:
    from bloodcells_dist.tools import hub

    out = tmp_path_factory.mktemp("hub") / "model"
    cli(hub.main, "save", "--model", str(untrained_model), "--out", str(out), check=True)
    return out


HUB_EDITS = {
    "negative window": (lambda c: c.update(cell_crop=-5), "cell_crop=-5"),
    "zero std": (lambda c: c.update(std=[0.2, 0.0, 0.2]), "std="),
    "text mean": (lambda c: c.update(mean=["a", "b", "c"]), "mean"),
    "labels disagree": (lambda c: c.update(id2label={"0": "MONOCYTE", "1": "LYMPHOCYTE", "2": "EOSINOPHIL",
                                                     "3": "NEUTROPHIL"}), "id2label"),
    "no mean": (lambda c: c.pop("mean"), "mean"),
    "a list": (lambda c: None, "list"),
}


@pytest.mark.parametrize("case", sorted(HUB_EDITS))
def test_a_hub_folder_with_unusable_values_is_refused_by_every_tool(case, hub_folder, synthetic_root, tmp_path, capsys):
    edit, needle = HUB_EDITS[case]
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("model.safetensors", "README.md"):
        (folder / name).write_bytes((hub_folder / name).read_bytes())
    config = json.loads((hub_folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps([config] if case == "a list" else config))
    images = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    refused(predict.main, ["--model", str(folder), str(images)], needle, capsys=capsys)
    refused(evaluate.main, ["--model", str(folder), "--images", str(images.parent.parent.parent)], needle, capsys=capsys)
    refused(export.main, ["--model", str(folder), "--format", "torchscript", "--out", str(tmp_path / "m.pt")], needle,
            capsys=capsys)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.e2e
def test_export_onnx_without_the_optional_packages_names_the_extra(untrained_model, tmp_path):
    # None in sys.modules: `import onnx` raises ModuleNotFoundError and find_spec says "not installed",
    # exactly as on a machine without the packages.
    blocker = ("import sys\n"
               "sys.modules.update(onnx=None, onnxruntime=None)\n"
               "from bloodcells_dist.cli import run_main\n"
               "from bloodcells_dist.tools import export\n"
               "sys.exit(run_main(export.main, sys.argv[1:]))\n")
    proc = run_cli("-c", blocker, "--model", str(untrained_model), "--format", "onnx", "--out",
                   str(tmp_path / "m.onnx"))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "pip install 'bloodcells_dist[export]'")
    assert not (tmp_path / "m.onnx").exists()
