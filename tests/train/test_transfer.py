"""Starting from a trained model (`init_from`, train/transfer.py), in-process on tiny models: every kind of
source, classes matched by name (kept, mapped, new, dropped), wrong sources refused in one line, and the
fine-tuning controls (features_lr, freeze_epochs, bn_refit) doing what they say, resume included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bloodcells_dist.cli import UserError
from bloodcells_dist.config import build_config
from bloodcells_dist.train import trainer
from bloodcells_dist.train.rundir import RunDir
from bloodcells_dist.train.spec import ModelSpec, load_model, save_weights
from bloodcells_dist.train.transfer import match_classes, parse_class_map, read_source, start_from

from ..helpers import stopped_and_resumed

TINY = {"image_size": "24,32", "widths": "4,8,8,8", "hidden": "16,16", "batch_size": "16", "tracker": "none",
        "workers": "0", "mixed_precision": "no", "log_every": "1", "lr": "0.05"}
SOURCE_CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")


def tiny(shards: Path, run: Path, **overrides: object) -> dict:
    return {**TINY, "shards": str(shards), "output_dir": str(run), **{k: str(v) for k, v in overrides.items()}}


@pytest.fixture(scope="module")
def source_run(synthetic_shards, tmp_path_factory) -> Path:
    """A tiny model trained 2 epochs on the synthetic shards (the 4 blood-cells classes): the source."""
    run = tmp_path_factory.mktemp("source") / "run"
    trainer.train(build_config(overrides=tiny(synthetic_shards, run, epochs=2)))
    return run


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------- classes by name


def test_classes_match_by_name_case_aside_through_the_map_new_and_dropped():
    match = match_classes(SOURCE_CLASSES, ("eosinophil", "lymphocyte", "neutrophils", "basophil"),
                          parse_class_map(["NEUTROPHIL=neutrophils"]))
    assert match.rows == (0, 1, 3, None)
    assert match.kept == ("eosinophil", "lymphocyte") and match.mapped == (("NEUTROPHIL", "neutrophils"),)
    assert match.fresh == ("basophil",) and match.dropped == ("MONOCYTE",)
    assert match.line() == ("kept 2 (eosinophil, lymphocyte), mapped 1 (NEUTROPHIL->neutrophils), fresh 1 (basophil), "
                            "dropped 1 (MONOCYTE)")
    # a map wins over a same-named class: the source's 'lymphocyte' row goes where the map says
    swapped = match_classes(("a", "b"), ("A", "B"), {"a": "B", "b": "A"})
    assert swapped.rows == (1, 0) and not swapped.kept and len(swapped.mapped) == 2


@pytest.mark.parametrize("entries, message", [
    (["neutrophil"], "expected SOURCE=NEW"),
    (["NEUTROPHIL=x=y"], "this run's data has no class 'x=y'"),
    (["BASOPHIL=eosinophil"], "the source model has no class 'BASOPHIL'"),
    (["NEUTROPHIL=nope"], "this run's data has no class 'nope'"),
    (["EOSINOPHIL=eosinophil", "LYMPHOCYTE=eosinophil"], "maps two source classes to 'eosinophil'"),
    (["NEUTROPHIL=a", "neutrophil=b"], "maps 'neutrophil' twice"),
])
def test_a_bad_class_map_is_one_line_naming_the_entry(entries, message):
    with pytest.raises(UserError, match=message):
        match_classes(SOURCE_CLASSES, ("eosinophil", "lymphocyte", "neutrophils"), parse_class_map(entries))


# ---------------------------------------------------------------- every kind of source


def fresh_model(spec: ModelSpec) -> torch.nn.Module:
    torch.manual_seed(1)
    return spec.build()


def test_a_run_folder_a_hub_folder_a_weights_file_and_an_export_all_start_a_model_alike(source_run, tmp_path):
    from bloodcells_dist.tools.export import export
    from bloodcells_dist.tools.hub import save_pretrained

    source, source_spec = load_model(source_run)
    hub = save_pretrained(source_run, tmp_path / "hub")
    export(source, source_spec, "torchscript", tmp_path / "model.pt")
    target = ModelSpec.from_config(build_config(overrides=TINY).to_dict(),
                                   ["eosinophil", "lymphocyte", "neutrophils", "basophil"], dataset="lab")
    expected = source.state_dict()
    for path in (source_run, hub, RunDir(source_run).best, tmp_path / "model.pt"):
        model = fresh_model(target)
        untouched = fresh_model(target).state_dict()
        record, line = start_from(model, target, str(path), ["NEUTROPHIL=neutrophils"])
        got = model.state_dict()
        for name, tensor in got.items():  # every layer but the logits' is the source's
            if not name.startswith("classifier.7"):
                assert torch.equal(tensor, expected[name]), (path, name)
        fc3 = got["classifier.7.weight"]
        assert torch.equal(fc3[0], expected["classifier.7.weight"][0])  # eosinophil: EOSINOPHIL's row
        assert torch.equal(fc3[2], expected["classifier.7.weight"][3])  # neutrophils: NEUTROPHIL's row (mapped)
        assert torch.equal(fc3[3], untouched["classifier.7.weight"][3])  # basophil: a fresh row
        assert torch.equal(got["classifier.7.bias"][1], expected["classifier.7.bias"][1])
        assert record["dataset"] == "synthetic" and record["classes"]["dropped"] == ["MONOCYTE"]
        assert record["commit"] == source_spec.provenance["git_commit"] and record["source"] == str(path)
        assert line.startswith(f"init_from {path} (dataset synthetic, 4 classes): kept 2")


def test_another_image_size_keeps_the_conv_blocks_starts_fc1_fresh_and_warns(source_run, recwarn):
    config = build_config(overrides={**TINY, "image_size": "32,32"})
    target = ModelSpec.from_config(config.to_dict(), list(SOURCE_CLASSES))
    model = fresh_model(target)
    record, line = start_from(model, target, str(source_run), [])
    assert record["fresh_layers"] == ["FC1"] and line.endswith("fresh layers: FC1")
    assert record["preprocessing_changed"] == ["image_size [24, 32] -> [32, 32]"]
    assert any("prepares images otherwise than the source model did (image_size [24, 32] -> [32, 32])"
               in str(w.message) for w in recwarn)
    source = load_model(source_run)[0].state_dict()
    assert torch.equal(model.state_dict()["features.3.0.weight"], source["features.3.0.weight"])


def test_wrong_sources_are_refused_in_one_line(source_run, tmp_path):
    target = ModelSpec.from_config(build_config(overrides={**TINY, "widths": "4,8,8,16"}).to_dict(),
                                   list(SOURCE_CLASSES))
    with pytest.raises(UserError, match=r"another architecture \(conv widths \[4, 8, 8, 8\]"):
        start_from(fresh_model(target), target, str(source_run), [])
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00not a model" * 10)
    not_a_model = tmp_path / "folder"
    (not_a_model / "notes").mkdir(parents=True)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x01")
    cases = {garbage: "is not a usable bloodcells_dist model", not_a_model: "not a model",
             onnx: "an ONNX export cannot be trained further", tmp_path / "missing": "no such file or folder"}
    for path, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            read_source(str(path))
        assert "\n" not in str(err.value) and str(err.value).startswith("config init_from")


def test_fine_tuning_keys_are_checked():
    with pytest.raises(UserError, match="class_map applies only when starting from a model"):
        build_config(overrides={"class_map": "a=b"})
    with pytest.raises(UserError, match=r"freeze_epochs=3: must be in \[0, epochs=2\]"):
        build_config(overrides={"freeze_epochs": "3", "epochs": "2"})
    with pytest.raises(UserError, match="features_lr=-1.0"):
        build_config(overrides={"features_lr": "-1"})
    assert build_config(overrides={"init_from": "x", "class_map": "a=b,c=d"}).class_map == ("a=b", "c=d")


# ---------------------------------------------------------------- a fine-tuning run


def test_a_fine_tuning_run_freezes_refits_and_records_its_start(source_run, lab_shards, tmp_path, capsys):
    run = tmp_path / "run"
    config = build_config(overrides=tiny(lab_shards, run, epochs=2, init_from=source_run,
                                         class_map="NEUTROPHIL=neutrophils", freeze_epochs=1, bn_refit=4,
                                         features_lr=0.1, checkpoint_every=3))
    result = trainer.train(config)
    out = capsys.readouterr().out
    assert "init_from " in out and "kept 2 (eosinophil, lymphocyte), mapped 1" in out
    assert "bn_refit: BatchNorm statistics re-estimated on 4 training batch(es)" in out
    model, spec = load_model(run)
    assert spec.init_from["dataset"] == "synthetic" and spec.init_from["classes"]["fresh"] == ["basophil"]
    assert spec.classes == ("basophil", "eosinophil", "lymphocyte", "neutrophils")
    source, last = weights(RunDir(source_run).best), weights(RunDir(run).last)
    assert not torch.equal(last["features.0.0.weight"], source["features.0.0.weight"])  # thawed in epoch 2
    assert not torch.equal(last["features.0.1.running_mean"], source["features.0.1.running_mean"])
    assert result["last_validation"]["samples"] > 0


def test_the_frozen_epochs_leave_the_conv_blocks_as_the_source_had_them(source_run, lab_shards, tmp_path):
    run = tmp_path / "run"
    config = build_config(overrides=tiny(lab_shards, run, epochs=1, init_from=source_run, freeze_epochs=1,
                                         class_map="NEUTROPHIL=neutrophils"))
    trainer.train(config)
    source, last = weights(RunDir(source_run).best), weights(RunDir(run).last)
    for name, tensor in last.items():
        if name.startswith("features."):
            assert torch.equal(tensor, source[name]), name  # weights and BatchNorm statistics alike
    assert not torch.equal(last["classifier.1.weight"], source["classifier.1.weight"])  # the head trained


def test_features_lr_scales_the_conv_blocks_learning_rate(source_run, lab_shards, tmp_path):
    run = tmp_path / "run"
    config = build_config(overrides=tiny(lab_shards, run, epochs=1, init_from=source_run, features_lr=0.25,
                                         class_map="NEUTROPHIL=neutrophils", checkpoint_every=2))
    trainer.train(config)
    state = torch.load(RunDir(run).latest_checkpoint() / "optimizer.bin", weights_only=False)
    groups = state["param_groups"]
    assert [g["lr_scale"] for g in groups] == [0.25, 1.0]
    assert groups[0]["lr"] == pytest.approx(0.25 * groups[1]["lr"])


def test_a_stopped_fine_tuning_run_resumes_exactly(source_run, lab_shards, tmp_path, monkeypatch):
    def run_to(folder: Path, stop_at: int | None) -> dict:
        config = build_config(overrides=tiny(lab_shards, folder, epochs=2, init_from=source_run, freeze_epochs=1,
                                             bn_refit=3, features_lr=0.1, class_map="NEUTROPHIL=neutrophils",
                                             checkpoint_every=4))
        return stopped_and_resumed(trainer.train, config, stop_at, monkeypatch) if stop_at else trainer.train(config)

    whole = run_to(tmp_path / "whole", None)
    resumed = run_to(tmp_path / "resumed", 3)  # stopped in the frozen epoch: the resume thaws where the whole run did
    assert resumed["last_validation"] == whole["last_validation"]
    a, b = weights(RunDir(tmp_path / "whole").last), weights(RunDir(tmp_path / "resumed").last)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_model(tmp_path / "resumed")[1].init_from == load_model(tmp_path / "whole")[1].init_from


def test_the_model_card_names_where_the_model_started(source_run, lab_shards, tmp_path):
    from bloodcells_dist.tools.hub import save_pretrained

    run = tmp_path / "run"
    trainer.train(build_config(overrides=tiny(lab_shards, run, epochs=1, init_from=source_run,
                                              class_map="NEUTROPHIL=neutrophils")))
    hub = save_pretrained(run, tmp_path / "hub")
    card = (hub / "README.md").read_text()
    assert "Started from" in card and "synthetic" in card and str(source_run) in card
    assert json.loads((hub / "config.json").read_text())["init_from"]["classes"]["fresh"] == ["basophil"]


def test_save_weights_round_trips_the_start_record(tmp_path):
    spec = ModelSpec.from_config(build_config(overrides=TINY).to_dict(), list(SOURCE_CLASSES))
    spec = ModelSpec(**{**spec.__dict__, "init_from": {"source": "x", "dataset": "pbc"}})
    save_weights(spec.build(), spec, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors")[1].init_from == {"source": "x", "dataset": "pbc"}


def test_a_missing_source_is_refused_before_the_cache_is_built(synthetic_shards, tmp_path):
    config = build_config(overrides=tiny(synthetic_shards, tmp_path / "run", init_from=tmp_path / "nowhere",
                                         cache_dir=tmp_path / "cache"))
    with pytest.raises(UserError, match="config init_from .*nowhere: no such file or folder"):
        trainer.train(config)
    assert not (tmp_path / "cache").exists()
