"""Files of version 0.1 (a run's final.json, a checkpoint, a weights file, a Hub config) end in one line naming
the version, not in a KeyError or a wrong default (fast)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from bloodcells_dist.cli import UserError, run_main
from bloodcells_dist.tools import hub
from bloodcells_dist.train.checkpoint import read_state
from bloodcells_dist.train.model import BloodCellCNN
from bloodcells_dist.train.rundir import STATE_NAME, HubDir, RunDir
from bloodcells_dist.train.spec import load_model

NAMED = "written by bloodcells_dist 0.1"


def test_a_final_json_of_version_0_1_is_refused_naming_it(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.final.write_text(json.dumps({"final": {"accuracy": 0.5}, "best": None, "finished": True}))
    assert run.finished()  # cv sees a finished fold, then reads it:
    with pytest.raises(UserError, match=f"final.json.*'final'.*'last_validation'.*{NAMED}"):
        run.summary()
    run.final.write_text(json.dumps({"last_validation": {"accuracy": 0.5}, "finished": True}))
    assert run.summary()["last_validation"] == {"accuracy": 0.5}
    run.final.write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        run.summary()


def test_a_checkpoint_of_version_0_1_is_refused_naming_it(tmp_path):
    step = RunDir(tmp_path).checkpoint(3)
    step.mkdir(parents=True)
    (step / STATE_NAME).write_text(json.dumps({"step": 3, "epoch": 0, "final": {"accuracy": 0.25}}))
    with pytest.raises(UserError, match=NAMED):
        read_state(step)


def test_a_weights_file_of_version_0_1_is_refused_in_one_line(tmp_path, capsys):
    """Before specs, the metadata held classes, image_size, cell_crop, mean, std, model and config apart."""
    model = BloodCellCNN(num_classes=4, image_size=(48, 64), widths=(4, 8, 8, 8), hidden=(16, 8))
    meta = {"classes": json.dumps(["E", "L", "M", "N"]), "image_size": "[48, 64]", "cell_crop": "160",
            "mean": json.dumps([0.678, 0.641, 0.659]), "std": json.dumps([0.262, 0.26, 0.259]),
            "model": json.dumps({"widths": [4, 8, 8, 8], "hidden": [16, 8], "dropout": 0.0}), "config": "{}"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "old.safetensors"), meta)
    with pytest.raises(UserError, match=NAMED):
        load_model(tmp_path / "old.safetensors")
    assert run_main(hub.main, ["save", "--model", str(tmp_path / "old.safetensors"), "--out", str(tmp_path / "h")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and NAMED in err and "Traceback" not in err


def test_a_hub_config_without_fit_is_version_0_1(untrained_model, tmp_path):
    assert run_main(hub.main, ["save", "--model", str(untrained_model), "--out", str(tmp_path / "hub")]) == 0
    config = HubDir(tmp_path / "hub").config
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "fit"}))
    with pytest.raises(UserError, match=f"no 'fit'.*{NAMED}"):
        load_model(tmp_path / "hub")
