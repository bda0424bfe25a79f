"""Shared fixtures: a small synthetic dataset and its shards, built once per test session."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bloodcells_dist.cli import run_main
from bloodcells_dist.data.preprocess import Preprocess
from bloodcells_dist.pack.shards import pack_shards
from bloodcells_dist.pack.synthetic import TRUTH_NAME, generate_dataset
from bloodcells_dist.train.spec import ModelSpec, save_weights

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "blood-cells"
REAL_TRAIN = REAL_DATA / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"


def completed(argv: list[str], env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    """Run argv to completion in its own process group. On timeout every Python process of the group (ranks,
    data workers, the launcher) dumps its threads' stacks (faulthandler, on SIGABRT) into the error, then the
    whole group is killed: a hang is diagnosed, and leaves no orphan rank behind to slow the next tests."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", ""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{argv[1:6]}... still running after {timeout:.0f} s; its stacks:\n"
                             f"stdout:\n{(stdout or '')[-3000:]}\nstderr:\n{(stderr or '')[-12000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or any argv) the way a user would; returns the completed process."""
    proc = completed([sys.executable, *args], env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def cli(main, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
    """A command's main() run in-process, as `run_main` runs it for a user: exit code and captured output.
    (The fast layer's stand-in for a subprocess: the same code path, without starting Python and torch anew.)"""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(main, list(argv))
    proc = subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{argv} exited {code}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    """A free TCP port on loopback for a launcher rendezvous, below the kernel's ephemeral range: a port from
    that range can be handed to another process's outgoing connection before the launcher binds it, or (in a
    client retrying before the server listens) connect a socket to itself."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.Random().sample(range(15000, max(low, 15001)), k=min(200, max(low - 15000, 1))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, env: dict | None = None, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` as a user types it."""
    proc = completed([ACCELERATE, "launch", *args], env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"accelerate launch exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc



@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A model file of the synthetic classes, untrained: for tests of what evaluate, predict and export accept."""
    spec = ModelSpec(classes=("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"), preprocess=Preprocess((24, 32)),
                     widths=(4, 4, 4, 4), hidden=(8, 8))
    path = tmp_path_factory.mktemp("untrained") / "model.safetensors"
    save_weights(spec.build(), spec, path)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory) -> Path:
    """Decoded caches go to a temporary folder (inherited by launched processes), not ~/.cache."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    yield folder / "bloodcells_dist"
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


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
    """The synthetic dataset packed with its true cells (the generator's record, as a `bloodcells cells` mapping):
    the grouping a perfect recovery would give, without the recovery's seconds (test_cells.py tests that)."""
    out = tmp_path_factory.mktemp("shards")
    pack_shards(synthetic_root, out, seed=0, cells=true_cells(synthetic_root, out.parent / "cells.csv"))
    return out


@pytest.fixture(scope="session")
def lab_shards(synthetic_root, tmp_path_factory) -> Path:
    """Another lab's data as class folders spelt otherwise: 'eosinophil' (case), 'lymphocyte', 'neutrophils'
    (a class_map), a class 'basophil' the synthetic set lacks (its monocytes' images), no monocyte; 20% val."""
    train = synthetic_root / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"
    root = tmp_path_factory.mktemp("lab") / "data"
    for old, new in {"EOSINOPHIL": "eosinophil", "LYMPHOCYTE": "lymphocyte", "NEUTROPHIL": "neutrophils",
                     "MONOCYTE": "basophil"}.items():
        shutil.copytree(train / old, root / new)
    out = root.parent / "shards"
    pack_shards(root, out, seed=0, val_fraction=0.2, test_fraction=0.0, groups="files", name="lab")
    return out


def stopped_and_resumed(train, config, stop_at: int, monkeypatch) -> dict:
    """Train `config` until the step hook stops it at `stop_at`, then resume it to the end: the resumed result."""
    monkeypatch.setenv("BLOODCELLS_AT_STEP", f"{stop_at}:stop")
    assert train(config)["stopped"]
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    return train(config, resume=Path(config.output_dir))


def true_cells(root: Path, mapping: Path) -> Path:
    """The generator's truth (path, cell) written as a cell mapping (path, class, cell, sha256)."""
    with open(root / TRUTH_NAME, newline="") as f:
        rows = [row for row in csv.DictReader(f) if "/TRAIN/" in row["path"]]
    with open(mapping, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "cell", "sha256"])
        for row in rows:
            name = row["path"].split("/")[-2]
            sha = hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
            writer.writerow([row["path"], name, f"{name}/{row['cell'].replace('/', '-')}", sha])
    return mapping


# A narrow model on 48x64 images: seconds per epoch on two CPU cores. fp32 whatever the CPU, so that runs
# compare exactly (`auto` would pick bf16 on CPUs with native bf16).
TINY = ["--image-size", "48,64", "--widths", "8,16,32,32", "--hidden", "64,32", "--batch-size", "8",
        "--tracker", "none", "--log-every", "5", "--mixed-precision", "no"]
# The reference run: one process, two data workers, mid-epoch checkpoints every 7 steps.
REF_EXTRA = ["--epochs", "8", "--workers", "2", "--checkpoint-every", "7", "--lr", "0.02", "--batch-size", "16"]


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    """`-m bloodcells_dist.train` arguments for a tiny model."""
    return ["-m", "bloodcells_dist.train", "--shards", str(shards), "--output-dir", str(run), *TINY, *extra]


@pytest.fixture(scope="session")
def reference_run(synthetic_shards, tmp_path_factory) -> Path:
    """A trained tiny model (8 epochs, ~20 s), shared by the trainer and evaluation tests."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*train_args(synthetic_shards, run, *REF_EXTRA), check=True)
    return run
