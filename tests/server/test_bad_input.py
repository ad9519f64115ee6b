"""Each kind of bad upload gets its own status and a message naming the problem; the round stays as it was."""

from __future__ import annotations

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection
from common.codec import encode_tensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import chunks_to_proto, specs_to_proto, trailer_to_proto
from tests.server.conftest import small_state, start_live_coordinator

INVALID, PRECONDITION, DATA_LOSS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.DATA_LOSS)


def _changed(tensors, name, value):
    out = dict(tensors)
    out[name] = value
    return out


CASES = {
    "missing tensor": (lambda t: {k: v for k, v in t.items() if k != "classifier.weight"}, INVALID,
                       "missing ['classifier.weight']"),
    "extra tensor": (lambda t: {**t, "other.lora_A.weight": torch.zeros(2, 2)}, INVALID,
                     "unexpected ['other.lora_A.weight']"),
    "wrong shape": (lambda t: _changed(t, "layer.lora_A.weight", torch.zeros(2, 11)), INVALID,
                    "'layer.lora_A.weight' has shape [2, 11], expected [2, 10]"),
    "wrong dtype": (lambda t: _changed(t, "classifier.weight", torch.zeros(3, 4, dtype=torch.int64)), INVALID,
                    "has dtype int64; send float32, float16, bfloat16"),
    "NaN": (lambda t: _changed(t, "layer.lora_B.weight", torch.full((12, 2), float("nan"))), INVALID,
            "'layer.lora_B.weight' contains NaN or Inf"),
    "Inf": (lambda t: _changed(t, "classifier.weight", torch.full((3, 4), float("inf"))), INVALID,
            "'classifier.weight' contains NaN or Inf"),
    "norm above bound": (lambda t: _changed(t, "layer.lora_A.weight", torch.full((2, 10), 100.0)), INVALID,
                         "above max_update_norm=50.0"),
}


@pytest.fixture
def round_open(tmp_path):
    live = start_live_coordinator(tmp_path, small_state(), max_update_norm=50.0)
    connection = CoordinatorConnection(live.address, patience_s=10)
    info = connection.join("client-0", 0)
    task = connection.next_task(info.client_id)
    yield live, connection, info.client_id, task.tensors
    connection.close()
    live.stop()


def _send(connection, client_id, tensors, mutate_header=None, mutate_stream=None):
    specs, buffer = encode_tensors(tensors)
    header = pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, client_id=client_id, round=1, num_examples=10,
                             payload=specs_to_proto(specs, len(buffer)))
    if mutate_header:
        mutate_header(header)
    messages = ([pb.UpdateMessage(header=header)] + [pb.UpdateMessage(chunk=c) for c in chunks_to_proto(buffer)]
                + [pb.UpdateMessage(trailer=trailer_to_proto(buffer))])
    if mutate_stream:
        messages = mutate_stream(messages)
    return connection.stub.SubmitUpdate(iter(messages), timeout=10)


def _assert_untouched(live):
    current = live.coordinator._round
    assert current.index == 1 and current.open and current.updates == {} and current.dropped == {}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_tensors_are_rejected_with_a_named_reason(round_open, case):
    live, connection, client_id, tensors = round_open
    mutate, code, message = CASES[case]
    with pytest.raises(grpc.RpcError) as raised:
        _send(connection, client_id, mutate(tensors))
    assert raised.value.code() == code and message in raised.value.details(), raised.value.details()
    _assert_untouched(live)
    assert _send(connection, client_id, tensors).bytes_received > 0   # the genuine update still goes through


@pytest.mark.parametrize("mutate_header, mutate_stream, code, message", [
    (lambda h: setattr(h, "protocol_version", 3), None, PRECONDITION, "protocol version 3 is not supported"),
    (lambda h: setattr(h, "client_id", "f" * 32), None, grpc.StatusCode.NOT_FOUND, "unknown client id"),
    (lambda h: setattr(h, "round", 2), None, PRECONDITION, "the open round is 1"),
    (lambda h: setattr(h.payload, "total_bytes", 3 << 30), None, grpc.StatusCode.RESOURCE_EXHAUSTED,
     "exceeds the coordinator's limit"),
    (None, lambda m: m[:-1], DATA_LOSS, "truncated"),
    (None, lambda m: m[:-1] + [pb.UpdateMessage(trailer=pb.PayloadTrailer(sha256=b"\1" * 32))], DATA_LOSS,
     "digest mismatch"),
    (None, lambda m: m[1:], INVALID, "must start with an UpdateHeader"),
], ids=["version", "unknown client", "wrong round", "oversize", "truncated", "bad digest", "no header"])
def test_bad_streams_are_rejected_with_a_named_reason(round_open, mutate_header, mutate_stream, code, message):
    live, connection, client_id, tensors = round_open
    with pytest.raises(grpc.RpcError) as raised:
        _send(connection, client_id, tensors, mutate_header, mutate_stream)
    assert raised.value.code() == code and message in raised.value.details(), raised.value.details()
    _assert_untouched(live)
