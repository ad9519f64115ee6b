"""The methods beyond the study through real federations (a coordinator and client processes on loopback,
the tiny BERT): FFA-LoRA, RoLoRA, FedEx-LoRA (and its residual log across a kill -9 and resume),
heterogeneous client ranks and the bfloat16 wire."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, REFERENCE_SUFFIX
from common.methods.fedex_lora import (LOG_PREFIX, RESIDUAL_A_SUFFIX, RESIDUAL_B_SUFFIX, RESIDUAL_DENSE_SUFFIX,
                                       base_residual_through, read_log)
from server.outputs import RunDirectory
from tests.integration.conftest import run_federation, tiny_run_config
from tests.integration.harness import Federation, free_port

F64 = torch.float64


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _adapter(run_dir, round_index: int) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run_dir / "adapters" / f"round_{round_index:03d}" / "adapter_model.safetensors"))
    return {k.replace(".default", ""): v for k, v in tensors.items()}


def _received(run, client: int) -> dict[int, dict[str, torch.Tensor]]:
    """Round -> the task tensors client ``client`` received (only rounds it was sampled in)."""
    return {int(path.stem.split("_")[1]): load_file(str(path))
            for path in sorted(run.received_dirs[client].glob("round_*.safetensors"))}


def _factors(tensors: dict[str, torch.Tensor], suffix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if k.endswith(suffix)}


def test_ffa_lora_keeps_the_shared_a_and_uploads_b_only(tmp_path, tiny_model_dir):
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="ffa_lora"))
    initial = _factors(_received(run, 0)[1], LORA_A_SUFFIX)
    for round_index in (1, 2):
        final_a = _factors(_adapter(run.run_dir, round_index), LORA_A_SUFFIX)
        assert final_a.keys() == initial.keys()
        assert all(torch.equal(final_a[k], initial[k]) for k in initial)          # A never moved
    for client in range(3):
        for tensors in _received(run, client).values():                          # every client holds the same A
            assert all(torch.equal(tensors[k], initial[k]) for k in initial)
    for m in _metrics(run.run_dir):
        assert m["bytes_up"] * 2 < m["bytes_down"] * 1.2                         # no A in any upload
    updates = load_file(str(run.run_dir / "updates" / "round_002" / "client-0.safetensors"))
    assert any(not torch.equal(updates[k], _received(run, 0)[2][k]) for k in updates if k.endswith(LORA_B_SUFFIX))


def test_rolora_alternates_and_the_frozen_factor_is_bit_identical(tmp_path, tiny_model_dir):
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="rolora", num_rounds=3))
    start = _received(run, 0)[1]
    rounds = {r: _adapter(run.run_dir, r) for r in (1, 2, 3)}
    previous = {1: start, 2: rounds[1], 3: rounds[2]}
    for r, frozen, trained in ((1, LORA_A_SUFFIX, LORA_B_SUFFIX), (2, LORA_B_SUFFIX, LORA_A_SUFFIX),
                               (3, LORA_A_SUFFIX, LORA_B_SUFFIX)):
        assert all(torch.equal(rounds[r][k], previous[r][k]) for k in _factors(start, frozen)), r
        assert any(not torch.equal(rounds[r][k], previous[r][k]) for k in _factors(start, trained)), r
    metrics = _metrics(run.run_dir)
    assert all(m["aggregation_error"] < 1e-5 for m in metrics)                   # exact: the frozen factor is shared


def test_fedex_lora_sends_each_client_the_residual_it_lacks_and_aggregates_exactly(tmp_path, tiny_model_dir):
    # 2 of 3 clients per round over 4 rounds: some client skips a round and must catch up on its residual.
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="fedex_lora", num_rounds=4,
                                                   client_fraction=0.6))
    metrics = _metrics(run.run_dir)
    assert metrics[0]["residual_bytes_down"] == 0                                  # nothing to fold in before round 1
    assert all(m["residual_bytes_down"] > 0 for m in metrics[1:])
    assert all(m["aggregation_error"] < 1e-5 for m in metrics)                     # residual included: exact
    log = read_log(RunDirectory(run.run_dir).load_checkpoint()[1])
    assert sorted(log) == [1, 2, 3, 4]
    caught_up = 0
    for client in range(3):
        last = 0                                            # the last round whose residual this client folded in
        for round_index, tensors in sorted(_received(run, client).items()):
            pending = [log[r] for r in range(last + 1, round_index)]
            for layer in log[1]:
                dense = tensors.get(layer + RESIDUAL_DENSE_SUFFIX)
                if dense is None and layer + RESIDUAL_B_SUFFIX in tensors:
                    dense = tensors[layer + RESIDUAL_B_SUFFIX].to(F64) @ tensors[layer + RESIDUAL_A_SUFFIX].to(F64)
                if not pending:
                    assert dense is None, (client, round_index, layer)
                    continue
                expected = sum(b.to(F64) @ a.to(F64) for b, a in (p[layer] for p in pending))
                torch.testing.assert_close(dense.to(F64), expected, rtol=1e-6, atol=1e-6)
            caught_up += len(pending) > 1
            last = round_index - 1
    assert caught_up >= 1, "no client skipped a round: the catch-up path was not exercised"
    # The evaluated model is the pretrained base + the logged residual through round 4 + adapters/round_004.
    from common.config import RunConfig
    from common.tasks import load_task_data
    from server.global_model import ServerModel

    config = RunConfig.load(run.run_dir / "config.yaml")
    data = load_task_data(config.data, seed=config.federation.seed)
    rebuilt = ServerModel(config, data.eval, len(data.label_names), device="cpu")
    rebuilt.add_to_base(base_residual_through(RunDirectory(run.run_dir).load_checkpoint()[1], 4))
    evaluation = rebuilt.evaluate(_adapter(run.run_dir, 4))
    assert evaluation["accuracy"] == metrics[-1]["accuracy"]
    assert abs(evaluation["loss"] - metrics[-1]["loss"]) < 1e-6


def test_fedex_lora_kill9_and_resume_keeps_the_residual_log_and_the_adapter_bit_for_bit(tmp_path, tiny_model_dir):
    config = tiny_run_config(tiny_model_dir, method="fedex_lora", num_rounds=4, client_fraction=0.6,
                             max_local_steps=6, save_client_updates=False)
    with Federation(tmp_path / "straight", config) as straight:
        straight.start(3)
        assert straight.finish() == 0
        expected_adapter = _adapter(straight.run_dir, 4)
        expected_state = RunDirectory(straight.run_dir).load_checkpoint()[1]
        expected_accuracy = [m["accuracy"] for m in straight.metrics()]

    with Federation(tmp_path / "crashed", config, port=free_port()) as federation:
        federation.start(3)
        federation.wait_for(lambda: len(federation.metrics()) >= 2, 240, "two committed rounds",
                            watch=federation.coordinator)
        federation.coordinator.kill()                   # kill -9 after round 2
        federation.coordinator.wait()
        federation.start_coordinator("--resume")
        assert federation.finish() == 0, federation.log("coordinator.log")[-3000:]
        assert "base-weight increments re-applied" in federation.log("coordinator.log")
        assert all(p.returncode == 0 for p in federation.clients.values())
        actual_adapter = _adapter(federation.run_dir, 4)
        actual_state = RunDirectory(federation.run_dir).load_checkpoint()[1]
        actual_accuracy = [m["accuracy"] for m in federation.metrics()]
    assert actual_adapter.keys() == expected_adapter.keys()
    assert all(torch.equal(actual_adapter[k], expected_adapter[k]) for k in expected_adapter)
    residual = sorted(k for k in expected_state if k.startswith(LOG_PREFIX))
    assert residual and sorted(k for k in actual_state if k.startswith(LOG_PREFIX)) == residual
    assert all(torch.equal(actual_state[k], expected_state[k]) for k in residual)   # the base-weight residual
    assert actual_accuracy == expected_accuracy        # the evaluation model re-applied the log before round 3


def _ranks_by_client(run, client_ranks: list[int]) -> dict[int, int]:
    """Client index -> its rank: client_ranks of the partition the coordinator gave it (first come, first served)."""
    partitions = {c: int(re.search(r"as partition (\d+) of", log).group(1)) for c, log in enumerate(run.client_logs)}
    return {client: client_ranks[partition] for client, partition in partitions.items()}


def test_heterogeneous_ranks_each_client_receives_its_top_part_and_trains_at_its_rank(tmp_path, tiny_model_dir):
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="subspace_reg", client_ranks=[4, 2, 1]))
    ranks = _ranks_by_client(run, [4, 2, 1])
    received = {client: _received(run, client) for client in range(3)}
    full = next(client for client, rank in ranks.items() if rank == 4)
    for client, rank in ranks.items():
        assert f"LoRA rank {rank})" in run.client_logs[client]
        for tensors in received[client].values():
            assert all(t.shape[0] == rank for t in _factors(tensors, LORA_A_SUFFIX).values())
        bases = _factors(received[client][2], REFERENCE_SUFFIX)
        assert bases and all(t.shape[1] == rank for t in bases.values())
        for name, basis in bases.items():                                     # exactly the top-r_i part
            assert torch.equal(basis, received[full][2][name][:, :rank])
    final = _adapter(run.run_dir, 2)
    assert all(t.shape[0] == 4 for t in _factors(final, LORA_A_SUFFIX).values())   # the global rank stays 4


def test_heterogeneous_ranks_with_fedavg_zero_pad_the_low_rank_uploads(tmp_path, tiny_model_dir):
    run = run_federation(tmp_path, tiny_run_config(tiny_model_dir, method="fedavg", client_ranks=[4, 2, 2]))
    ranks = _ranks_by_client(run, [4, 2, 2])
    for client, rank in ranks.items():
        assert all(t.shape[0] == rank for t in _factors(_received(run, client)[2], LORA_A_SUFFIX).values())
    low = next(client for client, rank in ranks.items() if rank == 2)
    padded = load_file(str(run.run_dir / "updates" / "round_001" / f"client-{low}.safetensors"))
    for name, tensor in _factors(padded, LORA_A_SUFFIX).items():
        assert tensor.shape[0] == 4 and torch.equal(tensor[2:], torch.zeros_like(tensor[2:])), name


def test_a_bfloat16_wire_halves_the_bytes_and_carries_bfloat16_values(tmp_path, tiny_model_dir):
    runs = {}
    for wire in ("float32", "bfloat16"):
        runs[wire] = run_federation(tmp_path / wire, tiny_run_config(tiny_model_dir, method="subspace_reg",
                                                                     wire_dtype=wire))
    full, half = _metrics(runs["float32"].run_dir), _metrics(runs["bfloat16"].run_dir)
    for a, b in zip(full, half):
        assert 2 * b["bytes_down"] == a["bytes_down"] and 2 * b["bytes_up"] == a["bytes_up"]
    for tensors in _received(runs["bfloat16"], 0).values():
        for name, tensor in tensors.items():
            assert torch.equal(tensor.to(torch.bfloat16).float(), tensor), name   # what arrived is bfloat16
    assert abs(full[-1]["accuracy"] - half[-1]["accuracy"]) <= 0.1
