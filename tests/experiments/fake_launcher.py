"""Stands in for `python -m scripts.local_federation` in the grid tests: same command line, and it
writes a finished run directory at once (or, for a cell named in --fail-on, half of one and exits 1).

    python -m tests.experiments.fake_launcher --calls FILE [--fail-on METHOD/seedN] --config ... --run-dir ... k=v
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.config import RunConfig, parse_overrides
from tests.experiments.runs import round_line, summary_of, write_run


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", required=True, help="append '<run-dir> <argv>' here, one line per call")
    parser.add_argument("--fail-on", action="append", default=[], help="run dirs ending like this fail")
    parser.add_argument("--no-summary", action="store_true", help="exit 0 without writing summary.json")
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--tiny-model", action="store_true")
    parser.add_argument("--devices")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with open(args.calls, "a") as calls:
        calls.write(f"{args.run_dir} {' '.join(sys.argv[1:])}\n")
    config = RunConfig.load(args.config, parse_overrides(args.overrides)).to_flat()
    method, seed, rounds = config["method"], config["seed"], config["num_rounds"]
    # Accuracy grows with the round and differs per seed, so every run's numbers are its own.
    lines = [round_line(r, method, accuracy=0.5 + 0.01 * r + 0.001 * (seed % 10)) for r in range(1, rounds + 1)]
    run_dir = Path(args.run_dir)
    if any(args.run_dir.endswith(pattern) for pattern in args.fail_on):
        write_run(run_dir, config, lines[:1])   # one round committed, then "crashed"
        print("fake launcher: failing as asked", flush=True)
        return 1
    write_run(run_dir, config, lines, None if args.no_summary else summary_of(lines))
    print(f"round {rounds}  acc {lines[-1]['accuracy']:.4f}", flush=True)
    print(run_dir, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
