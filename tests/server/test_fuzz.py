"""Fuzz a live coordinator with random and mutated messages: every reply is a clean status, nothing changes."""

from __future__ import annotations

import copy
import json
import random

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection, ReceivedTask
from common.codec import encode_tensors
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import specs_to_proto, trailer_to_proto
from tests.server.conftest import start_live_coordinator

CLEAN = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DATA_LOSS}
MESSAGES = 1200


def fuzz_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"enc.q.lora_A.weight": torch.randn(2, 300, generator=g) * 0.1,   # 2 chunks when chunk size is small
            "enc.q.lora_B.weight": torch.randn(200, 2, generator=g) * 0.1,
            "head.weight": torch.randn(3, 8, generator=g)}


class Upload:
    """A valid upload as mutable parts: header, chunks, trailer."""

    def __init__(self, client_id: str, tensors: dict[str, torch.Tensor]) -> None:
        specs, self.buffer = encode_tensors(tensors)
        self.header = pb.UpdateHeader(protocol_version=PROTOCOL_VERSION, client_id=client_id, round=1,
                                      num_examples=10, train_loss=0.5, train_seconds=1.0, local_steps=2,
                                      payload=specs_to_proto(specs, len(self.buffer)))
        self.chunks = [pb.PayloadChunk(offset=o, data=self.buffer[o:o + 1000]) for o in range(0, len(self.buffer), 1000)]
        self.trailer = trailer_to_proto(self.buffer)

    def messages(self) -> list[pb.UpdateMessage]:
        return ([pb.UpdateMessage(header=self.header)] + [pb.UpdateMessage(chunk=c) for c in self.chunks]
                + [pb.UpdateMessage(trailer=self.trailer)])


def _with_tensors(client_id: str, tensors: dict[str, torch.Tensor]) -> list[pb.UpdateMessage]:
    return Upload(client_id, tensors).messages()


def mutated_upload(rng: random.Random, client_id: str, base: dict[str, torch.Tensor]) -> list[pb.UpdateMessage]:
    """One invalid upload: a random choice among header, spec, stream and value mutations."""
    upload = Upload(client_id, base)
    header, spec = upload.header, rng.choice(upload.header.payload.tensors)
    kind = rng.randrange(22)
    if kind == 0:
        header.protocol_version = rng.choice([0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 5, 2**32 - 1])
    elif kind == 1:
        header.client_id = rng.randbytes(rng.randrange(0, 40)).hex()
    elif kind == 2:
        header.round = rng.choice([0, 2, 3, 99, 2**32 - 1])
    elif kind == 3:
        header.num_examples = 0
    elif kind == 4:
        header.payload.total_bytes = rng.choice([0, len(upload.buffer) - 1, len(upload.buffer) + 1, 2**62])
    elif kind == 5:
        spec.dtype = rng.choice([0, 6, 17, 99])
    elif kind == 6:
        spec.shape[0] = spec.shape[0] + rng.choice([-1, 1, 1000])
    elif kind == 7:
        spec.offset = spec.offset + rng.choice([1, 4, 10**6])
    elif kind == 8:
        spec.nbytes = spec.nbytes + rng.choice([-4, 4, 10**9])
    elif kind == 9:
        spec.name = rng.choice(["", "x", header.payload.tensors[0].name + "!", rng.randbytes(8).hex()])
    elif kind == 10:
        del header.payload.tensors[rng.randrange(len(header.payload.tensors))]
    elif kind == 11:
        chunk = rng.choice(upload.chunks)
        data = bytearray(chunk.data)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)      # bit flip: digest mismatch
        chunk.data = bytes(data)
    elif kind == 12:
        return upload.messages()[:-1]                                  # truncated: no trailer
    elif kind == 13:
        return upload.messages()[:rng.randrange(1, len(upload.chunks) + 1)] + [pb.UpdateMessage(trailer=upload.trailer)]
    elif kind == 14:
        messages = upload.messages()
        i, j = sorted(rng.sample(range(1, len(messages) - 1), 2))
        messages[i], messages[j] = messages[j], messages[i]           # out of order chunks
        return messages
    elif kind == 15:
        upload.trailer = pb.PayloadTrailer(sha256=rng.randbytes(rng.choice([0, 31, 32])))
    elif kind == 16:
        messages = upload.messages()
        return [messages[1]] + messages                                # chunk before header
    elif kind == 17:
        return []                                                      # empty stream
    elif kind == 18:
        bad = copy.deepcopy(base)
        name = rng.choice(list(bad))
        bad[name].view(-1)[rng.randrange(bad[name].numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        return _with_tensors(client_id, bad)                           # valid stream, non-finite values
    elif kind == 19:
        bad = copy.deepcopy(base)
        name = rng.choice(list(bad))
        bad[name] = bad[name] * 1e6                                    # above max_update_norm
        return _with_tensors(client_id, bad)
    elif kind == 20:
        bad = {k: v for k, v in base.items()}
        if rng.random() < 0.5:
            del bad[rng.choice(list(bad))]
        else:
            bad["extra.lora_A.weight"] = torch.zeros(2, 2)
        return _with_tensors(client_id, bad)                           # missing or extra tensors
    else:
        bad = {k: v for k, v in base.items()}
        name = rng.choice(list(bad))
        bad[name] = rng.choice([bad[name].reshape(-1), bad[name].to(torch.float64).t(), bad[name].to(torch.int64)])
        return _with_tensors(client_id, bad)                           # wrong shape or dtype
    return upload.messages()


def random_message(rng: random.Random, stub, client_id: str):
    """A random request on the other RPCs (never a valid Join under a new name: that is a legitimate change)."""
    kind = rng.randrange(4)
    if kind == 0:
        return lambda: stub.Join(pb.JoinRequest(protocol_version=rng.choice([0, 2, 99]), client_name=rng.randbytes(6).hex(),
                                                partition_index=rng.randrange(-5, 5)), timeout=10)
    if kind == 1:
        return lambda: stub.Join(pb.JoinRequest(protocol_version=PROTOCOL_VERSION, client_name=rng.randbytes(6).hex(),
                                                partition_index=rng.choice([-1, 0, 1, 2, 50, -7])), timeout=10)
    if kind == 2:
        request = pb.TaskRequest(protocol_version=rng.choice([0, 2, PROTOCOL_VERSION]),
                                 client_id=rng.randbytes(16).hex())
        return lambda: list(stub.GetTask(request, timeout=10))
    beats = [pb.Heartbeat(protocol_version=rng.choice([0, 3, PROTOCOL_VERSION]), client_id=rng.randbytes(16).hex())]
    if rng.random() < 0.3:
        beats.append(pb.Heartbeat(protocol_version=PROTOCOL_VERSION, client_id=client_id))   # id switch mid-stream
    return lambda: stub.KeepAlive(iter(beats), timeout=10)


@pytest.fixture
def live(tmp_path):
    # Two partitions, both taken: any Join under a new name is refused (the registry is full).
    coordinator = start_live_coordinator(tmp_path, fuzz_state(), num_clients=2, max_update_norm=100.0,
                                         heartbeat_timeout_s=600)
    yield coordinator
    coordinator.stop()


def test_fuzzed_messages_get_clean_statuses_and_change_nothing(live):
    a = CoordinatorConnection(live.address, patience_s=10)
    b = CoordinatorConnection(live.address, patience_s=10)
    info_a, info_b = a.join("client-a", 0), b.join("client-b", 1)
    task = a.next_task(info_a.client_id)
    assert isinstance(task, ReceivedTask)
    base = {k: v.clone() for k, v in task.tensors.items()}
    coordinator = live.coordinator
    registry_before, global_before = coordinator.registry.snapshot(), {k: v.clone() for k, v in coordinator._global.items()}

    rng = random.Random(20261128)
    statuses: dict[str, int] = {}
    for i in range(MESSAGES):
        if i % 3 == 2:
            call = random_message(rng, a.stub, info_a.client_id)
        else:
            messages = mutated_upload(rng, info_a.client_id, base)
            call = lambda messages=messages: a.stub.SubmitUpdate(iter(messages), timeout=10)  # noqa: E731
        try:
            result = call()
        except grpc.RpcError as error:
            assert error.code() in CLEAN, f"message {i}: {error.code()} {error.details()}"
            assert error.details(), f"message {i}: {error.code()} without a message"
            statuses[error.code().name] = statuses.get(error.code().name, 0) + 1
            continue
        # Only a KeepAlive may succeed (it carries no state but liveness).
        assert isinstance(result, pb.KeepAliveReply), f"message {i} was accepted: {result}"

    assert len(statuses) >= 5, statuses
    assert coordinator._round.index == 1 and coordinator._round.open and coordinator._round.updates == {}
    assert coordinator.registry.snapshot() == registry_before
    assert all(torch.equal(coordinator._global[k], v) for k, v in global_before.items())
    # The coordinator still works: the genuine uploads are accepted and the round commits.
    assert a.submit(info_a.client_id, 1, 10, base, 0.5, 1.0, 2).bytes_received > 0
    task_b = b.next_task(info_b.client_id)
    assert b.submit(info_b.client_id, 1, 10, task_b.tensors, 0.5, 1.0, 2).bytes_received > 0
    live.driver.join(timeout=30)
    lines = [json.loads(line) for line in (live.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1] and lines[0]["participants"] == ["client-a", "client-b"]
    a.close()
    b.close()
