"""What a command pays before it does anything: the import of its module, against importing torch alone (the
floor: every command but pack needs torch) and torch with torchvision (what the data path imported before).
Every rank, every `evaluate`, `predict` and `export`, and every command a test starts pays it.

    python benchmarks/bench_startup.py [--repeats 5]    # writes the "startup" section of results/speed.json

Each figure is the median wall time of `python -c "import MODULE"` in a fresh process, the modules taken in turn
so that a noisy machine spreads its noise over all of them. A training process imports torch._dynamo later, when
its optimizer first runs (torch.optim does), so its start is the trainer's figure plus that import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from record import REPO, record

MODULES = {  # key (as results/speed.json's startup section and docs/speed.md name it): the modules imported
    "torch": "torch",  # the floor
    "torch+torchvision": "torch, torchvision",  # what the data path imported before
    "pack": "bloodcells_dist.pack.shards",
    "evaluate": "bloodcells_dist.tools.evaluate",
    "predict": "bloodcells_dist.tools.predict",
    "train": "bloodcells_dist.train.trainer",  # before its optimizer imports torch._dynamo
    "torch+dynamo": "torch, torch._dynamo",  # what a training process imports once its optimizer runs
}


def seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=REPO)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for module in MODULES.values():  # once unmeasured: the files in the page cache, as on a second run
        seconds(module)
    times: dict[str, list[float]] = {name: [] for name in MODULES}
    for _ in range(args.repeats):
        for name, module in MODULES.items():
            times[name].append(seconds(module))
    figures = {name: {"seconds": round(statistics.median(t), 2), "runs": [round(x, 2) for x in t]}
               for name, t in times.items()}
    for name, f in figures.items():
        print(f"{f['seconds']:6.2f} s  {name}")
    path = record("speed", "startup", {"imports": figures}, command=f"python benchmarks/bench_startup.py "
                  f"--repeats {args.repeats}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
