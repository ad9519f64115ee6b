"""Keep a grid's results small enough to commit, and continue a grid from them.

``python -m experiments.archive SOURCE TARGET`` copies, for every completed run under SOURCE (summary.json
says ``completed``), the files that hold its results and its configuration (``ARCHIVED_FILES``: a few
kilobytes; not the adapters, checkpoints or logs) to the same relative path under TARGET. Runs already
in TARGET are left alone. Both directions are useful:

    python -m experiments.archive runs/cpu_grid docs/results/cpu_grid/runs   # keep finished cells in git
    python -m experiments.archive docs/results/cpu_grid/runs runs/cpu_grid   # continue the grid elsewhere

The grid (experiments/run_grid.py) counts an archived cell as finished, so ``make experiment`` then runs
only the rest, and ``make report RUNS=docs/results/cpu_grid/runs`` rebuilds the report from git alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ARCHIVED_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "run.json", "partition_stats.json")
"""What a run's results are: its configuration, every round's metrics line, its summary, its id, its split."""


def completed_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` whose summary.json says the run completed."""
    runs = []
    for summary in sorted(root.rglob("summary.json")):
        try:
            if json.loads(summary.read_text()).get("status") == "completed":
                runs.append(summary.parent)
        except (OSError, json.JSONDecodeError):
            continue
    return runs


def archive(source: Path, target: Path) -> tuple[list[Path], list[Path]]:
    """Copy each completed run's ARCHIVED_FILES from ``source`` to ``target``; returns (copied, already there)."""
    if not source.is_dir():
        raise ValueError(f"{source} is not a directory of runs; give the grid's output_root, e.g. runs/cpu_grid")
    copied, present = [], []
    for run in completed_runs(source):
        relative = run.relative_to(source)
        destination = target / relative
        if (destination / "summary.json").exists():
            present.append(relative)
            continue
        destination.mkdir(parents=True, exist_ok=True)
        for name in ARCHIVED_FILES:
            if (run / name).exists():
                shutil.copy2(run / name, destination / name)
        copied.append(relative)
    return copied, present


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.archive", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="directory of runs (a grid's output_root, or an archive)")
    parser.add_argument("target", type=Path, help="where the runs' result files go (same relative paths)")
    args = parser.parse_args(argv)
    try:
        copied, present = archive(args.source, args.target)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for relative in copied:
        print(f"copied {relative}")
    print(f"{len(copied)} runs copied to {args.target}, {len(present)} already there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
