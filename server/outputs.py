"""The run directory: everything a run writes, each file written atomically.

    run.json               the run's id, made with the directory and kept by every resume
    config.yaml            resolved configuration
    partition_stats.json   sizes and label histograms of the client partitions
    metrics.jsonl          one JSON line per round
    tensorboard/           the same scalars as TensorBoard events (tensorboard --logdir runs/)
    summary.json           best / final / last-5 accuracy, final loss and diagnostics
    adapters/round_NNN/    the global adapter after round NNN, in PEFT's format
    adapters/best/         the round with the best accuracy so far
    checkpoint/            the last committed round (global adapter, reference basis, state)
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from common.metrics import METRIC_NAMES

log = logging.getLogger(__name__)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_safe(value: Any) -> Any:
    """NaN and Inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.summary_path = self.path / "summary.json"
        self.adapters = self.path / "adapters"
        self.checkpoint = self.path / "checkpoint"
        self.tensorboard = self.path / "tensorboard"
        self._board: Any = None                    # server.tensorboard.MetricsBoard, made at the first line
        self._committed_before_board: int | None = None

    def run_id(self, resume: bool) -> str:
        """The run's identity: made when the run directory starts a run, read back by every resume, so that
        clients that rejoin a restarted coordinator know it is still their run (even before round 1 committed)."""
        identity = self.path / "run.json"
        if resume and identity.exists():
            return str(json.loads(identity.read_text())["run_id"])
        latest = self.checkpoint / "latest.json"
        run_id = (json.loads(latest.read_text()).get("run_id") if resume and latest.exists() else None) \
            or secrets.token_hex(8)        # a directory written before run.json existed keeps its checkpoint's id
        _atomic_write_text(identity, json.dumps({"run_id": run_id, "created": time.time()}) + "\n")
        return run_id

    def write_config(self, flat_config: dict[str, Any]) -> None:
        _atomic_write_text(self.path / "config.yaml", yaml.safe_dump(flat_config, sort_keys=True))

    def write_json(self, name: str, value: Any) -> None:
        _atomic_write_text(self.path / name, json.dumps(_json_safe(value), indent=2, sort_keys=True) + "\n")

    def append_metrics(self, line: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(_json_safe(line), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._add_to_board(line)

    def _add_to_board(self, line: dict[str, Any]) -> None:
        """The same line's scalars as TensorBoard events (server/tensorboard.py); without the tensorboard
        package, one warning and no events: the run itself does not depend on them."""
        if self._board is None:
            try:
                from server.tensorboard import MetricsBoard

                self._board = MetricsBoard(self.tensorboard, resume_after_round=self._committed_before_board)
            except ImportError as error:
                log.warning("no TensorBoard events for this run (%s); pip install tensorboard", error)
                self._board = False
        if self._board:
            self._board.add(line)

    def truncate_metrics(self, after_round: int) -> None:
        """Drop lines of rounds after the committed one (written just before a crash)."""
        kept = [line for line in self.read_metrics() if line["round"] <= after_round]
        self._committed_before_board = after_round           # and TensorBoard events after it are purged
        _atomic_write_text(self.metrics_path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in kept))

    def append_event(self, event: dict[str, Any]) -> None:
        """events.jsonl: what happened besides committed rounds (rounds below quorum, resumes...)."""
        with open(self.path / "events.jsonl", "a") as handle:
            handle.write(json.dumps(_json_safe({**event, "timestamp": time.time()}), sort_keys=True) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def round_adapter_dir(self, round_index: int) -> Path:
        return self.adapters / f"round_{round_index:03d}"

    def prune_round_adapters(self, keep_last: int, latest: int) -> list[int]:
        """Delete adapters/round_NNN/ of rounds before the last ``keep_last`` (adapters/best is a copy of its
        own, so the best round is always kept); returns the rounds deleted."""
        pruned = []
        for folder in sorted(self.adapters.glob("round_*")):
            index = int(folder.name.split("_", 1)[1])
            if index <= latest - keep_last:
                shutil.rmtree(folder, ignore_errors=True)
                pruned.append(index)
        return pruned

    def mark_best(self, round_index: int) -> None:
        """Copy round NNN's adapter to adapters/best (copy beside, then swap)."""
        source = self.round_adapter_dir(round_index)
        staging = self.adapters / ".best.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        (staging / "round.txt").write_text(f"{round_index}\n")
        old = self.adapters / ".best.old"
        shutil.rmtree(old, ignore_errors=True)
        best = self.adapters / "best"
        if best.exists():
            os.replace(best, old)
        os.replace(staging, best)
        shutil.rmtree(old, ignore_errors=True)

    def save_client_updates(self, round_index: int, updates: list) -> None:
        """updates/round_NNN/<client>.safetensors, with num_examples in the file's metadata."""
        directory = self.path / "updates" / f"round_{round_index:03d}"
        directory.mkdir(parents=True, exist_ok=True)
        for update in updates:
            tensors = {k: v.contiguous() for k, v in update.state.to_state_dict().items()}
            save_file(tensors, str(directory / f"{update.client}.safetensors"),
                      metadata={"num_examples": str(update.num_examples), "client": update.client})

    def commit_checkpoint(self, round_index: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Write tensors then the state file that points at them; the state file's rename is the commit."""
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        tensor_file = self.checkpoint / f"round_{round_index:03d}.safetensors"
        tmp = tensor_file.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, tensor_file)
        _atomic_write_text(self.checkpoint / "latest.json",
                           json.dumps({**state, "round": round_index, "tensors": tensor_file.name}, indent=2))
        for stale in self.checkpoint.glob("round_*.safetensors"):
            if stale != tensor_file:
                stale.unlink(missing_ok=True)

    def load_checkpoint(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        latest = self.checkpoint / "latest.json"
        if not latest.exists():
            return None
        state = json.loads(latest.read_text())
        return state, load_file(str(self.checkpoint / state["tensors"]))


def summarize(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Run summary: best accuracy and its round, final accuracy, mean of the last 5, final loss, final diagnostics."""
    if not metrics:
        return {"rounds_completed": 0}
    accuracies = [m.get("accuracy") for m in metrics]
    scored = [(a, m["round"]) for a, m in zip(accuracies, metrics) if a is not None]
    best_accuracy, best_round = max(scored, key=lambda item: (item[0], -item[1])) if scored else (None, None)
    last5 = [a for a in accuracies[-5:] if a is not None]
    final = metrics[-1]
    return {
        "method": final.get("method"),
        "rounds_completed": len(metrics),
        "best_accuracy": best_accuracy,
        "best_round": best_round,
        "final_accuracy": final.get("accuracy"),
        "mean_last5_accuracy": sum(last5) / len(last5) if last5 else None,
        "final_loss": final.get("loss"),
        "final_diagnostics": {key: final.get(key) for key in METRIC_NAMES},
        "total_bytes_down": sum(m.get("bytes_down", 0) for m in metrics),
        "total_bytes_up": sum(m.get("bytes_up", 0) for m in metrics),
        "total_round_seconds": sum(m.get("round_seconds", 0.0) for m in metrics),
    }
