"""Run directories with known numbers, in the coordinator's file formats (config.yaml, metrics.jsonl,
summary.json); no torch, so the fake launcher that uses them starts in a blink."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

DIAGNOSTICS = ("cancellation_ratio", "client_global_cosine", "pairwise_client_cosine", "basis_overlap",
               "basis_overlap_sq", "update_subspace_overlap", "aggregation_error")


def round_line(round_index: int, method: str, accuracy: float, loss: float = 1.0,
               diagnostics: dict[str, float | None] | None = None, bytes_up: int = 1_000_000,
               bytes_down: int = 2_000_000, round_seconds: float = 10.0) -> dict[str, Any]:
    """One metrics.jsonl line with the keys server/coordinator.py writes (the ones the report reads)."""
    values = {key: 0.5 for key in DIAGNOSTICS}
    values.update(diagnostics or {})
    return {"round": round_index, "method": method, "accuracy": accuracy, "loss": loss, "train_loss": loss,
            **values, "participants": ["client-0"], "partitions": [0], "bytes_up": bytes_up,
            "bytes_down": bytes_down, "round_seconds": round_seconds}


def summary_of(lines: list[dict[str, Any]], status: str = "completed") -> dict[str, Any]:
    """summary.json as server.outputs.summarize + the coordinator's status (test_report checks they agree)."""
    accuracies = [line["accuracy"] for line in lines]
    best = max(range(len(lines)), key=lambda i: (accuracies[i], -i))
    last5 = accuracies[-5:]
    final = lines[-1]
    return {
        "method": final["method"], "rounds_completed": len(lines),
        "best_accuracy": accuracies[best], "best_round": lines[best]["round"],
        "final_accuracy": final["accuracy"], "mean_last5_accuracy": sum(last5) / len(last5),
        "final_loss": final["loss"], "final_diagnostics": {key: final.get(key) for key in DIAGNOSTICS},
        "total_bytes_down": sum(line["bytes_down"] for line in lines),
        "total_bytes_up": sum(line["bytes_up"] for line in lines),
        "total_round_seconds": sum(line["round_seconds"] for line in lines),
        "status": status,
    }


def write_run(path: Path, config: dict[str, Any], lines: list[dict[str, Any]],
              summary: dict[str, Any] | None = None) -> Path:
    """A run directory; summary None writes none (a run that has not ended)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
    (path / "metrics.jsonl").write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return path
