"""Hostile peers against real processes: a hand-written client sends a real coordinator process uploads meant
to exhaust its memory; a real client process meets a coordinator that sends a poisoned adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import grpc
import pytest
import torch

from client.connection import CoordinatorConnection, ReceivedTask
from common.config import RunConfig
from proto import PROTOCOL_VERSION
from proto import federation_pb2 as pb
from proto.serde import CHUNK_BYTES
from tests.integration.conftest import tiny_run_config
from tests.integration.harness import ROOT, Federation

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size so far."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _oversized_upload(client_id: str, task: ReceivedTask, num_examples: int, declared_bytes: int, sent: list[int]):
    """The task's own tensor names, but its first LoRA factor declared as ``declared_bytes``; chunks are made
    lazily (the attacker holds one), and ``sent`` counts how many the coordinator pulled."""
    names = list(task.tensors)
    victim = next(n for n in names if n.endswith("lora_A.weight"))
    tensors, offset = [], 0
    for name in names:
        shape = [declared_bytes // 4] if name == victim else list(task.tensors[name].shape)
        nbytes = declared_bytes if name == victim else task.tensors[name].numel() * 4
        tensors.append(pb.TensorSpec(name=name, dtype=pb.FLOAT32, shape=shape, offset=offset, nbytes=nbytes))
        offset += nbytes
    yield pb.UpdateMessage(header=pb.UpdateHeader(
        protocol_version=PROTOCOL_VERSION, client_id=client_id, round=task.round, num_examples=num_examples,
        payload=pb.PayloadHeader(tensors=tensors, total_bytes=offset)))
    chunk = b"\0" * CHUNK_BYTES
    for position in range(0, offset, CHUNK_BYTES):
        sent.append(1)
        yield pb.UpdateMessage(chunk=pb.PayloadChunk(offset=position, data=chunk))


def test_uploads_declared_at_hundreds_of_mib_are_refused_from_the_header_and_cost_no_memory(tmp_path, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir, num_clients=1, num_rounds=1, heartbeat_timeout_s=120)
    with Federation(tmp_path, config) as federation:
        federation.start_coordinator()
        address = federation.wait_address()
        attacker = CoordinatorConnection(address, patience_s=30)
        try:
            info = attacker.join("attacker", -1)
            task = attacker.next_task(info.client_id)
            assert isinstance(task, ReceivedTask)
            pid = federation.coordinator.pid
            size = _partition_size(federation)       # an honest claim: only the payload lies
            before = _peak_rss_mb(pid)

            sent: list[int] = []
            with pytest.raises(grpc.RpcError) as raised:
                attacker.stub.SubmitUpdate(_oversized_upload(info.client_id, task, size, 512 * MIB, sent), timeout=60)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "has shape [134217728], expected" in raised.value.details()

            # Three concurrent 384 MiB streams from the same client.
            errors: list[grpc.RpcError] = []

            def attack() -> None:
                try:
                    attacker.stub.SubmitUpdate(_oversized_upload(info.client_id, task, size, 384 * MIB, sent), timeout=60)
                except grpc.RpcError as error:
                    errors.append(error)

            threads = [threading.Thread(target=attack) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=90)
            assert len(errors) == 3 and {e.code() for e in errors} <= {grpc.StatusCode.INVALID_ARGUMENT,
                                                                       grpc.StatusCode.ABORTED}
            after = _peak_rss_mb(pid)
            print(f"coordinator peak RSS {before:.0f} -> {after:.0f} MB; {len(sent)} payload chunks pulled by gRPC")
            # 512 + 3 x 384 MiB were declared; gRPC's flow control lets a few chunks in flight at most.
            assert after - before < 50, f"peak RSS grew from {before:.0f} to {after:.0f} MB"
            assert len(sent) < 4 * 64, f"the coordinator pulled {len(sent)} MiB of payload it was going to refuse"
            # Nothing changed: the genuine upload still counts and the run completes.
            reply = attacker.submit(info.client_id, task.round, size, task.tensors, 0.1, 1.0, 1)
            assert reply.bytes_received > 0
        finally:
            attacker.close()
        assert federation.finish(timeout_s=120) == 0
        assert federation.metrics()[0]["participants"] == ["attacker"]


def _partition_size(federation: Federation) -> int:
    return int(json.loads((federation.run_dir / "partition_stats.json").read_text())["sizes"][0])


def test_a_client_never_trains_on_a_poisoned_global_adapter(tmp_path, tiny_model_dir):
    from server.app import build_coordinator

    config = RunConfig.from_flat(tiny_run_config(tiny_model_dir, num_clients=1, num_rounds=1, round_timeout_s=60))
    app = build_coordinator(config, tmp_path / "run", address="127.0.0.1:0")
    coordinator = app.coordinator
    poisoned = next(name for name in coordinator._global if name.endswith("lora_A.weight"))
    coordinator._global[poisoned] = torch.full_like(coordinator._global[poisoned], float("nan"))
    driver = threading.Thread(target=lambda: coordinator.run(wait_for_clients_s=120), daemon=True)
    driver.start()
    try:
        result = subprocess.run([sys.executable, "-m", "client", "--coordinator", f"127.0.0.1:{app.port}",
                                 "--name", "careful", "--patience", "30"], cwd=ROOT, capture_output=True, text=True,
                                timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 6, result.stderr[-3000:]
        assert f"tensor {poisoned!r} contains NaN or Inf" in result.stderr
        assert "Traceback" not in result.stderr
        current = coordinator._round
        assert current is not None and current.updates == {}          # it never uploaded
    finally:
        coordinator.request_stop()
        driver.join(timeout=60)
        app.stop(0)
