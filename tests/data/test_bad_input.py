"""Bad input to the read side: a decoded cache that was edited, truncated or is not ours is rebuilt, never trusted;
a cache folder that cannot be written costs a rebuild, not the run."""

from __future__ import annotations

import torch

from bloodcells_dist.data.cache import load_or_build
from bloodcells_dist.data.preprocess import Preprocess
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.train import trainer as train

from ..helpers import cli, train_args

QUICK = ["--epochs", "1", "--workers", "0"]


def test_an_edited_or_foreign_cache_file_is_rebuilt_not_trusted(synthetic_shards, tmp_path, capsys):
    manifest, cache = ShardManifest.load(synthetic_shards), tmp_path / "cache"
    preprocess = Preprocess((24, 32))
    good, path, built = load_or_build(manifest, str(synthetic_shards), ["train"], preprocess, cache_dir=cache, workers=1)
    assert built
    labels, keys = good.labels.clone(), list(good.keys)
    edits = {
        "labels edited": lambda raw: raw["labels"].fill_(0),
        "a row lost": lambda raw: raw.update({k: raw[k][1:] for k in ("shard", "position", "split", "labels", "folds",
                                                                          "ids", "images")} | {"keys": raw["keys"][1:]}),
        "another image size": lambda raw: raw.update(images=torch.zeros(len(raw["keys"]), 3, 12, 16, dtype=torch.uint8)),
        "not a dict": lambda raw: None,
    }
    for name, edit in edits.items():
        raw = torch.load(path, weights_only=True)
        edit(raw)
        torch.save(raw if name != "not a dict" else [1, 2, 3], path)
        again, _, built = load_or_build(manifest, str(synthetic_shards), ["train"], preprocess, cache_dir=cache, workers=1)
        assert built, name
        assert torch.equal(again.labels, labels) and again.keys == keys, name
        assert "is not used" in capsys.readouterr().err, name


def test_an_unwritable_cache_folder_costs_a_rebuild_not_the_run(synthetic_shards, tmp_path):
    a_file = tmp_path / "cache-is-a-file"
    a_file.write_text("x")
    run = tmp_path / "run"
    proc = cli(train.main, *train_args(synthetic_shards, run, *QUICK, "--cache-dir", str(a_file))[2:], check=True)
    assert "cannot save the decoded cache" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "final.json").is_file()
