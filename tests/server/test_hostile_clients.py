"""A client with a valid session that lies: about its size, its payload, or by opening streams in parallel.
Every refusal leaves the round as it was, and honest clients still commit it."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection, JoinRefused
from common.codec import encode_tensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import CHUNK_BYTES, chunks_to_proto, specs_to_proto, trailer_to_proto
from tests.server.conftest import small_state, start_live_coordinator
from tests.server.test_bad_input import _assert_untouched, round_open  # noqa: F401  (a fixture)
from tests.server.test_rounds import _lines, _wait_round


def _header(client_id: str, tensors: dict[str, torch.Tensor], num_examples: int = 10) -> tuple[pb.UpdateHeader, bytes]:
    specs, buffer = encode_tensors(tensors)
    return pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, client_id=client_id, round=1, num_examples=num_examples,
                           payload=specs_to_proto(specs, len(buffer))), buffer


def _stream(header: pb.UpdateHeader, buffer: bytes):
    yield pb.UpdateMessage(header=header)
    for chunk in chunks_to_proto(buffer):
        yield pb.UpdateMessage(chunk=chunk)
    yield pb.UpdateMessage(trailer=trailer_to_proto(buffer))


@pytest.mark.parametrize("claimed", [10**12, 11, 9])
def test_an_upload_must_claim_exactly_the_partition_the_coordinator_handed_out(round_open, claimed):
    live, connection, client_id, tensors = round_open
    header, buffer = _header(client_id, tensors, num_examples=claimed)
    with pytest.raises(grpc.RpcError) as raised:
        connection.stub.SubmitUpdate(_stream(header, buffer), timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"claims num_examples={claimed}" in raised.value.details()
    assert "holds 10 examples (partition 0, as the coordinator handed it out)" in raised.value.details()
    _assert_untouched(live)
    header, buffer = _header(client_id, tensors, num_examples=10)
    assert connection.stub.SubmitUpdate(_stream(header, buffer), timeout=10).bytes_received > 0


def test_a_huge_declared_upload_is_refused_from_its_header_before_any_payload_byte(round_open):
    live, connection, client_id, tensors = round_open
    # The right tensor names, but lora_A declared as 512 MiB; the payload generator counts what gRPC pulled.
    huge = {**tensors, "layer.lora_A.weight": torch.empty(0)}
    specs, _ = encode_tensors(huge)
    header, _ = _header(client_id, tensors)
    del header.payload.tensors[:]
    offset = 0
    for spec in specs:
        shape, nbytes = ([2, 64 << 20], 512 << 20) if spec.name == "layer.lora_A.weight" else (list(spec.shape), spec.nbytes)
        header.payload.tensors.append(pb.TensorSpec(name=spec.name, dtype=pb.FLOAT32, shape=shape, offset=offset,
                                                    nbytes=nbytes))
        offset += nbytes
    header.payload.total_bytes = offset
    sent = {"chunks": 0}
    chunk = b"\0" * CHUNK_BYTES

    def messages():
        yield pb.UpdateMessage(header=header)
        for offset in range(0, 512 << 20, CHUNK_BYTES):
            sent["chunks"] += 1
            yield pb.UpdateMessage(chunk=pb.PayloadChunk(offset=offset, data=chunk))

    with pytest.raises(grpc.RpcError) as raised:
        connection.stub.SubmitUpdate(messages(), timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'layer.lora_A.weight' has shape [2, 67108864], expected [2, 10]" in raised.value.details()
    assert sent["chunks"] < 64, "the coordinator should refuse the header, not read the payload"
    _assert_untouched(live)


def test_a_second_concurrent_upload_stream_from_one_client_is_refused(round_open):
    live, connection, client_id, tensors = round_open
    header, buffer = _header(client_id, tensors)
    release = threading.Event()

    def held_open():                       # the header and one chunk, then the stream stays open
        yield pb.UpdateMessage(header=header)
        yield pb.UpdateMessage(chunk=pb.PayloadChunk(offset=0, data=buffer[:8]))
        release.wait(20)

    first = connection.stub.SubmitUpdate.future(held_open(), timeout=30)
    try:
        for _ in range(500):               # until the first stream holds the client's upload slot (bounded)
            if "client-0" in live.coordinator._uploading:
                break
            threading.Event().wait(0.02)
        with pytest.raises(grpc.RpcError) as raised:
            connection.stub.SubmitUpdate(_stream(header, buffer), timeout=10)
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assert "an upload from 'client-0' is already in progress" in raised.value.details()
        _assert_untouched(live)
    finally:
        release.set()
        with pytest.raises(grpc.RpcError):                 # the held stream ends without a trailer
            first.result(timeout=30)
    assert "client-0" not in live.coordinator._uploading   # the slot is free again
    assert connection.submit(client_id, 1, 10, tensors, 0.1, 1.0, 1).bytes_received > 0


def test_own_data_is_declared_at_join_bounded_by_the_cap_and_binds_the_uploads(tmp_path):
    live = start_live_coordinator(tmp_path, small_state(), num_clients=2, client_fraction=1.0,
                                  max_examples_per_client=50)
    greedy = CoordinatorConnection(live.address, patience_s=10)
    honest = CoordinatorConnection(live.address, patience_s=10)
    try:
        with pytest.raises(JoinRefused, match="declares 51 examples of its own data, above max_examples_per_client=50"):
            greedy.join("greedy", -1, num_examples=51)
        assert live.coordinator.registry.num_joined() == 0
        own = honest.join("own-data", -1, num_examples=50)
        other = greedy.join("partition", -1)
        current = _wait_round(live, 1)
        assert set(current.sampled) == {own.client_id, other.client_id}
        task = honest.next_task(own.client_id)
        header, buffer = _header(own.client_id, task.tensors, num_examples=49)
        with pytest.raises(grpc.RpcError) as raised:
            honest.stub.SubmitUpdate(_stream(header, buffer), timeout=10)
        assert "holds 50 examples (its own data, as declared at join)" in raised.value.details()
        assert honest.submit(own.client_id, 1, 50, task.tensors, 0.1, 1.0, 1).bytes_received > 0
        assert greedy.submit(other.client_id, 1, 10, greedy.next_task(other.client_id).tensors, 0.1, 1.0, 1).bytes_received > 0
        live.driver.join(timeout=30)
    finally:
        greedy.close()
        honest.close()
        live.stop()
    (line,) = _lines(live)
    assert dict(zip(line["participants"], line["num_examples"])) == {"own-data": 50, "partition": 10}


def test_without_a_cap_own_data_may_claim_at_most_the_largest_partition(tmp_path):
    live = start_live_coordinator(tmp_path, small_state())      # partitions of 10 examples
    connection = CoordinatorConnection(live.address, patience_s=10)
    try:
        with pytest.raises(JoinRefused, match="above max_examples_per_client=10 .without the key: the largest partition"):
            connection.join("big", -1, num_examples=10**12)
        assert connection.join("fits", -1, num_examples=10).partition_index == 0
    finally:
        connection.close()
        live.stop()


@contextmanager
def _clients_of(live, count: int):
    """``count`` connections to a live coordinator; all closed, and the coordinator stopped, at the end."""
    connections = [CoordinatorConnection(live.address, patience_s=10) for _ in range(count)]
    try:
        yield connections
    finally:
        for connection in connections:
            connection.close()
        live.stop()


def test_a_retry_samples_only_live_sessions(tmp_path):
    # 3 clients, 2 sampled, quorum 2. c-silent joined but never opened its keep-alive: a retry must not pick it.
    live = start_live_coordinator(tmp_path, small_state(), num_clients=3, client_fraction=0.6, num_rounds=1,
                                  min_clients_per_round=2, quorum_policy="retry", max_round_retries=3)
    with _clients_of(live, 3) as connections:
        ids = [c.join(f"c{i}", i).client_id for i, c in enumerate(connections)]
        first = _wait_round(live, 1)
        silent = ids[2]
        for cid in ids:
            if cid != silent:
                live.coordinator.keepalive(cid, is_open=True)
        for cid in first.sampled:                       # the first attempt fails: every sampled session drops
            live.coordinator.keepalive(cid, is_open=True)
            live.coordinator.keepalive(cid, is_open=False)
        for _ in range(500):                            # until the round waiter has seen it (bounded)
            if len(first.dropped) == 2:
                break
            threading.Event().wait(0.02)
        for cid in ids:                                 # they come back (as after a reconnect), c-silent does not
            if cid != silent:
                live.coordinator.keepalive(cid, is_open=True)
        retry = _wait_round(live, 1, attempt=1)
        assert silent not in retry.sampled and set(retry.sampled) == set(ids) - {silent}
        for cid, connection in zip(ids, connections):
            if cid in retry.sampled:
                assert connection.submit(cid, 1, 10, connection.next_task(cid).tensors, 0.1, 1.0, 1).bytes_received > 0
        live.driver.join(timeout=30)
    (line,) = _lines(live)
    assert line["attempt"] == 1 and "c2" not in line["participants"]


def test_an_update_above_client_update_clip_norm_is_clipped_before_weighting_and_listed(tmp_path):
    from common.adapter import AdapterState
    from common.clipping import clip_update

    state = small_state()
    live = start_live_coordinator(tmp_path, state, num_clients=2, client_fraction=1.0, num_rounds=1,
                                  client_update_clip_norm=1.0, lora_rank=2, lora_alpha=2.0)
    with _clients_of(live, 2) as connections:
        ids = [c.join(name, i).client_id for i, (name, c) in enumerate(zip(["big", "small"], connections))]
        _wait_round(live, 1)
        task = connections[0].next_task(ids[0]).tensors
        big = {name: t + 5.0 for name, t in task.items()}
        small = {name: t + 1e-3 for name, t in task.items()}
        assert connections[0].submit(ids[0], 1, 10, big, 0.1, 1.0, 1).bytes_received > 0
        connections[1].next_task(ids[1])
        assert connections[1].submit(ids[1], 1, 10, small, 0.1, 1.0, 1).bytes_received > 0
        live.driver.join(timeout=30)
    (line,) = _lines(live)
    assert line["clipped_clients"] == ["big"]
    assert line["client_update_norms"]["big"] > 1.0 > line["client_update_norms"]["small"]
    # fedavg of the clipped big update and the untouched small one (equal weights).
    reference = AdapterState.from_state_dict(task)
    clipped_big = clip_update(AdapterState.from_state_dict(big), reference, 1.0, 1.0).state.to_state_dict()
    (evaluated,) = live.model.evaluated
    for name in task:
        assert torch.allclose(evaluated[name], (clipped_big[name] + small[name]) / 2, atol=1e-6), name
