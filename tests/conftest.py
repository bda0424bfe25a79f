"""Shared fixtures: a small synthetic dataset and its shards, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bloodcells_dist.shards import pack_shards
from bloodcells_dist.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "blood-cells"
REAL_TRAIN = REAL_DATA / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or any argv) the way a user would; returns the completed process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """400 TRAIN images (4 classes x 100, 8 copies per original) and 99 TEST images (an odd count)."""
    root = tmp_path_factory.mktemp("synthetic")
    generate_dataset(root, per_class=100, seed=0, copies=8, test_per_class=25)
    test = root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    sorted((test / "NEUTROPHIL").glob("*.jpeg"))[0].unlink()
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_root, tmp_path_factory) -> Path:
    """Default packing of the synthetic dataset."""
    out = tmp_path_factory.mktemp("shards")
    pack_shards(synthetic_root, out, seed=0)
    return out
