"""What a run prints about itself in a log (bloodcells_dist/progress.py): a line every so often, not a redraw."""

from __future__ import annotations

import re
import sys

import tqdm.std

from bloodcells_dist import progress


def test_progress_in_a_log_is_a_line_every_so_often(monkeypatch, capsys):
    """tqdm's clock is driven by the loop (0.01 s a batch), not by sleeping: with a line every 0.05 s, 40 batches
    give a line about every 5 batches, and a phase shorter than the interval gives none."""
    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # tqdm reads its clock through this name
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # no monitor thread on the real clock
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    assert not sys.stderr.isatty()
    for _ in progress.progress(range(40), desc="epoch 1/1", unit="batch", leave=False):
        clock[0] += 0.01
    err = capsys.readouterr().err
    assert "\r" not in err and all(line.startswith("epoch 1/1") for line in err.splitlines()), err
    done = [int(m) for m in re.findall(r"\| (\d+)/40 ", err)]
    assert len(done) == len(err.splitlines()) and 6 <= len(done) <= 8, err
    assert all(5 <= b - a <= 7 for a, b in zip([0, *done], done)), done  # one line per 0.05 s of batches
    for _ in progress.progress(range(4), desc="short", leave=False):  # 0.04 s: under the interval
        clock[0] += 0.01
    assert capsys.readouterr().err == ""
