"""Helpers the tests share: small real images and source folders, command lines run in-process or as a user runs
them, the launcher, the tiny model's arguments, and the checks of an error line and of a page. Fixtures live in
conftest.py; no test module imports another."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcells_dist.cli import run_main
from bloodcells_dist.pack.synthetic import TRUTH_NAME

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "blood-cells"
REAL_TRAIN = REAL_DATA / "dataset2-master" / "dataset2-master" / "images" / "TRAIN"


def completed(argv: list[str], env: dict | None, timeout: float) -> subprocess.CompletedProcess:
    """Run argv to completion in its own process group. On timeout every Python process of the group (ranks,
    data workers, the launcher) dumps its threads' stacks (faulthandler, on SIGABRT) into the error, then the
    whole group is killed: a hang is diagnosed, and leaves no orphan rank behind to slow the next tests."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGABRT)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stdout, stderr = "", ""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{argv[1:6]}... still running after {timeout:.0f} s; its stacks:\n"
                             f"stdout:\n{(stdout or '')[-3000:]}\nstderr:\n{(stderr or '')[-12000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def run_cli(*args: str, check: bool = False, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or any argv) the way a user would; returns the completed process."""
    proc = completed([sys.executable, *args], env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def cli(main, *argv: str, check: bool = False) -> subprocess.CompletedProcess:
    """A command's main() run in-process, as `run_main` runs it for a user: exit code and captured output.
    (The fast layer's stand-in for a subprocess: the same code path, without starting Python and torch anew.)"""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(main, list(argv))
    proc = subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{argv} exited {code}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    """A free TCP port on loopback for a launcher rendezvous, below the kernel's ephemeral range: a port from
    that range can be handed to another process's outgoing connection before the launcher binds it, or (in a
    client retrying before the server listens) connect a socket to itself."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.Random().sample(range(15000, max(low, 15001)), k=min(200, max(low - 15000, 1))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = "<free port>"  # in launch()'s argv: a fresh free_port() for each attempt


def launch(*args: str, env: dict | None = None, check: bool = True, timeout: float = 240) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` as a user types it. The launcher (torchrun's static rendezvous) binds the port it is
    given itself and takes no bound socket, so a port from free_port() can still be taken in between: where ARGS
    hold PORT, a launch whose rendezvous found its port in use (nothing trained yet) is retried on another."""
    for _ in range(3):
        port = str(free_port())
        proc = completed([ACCELERATE, "launch", *(port if a == PORT else a for a in args)], env, timeout)
        stolen = proc.returncode != 0 and PORT in args and re.search(r"EADDRINUSE|address already in use",
                                                                      proc.stderr, flags=re.I)
        if not stolen:
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"accelerate launch exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def stopped_and_resumed(train, config, stop_at: int, monkeypatch) -> dict:
    """Train `config` until the step hook stops it at `stop_at`, then resume it to the end: the resumed result."""
    monkeypatch.setenv("BLOODCELLS_AT_STEP", f"{stop_at}:stop")
    assert train(config)["stopped"]
    monkeypatch.delenv("BLOODCELLS_AT_STEP")
    return train(config, resume=Path(config.output_dir))


def true_cells(root: Path, mapping: Path) -> Path:
    """The generator's truth (path, cell) written as a cell mapping (path, class, cell, sha256)."""
    with open(root / TRUTH_NAME, newline="") as f:
        rows = [row for row in csv.DictReader(f) if "/TRAIN/" in row["path"]]
    with open(mapping, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "cell", "sha256"])
        for row in rows:
            name = row["path"].split("/")[-2]
            sha = hashlib.sha256((root / row["path"]).read_bytes()).hexdigest()
            writer.writerow([row["path"], name, f"{name}/{row['cell'].replace('/', '-')}", sha])
    return mapping


# A narrow model on 48x64 images: seconds per epoch on two CPU cores. fp32 whatever the CPU, so that runs
# compare exactly (`auto` would pick bf16 on CPUs with native bf16).
TINY = ["--image-size", "48,64", "--widths", "8,16,32,32", "--hidden", "64,32", "--batch-size", "8",
        "--tracker", "none", "--log-every", "5", "--mixed-precision", "no"]

# The reference run: one process, two data workers, mid-epoch checkpoints every 7 steps.
REF_EXTRA = ["--epochs", "8", "--workers", "2", "--checkpoint-every", "7", "--lr", "0.02", "--batch-size", "16"]

# A refused run: if it started anyway, it would end in seconds.
TINY_CPU = ["--epochs", "1", "--image-size", "24,32", "--widths", "4,4,4,4", "--hidden", "8,8", "--batch-size", "4",
            "--workers", "0", "--tracker", "none"]


def train_args(shards: Path, run: Path, *extra: str) -> list[str]:
    """`-m bloodcells_dist.train` arguments for a tiny model."""
    return ["-m", "bloodcells_dist.train", "--shards", str(shards), "--output-dir", str(run), *TINY, *extra]


def jpeg(seed: int, size: tuple[int, int] = (32, 24), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A small real image (smooth gradient plus noise) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[:h, :w]
    pixels = np.stack([(x * 255 // max(w - 1, 1) + rng.integers(0, 40, (h, w))) % 256, (y * 255 // max(h - 1, 1)) % 256,
                       rng.integers(0, 256, (h, w))], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    image.convert(mode).save(buf, fmt, quality=90)
    return buf.getvalue()


def make_root(root: Path, files: dict[str, bytes | None]) -> Path:
    """Files (relative path -> bytes; None makes a folder) under `root`."""
    for rel, data in files.items():
        path = root / rel
        if data is None:
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


def one_error_line(stderr: str, *needles: str) -> str:
    """The last stderr line is the one `error:` line (progress bars may come before), with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    assert line.startswith("error: "), stderr[-3000:]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def refused(main, argv, *needles: str, capsys) -> str:
    """Run a command line in-process: exit code 2 and one `error:` line holding the needles, no traceback."""
    assert run_main(main, argv) == 2
    return one_error_line(capsys.readouterr().err, *needles)


class PageParser(HTMLParser):
    """What a test checks of a page: images, links, anchors, figures, scripts, and the visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.sections: list[str] = []
        self.figures: dict[str, int] = {}  # section id -> figures in it
        self.scripts = 0
        self.text: list[str] = []
        self.section = ""

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self.section = a["id"]
            self.sections.append(a["id"])
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "figure":
            self.figures[self.section] = self.figures.get(self.section, 0) + 1
        elif tag in ("script", "link", "iframe"):
            self.scripts += 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text())
    return parser


def assert_self_contained(page: PageParser) -> None:
    """Offline: every image embedded, every link an anchor of the page itself, no script."""
    assert page.scripts == 0
    assert page.images and all(src.startswith("data:image/") and len(src) > 200 for src in page.images)
    assert all(href.startswith("#") and href[1:] in page.ids for href in page.links), \
        [h for h in page.links if h[1:] not in page.ids][:3]
