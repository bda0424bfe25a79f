"""`make transfer`: the whole chain a lab reruns (pack PBC, pretrain, fine-tune another dataset on train + val
from that model, evaluate on its test split), on the PBC sample in ../shared and the synthetic set, tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bloodcells_dist.train.spec import load_model

from ..helpers import REPO

pytestmark = pytest.mark.e2e
PBC_SAMPLE = REPO.parent / "shared" / "datasets" / "pbc-sample"
TINY = ("--epochs 1 --image-size 32,32 --widths 4,8,8,8 --hidden 16,16 --batch-size 8 --tracker none "
        "--mixed-precision no --workers 0")  # the fine-tuning recipe's bn_refit uses what batches there are


@pytest.mark.skipif(not PBC_SAMPLE.is_dir(), reason="the PBC sample (../shared/datasets/pbc-sample) is not here")
def test_make_transfer_rebuilds_the_chain_from_the_two_folders(synthetic_root, tmp_path):
    venv = Path(sys.executable).parent.parent
    out = {"PBC_OUT": tmp_path / "pbc-shards", "PRETRAIN": tmp_path / "pretrain", "OUT": tmp_path / "shards",
           "TUNED": tmp_path / "tuned"}
    command = ["make", "-o", f"{venv}/.installed", "transfer", f"VENV={venv}", f"PBC={PBC_SAMPLE}",
               f"DATA={synthetic_root}", f"TRAIN_FLAGS={TINY}", *(f"{k}={v}" for k, v in out.items())]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"WANDB_MODE": "offline", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                               "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "init_from " in done.stdout and "kept 4" in done.stdout  # PBC's 4 shared classes keep their rows
    _, spec = load_model(out["TUNED"])
    assert spec.init_from["source"] == str(out["PRETRAIN"]) and spec.init_from["dataset"] == "pbc"
    assert sorted(spec.init_from["classes"]["dropped"]) == ["basophil", "erythroblast", "ig", "platelet"]
    assert spec.recipe["train_splits"] == ["train", "val"]
    scored = json.loads((out["TUNED"] / "eval-test.json").read_text())
    assert scored["samples"] == json.loads((out["OUT"] / "manifest.json").read_text())["splits"]["test"]["samples"]
    assert (out["PRETRAIN"] / "eval-test.json").is_file()
