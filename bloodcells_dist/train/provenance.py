"""Where a figure came from: the code (git commit, dirty or not), the library versions, the machine."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .. import __version__

LIBRARIES = ("torch", "accelerate", "webdataset", "simplejpeg", "numpy", "huggingface_hub")
PACKAGE = Path(__file__).resolve().parents[1]


def git_state() -> dict:
    """The commit of the checkout this package runs from and whether its tracked files differ from it; None for
    both where the package is not in a git checkout (an installed wheel)."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(PACKAGE), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def provenance(*, device: str = "", precision: str = "", processes: int | None = None) -> dict:
    """Code, libraries and machine of this process, as JSON-ready data."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    found: dict[str, object] = {"bloodcells_dist": __version__, **git_state(), "python": sys.version.split()[0], **versions,
             "host": platform.node(), "platform": platform.platform(), "cpu": cpu_name(),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    found.update({k: v for k, v in (("device", device), ("precision", precision), ("processes", processes)) if v})
    return found


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


def comment_block(found: dict) -> str:
    """The provenance as YAML comment lines (a run's config.yaml starts with them and stays a usable recipe)."""
    return "".join(f"# {key}: {value}\n" for key, value in found.items())
