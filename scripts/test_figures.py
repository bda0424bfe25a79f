"""The test suite's size and time, for the README: read from a pytest run's JUnit XML into results/tests.json.

    python -m pytest --junitxml=/tmp/all.xml                       # or make test, with PYTEST_ADDOPTS
    python scripts/test_figures.py --junit /tmp/all.xml --layer all --command "make test" [--note "..."]
    python -m pytest -m "not e2e" --junitxml=/tmp/fast.xml
    python scripts/test_figures.py --junit /tmp/fast.xml --layer fast --command "make test-fast"
    (--commit REV names the clean commit the tests ran at, e.g. a clean clone's, when the checkout has moved on)

One section per layer (all, fast), each with the provenance of the machine that ran it; the README renders them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def junit_counts(path: Path) -> dict:
    """Tests, passed, skipped, failed (errors included) and wall seconds of a JUnit XML report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "skipped", "failures", "errors")}
    failed = count["failures"] + count["errors"]
    return {"tests": count["tests"], "passed": count["tests"] - count["skipped"] - failed,
            "skipped": count["skipped"], "failed": failed,
            "seconds": round(sum(float(s.get("time", 0)) for s in suites))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--junit", type=Path, required=True)
    parser.add_argument("--layer", required=True, help="the section: all (make test) or fast (make test-fast)")
    parser.add_argument("--command", required=True, help="what ran the tests, as the README should show it")
    parser.add_argument("--note", default="", help="what else the machine was doing, if anything")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "tests.json")
    parser.add_argument("--commit", help="the clean commit the tests ran at, when it is not this checkout's HEAD")
    args = parser.parse_args()
    from record import run_provenance

    found = run_provenance() | ({"note": args.note} if args.note else {})
    if args.commit:  # the tests ran at another commit than this checkout's (a clean clone, an earlier HEAD)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{args.commit}^{{commit}}"],
                                capture_output=True, text=True, check=True).stdout.strip()
        found.update(git_commit=commit, commit=commit, git_dirty=False)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.setdefault("runs", {})[args.layer] = {"command": args.command, **junit_counts(args.junit),
                                                 "provenance": found}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.layer}: {json.dumps({k: v for k, v in result['runs'][args.layer].items() if k != 'provenance'})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
