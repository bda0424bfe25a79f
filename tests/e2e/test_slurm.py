"""launch/slurm_multinode.sbatch run as SLURM runs it, on one machine: bash executes the script with the
environment SLURM gives a 2-node job, `srun` starts its step once per node (each with its SLURM_NODEID), and
`scontrol` answers the two questions the script asks. Those two commands are the only stand-ins (this machine
has no SLURM); accelerate launch, the c10d rendezvous, the training processes and the signal are real.

SLURM's `--signal=USR1@180` sends SIGUSR1 to every process of the job step: the per-node launchers (which must
survive it: `trap '' USR1`) and the training processes (which must checkpoint and exit 0). The job then requeues
itself, and the requeued job resumes the run to its end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from ..helpers import ACCELERATE, REPO, free_port

SCRIPT = REPO / "launch" / "slurm_multinode.sbatch"

SRUN = f"""#!{sys.executable}
# srun on one machine: the step's command once per node, SLURM_NODEID 0..SLURM_NNODES-1; task pids to a file.
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
tasks = [subprocess.Popen(args, env={{**os.environ, "SLURM_NODEID": str(n)}})
         for n in range(int(os.environ["SLURM_NNODES"]))]
with open(os.environ["FAKE_SLURM_TASKS"], "w") as f:
    f.write(" ".join(str(t.pid) for t in tasks))
codes = [t.wait() for t in tasks]
sys.exit(next((c for c in codes if c), 0))
"""

SCONTROL = """#!/bin/bash
# scontrol: the node list's first host, and a requeue recorded instead of done
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$FAKE_SLURM_REQUEUED" ;;
  *) echo "scontrol stand-in: unexpected $*" >&2; exit 1 ;;
esac
"""

RECIPE = """image_size: [48, 64]
widths: [8, 16, 32, 32]
hidden: [64, 32]
batch_size: 8
epochs: 4
workers: 0
tracker: none
mixed_precision: "no"
checkpoint_every: 5
"""


def fake_slurm(tmp_path: Path) -> dict:
    """The environment of a 2-node job whose PATH finds the srun and scontrol stand-ins, then accelerate."""
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in {"srun": SRUN, "scontrol": SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": os.pathsep.join([str(bin_dir), str(Path(ACCELERATE).parent), os.environ["PATH"]]),
            "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "node[01-02]",
            "SLURM_JOB_ID": "4242", "MAIN_PORT": str(free_port()), "MAX_RESTARTS": "0", "PYTHONUNBUFFERED": "1",
            "FAKE_SLURM_TASKS": str(tmp_path / "tasks"), "FAKE_SLURM_REQUEUED": str(tmp_path / "requeued"),
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def usr1_to_the_job_step(tasks_file: Path) -> int:
    """What SLURM does at the time limit minus 180 s: SIGUSR1 to every process of the step (each task and all
    its descendants, whatever their process group)."""
    processes = []
    for pid in tasks_file.read_text().split():
        task = psutil.Process(int(pid))
        processes += [task, *task.children(recursive=True)]
    for p in processes:
        try:
            p.send_signal(signal.SIGUSR1)
        except psutil.NoSuchProcess:
            pass
    return len(processes)


@pytest.mark.e2e
def test_the_sbatch_script_checkpoints_on_usr1_requeues_and_the_requeued_job_finishes(synthetic_shards, tmp_path):
    env, run, recipe = fake_slurm(tmp_path), tmp_path / "run", tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    argv = ["bash", str(SCRIPT), str(synthetic_shards), str(run), str(recipe)]

    job = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in job.stdout:  # the first epoch's validation line: two nodes are training
        if line.startswith("epoch 1:"):
            break
    else:
        raise AssertionError(f"the job ended before its first epoch: {job.wait()} {job.stderr.read()[-3000:]}")
    assert usr1_to_the_job_step(tmp_path / "tasks") >= 4  # 2 node tasks, each a launcher and a training process
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]  # the launchers survived the signal; the ranks stopped cleanly
    assert "run not finished (exit status 0): requeueing job 4242" in out
    assert (tmp_path / "requeued").read_text().split() == ["4242"]
    assert not (run / "final.json").exists() and any((run / "checkpoints").iterdir())

    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)  # the requeued job
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints'}" in again.stdout
    assert (run / "final.json").is_file() and "requeueing" not in again.stdout
    assert (tmp_path / "requeued").read_text().split() == ["4242"]  # a finished run is not requeued
