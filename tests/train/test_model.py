"""What a trained model is (ModelSpec) and the files it lives in: weights files, the Hub folder, exports (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from bloodcells_dist.cli import UserError
from bloodcells_dist.data.preprocess import Preprocess
from bloodcells_dist.tools.export import export, load_exported
from bloodcells_dist.train.model import BloodCellCNN, Ensemble
from bloodcells_dist.train.spec import ModelSpec, load_model, save_weights

SPEC = ModelSpec(classes=("basophil", "eosinophil", "ig"), preprocess=Preprocess((32, 48), cell_crop=0.5, fit="pad"),
                 widths=(4, 8, 8, 8), hidden=(16, 8), dropout=0.2, dataset="lab", recipe={"lr": 0.05},
                 provenance={"git_commit": "abc"})


def network(spec: ModelSpec = SPEC, seed: int = 0) -> BloodCellCNN:
    torch.manual_seed(seed)
    return spec.build().eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_spec_round_trips_through_json_and_builds_the_reference_design():
    assert ModelSpec.from_json(json.loads(json.dumps(SPEC.to_json()))) == SPEC
    model = SPEC.build()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is None for c in convs)  # the design: BatchNorm carries the bias
    assert [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)] == [16, 8, 3]
    assert model(torch.zeros(2, 3, 32, 48)).shape == (2, 3)


def test_weights_files_and_run_folders_load_with_their_spec(tmp_path):
    model = network()
    save_weights(model, SPEC, tmp_path / "best.safetensors")
    loaded, spec = load_model(tmp_path / "best.safetensors")
    assert spec == SPEC and same_weights(model, loaded) and not loaded.training
    save_weights(network(seed=1), SPEC, tmp_path / "last.safetensors")
    assert same_weights(load_model(tmp_path)[0], model)  # a run folder: its best weights first
    (tmp_path / "best.safetensors").unlink()
    assert same_weights(load_model(tmp_path)[0], network(seed=1))  # ...else its last (a train + val run)


def test_the_hub_folder_rebuilds_the_network_from_config_json_alone(tmp_path):
    model = network()
    model.save_pretrained(tmp_path / "hub", config=SPEC.to_json())  # huggingface_hub's PyTorchModelHubMixin
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["conv_bias"] is False and config["num_classes"] == 3 and config["id2label"]["2"] == "ig"
    rebuilt = BloodCellCNN.from_pretrained(tmp_path / "hub")  # the mixin, from config.json's keys alone
    assert same_weights(rebuilt, model)
    loaded, spec = load_model(tmp_path / "hub")
    assert spec == SPEC and same_weights(loaded, model)


def relabel(classes: list[str]):
    """An edit of a Hub config.json giving other class names (with id2label and label2id to match)."""
    return lambda c: c.update(classes=classes, id2label={str(i): n for i, n in enumerate(classes)},
                              label2id={n: i for i, n in enumerate(classes)})


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(cell_crop=-5), "cell_crop=-5"),
    (lambda c: c.update(std=[0.2, 0.0, 0.2]), "std="),
    (lambda c: c.update(mean=["a", "b", "c"]), "mean="),
    (lambda c: c.update(id2label={"0": "ig", "1": "eosinophil", "2": "basophil"}), "id2label"),
    (lambda c: c.update(num_classes=4), "num_classes"),
    (lambda c: c.update(widths=[4, 8, 8]), "widths"),
    (lambda c: c.update(fit="squash"), "fit="),
    (lambda c: c.pop("mean"), "mean"),
    (lambda c: c.update(std=[1e-300] * 3), "std="),
    (lambda c: c.update(mean=[1e308] * 3), "mean="),
    (relabel(["basophil", "basophil", "ig"]), "'basophil' more than once"),
    (relabel(["basophil", "Basophil", "ig"]), "more than once"),
    (relabel(["basophil", "../etc", "ig"]), "'../etc'"),
    (relabel(["basophil", "eosin\nophil", "ig"]), "control character"),
])
def test_an_unusable_spec_is_refused_before_any_image(edit, words, tmp_path):
    network().save_pretrained(tmp_path / "hub", config=SPEC.to_json())
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    edit(config)
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not a usable bloodcells_dist Hub model") as err:
        load_model(tmp_path / "hub")
    assert words in str(err.value)


@pytest.mark.parametrize("fmt, suffix", [("export", ".pt2"), ("torchscript", ".pt"), ("onnx", ".onnx")])
def test_exports_carry_the_spec_and_compute_what_pytorch_does(fmt, suffix, tmp_path):
    model, path = network(), tmp_path / f"model{suffix}"
    export(model, SPEC, fmt, path)
    exported, spec = load_exported(path)
    assert spec == SPEC and not list(tmp_path.glob(".*"))  # no temporary file left
    images = torch.randn(5, 3, 32, 48)  # a batch size the export never saw
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(exported(images)), model(images), atol=1e-4)


def test_an_ensemble_is_the_mean_of_its_members_probabilities():
    members = [network(seed=s) for s in (0, 1, 2)]
    images = torch.randn(4, 3, 32, 48)
    with torch.no_grad():
        mean = torch.stack([m(images).softmax(1) for m in members]).mean(0)
        assert torch.allclose(Ensemble(members)(images).exp(), mean, atol=1e-6)


def test_a_missing_or_foreign_file_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="no model at"):
        load_model(tmp_path / "nothing.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(UserError, match="not a usable bloodcells_dist model"):
        load_model(tmp_path / "x.safetensors")


def test_a_missing_local_path_is_never_taken_for_a_hub_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt fails at once instead of reaching the network
    with pytest.raises(UserError) as err:
        load_model("runs/mistyped")
    assert str(err.value) == "no model at runs/mistyped (a Hub repo is named hf://runs/mistyped)"
    with pytest.raises(UserError, match=r"^no Hub repo someone/model could be downloaded"):
        load_model("hf://someone/model")
