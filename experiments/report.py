"""Tables and plots over a directory of runs: mean +- std over seeds, per model and method.

    python -m experiments.report runs/cpu_grid --out docs/results/cpu_grid [--target-accuracy 0.9]

Reads every run directory below RUNS_ROOT (config.yaml, metrics.jsonl, summary.json, as
server/outputs.py writes them) and writes to --out:

    summary.md     per model: accuracy, convergence (mean accuracy over rounds 1..10, first round at the
                   target accuracy and the megabytes sent by then, megabytes per round), final-round
                   alignment diagnostics, per-seed results and cost (totals and per round), as mean +-
                   sample std over seeds (n shown); skipped runs listed with the reason
    summary.csv    one row per (model, method, metric): n, mean, std, min, max and every seed's value
    <model>_accuracy.png                  accuracy per round per method (mean line, +-1 std band)
    <model>_alignment.png                 basis overlap (and 1 - overlap, log), update-subspace overlap,
                                          cancellation ratio per round
    <model>_final_accuracy_per_seed.png   final accuracy of every seed, per method
    <model>_bytes.png                     megabytes up and down per round per method (base-weight residual
                                          increments dashed, where a method sends them)
    <model>_accuracy_vs_mb.png            accuracy against cumulative megabytes sent (up + down)

Every round axis has whole-number ticks. A grid entry is a "model" here: a scenario such as
minilm-hetrank (the same model with heterogeneous client ranks) gets its own section and plots.

The model of a run is the directory above <method>/seed<N> when runs follow the grid's layout
(<root>/<model>/<method>/seed<N>), else the basename of its config's model_name. An unfinished run or
one missing a key is skipped with a warning line, never a crash: a grid still running can be reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.methods import get_method, method_names
from common.metrics import METRIC_NAMES

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "launcher.log")
"""Any of these marks a run directory; launcher.log alone: a grid cell that has just started."""
DIAGNOSTICS = METRIC_NAMES
"""The final-round diagnostics of summary.json's final_diagnostics (docs/DESIGN.md §5)."""
ACCURACY_METRICS = ("best_accuracy", "mean_last5_accuracy", "final_accuracy", "final_loss")
COST_METRICS = ("total_bytes_up", "total_bytes_down", "total_round_seconds")
REQUIRED_SUMMARY_KEYS = ("status", *ACCURACY_METRICS, "final_diagnostics", *COST_METRICS)
CONVERGENCE_METRICS = ("mean_accuracy_rounds_1_10", "first_round_at_target", "bytes_at_target", "bytes_per_round")
"""Computed from metrics.jsonl (``convergence``): how fast a method learns and what that costs on the wire."""
PER_ROUND_COST_METRICS = ("bytes_up_per_round", "bytes_down_per_round")
"""Mean bytes per round of a run, from metrics.jsonl: comparable across runs of different lengths."""
METRICS = (*ACCURACY_METRICS, *CONVERGENCE_METRICS, *DIAGNOSTICS, *COST_METRICS, *PER_ROUND_COST_METRICS)
"""The CSV's metric names, in table order."""
BYTE_METRICS = frozenset({"total_bytes_up", "total_bytes_down", "bytes_at_target", "bytes_per_round",
                          *PER_ROUND_COST_METRICS})
"""Counted in bytes, shown in MB (10^6 bytes)."""
EARLY_ROUNDS = 10
"""mean_accuracy_rounds_1_10 averages rounds 1..EARLY_ROUNDS: the area under the early accuracy curve."""
DEFAULT_TARGET_ACCURACY = 0.9
"""first_round_at_target: the first round whose accuracy is at least this (--target-accuracy)."""
RESIDUAL_KEY = "residual_bytes_down"
"""metrics.jsonl: bytes of base-weight residual increments sent that round (fedex_lora), already in bytes_down."""

METRIC_LABELS = {
    "best_accuracy": "Best acc.", "mean_last5_accuracy": "Mean of last 5", "final_accuracy": "Final acc.",
    "final_loss": "Final loss", "cancellation_ratio": "Cancellation ratio", "client_global_cosine": "Client-global cos",
    "pairwise_client_cosine": "Pairwise cos", "basis_overlap": "Basis overlap", "basis_overlap_sq": "Basis overlap²",
    "update_subspace_overlap": "Update-subspace overlap", "aggregation_error": "Aggregation error",
    "total_bytes_up": "Bytes up (MB)", "total_bytes_down": "Bytes down (MB)", "total_round_seconds": "Wall time (s)",
    "bytes_up_per_round": "Bytes up / round (MB)", "bytes_down_per_round": "Bytes down / round (MB)",
    "bytes_per_round": "MB sent / round", "bytes_at_target": "MB sent by then",
}
_SEED_DIR = re.compile(r"^seed-?(\d+)$")


@dataclass
class Run:
    """One completed run directory, with the values the report needs."""

    path: Path
    relative: str
    model: str
    method: str
    seed: int | None
    values: dict[str, float | None]
    """Each of METRICS for this run (None: the run wrote null, e.g. a NaN)."""
    rounds: list[dict[str, Any]]
    """metrics.jsonl, one dict per round."""
    early_rounds: int = EARLY_ROUNDS
    """How many rounds mean_accuracy_rounds_1_10 averaged: EARLY_ROUNDS, or fewer for a shorter run."""


@dataclass
class Skipped:
    relative: str
    reason: str


@dataclass
class Stat:
    values: list[float]
    """The runs' values (nulls left out)."""

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n - 1); undefined for fewer than 2 runs."""
        return statistics.stdev(self.values) if len(self.values) >= 2 else None


@dataclass
class Report:
    summary_md: Path
    summary_csv: Path
    plots: list[Path] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def num_runs(self) -> int:
        return len(self.runs)


# ---------------------------------------------------------------- reading run directories

def find_run_dirs(root: Path, exclude: Path | None = None) -> list[Path]:
    """Directories holding any run file; hidden ones (.incomplete/) and the report's own are not searched."""
    found = []
    exclude = exclude.resolve() if exclude else None
    for directory, subdirs, files in os.walk(root):
        here = Path(directory)
        if exclude is not None and here.resolve() == exclude:
            subdirs[:] = []
            continue
        if any(name in files for name in RUN_FILES):
            found.append(here)
            subdirs[:] = []   # adapters/, checkpoint/, logs/ and a tiny model are not runs of their own
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    return sorted(found)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path.name} is not valid JSON ({error})") from None


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value) if math.isfinite(value) else None


def _line_number(line: dict[str, Any], key: str) -> float | None:
    """A metrics.jsonl value as a float; None when the line lacks it or wrote null (a NaN)."""
    return _number(line.get(key))


def _sent(line: dict[str, Any]) -> float | None:
    """Bytes up + down of one round; None when either is missing."""
    up, down = _line_number(line, "bytes_up"), _line_number(line, "bytes_down")
    return None if up is None or down is None else up + down


def cumulative_bytes(rounds: list[dict[str, Any]]) -> dict[int, float]:
    """Round -> bytes sent (up + down) in rounds 1..that round; stops at the first round without byte counts,
    since every later total would be short by an unknown amount."""
    totals: dict[int, float] = {}
    total = 0.0
    for line in sorted(rounds, key=lambda line: int(line["round"])):
        sent = _sent(line)
        if sent is None:
            break
        total += sent
        totals[int(line["round"])] = total
    return totals


def _mean_of(lines: list[dict[str, Any]], value) -> float | None:
    values = [v for v in map(value, lines) if v is not None]
    return statistics.fmean(values) if values else None


def _first_round_at(rounds: list[dict[str, Any]], target: float) -> int | None:
    """The first round whose accuracy is at least ``target``; None if no round's is."""
    for line in sorted(rounds, key=lambda line: int(line["round"])):
        accuracy = _line_number(line, "accuracy")
        if accuracy is not None and accuracy >= target:
            return int(line["round"])
    return None


def convergence(rounds: list[dict[str, Any]], target: float) -> tuple[dict[str, float | None], int]:
    """The CONVERGENCE_METRICS and PER_ROUND_COST_METRICS of one run, and how many rounds the early mean covers.

    mean_accuracy_rounds_1_10: mean accuracy over rounds 1..EARLY_ROUNDS (fewer if the run is shorter);
    first_round_at_target / bytes_at_target: the first round with accuracy >= target and the cumulative bytes
    sent (up + down) through it, None if never reached; bytes_per_round: mean of up + down over the rounds.
    """
    early = [line for line in rounds if 1 <= int(line["round"]) <= EARLY_ROUNDS]
    first_round = _first_round_at(rounds, target)
    values = {
        "mean_accuracy_rounds_1_10": _mean_of(early, lambda line: _line_number(line, "accuracy")),
        "first_round_at_target": None if first_round is None else float(first_round),
        "bytes_at_target": None if first_round is None else cumulative_bytes(rounds).get(first_round),
        "bytes_per_round": _mean_of(rounds, _sent),
        "bytes_up_per_round": _mean_of(rounds, lambda line: _line_number(line, "bytes_up")),
        "bytes_down_per_round": _mean_of(rounds, lambda line: _line_number(line, "bytes_down")),
    }
    return values, len(early)


def read_run(path: Path, root: Path, target: float = DEFAULT_TARGET_ACCURACY) -> Run | Skipped:
    """A completed run, or why it cannot be reported; ``target`` is the accuracy first_round_at_target looks for."""
    relative = str(path.relative_to(root)) if path != root else "."
    summary_path, metrics_path, config_path = path / "summary.json", path / "metrics.jsonl", path / "config.yaml"
    try:
        if not summary_path.exists():
            return Skipped(relative, "no summary.json (the run has not ended)")
        summary = _read_json(summary_path)
        if summary.get("status") != "completed":
            return Skipped(relative, f"status {summary.get('status')!r} in summary.json, not 'completed'")
        missing = [key for key in REQUIRED_SUMMARY_KEYS if key not in summary]
        diagnostics = summary.get("final_diagnostics")
        if isinstance(diagnostics, dict):
            missing += [f"final_diagnostics.{key}" for key in DIAGNOSTICS if key not in diagnostics]
        if missing:
            return Skipped(relative, f"summary.json lacks {', '.join(missing)}")
        if not metrics_path.exists():
            return Skipped(relative, "no metrics.jsonl")
        rounds = []
        for number, text in enumerate(metrics_path.read_text().splitlines(), start=1):
            if not text.strip():
                continue
            try:
                rounds.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise ValueError(f"metrics.jsonl line {number} is not valid JSON ({error})") from None
        for number, line in enumerate(rounds, start=1):
            absent = [key for key in ("round", "accuracy") if key not in line]
            if absent:
                return Skipped(relative, f"metrics.jsonl line {number} lacks {', '.join(absent)}")
        config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
        expected_rounds = config.get("num_rounds")
        if expected_rounds is not None and len(rounds) != expected_rounds:
            return Skipped(relative, f"metrics.jsonl has {len(rounds)} of {expected_rounds} rounds")
        if not rounds:
            return Skipped(relative, "metrics.jsonl is empty")
        method = config.get("method") or summary.get("method")
        if not method:
            return Skipped(relative, "method unknown (no config.yaml and no method in summary.json)")
        values = {key: _number(summary[key]) for key in (*ACCURACY_METRICS, *COST_METRICS)}
        values.update({key: _number(diagnostics[key]) for key in DIAGNOSTICS})
        derived, early_rounds = convergence(rounds, target)
        values.update(derived)
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError) as error:
        # json.JSONDecodeError is a ValueError: a half-written or hand-edited file.
        return Skipped(relative, f"unreadable: {error}")
    parts = Path(relative).parts
    seed_match = _SEED_DIR.match(parts[-1]) if parts else None
    if len(parts) >= 3 and seed_match:
        model = "/".join(parts[:-2])   # the grid's layout: <model>/<method>/seed<N>
    else:
        model = Path(str(config.get("model_name", "unknown"))).name or "unknown"
    seed = config.get("seed", int(seed_match.group(1)) if seed_match else None)
    return Run(path, relative, model, str(method), seed, values, rounds, early_rounds)


def collect_runs(root: Path, exclude: Path | None = None,
                 target: float = DEFAULT_TARGET_ACCURACY) -> tuple[list[Run], list[Skipped]]:
    runs: list[Run] = []
    skipped: list[Skipped] = []
    seen: dict[tuple[str, str, Any], str] = {}
    for directory in find_run_dirs(root, exclude):
        run = read_run(directory, root, target)
        if isinstance(run, Skipped):
            skipped.append(run)
            continue
        key = (run.model, run.method, run.seed)
        if run.seed is not None and key in seen:
            # Two runs of one seed would weigh that seed twice in the mean.
            skipped.append(Skipped(run.relative, f"same model, method and seed as {seen[key]}"))
            continue
        seen[key] = run.relative
        runs.append(run)
    return runs, skipped


# ---------------------------------------------------------------- statistics

def _method_order(methods: set[str]) -> list[str]:
    known = method_names()
    return [m for m in known if m in methods] + sorted(methods - set(known))


def group(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    """model -> method -> runs (sorted by seed), models in order of appearance, methods in registry order (common.methods)."""
    models: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        models.setdefault(run.model, {}).setdefault(run.method, []).append(run)
    return {model: {method: sorted(by_method[method], key=lambda r: (r.seed is None, r.seed or 0))
                    for method in _method_order(set(by_method))}
            for model, by_method in models.items()}


def stat(runs: list[Run], metric: str) -> Stat:
    return Stat([run.values[metric] for run in runs if run.values.get(metric) is not None])


def round_values(run: Run, key: str) -> dict[int, float]:
    """Round -> one metrics.jsonl key's finite value in this run (rounds without one left out)."""
    values = {}
    for line in run.rounds:
        value = line.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[int(line["round"])] = float(value)
    return values


def per_round(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std over runs of one metrics.jsonl key (std 0 where a single run has the round)."""
    return mean_over_runs([round_values(run, key) for run in runs])


def mean_over_runs(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std over runs of per-round values (std 0 where a single run has the round)."""
    by_round: dict[int, list[float]] = {}
    for values in series:
        for round_index, value in values.items():
            by_round.setdefault(round_index, []).append(value)
    rounds = sorted(by_round)
    means = [statistics.fmean(by_round[r]) for r in rounds]
    stds = [statistics.stdev(by_round[r]) if len(by_round[r]) >= 2 else 0.0 for r in rounds]
    return rounds, means, stds


# ---------------------------------------------------------------- writing

def write_csv(path: Path, grouped: dict[str, dict[str, list[Run]]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "method", "metric", "n", "mean", "std", "min", "max", "seeds", "values"])
        for model, by_method in grouped.items():
            for method, runs in by_method.items():
                for metric in METRICS:
                    s = stat(runs, metric)
                    present = [r for r in runs if r.values.get(metric) is not None]
                    writer.writerow([
                        model, method, metric, s.n, _raw(s.mean), _raw(s.std),
                        _raw(min(s.values) if s.values else None), _raw(max(s.values) if s.values else None),
                        ";".join(str(r.seed) for r in present), ";".join(_raw(r.values[metric]) for r in present),
                    ])


def _raw(value: float | None) -> str:
    """Full precision (repr round-trips), empty for none: the CSV is for further analysis."""
    return "" if value is None else repr(float(value))


def _scale(metric: str) -> float:
    return 1e-6 if metric in BYTE_METRICS else 1.0


def _digits(metric: str) -> int:
    if metric in DIAGNOSTICS:
        return 5   # basis overlaps near 1 differ in the 4th-5th decimal (0.958 vs 0.99998 in the study)
    if metric in ("total_round_seconds", "first_round_at_target"):
        return 1
    if metric in BYTE_METRICS:
        return 2
    return 4


def fmt_stat(s: Stat, metric: str, n_runs: int) -> str:
    if s.mean is None:
        return "n/a"
    scale, digits = _scale(metric), _digits(metric)
    text = f"{s.mean * scale:.{digits}f}"
    if s.std is not None:
        std = s.std * scale
        # A spread below the shown precision would print as 0.00000; say how small it is instead.
        text += f" ± {std:.1e}" if 0 < std < 10 ** -digits else f" ± {std:.{digits}f}"
    if s.n != n_runs:
        text += f" (n={s.n})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def method_label(method: str) -> str:
    """The method's own label (common/methods/), or its name for a method this installation does not know."""
    return get_method(method).label if method in method_names() else method


def _metric_table(by_method: dict[str, list[Run]], metrics: tuple[str, ...]) -> list[str]:
    header = ["Method", "n", *(METRIC_LABELS[m] for m in metrics)]
    rows = [[method_label(method), str(len(runs)), *(fmt_stat(stat(runs, m), m, len(runs)) for m in metrics)]
            for method, runs in by_method.items()]
    return _table(header, rows)


def _reached_cell(runs: list[Run], metric: str) -> str:
    """A value only the runs that reached the target have: 'not reached', or the mean over those that did."""
    s = stat(runs, metric)
    if s.n == 0:
        return "not reached"
    text = fmt_stat(s, metric, s.n)   # n = s.n: the "reached" note below replaces fmt_stat's (n=k)
    return text if s.n == len(runs) else f"{text} ({s.n} of {len(runs)} reached)"


def _convergence_table(by_method: dict[str, list[Run]], target: float) -> list[str]:
    windows = {run.early_rounds for runs in by_method.values() for run in runs}
    window = f"rounds 1–{max(windows)}" + ("" if len(windows) == 1 else " (fewer in shorter runs)")
    header = ["Method", "n", f"Mean acc. {window}", f"First round acc. ≥ {target:g}",
              METRIC_LABELS["bytes_at_target"], METRIC_LABELS["bytes_per_round"]]
    rows = [[method_label(method), str(len(runs)),
             fmt_stat(stat(runs, "mean_accuracy_rounds_1_10"), "mean_accuracy_rounds_1_10", len(runs)),
             _reached_cell(runs, "first_round_at_target"), _reached_cell(runs, "bytes_at_target"),
             fmt_stat(stat(runs, "bytes_per_round"), "bytes_per_round", len(runs))]
            for method, runs in by_method.items()]
    return _table(header, rows)


def residual_methods(by_method: dict[str, list[Run]]) -> dict[str, float]:
    """Methods whose runs sent base-weight residual increments (RESIDUAL_KEY > 0 in some round) -> mean bytes of
    them per round. Every round line carries the key (0 for most methods), so presence alone says nothing."""
    found = {}
    for method, runs in by_method.items():
        per_run = [round_values(run, RESIDUAL_KEY) for run in runs]
        if any(value > 0 for values in per_run for value in values.values()):
            found[method] = statistics.fmean(v for values in per_run for v in values.values())
    return found


def _residual_caption(model: str, by_method: dict[str, list[Run]]) -> list[str]:
    found = residual_methods(by_method)
    if not found:
        return []
    which = ", ".join(f"{method_label(m)} ({mean * 1e-6:.2f} MB per round on average)" for m, mean in found.items())
    return [f"Bytes down include the base-weight residual increments (`{RESIDUAL_KEY}`) of {which}; "
            f"`{_file_stem(model)}_bytes.png` draws them dashed.", ""]


def _seed_table(by_method: dict[str, list[Run]]) -> list[str]:
    seeds = sorted({run.seed for runs in by_method.values() for run in runs}, key=lambda s: (s is None, s or 0))
    header = ["Method", *(f"seed {seed}" for seed in seeds)]
    rows = []
    for method, runs in by_method.items():
        by_seed = {run.seed: run for run in runs}
        cells = []
        for seed in seeds:
            run = by_seed.get(seed)
            final, best = (run.values["final_accuracy"], run.values["best_accuracy"]) if run else (None, None)
            cells.append("—" if final is None else f"{final:.4f} ({best:.4f})" if best is not None else f"{final:.4f}")
        rows.append([method_label(method), *cells])
    return _table(header, rows)


def write_markdown(path: Path, root: Path, grouped: dict[str, dict[str, list[Run]]], skipped: list[Skipped],
                   plots: dict[str, list[Path]], target: float = DEFAULT_TARGET_ACCURACY) -> None:
    num_runs = sum(len(runs) for by_method in grouped.values() for runs in by_method.values())
    lines = ["# Experiment report", "",
             f"Runs under `{root}`: {num_runs} completed runs reported, {len(skipped)} skipped. "
             "Each cell is the mean ± sample standard deviation (n − 1) over the runs (seeds) of a method; "
             "n is the number of runs, and `(n=k)` marks a value that only k of them reported.", ""]
    for model, by_method in grouped.items():
        lines += [f"## Model: {model}", "",
                  "### Accuracy on the held-out set", "",
                  *_metric_table(by_method, ACCURACY_METRICS),
                  "### Convergence", "",
                  f"Mean accuracy over the early rounds (the area under the accuracy curve), the first round "
                  f"whose accuracy is at least {target:g} and the megabytes sent (up + down, cumulative) through "
                  f"it, over the seeds that reached it, and the megabytes sent per round.", "",
                  *_convergence_table(by_method, target),
                  "### Alignment diagnostics after the final round", "",
                  *_metric_table(by_method, DIAGNOSTICS),
                  "### Final accuracy per seed (best accuracy in parentheses)", "",
                  *_seed_table(by_method),
                  "### Cost per run (totals over all rounds and means per round; wall time is the sum of "
                  "round times)", "",
                  *_metric_table(by_method, (*COST_METRICS, *PER_ROUND_COST_METRICS)),
                  *_residual_caption(model, by_method)]
        if plots.get(model):
            lines += ["### Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots[model]] + [""]
    if skipped:
        lines += ["## Skipped run directories", ""]
        lines += [f"- WARNING: `{s.relative}` skipped: {s.reason}" for s in skipped] + [""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------- plots

def _file_stem(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")   # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    return plt


def _round_axis(ax) -> None:
    """Rounds are whole numbers: without this, matplotlib ticks a 20-round axis at 2.5, 7.5, ..."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def _curves(ax, by_method: dict[str, list[Run]], colors: dict[str, str], series, transform=lambda v: v,
            linestyle: str = "-", label_suffix: str = "") -> None:
    """Mean line and +-1 std band per method over rounds; ``series(run)`` gives a run's round -> value."""
    for method, runs in by_method.items():
        rounds, means, stds = mean_over_runs([series(run) for run in runs])
        if not rounds:
            continue
        low = [transform(m - s) for m, s in zip(means, stds)]
        high = [transform(m + s) for m, s in zip(means, stds)]
        ax.plot(rounds, [transform(m) for m in means], color=colors[method], marker=".", linestyle=linestyle,
                label=f"{method_label(method)}{label_suffix} (n={len(runs)})")
        ax.fill_between(rounds, low, high, color=colors[method], alpha=0.2, linewidth=0)
    _round_axis(ax)


def _key(key: str):
    return lambda run: round_values(run, key)


def _megabytes(value: float) -> float:
    return value * 1e-6


def _accuracy_figure(plt, model: str, by_method: dict[str, list[Run]], colors: dict[str, str]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _curves(ax, by_method, colors, _key("accuracy"))
    ax.set_ylabel("accuracy (held-out)")
    ax.set_title(f"{model}: accuracy per round (mean ± std over seeds)")
    ax.legend()
    return fig


def _alignment_figure(plt, model: str, by_method: dict[str, list[Run]], colors: dict[str, str]):
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    _curves(axes[0][0], by_method, colors, _key("basis_overlap"))
    axes[0][0].set_title("basis overlap ||Q_iᵀ Q_g||_F / √r")
    # 0.958 and 0.99998 both look like 1 on a linear axis; the gap to 1 on a log axis separates them.
    _curves(axes[0][1], by_method, colors, _key("basis_overlap"), transform=lambda v: max(1.0 - v, 1e-9))
    axes[0][1].set_yscale("log")
    axes[0][1].set_title("1 − basis overlap (log)")
    _curves(axes[1][0], by_method, colors, _key("update_subspace_overlap"))
    axes[1][0].set_title("update-subspace overlap (scale-free)")
    _curves(axes[1][1], by_method, colors, _key("cancellation_ratio"))
    axes[1][1].set_title("cancellation ratio ||Σ p_i ΔW_i|| / Σ p_i ||ΔW_i||")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{model}: alignment per round (mean ± std over seeds)")
    return fig


def _final_accuracy_figure(plt, model: str, by_method: dict[str, list[Run]], colors: dict[str, str]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(by_method)
    seeds = sorted({run.seed for runs in by_method.values() for run in runs}, key=lambda s: (s is None, s or 0))
    # Points, not bars from 0: seeds of one method often differ in the 2nd or 3rd decimal.
    markers = "osD^vP*Xhp"
    for j, seed in enumerate(seeds):
        offset = (j - (len(seeds) - 1) / 2) * 0.12
        xs, ys = [], []
        for i, method in enumerate(methods):
            run = next((r for r in by_method[method] if r.seed == seed), None)
            if run is not None and run.values["final_accuracy"] is not None:
                xs.append(i + offset)
                ys.append(run.values["final_accuracy"])
        ax.scatter(xs, ys, marker=markers[j % len(markers)], s=45, color="0.3", zorder=3, label=f"seed {seed}")
    for i, method in enumerate(methods):
        mean = stat(by_method[method], "final_accuracy").mean
        if mean is not None:
            ax.hlines(mean, i - 0.35, i + 0.35, colors=colors[method], linewidth=2.5, label="mean" if i == 0 else None)
    ax.set_xlim(-0.6, len(methods) - 0.4)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_xticks(range(len(methods)), [method_label(m) for m in methods])
    ax.set_ylabel("final accuracy")
    ax.set_title(f"{model}: final accuracy per seed")
    ax.legend(fontsize="small")
    return fig


def _bytes_figure(plt, model: str, by_method: dict[str, list[Run]], colors: dict[str, str]):
    fig, (up, down) = plt.subplots(1, 2, figsize=(11, 4.5))
    _curves(up, by_method, colors, _key("bytes_up"), transform=_megabytes)
    up.set_title("up (clients → server)")
    _curves(down, by_method, colors, _key("bytes_down"), transform=_megabytes)
    down.set_title("down (server → clients)")
    residual = {m: by_method[m] for m in residual_methods(by_method)}
    if residual:
        # Already inside bytes_down; drawn apart so the residual's share of the downlink shows.
        _curves(down, residual, colors, _key(RESIDUAL_KEY), transform=_megabytes, linestyle="--",
                label_suffix=": residual increments, included above")
    for ax in (up, down):
        ax.set_ylabel("MB per round")
        ax.set_ylim(bottom=0)
    up.legend(fontsize="small")
    if residual:
        down.legend(fontsize="small")
    fig.suptitle(f"{model}: megabytes per round (mean ± std over seeds)")
    return fig


def _accuracy_vs_mb_figure(plt, model: str, by_method: dict[str, list[Run]], colors: dict[str, str]):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, runs in by_method.items():
        acc_rounds, acc_means, acc_stds = per_round(runs, "accuracy")
        mb_rounds, mb_means, _ = mean_over_runs([cumulative_bytes(run.rounds) for run in runs])
        mb_at = dict(zip(mb_rounds, mb_means))
        # One point per round that has both: the mean accuracy over seeds at the mean cumulative MB over seeds.
        points = [(mb_at[r] * 1e-6, m, s) for r, m, s in zip(acc_rounds, acc_means, acc_stds) if r in mb_at]
        if not points:
            continue
        xs, means, stds = (list(column) for column in zip(*points))
        ax.plot(xs, means, color=colors[method], marker=".", label=f"{method_label(method)} (n={len(runs)})")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=colors[method], alpha=0.2, linewidth=0)
    ax.set_xlabel("cumulative MB sent (up + down)")
    ax.set_ylabel("accuracy (held-out)")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{model}: accuracy against cumulative MB sent (mean ± std over seeds)")
    ax.legend(fontsize="small")
    return fig


PLOTS = {
    "accuracy": _accuracy_figure,
    "alignment": _alignment_figure,
    "final_accuracy_per_seed": _final_accuracy_figure,
    "bytes": _bytes_figure,
    "accuracy_vs_mb": _accuracy_vs_mb_figure,
}
"""File suffix -> figure builder; each model gets <model>_<suffix>.png, in this order."""


def build_figures(model: str, by_method: dict[str, list[Run]]) -> dict[str, Any]:
    """Suffix -> matplotlib Figure of every plot of one model (not saved; write_plots saves and closes them)."""
    plt = _pyplot()
    colors = {method: f"C{i}" for i, method in enumerate(by_method)}
    return {suffix: build(plt, model, by_method, colors) for suffix, build in PLOTS.items()}


def write_plots(out: Path, model: str, by_method: dict[str, list[Run]]) -> list[Path]:
    stem = _file_stem(model)
    return [_save(fig, out / f"{stem}_{suffix}.png") for suffix, fig in build_figures(model, by_method).items()]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- entry points

def write_report(root: Path, out: Path, plots: bool = True,
                 target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> Report:
    """Read every run under root; write summary.md, summary.csv and the plots to out."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, skipped = collect_runs(root, exclude=out, target=target_accuracy)
    for s in skipped:
        log.warning("skipped %s: %s", s.relative, s.reason)
    grouped = group(runs)
    plot_paths = {model: write_plots(out, model, by_method) for model, by_method in grouped.items()} if plots else {}
    report = Report(out / "summary.md", out / "summary.csv", [p for ps in plot_paths.values() for p in ps],
                    runs, skipped)
    write_csv(report.summary_csv, grouped)
    write_markdown(report.summary_md, root, grouped, skipped, plot_paths, target_accuracy)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_root", help="directory holding run directories (e.g. runs/cpu_grid)")
    parser.add_argument("--out", help="where summary.md, summary.csv and the plots go (default: RUNS_ROOT/report)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--target-accuracy", type=float, default=DEFAULT_TARGET_ACCURACY, metavar="ACC",
                        help="the convergence table's first round with accuracy >= ACC (default %(default)s)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    root = Path(args.runs_root)
    if not root.is_dir():
        print(f"error: {root} is not a directory; give the grid's output_root, e.g. runs/cpu_grid", file=sys.stderr)
        return 2
    if not 0.0 < args.target_accuracy <= 1.0:
        print(f"error: --target-accuracy {args.target_accuracy}: expected an accuracy in (0, 1], e.g. 0.9",
              file=sys.stderr)
        return 2
    report = write_report(root, Path(args.out) if args.out else root / "report", plots=not args.no_plots,
                          target_accuracy=args.target_accuracy)
    print(f"{report.summary_md}\n{report.summary_csv}")
    for path in report.plots:
        print(path)
    if not report.runs:
        print(f"error: no completed run under {root}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
