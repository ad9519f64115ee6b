"""The metrics line of a round is a pure function of the round's state and what closing it computed."""

from __future__ import annotations

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors
from common.clipping import ClippedUpdate
from server.rounds import DEADLINE_REASON, ClosedRound, RoundState, UploadStats, metrics_record


def _update(name: str, n: int) -> ClientUpdate:
    return ClientUpdate(name, n, AdapterState(lora={"l": LoraFactors(A=torch.zeros(1, 2), B=torch.zeros(3, 1))}))


def test_metrics_record_from_hand_made_inputs():
    state = RoundState(index=4, sampled={"id-a": 2, "id-b": 0, "id-c": 1},
                       names={"id-a": "alice", "id-b": "bob", "id-c": "carol"}, attempt=1,
                       opened_at=1000.0, bytes_down=100 * 4, residual_bytes_down=120)   # 4 deliveries of 100 bytes
    # Uploads arrive out of partition order; carol missed the deadline; alice fetched her task twice.
    state.updates["id-a"] = (_update("alice", 30), UploadStats(train_loss=1.0, train_seconds=2.0, local_steps=5,
                                                               payload_bytes=40))
    state.updates["id-b"] = (_update("bob", 10), UploadStats(train_loss=3.0, train_seconds=4.0, local_steps=6,
                                                             payload_bytes=60))
    state.dropped["id-c"] = f"{DEADLINE_REASON} (60s)"
    state.deliveries.update({"id-a": 2, "id-b": 1, "id-c": 1})
    closed = ClosedRound(
        clipped={"bob": ClippedUpdate(_update("bob", 10).state, norm=2.5, factor=0.4),
                 "alice": ClippedUpdate(_update("alice", 30).state, norm=0.5, factor=1.0)},
        new_global={}, method_state={}, diagnostics={"cancellation_ratio": 0.9, "basis_overlap": None},
        evaluation={"accuracy": 0.75, "loss": 0.5, "num_examples": 40}, aggregation_seconds=0.25, eval_seconds=1.5)

    line = metrics_record("fedavg", state, closed, now=1012.5)

    assert line == {
        "round": 4, "method": "fedavg", "accuracy": 0.75, "loss": 0.5, "eval_examples": 40,
        "train_loss": (10 * 3.0 + 30 * 1.0) / 40,                      # weighted by examples
        "cancellation_ratio": 0.9, "basis_overlap": None,
        "client_update_norms": {"bob": 2.5, "alice": 0.5}, "clipped_clients": ["bob"],
        "participants": ["bob", "alice"], "partitions": [0, 2], "num_examples": [10, 30],   # partition order
        "sampled": ["alice", "bob", "carol"], "stragglers": ["carol"],
        "dropped": [{"client": "carol", "reason": "missed the round deadline (60s)"}],
        "attempt": 1, "bytes_down": 100 * 4, "residual_bytes_down": 120, "bytes_up": 100,
        "client_train_seconds": {"bob": 4.0, "alice": 2.0}, "mean_client_train_seconds": 3.0,
        "local_steps": {"bob": 6, "alice": 5}, "aggregation_seconds": 0.25, "eval_seconds": 1.5,
        "round_seconds": 12.5, "timestamp": 1012.5,
    }
