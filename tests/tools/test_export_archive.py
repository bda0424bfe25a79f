"""What is inside an exported archive: torch's own folder name, never the temporary file's (fast)."""

from __future__ import annotations

import zipfile

import pytest

from bloodcells_dist.cli import run_main
from bloodcells_dist.tools import export


@pytest.mark.parametrize("fmt, suffix", [("export", ".pt2"), ("torchscript", ".pt")])
def test_the_archive_folder_is_not_a_temporary_name(untrained_model, tmp_path, fmt, suffix):
    out = tmp_path / f"model{suffix}"
    assert run_main(export.main, ["--model", str(untrained_model), "--format", fmt, "--out", str(out)]) == 0
    names = zipfile.ZipFile(out).namelist()
    assert names and {n.split("/")[0] for n in names} == {"archive"}, names[:5]
    assert not any(".tmp" in n for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left either
