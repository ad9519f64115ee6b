"""What the coordinator knows of each client decides its task and what its upload may be: its LoRA rank
(client_ranks or --rank, never above lora_rank) and, for fedex_lora, the base-weight residual it has folded
in. Claims it cannot honour are refused by name, before they cost anything."""

from __future__ import annotations

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection, JoinRefused, ReceivedTask
from common.validation import ExpectedTensors
from tests.server.conftest import small_state, start_live_coordinator


@pytest.fixture
def live_factory(tmp_path):
    started = []

    def start(**overrides):
        live = start_live_coordinator(tmp_path / f"run{len(started)}", small_state(r=2), lora_rank=2, **overrides)
        started.append(live)
        return live, CoordinatorConnection(live.address, patience_s=5)

    yield start
    for live in started:
        live.stop()


def test_a_rank_above_the_runs_lora_rank_is_refused_at_join(live_factory):
    live, connection = live_factory()
    with pytest.raises(JoinRefused, match="asks for LoRA rank 3, above the run's lora_rank=2"):
        connection.join("greedy", lora_rank=3)
    assert live.coordinator.registry.records() == []                  # nothing was registered


def test_a_rank_that_contradicts_client_ranks_is_refused_by_name(live_factory):
    live, connection = live_factory(client_ranks=[1])
    with pytest.raises(JoinRefused, match="client_ranks gives partition 0 rank 1; drop --rank"):
        connection.join("contrary", lora_rank=2)
    assert connection.join("obedient").lora_rank == 1                 # the run decides


def test_a_low_rank_client_gets_the_truncated_task_and_its_upload_is_checked_at_its_rank(live_factory):
    live, connection = live_factory(client_ranks=[1])
    info = connection.join("small")
    state = small_state(r=2)
    task = connection.next_task(info.client_id, ExpectedTensors.like({
        "layer.lora_A.weight": state["layer.lora_A.weight"][:1], "layer.lora_B.weight": state["layer.lora_B.weight"][:, :1],
        "classifier.weight": state["classifier.weight"]}))
    assert isinstance(task, ReceivedTask)
    assert torch.equal(task.tensors["layer.lora_A.weight"], state["layer.lora_A.weight"][:1])   # the first component
    with pytest.raises(grpc.RpcError) as raised:                      # a rank-2 upload from a rank-1 client
        connection.submit(info.client_id, 1, 10, state, 0.5, 1.0, 1)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'layer.lora_A.weight' has shape [2, 10], expected [1, 10]" in raised.value.details()
    upload = {**task.tensors, "layer.lora_B.weight": torch.ones(12, 1)}
    assert connection.submit(info.client_id, 1, 10, upload, 0.5, 1.0, 1).bytes_received > 0
    live.driver.join(timeout=30)
    adapter = live.coordinator._global                                 # rank 2 again: zero-padded, product kept
    assert adapter["layer.lora_A.weight"].shape == (2, 10)
    torch.testing.assert_close(adapter["layer.lora_B.weight"] @ adapter["layer.lora_A.weight"],
                               torch.ones(12, 1) @ state["layer.lora_A.weight"][:1])


def test_a_claimed_residual_round_beyond_the_committed_rounds_is_refused(live_factory):
    live, connection = live_factory(method="fedex_lora")
    info = connection.join("ahead")
    with pytest.raises(grpc.RpcError) as raised:
        connection.next_task(info.client_id, base_residual_round=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "folded base-weight residuals through round 5, but this run has committed 0 rounds" in raised.value.details()
    task = connection.next_task(info.client_id, base_residual_round=0)
    assert isinstance(task, ReceivedTask) and task.base_residual_round == 0
