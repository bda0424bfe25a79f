"""Where a benchmark's figures go: one section of a results/*.json file, with the provenance of the run that
measured them (commit, date, machine and its CPU flags, library versions), so docs/speed.md renders from it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bloodcells_dist.train.precision import cpu_flags as all_cpu_flags  # noqa: E402
from bloodcells_dist.train.provenance import cpu_name, provenance  # noqa: E402

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides bf16 speed on a CPU


def cpu_flags() -> list[str]:
    """The CPU flags of CPU_FLAGS this machine has (Linux; empty elsewhere)."""
    found = all_cpu_flags()
    return [flag for flag in CPU_FLAGS if flag in found]


def machine(device: str = "cpu") -> str:
    """A short name of the machine a figure was measured on, as the docs print it."""
    import torch
    if device.startswith("cuda"):
        return f"1 x {torch.cuda.get_device_name(torch.device(device))}, {os.cpu_count()} CPU cores"
    flags = cpu_flags()
    bf16 = "AVX512-BF16" if "avx512_bf16" in flags else "AMX" if "amx_bf16" in flags else "no AVX512-BF16"
    return f"{os.cpu_count()}-core {cpu_name()} ({bf16})"


def run_provenance(device: str = "cpu", precision: str = "") -> dict:
    """provenance() with what the results tables print: commit, date, machine, CPU flags and precision."""
    found = provenance(device=device, precision=precision)
    found.update(commit=found.get("git_commit"), date=str(found["time"])[:10], machine=machine(device),
                 cpu_flags=cpu_flags(), precision=precision or "-")
    return found


def record(name: str, section: str, figures: dict, *, command: str, device: str = "cpu", precision: str = "",
           run: dict | None = None) -> Path:
    """Write `figures` as `section` of results/NAME.json (other sections kept), with this run's provenance.

    `run` (a dict with a "batch") joins the section's "runs", replacing the one of the same batch, as long as the
    section was recorded at the same commit on the same machine; otherwise the section starts anew.
    """
    path = REPO / "results" / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    found = run_provenance(device, precision)
    entry = {"command": command, **figures}
    if run is not None:
        before = data.get(section, {})
        same = {k: before.get("provenance", {}).get(k) for k in ("commit", "machine")} == \
            {k: found[k] for k in ("commit", "machine")}
        runs = [r for r in before.get("runs", []) if same and r["batch"] != run["batch"]]
        entry["runs"] = sorted([*runs, run], key=lambda r: -r["batch"])
    data[section] = {**entry, "provenance": found}
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded {section} in {path.relative_to(REPO)}")
    return path
