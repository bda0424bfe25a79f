"""The run folder: its layout, atomic writes, "finished", checkpoints, the lock and provenance (fast)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator

from bloodcells_dist.cli import UserError
from bloodcells_dist.files import atomic_path, write_atomic, write_json
from bloodcells_dist.train import trainer
from bloodcells_dist.train.checkpoint import save_checkpoint
from bloodcells_dist.train.provenance import comment_block, provenance
from bloodcells_dist.train.rundir import STATE_NAME, RunDir
from bloodcells_dist.train.state import TrainState
from bloodcells_dist.train.tracking import MetricsLog

from ..helpers import cli, one_error_line

HOLD = """
import sys, time
from bloodcells_dist.train.rundir import RunDir
lock = RunDir(sys.argv[1]).lock()
lock.acquire()
print("held", flush=True)
sys.stdin.readline()
"""


def test_a_run_is_finished_only_when_final_json_says_so(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    assert not run.finished() and run.run_files() == []
    run.final.write_text('{"steps": 3')  # torn
    assert not run.finished()
    run.write_final({"steps": 3})
    assert run.finished() and json.loads(run.final.read_text()) == {"steps": 3, "finished": True}
    assert run.run_files() == [run.final]
    run.clear()
    assert not run.final.exists() and run.path.is_dir()


def test_only_complete_checkpoints_count(tmp_path):
    run = RunDir(tmp_path)
    for step in (5, 10, 15):
        run.checkpoint(step).mkdir(parents=True)
    (run.checkpoint(5) / STATE_NAME).write_text("{}")
    (run.checkpoint(10) / STATE_NAME).write_text("{}")
    (run.checkpoints / ".tmp-step-00000020").mkdir()
    assert run.complete_checkpoints() == [run.checkpoint(5), run.checkpoint(10)]
    assert run.latest_checkpoint() == run.checkpoint(10) and RunDir.of_checkpoint(run.checkpoint(10)).path == tmp_path
    assert RunDir(tmp_path / "empty").latest_checkpoint() is None


def test_atomic_writes_leave_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "final.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]
    write_atomic(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"


def test_the_lock_refuses_a_second_process_and_dies_with_the_first(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by another training \(pid {holder.pid} on "):
            run.lock().acquire()
        holder.kill()  # SIGKILL: no clean-up runs in the holder
        holder.wait()
    finally:
        holder.kill()
    lock = run.lock()
    lock.acquire()  # the kernel released the dead holder's lock
    assert f"pid {__import__('os').getpid()}" in run.lock_file.read_text()
    lock.release()


def test_a_run_never_writes_through_a_link_or_into_what_is_not_a_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = RunDir(tmp_path / "run")
    run.create()
    run.lock_file.symlink_to(victim)
    with pytest.raises(UserError, match=r"\.lock is a symbolic link"):
        run.lock().acquire()
    run.metrics.symlink_to(victim)
    with pytest.raises(UserError, match=r"metrics\.jsonl is a symbolic link"):
        MetricsLog(run.metrics, enabled=True).write({"step": 1})
    # an atomic write replaces a link at its path, and removes one planted under its temporary name
    run.final.symlink_to(victim)
    (run.path / f".final.tmp-{os.getpid()}.json").symlink_to(victim)
    run.write_final({"steps": 1})
    assert not run.final.is_symlink() and run.finished()
    assert victim.read_text() == "precious\n"
    run.lock_file.unlink()
    run.lock_file.mkdir()
    with pytest.raises(UserError, match=r"\.lock: Is a directory"):
        run.lock().acquire()
    run.lock_file.rmdir()
    os.mkfifo(run.lock_file)
    with pytest.raises(UserError, match=r"\.lock is not a regular file"):
        run.lock().acquire()


@pytest.mark.parametrize("planted", ["a link to a folder", "a broken link", "a file"])
def test_a_checkpoints_entry_that_is_a_link_or_not_a_folder_is_refused_before_training(planted, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious\n")
    run = RunDir(tmp_path / "run")
    run.create()
    if planted == "a file":
        run.checkpoints.write_text("not a folder\n")
    else:
        run.checkpoints.symlink_to(victim if planted == "a link to a folder" else tmp_path / "nowhere")
    words = "is not a folder" if planted == "a file" else "is a symbolic link"
    with pytest.raises(UserError, match=words):
        run.create()
    # the command line: one line before anything is read (the shards named do not even exist) or written
    argv = ["--shards", str(tmp_path / "no-shards"), "--output-dir", str(run.path), "--overwrite"]
    proc = cli(trainer.main, *argv)
    assert proc.returncode == 2
    one_error_line(proc.stderr, str(run.checkpoints), words)
    assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"] and sorted(os.listdir(run.path)) == ["checkpoints"]


def test_save_checkpoint_removes_planted_links_themselves_never_through_them(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / STATE_NAME).write_text("{}")  # looks like a complete checkpoint through a link
    run = RunDir(tmp_path / "run")
    run.create()
    run.checkpoints.mkdir()
    step = run.checkpoint(2)
    planted = [step.with_name(f".tmp-{step.name}"), step, run.checkpoint(1)]  # the save's temporary and final
    for link in planted:                                                        # names, and an "old" checkpoint
        link.symlink_to(victim, target_is_directory=True)
    saved = save_checkpoint(Accelerator(cpu=True), run, TrainState(step=2), keep=1)
    assert saved == step and not step.is_symlink() and (step / STATE_NAME).is_file()
    assert sorted(os.listdir(run.checkpoints)) == [step.name]  # the links went, the oldest pruned as a link
    assert sorted(os.listdir(victim)) == [STATE_NAME] and (victim / STATE_NAME).read_text() == "{}"


def test_the_state_round_trips():  # a checkpoint of version 0.1: train/test_version_0_1.py
    state = TrainState(step=7, epoch=1, best_macro_f1=0.5, best={"epoch": 1}, last_validation={"accuracy": 0.5},
                       train_seconds=2.5, layout={"processes": 1})
    assert TrainState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_provenance_names_the_code_libraries_and_machine():
    found = provenance(device="1 x cpu", precision="no", processes=1)
    for key in ("bloodcells_dist", "git_commit", "git_dirty", "python", "torch", "accelerate", "cpu", "time"):
        assert key in found, key
    assert found["device"] == "1 x cpu" and found["processes"] == 1
    assert len(found["git_commit"] or "") in (0, 40)  # a commit hash in a checkout, None in an installed wheel
    assert all(line.startswith("# ") for line in comment_block(found).splitlines())
