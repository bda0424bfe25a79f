"""predict, export and report on a real tiny model: corrupt and grayscale images, exported round trips, plots."""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcells_dist.cli import run_main
from bloodcells_dist.data.preprocess import Preprocess, read_rgb
from bloodcells_dist.tools import evaluate, export, predict, report
from bloodcells_dist.train import trainer
from bloodcells_dist.train.spec import ModelSpec, save_weights

from ..helpers import cli, jpeg, make_root, train_args

pytestmark = pytest.mark.e2e

CLASSES = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
PROBS = [f"prob_{c}" for c in CLASSES]


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def tiny_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tools") / "run"
    # The shared tiny model for one epoch: about ten seconds on two CPU cores.
    cli(trainer.main, *train_args(synthetic_shards, run, "--batch-size", "16", "--epochs", "1", "--workers", "1")[2:],
        check=True)
    return run


@pytest.fixture(scope="module")
def image_folder(synthetic_root, tmp_path_factory) -> Path:
    """Two real test JPEGs per class in class sub-folders, one corrupt .jpeg and a file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    test = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    for c in CLASSES:
        (folder / c).mkdir()
        for path in sorted((test / c).glob("*.jpeg"))[:2]:
            shutil.copy(path, folder / c / path.name)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_run, image_folder, tmp_path_factory):
    """predict with the run folder (best.safetensors) on the image folder: the process and its CSV rows."""
    out = tmp_path_factory.mktemp("preds") / "preds.csv"
    proc = cli(predict.main, "--model", str(tiny_run), str(image_folder), "--out", str(out),
                   "--batch-size", "3")
    return proc, out.read_text()


def test_predict_folder_reports_the_corrupt_file_and_goes_on(reference, image_folder):
    proc, text = reference
    # every row written, and the run exits 1 with the count, so that a script cannot take it for a clean one
    assert proc.returncode == 1 and "9 images, 1 unreadable" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: 1 of 9 image(s) could not be read (their rows say why)"
    assert text.splitlines()[0] == ",".join(["path", "predicted_class", *PROBS, "error"])
    rows = read_csv(text)
    paths = [r["path"] for r in rows]
    assert len(rows) == 9 and paths == sorted(paths) and not any(p.endswith(".txt") for p in paths)
    broken = [r for r in rows if r["path"].endswith("broken.jpeg")]
    assert len(broken) == 1 and broken[0]["error"] and broken[0]["predicted_class"] == ""
    assert all(broken[0][p] == "" for p in PROBS)
    for row in rows:
        if row is not broken[0]:
            assert row["error"] == "" and row["predicted_class"] in CLASSES
            assert sum(float(row[p]) for p in PROBS) == pytest.approx(1.0, abs=1e-4)


def test_predict_grayscale_jpeg_and_rgba_png_to_stdout(tiny_run, image_folder, tmp_path):
    jpeg = next(image_folder.glob("*/*.jpeg"))
    Image.open(jpeg).convert("L").save(tmp_path / "gray.jpg")
    Image.open(jpeg).convert("RGBA").save(tmp_path / "alpha.png")
    proc = cli(predict.main, "--model", str(tiny_run), str(tmp_path / "gray.jpg"),
                   str(tmp_path / "alpha.png"), check=True)
    rows = read_csv(proc.stdout)
    assert [Path(r["path"]).name for r in rows] == ["gray.jpg", "alpha.png"]
    assert all(r["error"] == "" and r["predicted_class"] in CLASSES for r in rows), rows
    assert "2 images, 0 unreadable" in proc.stderr


@pytest.mark.parametrize("fmt, suffix", [("export", ".pt2"), ("torchscript", ".pt"), ("onnx", ".onnx")])
def test_exported_model_predicts_like_the_pytorch_model(fmt, suffix, tiny_run, image_folder, reference, tmp_path):
    model = tmp_path / f"model{suffix}"
    proc = cli(export.main, "--model", str(tiny_run), "--format", fmt, "--out", str(model),
                   check=True)
    assert str(model) in proc.stdout and " MB" in proc.stdout and model.stat().st_size > 10_000
    proc = cli(predict.main, "--model", str(model), str(image_folder))
    assert proc.returncode == 1  # the broken file, as with the PyTorch model
    got, want = read_csv(proc.stdout), read_csv(reference[1])
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert g["predicted_class"] == w["predicted_class"] and bool(g["error"]) == bool(w["error"])
        for p in PROBS:
            if w[p]:
                assert abs(float(g[p]) - float(w[p])) <= 1e-4, (fmt, g, w)


def test_report_writes_curves_and_confusion_pngs_and_logs_them_offline(tiny_run):
    proc = cli(report.main, str(tiny_run), "--wandb", check=True)
    assert "warning" not in proc.stderr, proc.stderr
    for name in ("curves.png", "confusion.png"):
        path = tiny_run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        with Image.open(path) as image:
            assert min(image.size) >= 300
    logs = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and b"confusion" in logs[0].read_bytes()


def test_bad_model_path_is_one_line_and_exit_2(image_folder, tmp_path):
    proc = cli(predict.main, "--model", str(tmp_path / "missing"), str(image_folder))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: no model at {tmp_path / 'missing'}"]


def test_other_user_errors_are_one_line(tiny_run, image_folder, tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    calls = [(predict.main, ["--model", str(tmp_path / "junk.onnx"), str(image_folder)], "is not a readable model"),
             (predict.main, ["--model", str(tiny_run), str(tmp_path / "nowhere")], "no such file or folder"),
             (predict.main, ["--model", str(tiny_run / "config.yaml"), str(image_folder)], "expected a run folder"),
             (export.main, ["--model", str(tmp_path / "x"), "--format", "onnx", "--out", str(tmp_path / "y.onnx")],
              "no model at"),
             (export.main, ["--model", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "m.pt")],
              "end in .onnx"),
             (report.main, [str(tmp_path)], "no metrics in")]
    for main, argv, message in calls:
        assert run_main(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of (H, W, 3) uint16 pixels (PIL writes none)."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_16_bit_png_is_read_as_its_8_bit_twin_by_predict(tmp_path):
    spec = ModelSpec(classes=tuple(CLASSES), preprocess=Preprocess((24, 32), fit="pad"), widths=(4, 4, 4, 4),
                     hidden=(8, 8))  # padding fills in uint8 units: where 16-bit values went wrong
    save_weights(spec.build(), spec, tmp_path / "pad.safetensors")
    eight = np.asarray(Image.open(io.BytesIO(jpeg(0, size=(60, 30)))))
    Image.fromarray(eight).save(tmp_path / "eight.png")
    (tmp_path / "sixteen.png").write_bytes(png16(eight.astype(np.uint16) * 257))
    image = read_rgb(tmp_path / "sixteen.png")
    assert image.dtype == torch.uint8 and torch.equal(image, read_rgb(tmp_path / "eight.png"))
    proc = cli(predict.main, "--model", str(tmp_path / "pad.safetensors"), str(tmp_path / "eight.png"),
               str(tmp_path / "sixteen.png"), check=True)
    eight_row, sixteen_row = read_csv(proc.stdout)
    assert [eight_row[p] for p in PROBS] == [sixteen_row[p] for p in PROBS]


def huge_header_jpeg() -> bytes:
    """A JPEG of a few hundred bytes whose frame header claims 20000 x 20000 pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 20000, 20000)
    return bytes(data)


def test_predict_and_evaluate_hold_images_to_the_packers_checks(untrained_model, tmp_path):
    good = jpeg(0, size=(160, 120))
    truncated = good[:len(good) // 2] + b"\xff\xd9"  # cut short, end marker appended: decodes with a warning only
    folder = make_root(tmp_path / "images", {"MONOCYTE/good.jpeg": good, "MONOCYTE/truncated.jpeg": truncated,
                                             "NEUTROPHIL/huge.jpeg": huge_header_jpeg()})
    proc = cli(predict.main, "--model", str(untrained_model), str(folder))
    assert proc.returncode == 1 and "3 images, 2 unreadable" in proc.stderr
    rows = {Path(r["path"]).name: r for r in read_csv(proc.stdout)}
    assert rows["good.jpeg"]["error"] == "" and rows["good.jpeg"]["predicted_class"] in CLASSES
    assert "corrupt JPEG" in rows["truncated.jpeg"]["error"] and rows["truncated.jpeg"]["predicted_class"] == ""
    assert "400000000 pixels" in rows["huge.jpeg"]["error"] and rows["huge.jpeg"]["predicted_class"] == ""
    proc = cli(evaluate.main, "--model", str(untrained_model), "--images", str(folder), "--out", str(tmp_path / "e"),
               check=True)
    result = json.loads((tmp_path / "e" / "eval-test.json").read_text())
    assert result["samples"] == 1 and result["unreadable"] == 2 and "2 unreadable image(s) skipped" in proc.stderr


def test_a_model_answering_nan_gives_error_rows_and_a_failed_evaluation(tmp_path):
    spec = ModelSpec(classes=tuple(CLASSES), preprocess=Preprocess((24, 32)), widths=(4, 4, 4, 4), hidden=(8, 8))
    network = spec.build()
    with torch.no_grad():
        network.state_dict()[next(k for k in network.state_dict() if k.endswith("bias"))].fill_(float("nan"))
    save_weights(network, spec, tmp_path / "nan.safetensors")
    folder = make_root(tmp_path / "images", {"MONOCYTE/a.jpeg": jpeg(0), "NEUTROPHIL/b.jpeg": jpeg(1)})
    proc = cli(predict.main, "--model", str(tmp_path / "nan.safetensors"), str(folder))
    rows = read_csv(proc.stdout)
    assert proc.returncode == 1 and len(rows) == 2 and "not finite (inf or nan) for 2 of 2" in proc.stderr
    assert all(r["predicted_class"] == "" and "not finite" in r["error"] for r in rows), rows
    proc = cli(evaluate.main, "--model", str(tmp_path / "nan.safetensors"), "--images", str(folder), "--out",
               str(tmp_path / "e"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: the model's output is not")
    assert not (tmp_path / "e" / "eval-test.json").exists()


def test_outputs_that_cannot_be_written_are_one_line_before_the_work(untrained_model, tiny_run, image_folder, tmp_path,
                                                                     capsys):
    from bloodcells_dist.tools import hub

    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be\n")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    model, images = str(untrained_model), str(image_folder)
    calls = [(predict.main, ["--model", model, images, "--out", str(blocker / "p.csv")], "cannot create --out folder"),
             (export.main, ["--model", model, "--format", "onnx", "--out", str(blocker / "m.onnx")], "cannot create"),
             (export.main, ["--model", model, "--format", "torchscript", "--out", str(tmp_path / "d.pt")], "is a folder"),
             (hub.main, ["save", "--model", model, "--out", str(blocker / "hub")], "cannot create --out"),
             (hub.main, ["save", "--model", model, "--out", str(blocker)], "is a file, not a folder"),
             (evaluate.main, ["--model", model, "--images", images, "--out", str(blocker / "e")], "cannot create --out"),
             (predict.main, ["--model", model, images, "--out", "/dev/full"], "No space left on device")]
    (tmp_path / "d.pt").mkdir()
    for main, argv, message in calls:
        assert run_main(main, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1] and "Traceback" not in "".join(err), (argv, err)
    run = shutil.copytree(tiny_run, tmp_path / "run")
    (run / "curves.png").unlink(missing_ok=True)  # drawn by the report test, if it ran first
    (run / "curves.png").mkdir()  # report cannot put its file there: the OSError of a read-only run folder's kind
    assert run_main(report.main, [str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "curves.png" in err[-1], err
