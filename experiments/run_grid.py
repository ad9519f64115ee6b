"""Run every cell of an experiment grid as a real federation, one after the other, then the report.

    python -m experiments --grid configs/grid_cpu.yaml [--dry-run] [--only method=fedavg,svd] [--keep-going]

Each cell is one `python -m scripts.local_federation` process (a coordinator and its client
processes over gRPC) writing <output_root>/<model>/<method>/seed<seed>/. A cell whose directory
already holds a completed run (summary.json with status "completed" and one metrics line per
round) is skipped, so an interrupted grid continues where it stopped. A cell left unfinished is
moved aside to <output_root>/.incomplete/ (kept for its logs) and run again from round 1: the
launcher has no resume, and a fresh run from the same seed is the simplest result that is
certainly the cell's own.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml

from experiments.grid import Cell, GridConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAUNCHER: tuple[str, ...] = (sys.executable, "-m", "scripts.local_federation")
ONLY_KEYS = ("model", "method", "seed")


@dataclass(frozen=True)
class CellState:
    finished: bool
    reason: str
    """Why the cell is not finished ('' when it is, or when nothing was run yet)."""
    exists: bool


def cell_state(cell: Cell) -> CellState:
    """Finished = summary.json says completed, metrics.jsonl has num_rounds lines, config.yaml is this cell's."""
    directory = cell.run_dir
    if not directory.exists():
        return CellState(False, "", exists=False)
    summary_path = directory / "summary.json"
    if not summary_path.exists():
        return CellState(False, "no summary.json (the run did not end)", exists=True)
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return CellState(False, f"summary.json unreadable ({error})", exists=True)
    if summary.get("status") != "completed":
        return CellState(False, f"summary.json has status {summary.get('status')!r}", exists=True)
    metrics_path = directory / "metrics.jsonl"
    rounds = len([line for line in metrics_path.read_text().splitlines() if line.strip()]) \
        if metrics_path.exists() else 0
    if rounds != cell.num_rounds:
        return CellState(False, f"metrics.jsonl has {rounds} of {cell.num_rounds} rounds", exists=True)
    config_path = directory / "config.yaml"
    try:
        stored = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        return CellState(False, f"config.yaml unreadable ({error})", exists=True)
    for key, value in cell.expected.items():
        if stored.get(key) != value:
            return CellState(False, f"config.yaml has {key}={stored.get(key)!r}, the grid wants {value!r}",
                             exists=True)
    return CellState(True, "", exists=True)


def launcher_command(cell: Cell, launcher: Sequence[str], timeout_s: float, extra_args: Sequence[str] = ()) -> list[str]:
    """The launcher's command line for one cell; overrides are written as the launcher reads them (YAML scalars)."""
    overrides = [f"{key}={value if isinstance(value, str) else json.dumps(value)}"
                 for key, value in cell.overrides.items()]
    # Absolute paths: the launcher runs from the repository root, the grid may be started from elsewhere.
    return [*launcher, "--config", str(cell.config_path.absolute()), "--run-dir", str(cell.run_dir.absolute()),
            "--timeout", f"{timeout_s:g}", *cell.launcher_args, *extra_args, *overrides]


def parse_only(items: Sequence[str], grid: GridConfig) -> dict[str, set[str]]:
    """--only method=fedavg,svd --only seed=42: keep cells matching every key (any of its values)."""
    known = {"model": {m.name for m in grid.models}, "method": set(grid.methods), "seed": {str(s) for s in grid.seeds}}
    selected: dict[str, set[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise ValueError(f"--only {item!r}: expected key=value, e.g. method=fedavg or seed=42,43")
        if key not in ONLY_KEYS:
            nearest = difflib.get_close_matches(key, ONLY_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean {nearest[0]!r}?" if nearest else f"use one of {', '.join(ONLY_KEYS)}"
            raise ValueError(f"--only {item!r}: unknown key {key!r}; {hint}")
        values = {v.strip() for v in raw.split(",") if v.strip()}
        unknown = sorted(values - known[key])
        if unknown:
            raise ValueError(f"--only {item!r}: {', '.join(unknown)} not in the grid's {key}s "
                             f"({', '.join(sorted(known[key]))})")
        selected.setdefault(key, set()).update(values)
    return selected


def _matches(cell: Cell, only: dict[str, set[str]]) -> bool:
    values = {"model": cell.model.name, "method": cell.method, "seed": str(cell.seed)}
    return all(values[key] in allowed for key, allowed in only.items())


def check_selection(grid: GridConfig, only: dict[str, set[str]]) -> None:
    """Every --only value is in the grid, yet together they may match no cell when an entry runs only some
    methods (model=minilm-hetrank with method=fedsvd): say so instead of running an empty grid."""
    if not only or any(_matches(cell, only) for cell in grid.cells()):
        return
    entries = "; ".join(f"{m.name}: {', '.join(grid.methods_of(m))}" for m in grid.models)
    raise ValueError(f"--only selects no cell: no entry runs that combination (methods per entry: {entries})")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _move_aside(cell: Cell, output_root: Path) -> Path:
    """Keep an unfinished run's directory (its logs say why it stopped) out of the report's way."""
    target = output_root / ".incomplete" / cell.model.name / cell.method / \
        f"seed{cell.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name}-{suffix}")
        suffix += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(cell.run_dir), str(target))
    return target


@dataclass
class GridResult:
    finished: list[str] = field(default_factory=list)
    """Cells finished before this invocation (skipped)."""
    ran: list[str] = field(default_factory=list)
    """Cells run to completion by this invocation."""
    failed: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def _run_cell(command: list[str], log_path: Path, say: Callable[[str], None]) -> int:
    """Run the launcher, echo its lines indented and keep them in the run directory's launcher.log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                say("    " + line.rstrip("\n"))
            return process.wait()
        except BaseException:
            # Interrupted: the launcher stops its coordinator and clients on SIGTERM (its finally block).
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            raise


def _say(message: str) -> None:
    print(message, flush=True)   # flushed: progress shows through `| tee` and in CI logs as it happens


def run_grid(grid: GridConfig, launcher: Sequence[str] = DEFAULT_LAUNCHER, only: dict[str, set[str]] | None = None,
             dry_run: bool = False, keep_going: bool = False, extra_launcher_args: Sequence[str] = (),
             say: Callable[[str], None] = _say) -> GridResult:
    """Run the grid's unfinished cells in order; `launcher` is the command that runs one federation."""
    cells = [c for c in grid.cells() if _matches(c, only or {})]
    output_root = Path(grid.output_root)
    total = len(cells)
    result = GridResult()
    started = time.monotonic()
    durations: list[float] = []
    states = {cell.label: cell_state(cell) for cell in cells}
    to_run = sum(1 for cell in cells if not states[cell.label].finished)
    # Counted from the cells, not models x methods x seeds: an entry may run only some methods.
    selected = f"{total} of {len(grid.cells())} cells selected by --only" if only else f"{total} cells"
    say(f"grid: {grid.describe()}, {selected}: {total - to_run} finished, {to_run} to run; output {output_root}")
    for index, cell in enumerate(cells, start=1):
        state = states[cell.label]
        prefix = f"[cell {index}/{total}] {cell.label}"
        command = launcher_command(cell, launcher, grid.cell_timeout_s, extra_launcher_args)
        if state.finished:
            say(f"{prefix}: finished, skipped")
            result.finished.append(cell.label)
            continue
        if dry_run:
            note = f"unfinished ({state.reason}): would move aside and rerun" if state.exists else "would run"
            say(f"{prefix}: {note}\n    {shlex.join(command)}")
            continue
        if state.exists:
            moved = _move_aside(cell, output_root)
            say(f"{prefix}: unfinished ({state.reason}); moved to {moved}, running again")
        elapsed = time.monotonic() - started
        remaining = to_run - len(durations) - len(result.failed)
        eta = (f"ETA {_duration(remaining * sum(durations) / len(durations))} from {len(durations)} cells"
               if durations else "ETA after the first cell")
        say(f"{prefix}: running (grid elapsed {_duration(elapsed)}, {eta})")
        cell_started = time.monotonic()
        try:
            code = _run_cell(command, cell.run_dir / "launcher.log", say)
        except KeyboardInterrupt:
            say(f"{prefix}: interrupted; rerun the same command to continue the grid")
            result.interrupted = True
            return result
        seconds = time.monotonic() - cell_started
        after = cell_state(cell)
        if code == 0 and after.finished:
            durations.append(seconds)
            result.ran.append(cell.label)
            say(f"{prefix}: done in {_duration(seconds)}")
            continue
        why = f"launcher exited {code}" if code != 0 else f"launcher exited 0 but {after.reason or 'no run directory'}"
        result.failed.append(cell.label)
        say(f"{prefix}: FAILED ({why}); see {cell.run_dir / 'launcher.log'} and {cell.run_dir / 'logs'}")
        if not keep_going:
            say("stopping the grid at the first failed cell (--keep-going runs the others); "
                "rerun the same command to continue")
            return result
    if not dry_run:
        say(f"grid: {len(result.finished) + len(result.ran)} of {total} cells finished "
            f"({len(result.ran)} run now, in {_duration(time.monotonic() - started)})"
            + (f"; failed: {', '.join(result.failed)}" if result.failed else ""))
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", required=True, help="grid file (YAML), e.g. configs/grid_cpu.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print each cell's state and command; run nothing")
    parser.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                        help="run only cells with these models / methods / seeds (repeatable), e.g. method=fedavg")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failed cell, run the remaining ones (default: stop at the first failure)")
    parser.add_argument("--devices", metavar="DEV1,DEV2",
                        help="spread each cell's clients over these devices (the launcher's --devices), "
                             "e.g. cuda:0,cuda:1")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, launcher: Sequence[str] = DEFAULT_LAUNCHER) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        grid = GridConfig.load(args.grid)
        only = parse_only(args.only, grid)
        check_selection(grid, only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    extra = ["--devices", args.devices] if args.devices else []
    # SIGTERM (a scheduler, `kill`) ends the grid like Ctrl-C: the running launcher stops its federation.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = run_grid(grid, launcher, only=only, dry_run=args.dry_run, keep_going=args.keep_going,
                          extra_launcher_args=extra)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result.interrupted:
        return 130
    if not args.dry_run and not args.no_report:
        from experiments.report import write_report   # matplotlib only when a report is written

        report = write_report(Path(grid.output_root), grid.report_path)
        print(f"report: {report.summary_md} ({report.num_runs} runs, {len(report.skipped)} skipped)")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
