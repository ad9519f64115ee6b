"""The wire end to end on loopback: a real gRPC server around a real Coordinator, real client connection.

The model is a stand-in (no transformer needed to test the transport); the
aggregation is the real one from common/.
"""

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection, ReceivedTask, RunFinished
from tests.server.conftest import start_live_coordinator
from common.codec import encode_tensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import CHUNK_BYTES, chunks_to_proto, specs_to_proto, trailer_to_proto


def big_state(d=150_000, r=8):
    """One adapted layer of 2 x 4.8 MB plus a head: a payload of over 9.6 MB."""
    g = torch.Generator().manual_seed(0)
    return {
        "layer.lora_A.weight": torch.randn(r, d, generator=g),
        "layer.lora_B.weight": torch.randn(d, r, generator=g) * 0.01,
        "classifier.weight": torch.randn(5, 16, generator=g),
    }


@pytest.fixture
def federation(tmp_path):
    live = start_live_coordinator(tmp_path, big_state(), max_update_norm=None)
    yield live.coordinator, live.address, live.model, tmp_path
    live.stop()


def test_payload_over_8_mib_crosses_both_ways_in_chunks(federation):
    coordinator, address, model, run_dir = federation
    connection = CoordinatorConnection(address, patience_s=10)
    info = connection.join("client-0", 0, "cpu")
    task = connection.next_task(info.client_id)
    assert isinstance(task, ReceivedTask) and task.round == 1
    assert task.payload_bytes > 8 * 1024 * 1024
    for name, tensor in big_state().items():
        assert torch.equal(task.tensors[name], tensor)
    reply = connection.submit(info.client_id, 1, 10, task.tensors, 0.5, 1.0, 3)
    assert reply.bytes_received > 0 and reply.bytes_received == task.payload_bytes
    # The round closes and the fedavg of one client is that client.
    with pytest.raises(RunFinished) as over:
        for _ in range(100):                     # long polls until the run is over (bounded)
            connection.next_task(info.client_id)
    assert over.value.rounds_completed == 1
    assert torch.allclose(model.evaluated[0]["layer.lora_B.weight"], big_state()["layer.lora_B.weight"])
    connection.close()


def test_chunks_stay_below_one_mib():
    _, buffer = encode_tensors(big_state())
    chunks = list(chunks_to_proto(buffer))
    assert len(chunks) == -(-len(buffer) // CHUNK_BYTES)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert all(c.ByteSize() < 4 * 1024 * 1024 for c in chunks)


def _upload(stub, header, buffer, trailer=None, chunks=None):
    def messages():
        yield pb.UpdateMessage(header=header)
        for chunk in (chunks if chunks is not None else chunks_to_proto(buffer)):
            yield pb.UpdateMessage(chunk=chunk)
        if trailer is not False:
            yield pb.UpdateMessage(trailer=trailer or trailer_to_proto(buffer))
    return stub.SubmitUpdate(messages(), timeout=30)


@pytest.mark.parametrize("mutate, code, message", [
    (lambda h, b: (h.__setattr__("protocol_version", 99), b), grpc.StatusCode.FAILED_PRECONDITION, "protocol version 99"),
    (lambda h, b: (h.__setattr__("client_id", "nobody"), b), grpc.StatusCode.NOT_FOUND, "unknown client"),
    (lambda h, b: (h.__setattr__("round", 7), b), grpc.StatusCode.FAILED_PRECONDITION, "open round is 1"),
])
def test_bad_headers_are_rejected_before_the_payload(federation, mutate, code, message):
    coordinator, address, _, _ = federation
    connection = CoordinatorConnection(address, patience_s=10)
    info = connection.join("client-0", 0, "cpu")
    task = connection.next_task(info.client_id)
    specs, buffer = encode_tensors(task.tensors)
    header = pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, client_id=info.client_id, round=1, num_examples=10,
                             payload=specs_to_proto(specs, len(buffer)))
    mutate(header, buffer)
    with pytest.raises(grpc.RpcError) as raised:
        _upload(connection.stub, header, buffer)
    assert raised.value.code() == code and message in raised.value.details()
    assert coordinator._round.updates == {}
    connection.close()


def test_bad_digest_and_truncation_are_data_loss(federation):
    coordinator, address, _, _ = federation
    connection = CoordinatorConnection(address, patience_s=10)
    info = connection.join("client-0", 0, "cpu")
    task = connection.next_task(info.client_id)
    specs, buffer = encode_tensors(task.tensors)
    header = pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, client_id=info.client_id, round=1, num_examples=10,
                             payload=specs_to_proto(specs, len(buffer)))
    with pytest.raises(grpc.RpcError) as raised:
        _upload(connection.stub, header, buffer, trailer=pb.PayloadTrailer(sha256=b"\0" * 32))
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS and "digest mismatch" in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        _upload(connection.stub, header, buffer, trailer=False, chunks=list(chunks_to_proto(buffer))[:2])
    assert raised.value.code() == grpc.StatusCode.DATA_LOSS and "truncated" in raised.value.details()
    assert coordinator._round.updates == {}
    connection.close()
