"""One table over every benchmark's last result: benchmark, measured, target, met.

    python -m bench.summary                  # reads runs/bench/
    python -m bench.summary --dir DIR

Each benchmark leaves its final JSON object in DIR: bench.transport, bench.round_overhead and bench.scale
write DIR/<name>.json; ``make bench`` tees the others' output to DIR/<name>.log, whose last JSON line is
read. A benchmark without a result (not run, or it failed before its last line) is listed as such, and the
exit code is 1 then. ``make bench`` runs this last.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

Row = tuple[str, str, str, str]     # benchmark, measured, target, met


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "NOT met")


def _math(r: dict) -> list[Row]:
    k10 = r.get("aggregation_k10", {}).get("speedup")
    step = r.get("regularizer_step_speedup")
    return [("math: regularizer fwd+bwd (P1)",
             f"{r['regularizer_speedup']:.0f}x dense" + (f" ({step:.0f}x per step)" if step else ""), ">= 100x",
             _met(r["regularizer_speedup"] >= 100)),
            ("math: aggregation K=10 (P2)", f"{k10:.0f}x dense" if k10 else "?", ">= 300x",
             _met(k10 >= 300 if k10 else None))]


def _soak(r: dict) -> list[Row]:
    growth = max(r.get("rss_growth") or 0, r.get("rss_growth_peak_final") or 0)
    return [("soak: coordinator RSS growth", f"{100 * growth:+.1f}%", "< +10%", _met(growth < 0.10))]


def _distributed(r: dict) -> list[Row]:
    if "skipped" in r:
        return [("distributed client", f"skipped: {r['skipped']}", "-", "n/a")]
    return [("distributed client (2 ranks)", f"{r.get('speedup_vs_1_thread', 0):.2f}x one process", "-", "n/a")]


def _transport(r: dict) -> list[Row]:
    rows = []
    for size in r["sizes"]:
        rows.append((f"transport (P3) {size['payload_bytes'] / 1e6:.1f} MB",
                     f"{size['project']['round_trip_mb_s']:.0f} vs {size['raw']['round_trip_mb_s']:.0f} MB/s: "
                     f"{size['ratio']:.2f}", f">= {r['target']} of raw", _met(size["ratio"] >= r["target"])))
    return rows


def _round_overhead(r: dict) -> list[Row]:
    def less(m: dict) -> str:
        return f" ({m['ratio_less_aggregation']:.1f}x less the aggregation)" if "ratio_less_aggregation" in m else ""

    return [(f"round overhead (P4) {method}", f"{m['round_wall_s']:.2f} s vs echo {m['echo_s']:.2f} s: "
             f"{m['ratio']:.1f}x{less(m)}", f"<= {r['target']}x echo", _met(m["ratio"] <= r["target"]))
            for method, m in r["methods"].items()]


def _scale(r: dict) -> list[Row]:
    rows = []
    for k in r["results"]:
        rows.append((f"scale (P5) K={k['k']} m={k['sampled']}",
                     f"join {k['join_s']:.1f} s, round {k['round_wall_s']:.2f} s, idle CPU "
                     f"{k['idle_cpu_percent']:.0f}%, RSS peak {k['rss_peak_mb']:.0f} MB", "-", "n/a"))
    if r.get("quick") and r["max_clients_held"] < r["target_clients"]:     # quick mode stops below the target
        rows.append(("scale (P5) clients held", f"{r['max_clients_held']} (--quick: not tried at "
                     f"{r['target_clients']})", f">= {r['target_clients']}", "n/a"))
    else:
        rows.append(("scale (P5) clients held", str(r["max_clients_held"]), f">= {r['target_clients']}",
                     _met(r["met"])))
    return rows


def _client_overhead(r: dict) -> list[Row]:
    return [(f"client step vs bare PEFT (P7) {method}", f"{r[method]['ratio']:.3f}", f">= {r[method]['target']}",
             _met(r[method]["meets_target"])) for method in ("fedavg", "subspace_reg") if method in r]


def _client_memory(r: dict) -> list[Row]:
    return [("client peak RSS (default config)", f"{r['peak_rss_mb']:.0f} MB (idle {r['idle_rss_mb']:.0f} MB)"
             + (" --quick" if r.get("mode") == "quick" else ""), f"<= {r['target_mb']:.0f} MB", _met(r["peak_ok"]))]


def _generic(name: str) -> Callable[[dict], list[Row]]:
    def rows(r: dict) -> list[Row]:
        measured = next((f"{r[key]:.3g}" for key in ("ratio", "ratio_min", "ratio_max") if key in r), "see JSON")
        return [(name, measured, str(r.get("target", "-")), _met(r.get("met")))]
    return rows


KNOWN: dict[str, Callable[[dict], list[Row]]] = {
    "math": _math, "soak": _soak, "distributed": _distributed, "transport": _transport,
    "round_overhead": _round_overhead, "scale": _scale, "client_overhead": _client_overhead,
    "client_memory": _client_memory,
}


def last_result(directory: Path, name: str) -> dict[str, Any] | None:
    """DIR/<name>.json, else the last line of DIR/<name>.log that parses as a JSON object."""
    for path in (directory / f"{name}.json", directory / f"{name}.log"):
        if not path.exists():
            continue
        for line in reversed(path.read_text(errors="replace").splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    continue
        if path.suffix == ".json":
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
    return None


def table(directory: Path, names: list[str]) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    missing: list[str] = []
    for name in names:
        result = last_result(directory, name)
        if result is None:
            missing.append(name)
            rows.append((name, "no result (not run, or failed before its last line)", "-", "-"))
            continue
        try:
            rows.extend(KNOWN.get(name, _generic(name))(result))
        except (KeyError, TypeError, ValueError) as error:
            rows.append((name, f"unreadable result ({error!r})", "-", "-"))
            missing.append(name)
    return rows, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=str(RESULTS_DIR), help=f"where the results are (default: {RESULTS_DIR})")
    parser.add_argument("--only", default=None, help="comma-separated benchmark names (default: every one found "
                                                     "plus the known ones)")
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    found = sorted({p.stem for p in directory.glob("*.json")} | {p.stem for p in directory.glob("*.log")})
    names = args.only.split(",") if args.only else list(dict.fromkeys([*KNOWN, *found]))
    rows, missing = table(directory, names)
    header = ("benchmark", "measured", "target", "met")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
