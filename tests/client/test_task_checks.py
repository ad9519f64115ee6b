"""A client checks a task as strictly as the coordinator checks uploads: header before payload, digest, values."""

from __future__ import annotations

import pytest
import torch

from client.connection import CoordinatorConnection, CorruptTask, InvalidTask, ReceivedTask
from common.codec import encode_tensors
from common.validation import ExpectedTensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import chunks_to_proto, specs_to_proto, trailer_to_proto

GOOD = {"layer.lora_A.weight": torch.randn(2, 10), "layer.lora_B.weight": torch.zeros(12, 2)}
EXPECTED = ExpectedTensors.like(GOOD)


def _task_stream(tensors, trailer=None, drop_last_chunk=False, consumed=None):
    specs, buffer = encode_tensors(tensors)
    yield pb.TaskMessage(header=pb.TaskHeader(protocol_version=PROTOCOL_VERSION, round=3, method="fedavg",
                                              payload=specs_to_proto(specs, len(buffer))))
    chunks = list(chunks_to_proto(buffer))
    for chunk in chunks[:-1] if drop_last_chunk else chunks:
        if consumed is not None:
            consumed.append(chunk)
        yield pb.TaskMessage(chunk=chunk)
    yield pb.TaskMessage(trailer=trailer or trailer_to_proto(buffer))


def test_a_genuine_task_passes_and_arrives_as_float32():
    task = CoordinatorConnection._receive_task(_task_stream(GOOD), EXPECTED)
    assert isinstance(task, ReceivedTask) and task.round == 3
    for name, tensor in GOOD.items():
        assert torch.equal(task.tensors[name], tensor)


@pytest.mark.parametrize("tensors, message", [
    ({**GOOD, "layer.lora_A.weight": torch.randn(2, 11)}, "'layer.lora_A.weight' has shape [2, 11], expected [2, 10]"),
    ({"layer.lora_A.weight": GOOD["layer.lora_A.weight"]}, "missing ['layer.lora_B.weight']"),
    ({**GOOD, "other.weight": torch.zeros(1)}, "unexpected ['other.weight']"),
    ({**GOOD, "layer.lora_B.weight": torch.zeros(12, 2, dtype=torch.float64)}, "has dtype float64"),
], ids=["shape", "missing", "unexpected", "dtype"])
def test_a_task_whose_header_does_not_match_the_model_is_refused_before_its_payload(tensors, message):
    consumed: list = []
    with pytest.raises(InvalidTask) as raised:
        CoordinatorConnection._receive_task(_task_stream(tensors, consumed=consumed), EXPECTED)
    assert message in str(raised.value) and "round 3" in str(raised.value)
    assert consumed == []                      # not one payload chunk was read


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_task_with_non_finite_values_is_refused(bad):
    poisoned = {**GOOD, "layer.lora_B.weight": torch.full((12, 2), bad)}
    with pytest.raises(InvalidTask, match="'layer.lora_B.weight' contains NaN or Inf"):
        CoordinatorConnection._receive_task(_task_stream(poisoned), EXPECTED)


def test_a_damaged_task_is_reported_as_corrupt_so_that_it_is_fetched_again():
    with pytest.raises(CorruptTask, match="digest mismatch"):
        CoordinatorConnection._receive_task(_task_stream(GOOD, trailer=pb.PayloadTrailer(sha256=b"\1" * 32)), EXPECTED)
    with pytest.raises(CorruptTask, match="truncated"):
        CoordinatorConnection._receive_task(_task_stream(GOOD, drop_last_chunk=True), EXPECTED)
