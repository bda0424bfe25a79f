"""The audit and grouping figures the README and docs/data.md quote, read from a packed shards folder's
manifest.json and audit.json (what `bloodcells pack` recorded), into one section of results/audit.json.

    python scripts/audit_figures.py --shards SHARDS --name NAME [--out results/audit.json]

Cheap: it reads two JSON files, it does not re-run the audit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def audit_figures(shards: Path) -> dict:
    """Counts of the audit (files, unreadable, duplicates, exclusions) and the groups measurement of one pack."""
    manifest = json.loads((shards / "manifest.json").read_text())
    audit = json.loads((shards / "audit.json").read_text())
    groups = manifest["groups"]
    measured = groups.get("measured") or {}
    duplicates = audit["exact_duplicates"]
    return {
        "source": audit["source"], "layout": audit["layout"], "classes": len(audit["classes"]),
        "files": audit["files"], "readable_images": audit["readable_images"], "unreadable": len(audit["unreadable"]),
        "exact_duplicate_sets": {k: duplicates[k] for k in ("within_class", "across_classes", "across_splits")},
        "near_duplicate_pairs": audit["near_duplicates"]["pairs"],
        "excluded": len(audit["excluded"]),
        "packed": {name: split["samples"] for name, split in manifest["splits"].items()},
        "groups": {"method": groups["method"], "chosen_by": manifest["args"]["groups"],
                   "copy_share": measured.get("share"), "sampled": measured.get("sampled"),
                   "with_near_copy": measured.get("with_near_copy"), "threshold": measured.get("threshold"),
                   "per_class": measured.get("per_class")},
        "pack_args": manifest["args"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--name", required=True, help="the section of results/audit.json (e.g. pbc, blood-cells)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "audit.json")
    args = parser.parse_args()
    figures = audit_figures(args.shards)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    packed_on = time.strftime("%Y-%m-%d", time.gmtime((args.shards / "manifest.json").stat().st_mtime))
    tool = json.loads((args.shards / "manifest.json").read_text()).get("tool_version")
    # The manifest names the package version, not the commit that packed it: no commit is claimed.
    figures["provenance"] = {"commit": None, "date": packed_on, "machine": "-", "precision": "-",
                             "note": f"read from {args.shards}/manifest.json and audit.json (packed {packed_on} by "
                                     f"bloodcells_dist {tool}; the manifest does not record the commit)",
                             "read_by": f"scripts/audit_figures.py at {commit}"}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result[args.name] = figures
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.name}: {json.dumps({k: figures[k] for k in ('files', 'unreadable', 'excluded', 'groups')})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
