"""Packing throughput: `shards pack` (check + write, 1 and 2 processes) vs `tar -cf` of the same folder.

`tar` is the I/O floor: it copies the bytes and nothing else. Ratios hold on a noisy shared machine;
absolute times do not.

    python benchmarks/bench_pack.py [--src ../shared/blood-cells] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bloodcells_dist.shards import pack_shards
from bloodcells_dist.sources import find_split_folders, scan_images


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Median seconds over repeats for tar and for pack at 1 and 2 workers, as images/s."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", type=Path, default=Path("../shared/blood-cells"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = len(scan_images(args.src)[0])
    folders = [str(p) for p in find_split_folders(args.src).values()]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "tar -cf (I/O floor)": lambda: subprocess.run(["tar", "-cf", f"{tmp}/all.tar", *folders], check=True),
            "pack, 1 process": lambda: pack_shards(args.src, Path(tmp, "w1"), overwrite=True, workers=1),
            "pack, 2 processes": lambda: pack_shards(args.src, Path(tmp, "w2"), overwrite=True, workers=2),
        }
        for fn in runs.values():  # warm the page cache so every variant reads from memory
            fn()
        results = {name: statistics.median(timed(fn) for _ in range(args.repeats)) for name, fn in runs.items()}
    floor = results["tar -cf (I/O floor)"]
    print(f"{n} images from {args.src}, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"{name:<22} {seconds:6.2f} s  {n / seconds:8,.0f} images/s  {seconds / floor:5.1f}x tar's time")


if __name__ == "__main__":
    main()
