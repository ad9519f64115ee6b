"""One round's state on the coordinator, and the metrics line it leaves: a pure function of what happened.

``RoundState`` is what the state machine (server/coordinator.py) fills while a round is open;
``ClosedRound`` is what closing it computed (the clipped updates, the new global adapter, the
diagnostics, the evaluation, timings); ``metrics_record`` turns both into the line appended to
metrics.jsonl (field meanings in docs/DESIGN.md §5). Nothing here touches gRPC, the disk or a clock,
so a unit test can check a record from hand-made inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from common.adapter import ClientUpdate
from common.clipping import ClippedUpdate
from common.codec import TensorSpec

DEADLINE_REASON = "missed the round deadline"
"""Drop reason of a sampled client that was alive but too slow: such clients are the round's stragglers."""


@dataclass(frozen=True)
class UploadStats:
    train_loss: float
    train_seconds: float
    local_steps: int
    payload_bytes: int


@dataclass(frozen=True)
class TaskPayload:
    """One encoded task: its tensor specs, its bytes, and how many of them are base-weight residual."""

    specs: list[TensorSpec]
    buffer: bytes
    residual_bytes: int = 0


@dataclass
class RoundState:
    index: int
    sampled: dict[str, int]                        # client id -> partition
    names: dict[str, str]                          # client id -> name
    attempt: int = 0                               # > 0 when the round is retried below quorum
    payloads: dict[tuple[int, int], TaskPayload] = field(default_factory=dict)   # (rank, residual round) -> task
    catch_up: dict[str, tuple[tuple[int, int], TaskPayload]] = field(default_factory=dict)   # client id -> its task
    bytes_down: int = 0                            # task bytes sent this round, every delivery counted
    residual_bytes_down: int = 0                   # of which base-weight residual (fedex_lora)
    opened_at: float = field(default_factory=time.time)
    open: bool = True
    dropped: dict[str, str] = field(default_factory=dict)      # client id -> why it was dropped
    deliveries: dict[str, int] = field(default_factory=dict)   # client id -> times the task was fetched
    updates: dict[str, tuple[ClientUpdate, UploadStats]] = field(default_factory=dict)

    def reported(self) -> list[tuple[str, ClientUpdate, UploadStats]]:
        """(client id, update, stats) of every client that reported, in partition order (a fixed order, so
        that aggregation is bit-reproducible whatever order the uploads arrived in)."""
        ordered = sorted(self.updates.items(), key=lambda item: self.sampled[item[0]])
        return [(cid, update, stats) for cid, (update, stats) in ordered]


@dataclass(frozen=True)
class ClosedRound:
    """What closing a round computed, before anything is written."""

    clipped: dict[str, ClippedUpdate]              # client name -> its update after the per-client bound
    new_global: dict[str, torch.Tensor]            # the new global adapter, float32
    method_state: dict[str, torch.Tensor]          # what the method keeps between rounds (reference bases), float32
    diagnostics: dict[str, float | None]           # common.metrics.alignment_metrics
    evaluation: dict[str, Any]                     # accuracy, loss, num_examples of the new global adapter
    aggregation_seconds: float
    eval_seconds: float


def metrics_record(method: str, state: RoundState, closed: ClosedRound, now: float) -> dict[str, Any]:
    """The metrics.jsonl line of one committed round."""
    reported = state.reported()
    names = [state.names[cid] for cid, _, _ in reported]
    weights = [update.num_examples for _, update, _ in reported]
    stats = {state.names[cid]: s for cid, _, s in reported}
    return {
        "round": state.index,
        "method": method,
        "accuracy": closed.evaluation.get("accuracy"),
        "loss": closed.evaluation.get("loss"),
        "eval_examples": closed.evaluation.get("num_examples"),
        "train_loss": sum(w * s.train_loss for w, s in zip(weights, stats.values())) / sum(weights),
        **closed.diagnostics,
        "client_update_norms": {name: c.norm for name, c in closed.clipped.items()},
        "clipped_clients": sorted(name for name, c in closed.clipped.items() if c.factor < 1.0),
        "participants": names,
        "partitions": [state.sampled[cid] for cid, _, _ in reported],
        "num_examples": weights,
        "sampled": sorted(state.names.values()),
        "stragglers": sorted(state.names[cid] for cid, why in state.dropped.items() if DEADLINE_REASON in why),
        "dropped": sorted(({"client": state.names[cid], "reason": why} for cid, why in state.dropped.items()),
                          key=lambda entry: entry["client"]),
        "attempt": state.attempt,
        "bytes_down": state.bytes_down,
        "residual_bytes_down": state.residual_bytes_down,
        "bytes_up": sum(s.payload_bytes for s in stats.values()),
        "client_train_seconds": {name: round(s.train_seconds, 3) for name, s in stats.items()},
        "mean_client_train_seconds": sum(s.train_seconds for s in stats.values()) / len(stats),
        "local_steps": {name: s.local_steps for name, s in stats.items()},
        "aggregation_seconds": closed.aggregation_seconds,
        "eval_seconds": closed.eval_seconds,
        "round_seconds": now - state.opened_at,
        "timestamp": now,
    }
