"""Does fine-tuning cost more per epoch than training from scratch? The same shards, the same network and steps:
best.yaml from random weights against bloodcells-finetune.yaml from a source model (bn_refit, features_lr), and
the same with the feature layers frozen for the whole run (freeze_epochs), interleaved round by round so that the
load of a shared machine falls on all of them alike. Records seconds per step (training steps only) and the whole
wall time of each command (start-up, cache load and bn_refit included) in results/speed.json, section
"finetune".

    nice -n 5 python benchmarks/bench_finetune.py --shards SHARDS --init-from runs/pbc-pretrain \
        [--fraction 0.1] [--epochs 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import record  # noqa: E402  (benchmarks/record.py, beside this script)


def variants(init_from: str) -> dict[str, list[str]]:
    finetune = ["--config", "launch/recipes/bloodcells-finetune.yaml", "--init-from", init_from]
    return {"scratch (best.yaml)": ["--config", "launch/recipes/best.yaml"],
            "fine-tune (bloodcells-finetune.yaml)": finetune,
            "fine-tune, features frozen": [*finetune, "--freeze-epochs", "EPOCHS"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True)
    parser.add_argument("--init-from", required=True)
    parser.add_argument("--fraction", type=float, default=0.1, help="train_fraction: a short epoch, same per step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    found: dict[str, dict[str, list[float]]] = {name: {"step_s": [], "wall_s": []} for name in variants("")}
    common = ["--train-splits", "train", "--val-split", "", "--train-fraction", str(args.fraction), "--epochs",
              str(args.epochs), "--tracker", "none", "--overwrite", "--eval-every", "1000"]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, extra in variants(args.init_from).items():
                run = Path(tmp) / f"{round_}-{list(found).index(name)}"
                command = [sys.executable, "-m", "bloodcells_dist.train", "--shards", args.shards, "--output-dir",
                           str(run), *[str(args.epochs) if a == "EPOCHS" else a for a in extra], *common]
                started = time.perf_counter()
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
                final = json.loads((run / "final.json").read_text())
                found[name]["wall_s"].append(time.perf_counter() - started)
                found[name]["step_s"].append(final["train_seconds"] / final["steps"])
                print(f"round {round_}: {name}: {found[name]['step_s'][-1]:.3f} s/step, "
                      f"{found[name]['wall_s'][-1]:.0f} s in all", flush=True)
    scratch = statistics.median(found["scratch (best.yaml)"]["step_s"])
    rows = [{"variant": name, "seconds_per_step": round(statistics.median(v["step_s"]), 4),
             "wall_seconds": round(statistics.median(v["wall_s"]), 1),
             "per_step_vs_scratch": round(statistics.median(v["step_s"]) / scratch, 3)} for name, v in found.items()]
    for row in rows:
        print(f"{row['variant']}: {row['seconds_per_step']:.3f} s/step ({row['per_step_vs_scratch']:.2f} x scratch), "
              f"{row['wall_seconds']:.0f} s a command")
    record("speed", "finetune", {"rows": rows, "rounds": args.rounds, "epochs": args.epochs,
                                 "train_fraction": args.fraction},
           command="python benchmarks/bench_finetune.py " + shlex.join(sys.argv[1:]), precision="auto")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
