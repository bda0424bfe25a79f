"""The trainer at scale, launched for real (e2e): compiled weights, per-rank seeds, preemption and resume, runs
split across machines, a killed peer, and W&B across a resume. Interruptions happen at a step the test names
(BLOODCELLS_AT_STEP), never after a sleep."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bloodcells_dist.data.plan import EpochPlan
from bloodcells_dist.pack.manifest import ShardManifest
from bloodcells_dist.tools import evaluate, export
from bloodcells_dist.tools.cv import fold_command
from bloodcells_dist.train import trainer
from bloodcells_dist.train.precision import detect_hardware

from ..helpers import ACCELERATE, PORT, REPO, cli, free_port, launch, run_cli, train_args


def final(run: Path) -> dict:
    return json.loads((run / "final.json").read_text())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


# --- 2. compiled models -------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_compiled_run_saves_weights_that_evaluate_and_export_load(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    run_cli(*train_args(synthetic_shards, run, "--epochs", "1", "--workers", "1", "--compile", "true"), check=True,
            timeout=900)
    for name in ("best.safetensors", "last.safetensors"):
        assert not [k for k in weights(run / name) if "_orig_mod" in k], f"{name} holds compiled-wrapper keys"
    cli(evaluate.main, "--model", str(run), "--shards", str(synthetic_shards), "--split",
            "test", check=True)
    out = tmp_path / "model.pt"
    cli(export.main, "--model", str(run), "--format", "torchscript", "--out", str(out),
            check=True)
    assert out.is_file()


# --- 3. ranks, 5. preemption and a changed layout: one uninterrupted 2-process run to compare against -------

# Validated on the test split: 99 samples, an odd number, in 6 uneven shards, 3 per rank.
TWO_PROC = ["--epochs", "3", "--workers", "1", "--dropout", "0.5", "--checkpoint-every", "0", "--val-split", "test"]


@pytest.fixture(scope="module")
def two_process_run(synthetic_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("two") / "run"
    launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
           *train_args(synthetic_shards, run, *TWO_PROC), timeout=600)
    return run


@pytest.mark.e2e
def test_two_processes_count_every_validation_sample_once(two_process_run, synthetic_shards):
    test = ShardManifest.load(synthetic_shards).splits["test"]
    assert test.samples % 2 == 1 and len({s.samples for s in test.shards}) > 1
    result = final(two_process_run)
    assert result["processes"] == 2 and result["last_validation"]["samples"] == test.samples
    assert sum(map(sum, result["last_validation"]["confusion_matrix"])) == test.samples
    for c, n in test.samples_per_class.items():
        assert result["last_validation"]["per_class"][c]["support"] == n


@pytest.mark.e2e
def test_ranks_draw_different_dropout_masks(two_process_run):
    """Each rank's random stream, as checkpointed, gives a different dropout mask."""
    masks = []
    for rank in (0, 1):
        states = torch.load(checkpoints(two_process_run)[-1] / f"random_states_{rank}.pkl", weights_only=False)
        generator = torch.Generator().manual_seed(0)
        generator.set_state(states["torch_manual_seed"])
        masks.append(torch.rand(1000, generator=generator) < 0.5)  # what nn.Dropout(0.5) draws next
    assert not torch.equal(masks[0], masks[1]), "both ranks would drop the same units"


@pytest.mark.e2e
def test_sigterm_to_one_rank_checkpoints_exits_0_and_resume_matches(synthetic_shards, two_process_run, tmp_path):
    run = tmp_path / "run"
    steps_per_epoch = final(two_process_run)["steps"] // 3
    # SIGTERM to rank 1 alone, after a step of the second epoch: both ranks must stop at the next step, together.
    proc = launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
                  *train_args(synthetic_shards, run, *TWO_PROC),
                  env={"BLOODCELLS_AT_STEP": f"{steps_per_epoch + 5}:sigterm:1"}, timeout=600)
    assert "stopped by a signal" in proc.stdout and not (run / "final.json").exists()
    stopped = json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())
    assert stopped["step"] == steps_per_epoch + 6

    launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
           "-m", "bloodcells_dist.train", "--resume", str(run), timeout=600)
    ref, got = final(two_process_run), final(run)
    assert got["last_validation"] == ref["last_validation"] and got["best"] == ref["best"]
    assert got["steps"] == ref["steps"]
    a, b = weights(two_process_run / "last.safetensors"), weights(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert got["train_seconds"] > stopped["train_seconds"] > 0


def trained_ids(log: Path) -> list[int]:
    """Every sample id the ranks trained on (BLOODCELLS_SAMPLE_LOG: one file per rank, appended by every sitting)."""
    return [int(n) for f in sorted(log.parent.glob(log.name + ".*")) for n in f.read_text().split()]


@pytest.mark.e2e
@pytest.mark.parametrize("data", ["cache", "stream"])
def test_an_epoch_resumed_on_2_then_1_then_3_processes_trains_on_every_sample_once(synthetic_shards, tmp_path, data):
    """Stopped at step 6 of 20 on 2 processes (2 data workers each), at step 12 on 1, finished on 3 (1 worker):
    the global batch (16) and the steps stay, and the three sittings together train on each sample once."""
    run, log = tmp_path / "run", tmp_path / "ids"
    samples = ShardManifest.load(synthetic_shards).splits["train"].samples
    steps = EpochPlan(samples, 8, 2).steps_per_epoch
    env = {"BLOODCELLS_SAMPLE_LOG": str(log)}
    launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
           *train_args(synthetic_shards, run, "--epochs", "1", "--workers", "2", "--data", data, "--val-split", ""),
           env={**env, "BLOODCELLS_AT_STEP": "5:sigterm:1"})
    assert json.loads((checkpoints(run)[-1] / "trainer_state.json").read_text())["step"] == 6
    one = run_cli("-m", "bloodcells_dist.train", "--resume", str(run), env={**env, "BLOODCELLS_AT_STEP": "11:sigterm"},
                  check=True)
    assert "resumed on 1 process(es) where 2 saved it: global batch 16 kept, grad_accum 1 -> 2" in one.stdout
    three = launch("--multi_gpu", "--num_processes", "3", "--main_process_port", PORT,
                   "-m", "bloodcells_dist.train", "--resume", str(run), "--workers", "1", env=env)
    assert "resumed on 3 process(es) where 1 saved it: global batch 16 kept, grad_accum 2 -> 1" in three.stdout
    assert final(run)["steps"] == steps and final(run)["processes"] == 3
    ids = trained_ids(log)
    assert len(ids) == len(set(ids)) == samples - EpochPlan(samples, 8, 2).remainder  # 308: 0 left out


@pytest.mark.e2e
def test_resume_with_another_batch_size_is_refused(two_process_run, tmp_path):
    """The global batch is what a resume on another number of processes keeps: batch_size itself may not change."""
    run = tmp_path / "run"
    shutil.copytree(two_process_run, run)
    proc = cli(trainer.main, "--resume", str(run), "--batch-size", "4")
    assert proc.returncode == 2 and "cannot resume with batch_size=4: the run was started with 8" in proc.stderr


# --- 4. resume ----------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_resume_into_another_output_dir_is_refused(reference_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    files = {"config.yaml": "epochs: 1\n", "metrics.jsonl": '{"step": 1}\n', "final.json": "{}\n"}
    for name, text in files.items():
        (other / name).write_text(text)
    proc = cli(trainer.main, "--resume", str(reference_run), "--output-dir", str(other))
    assert proc.returncode == 2 and proc.stderr.startswith("error: --resume continues the run in"), proc.stderr
    assert {p.name: p.read_text() for p in other.iterdir()} == files  # untouched


@pytest.mark.e2e
def test_a_kill_between_the_last_step_and_the_epoch_end_is_finished_on_resume(synthetic_shards, tmp_path):
    """Killed after the checkpoint of an epoch's last step, before its validation: resume validates it."""
    run = tmp_path / "run"
    steps_per_epoch = EpochPlan(ShardManifest.load(synthetic_shards).splits["train"].samples, 8, 1).steps_per_epoch
    args = train_args(synthetic_shards, run, "--epochs", "2", "--workers", "1", "--checkpoint-every", str(steps_per_epoch))
    killed = run_cli(*args, env={"BLOODCELLS_AT_STEP": f"{steps_per_epoch}:kill"})
    assert killed.returncode == -signal.SIGKILL
    target = run / "checkpoints" / f"step-{steps_per_epoch:08d}"
    assert checkpoints(run) == [target] and not any("val/accuracy" in r for r in records(run))
    assert json.loads((target / "trainer_state.json").read_text())["train_seconds"] > 0  # the interrupted part
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "train/lo')  # as if killed mid-write

    resumed = cli(trainer.main, "--resume", str(run), check=True)
    assert "unreadable (torn) line" in resumed.stderr  # the torn line does not stop it
    val = [r for r in records(run) if "val/accuracy" in r]
    assert [r["epoch"] for r in val] == [1, 2] and [r["step"] for r in val] == [steps_per_epoch, 2 * steps_per_epoch]
    result = final(run)
    assert (run / "best.safetensors").is_file() and result["best"]["epoch"] in (1, 2)
    assert result["train_seconds"] > json.loads((target / "trainer_state.json").read_text())["train_seconds"]


# --- 5. clusters --------------------------------------------------------------------------------------------

def two_machines(args: list[str], cwds: tuple[Path, Path], env: dict | None = None) -> list[subprocess.Popen]:
    """Machine ranks 0 and 1 on loopback, one process each, each with its own launcher and working folder."""
    common = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(free_port()), "--rdzv_backend", "static", "--same_network"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}), "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return [subprocess.Popen([ACCELERATE, "launch", *common, "--machine_rank", str(r), *args], cwd=cwd, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r, cwd in zip((0, 1), cwds)]


@pytest.mark.e2e
def test_two_machines_without_a_shared_run_folder_stop_with_a_clear_error(synthetic_shards, tmp_path):
    # A relative --output-dir from two different working folders: two machines with their own disks.
    cwds = (tmp_path / "machine0", tmp_path / "machine1")
    for cwd in cwds:
        cwd.mkdir()
    procs = two_machines(train_args(synthetic_shards, Path("run"), "--epochs", "1", "--workers", "1"), cwds)
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode != 0 for p in procs), outs[0][1][-2000:]
    assert "error: the run folder run is not shared: 1 machine(s)" in outs[0][1] + outs[1][1]
    assert not (cwds[0] / "run" / "checkpoints").exists() and not (cwds[1] / "run" / "checkpoints").exists()


@pytest.mark.e2e
def test_a_killed_peer_ends_the_other_process_with_a_clear_message(synthetic_shards, tmp_path):
    run = tmp_path / "run"
    procs = two_machines(train_args(synthetic_shards, run, "--epochs", "20", "--workers", "1", "--collective-timeout",
                                    "20"), (REPO, REPO), env={"BLOODCELLS_AT_STEP": "5:kill:1"})  # SIGKILL after step 5
    _, err = procs[0].communicate(timeout=600)
    procs[1].communicate(timeout=120)
    assert procs[0].returncode != 0
    assert "error: lost contact with another process of this run: rank 1 stopped answering" in err
    assert f"--resume {run}" in err


@pytest.mark.e2e
def test_a_stopped_rank_ends_the_run_within_the_timeout_naming_it(synthetic_shards, tmp_path):
    """SIGSTOP: the rank neither dies nor answers. The collective timeout turns the hang into an error naming it."""
    started = time.monotonic()
    proc = launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
                  *train_args(synthetic_shards, tmp_path / "run", "--epochs", "1", "--workers", "0", "--val-split", "",
                              "--collective-timeout", "15"), env={"BLOODCELLS_AT_STEP": "3:sigstop:1"}, check=False)
    assert proc.returncode != 0
    assert ("error: lost contact with another process of this run: rank 1 stopped answering within "
            "collective_timeout 15 s") in proc.stderr
    assert time.monotonic() - started < 150  # start-up, 15 s, the launcher's grace for the others; not 10 min


# Each group torchrun restarts gets a new store (rank 0 hosts it on a new port), not the launcher's, where the
# previous group's gloo addresses remain and the new ranks may connect to a dead one (docs/training.md).
FRESH_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.e2e
def test_a_killed_rank_under_max_restarts_finishes_like_the_uninterrupted_run(synthetic_shards, two_process_run,
                                                                              tmp_path):
    """`--max_restarts 1` and `--resume auto`: the launcher restarts the group after a SIGKILL, which resumes
    from the last checkpoint (the first epoch's end) to the uninterrupted run's weights, bit for bit."""
    run = tmp_path / "run"
    steps_per_epoch = final(two_process_run)["steps"] // 3
    proc = launch("--config_file", "launch/cpu_2proc.yaml", "--main_process_port", PORT,
                  "--max_restarts", "1", "--monitor_interval", "1", "--rdzv_backend", "c10d",
                  *train_args(synthetic_shards, run, *TWO_PROC, "--resume", "auto", "--collective-timeout", "20"),
                  env={"BLOODCELLS_AT_STEP": f"{steps_per_epoch + 3}:kill:1", **FRESH_STORE}, timeout=600)
    assert f"resumed from {run / 'checkpoints' / f'step-{steps_per_epoch:08d}'}" in proc.stdout
    ref, got = final(two_process_run), final(run)
    assert got["last_validation"] == ref["last_validation"] and got["steps"] == ref["steps"]
    a, b = weights(two_process_run / "last.safetensors"), weights(run / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- 6. W&B and epoch numbering -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_wandb_is_offline_by_default_and_its_run_survives_a_stop_and_resume(synthetic_shards, tmp_path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    env = {"HOME": str(tmp_path), "WANDB_SILENT": "true"}  # no ~/.netrc login and no WANDB_MODE: must be offline
    run = tmp_path / "run"
    steps_per_epoch = EpochPlan(ShardManifest.load(synthetic_shards).splits["train"].samples, 8, 1).steps_per_epoch
    args = train_args(synthetic_shards, run, "--epochs", "2", "--workers", "1", "--tracker", "wandb",
                      "--mixed-precision", "auto")
    stopped = run_cli(*args, env={**env, "BLOODCELLS_AT_STEP": f"{steps_per_epoch + 5}:sigterm"}, check=True)
    assert "stopped by a signal (SIGTERM)" in stopped.stdout
    # The start summary, with what auto chose on this CPU, and after the first epoch an ETA.
    expected = "bf16" if detect_hardware().cpu_native_bf16 else "no"
    assert f"start: 1 x cpu, precision {expected} (auto: the CPU has" in stopped.stdout
    assert "global batch 8" in stopped.stdout and "eta: " in stopped.stdout and "1 epoch(s) left" in stopped.stdout

    resumed = run_cli("-m", "bloodcells_dist.train", "--resume", str(run), env=env, check=True)
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all((d / f"run-{run_id}.wandb").is_file() for d in offline)
    data = (offline[-1] / f"run-{run_id}.wandb").read_bytes()
    for key in (b"train/loss", b"val/accuracy", b"val/precision_NEUTROPHIL", b"val/recall_NEUTROPHIL",
                b"wandb/confusion_matrix/v1"):
        assert key in data, key

    val = [r for r in records(run) if "val/accuracy" in r]
    assert [r["epoch"] for r in val] == [1, 2]
    assert {r["epoch"] for r in records(run) if "train/loss" in r} == {1, 2}
    best = max(val, key=lambda r: r["val/macro_f1"])  # the first of equals, like the trainer
    assert final(run)["best"]["epoch"] == best["epoch"]
    assert "epoch 2: samples" in resumed.stdout


def test_cv_groups_its_folds_in_wandb(tmp_path):
    command = fold_command("", "shards", tmp_path / "cv-best" / "fold-3", 3, None, [])
    assert command[command.index("--wandb-group") + 1] == "cv-best"
