"""A lost node: one machine of a two-machine run vanishes (its launcher and its rank at once, as when the host dies
or is preempted without warning). The other machine ends within collective_timeout naming the lost rank, and the
run resumes on the machine that is left, to its planned end."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from ..helpers import ACCELERATE, REPO, free_port, run_cli, train_args


@pytest.mark.e2e
def test_a_lost_machine_ends_the_run_naming_its_rank_and_the_run_resumes_on_the_machine_left(synthetic_shards,
                                                                                             tmp_path):
    run = tmp_path / "run"
    args = train_args(synthetic_shards, run, "--epochs", "2", "--workers", "0", "--checkpoint-every", "4",
                      "--collective-timeout", "20", "--val-split", "")
    common = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "--rdzv_backend", "static", "--same_network"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "BLOODCELLS_AT_STEP": "6:pause:1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    # Machine 0's output goes to files (a pipe nobody reads while we watch machine 1 could fill and stall it);
    # machine 1's stdout is read for the hook's line.
    logs = [(tmp_path / "machine0.out").open("w+"), (tmp_path / "machine0.err").open("w+")]
    machines = [subprocess.Popen([ACCELERATE, "launch", *common, "--machine_rank", str(r), *args], cwd=REPO, env=env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE if r else logs[0],
                                 stderr=subprocess.DEVNULL if r else logs[1], text=True, start_new_session=True)
                for r in (0, 1)]
    try:
        # Machine 1's rank stops after step 6 (the hook: it says so and waits); then the whole machine goes,
        # launcher included, with no chance to say anything.
        for line in machines[1].stdout:
            if line.startswith("paused at step 6"):
                break
        else:
            raise AssertionError("machine 1 ended before step 6")
        os.killpg(machines[1].pid, signal.SIGKILL)
        machines[1].wait(timeout=60)
        machines[0].wait(timeout=300)
        err = (tmp_path / "machine0.err").read_text()
    finally:
        for m in machines:
            if m.poll() is None:
                os.killpg(m.pid, signal.SIGKILL)
                m.communicate()
    assert machines[0].returncode != 0
    assert "error: lost contact with another process of this run: rank 1" in err, err[-3000:]
    assert f"--resume {run}" in err
    # The machine that is left resumes the run alone (a world-size change, 2 -> 1) and ends it as planned.
    proc = run_cli("-m", "bloodcells_dist.train", "--resume", str(run), check=True)
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'}" in proc.stdout
    final = json.loads((run / "final.json").read_text())
    assert final["finished"] and final["epochs"] == 2 and final["processes"] == 1
