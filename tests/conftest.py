"""Shared fixtures: a small synthetic dataset and its shards, built once per test session. Helpers are in helpers.py."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from bloodcells_dist.pack.shards import PackOptions, pack_shards
from bloodcells_dist.pack.synthetic import generate_dataset

from .helpers import REF_EXTRA, jpeg, make_root, run_cli, train_args, true_cells


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs `-n auto`), each worker gets its share of the cores, in process and in
    the commands it starts (OMP_NUM_THREADS): two workers with a thread per core each would ask for twice the cores
    and run slower than one, and a run resumed in process must compute as the command that started it did (the
    sums of a convolution depend on the number of threads)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A model file of the synthetic classes, untrained: for tests of what evaluate, predict and export accept."""
    from bloodcells_dist.data.preprocess import Preprocess  # torch: imported where used, so that the xdist
    from bloodcells_dist.train.spec import ModelSpec, save_weights  # controller starts its workers at once

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


SYNTHETIC = {"per_class": 100, "seed": 0, "copies": 8, "test_per_class": 25}


def generated(config, out: Path) -> Path:
    """The synthetic dataset of SYNTHETIC, drawn once into pytest's cache (.pytest_cache) and reused while the
    generator's source is unchanged (its sha256 names the folder): drawing it costs every xdist worker of every
    session about 5 s. Each session copies it (tests may change their copy). Without the cache plugin
    (-p no:cacheprovider), drawn into `out`. A folder is used only once complete (its marker is written last,
    then it is renamed into place), so workers drawing at once, or a run stopped midway, leave no half dataset."""
    from bloodcells_dist.pack import synthetic

    if config.cache is None:
        generate_dataset(out, **SYNTHETIC)
        return out
    key = hashlib.sha256(Path(synthetic.__file__).read_bytes() + repr(sorted(SYNTHETIC.items())).encode())
    final = config.cache.mkdir("synthetic") / key.hexdigest()[:16]
    if not (final / "complete").is_file():
        draft = final.with_name(f"{final.name}.{os.getpid()}")
        shutil.rmtree(draft, ignore_errors=True)
        generate_dataset(draft, **SYNTHETIC)
        (draft / "complete").write_text("")
        try:
            draft.rename(final)
        except OSError:  # another worker's copy got there first (or a stale one is in the way)
            shutil.rmtree(draft)
            if not (final / "complete").is_file():
                raise
    shutil.copytree(final, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("complete"))
    return out


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory, pytestconfig) -> Path:
    """400 TRAIN images (4 classes x 100, 8 copies per original) and 99 TEST images (an odd count)."""
    root = generated(pytestconfig, tmp_path_factory.mktemp("synthetic"))
    test = root / "dataset2-master" / "dataset2-master" / "images" / "TEST"
    sorted((test / "NEUTROPHIL").glob("*.jpeg"))[0].unlink()
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_root, tmp_path_factory) -> Path:
    """The synthetic dataset packed with its true cells (the generator's record, as a `bloodcells cells` mapping):
    the grouping a perfect recovery would give, without the recovery's seconds (test_cells.py tests that)."""
    out = tmp_path_factory.mktemp("shards")
    pack_shards(synthetic_root, out, PackOptions(seed=0, cells=true_cells(synthetic_root, out.parent / "cells.csv")))
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
    pack_shards(root, out, PackOptions(seed=0, val_fraction=0.2, test_fraction=0.0, groups="files", name="lab"))
    return out


@pytest.fixture(scope="session")
def reference_run(synthetic_shards, tmp_path_factory) -> Path:
    """A trained tiny model (8 epochs, ~20 s), shared by the trainer and evaluation tests."""
    run = tmp_path_factory.mktemp("ref") / "run"
    run_cli(*train_args(synthetic_shards, run, *REF_EXTRA), check=True)
    return run


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """Two classes x 12 cells x 2 copies in TRAIN (train, val, five folds) and a TEST split."""
    root = tmp_path_factory.mktemp("small-src")
    files = {f"TRAIN/{c}/_{i}_{r}.jpeg": jpeg(100 * k + 10 * i + r) for k, c in enumerate("AB") for i in range(12)
             for r in range(2)}
    files.update({f"TEST/{c}/_{i}_0.jpeg": jpeg(1000 + 10 * k + i) for k, c in enumerate("AB") for i in range(4)})
    make_root(root, files)
    out = tmp_path_factory.mktemp("small-shards")
    pack_shards(root, out, PackOptions(workers=1, shard_size=10))
    return out

