"""A client as a torch.distributed job, below the sockets: torchrun's environment, the shards of a global
batch, and two real gloo ranks (on 127.0.0.1) that hand tasks over and train like one process."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from client.distributed import (SOLO, DataParallelGroup, DistributedSetupError, RankGroup, TorchrunEnv,
                                rank_device, shard_bounds)
from client.exit_codes import exit_code
from client.handoff import tick_interval
from tests.client.equivalence import assert_same_training
from tests.integration.harness import free_port

# --------------------------------------------------------------------------- the environment


def test_no_torchrun_means_no_process_group():
    assert TorchrunEnv.from_environ({}) is None
    assert TorchrunEnv.from_environ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None   # one process


def test_torchrun_layout_is_read_and_checked():
    assert TorchrunEnv.from_environ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == TorchrunEnv(4, 3, 1)
    with pytest.raises(DistributedSetupError, match="RANK and LOCAL_RANK unset.*torchrun"):
        TorchrunEnv.from_environ({"WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="RANK=2 is outside 0..1"):
        TorchrunEnv.from_environ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE='two' is not an integer"):
        TorchrunEnv.from_environ({"WORLD_SIZE": "two"})


def test_each_rank_takes_the_gpu_of_its_local_rank_and_a_numbered_gpu_is_refused():
    env = TorchrunEnv(2, 1, 1)
    assert rank_device("cpu", env) == "cpu"
    with pytest.raises(DistributedSetupError, match="--device cuda:1 under torchrun: use --device cuda"):
        rank_device("cuda:1", env)
    if torch.cuda.device_count() < 2:
        with pytest.raises(DistributedSetupError, match="LOCAL_RANK=1 but this node sees"):
            rank_device("cuda", env)


def test_a_bad_setup_exits_2_like_any_other_setup_error():
    assert exit_code(DistributedSetupError("x")) == 2
    assert exit_code(RuntimeError("x")) == 1


def test_idle_orders_come_well_within_the_timeout():
    assert tick_interval(300) == 30 and tick_interval(8) == 2


def test_dist_timeout_must_be_positive():
    from client.runtime import ClientOptions

    with pytest.raises(ValueError, match="--dist-timeout 0: must be a positive"):
        ClientOptions(coordinator="127.0.0.1:1", name="c", dist_timeout_s=0)


# --------------------------------------------------------------------------- shards of a global batch


@pytest.mark.parametrize("size, world", [(8, 2), (5, 2), (1, 2), (7, 3), (2, 4), (16, 1)])
def test_shards_are_disjoint_cover_the_batch_and_weigh_it_exactly(size, world):
    rows = list(range(size))
    seen, weight = [], dict.fromkeys(rows, 0.0)
    for rank in range(world):
        lo, hi = shard_bounds(size, rank, world)
        seen += rows[lo:hi]
        group = RankGroup()
        group.rank, group.world_size = rank, world
        mine, share = group.shard(rows)
        assert (mine, share) == ((rows[lo:hi], (hi - lo) * world / size) if hi > lo else (rows[:1], 0.0))
        for row in mine:                               # DDP's average over ranks of share x (mean over mine)
            weight[row] += share / len(mine) / world
    assert seen == rows
    assert weight == pytest.approx(dict.fromkeys(rows, 1 / size))     # = the mean over the whole batch


def test_a_single_process_is_untouched():
    rows = list(range(8))
    assert SOLO.shard(rows) == (rows, 1.0)
    assert SOLO.dropout_seed(123) == 123
    assert SOLO.batch_losses([0.5, 0.25], [8, 8], [8, 8]) == [0.5, 0.25]


# --------------------------------------------------------------------------- two real ranks

ROWS = 48
SCENARIOS = {
    # name: (method, rows, max_local_steps, gradient_accumulation_steps, rounds, other config)
    "subspace_reg_penalty": ("subspace_reg", ROWS, 3, 1, 1, {}),
    "rolora_alternates_a_and_b": ("rolora", ROWS, 3, 1, 2, {}),
    "fedex_lora_residual": ("fedex_lora", ROWS, 3, 1, 2, {}),
    # 17 rows in global batches of 8: 8, 8, then 1 (one rank has none), accumulated over 2 micro-batches.
    "uneven_last_batch": ("fedavg", 17, None, 2, 1, {}),
    # The RoBERTa-large reference trains with activation checkpointing (recomputed in backward, under DDP).
    "gradient_checkpointing": ("fedavg", ROWS, 3, 1, 1, {"gradient_checkpointing": True}),
}
PER_RANK_BATCH = 4
LEARNING_RATE = 5e-3


def _no_dropout_model(target: Path) -> str:
    """The tiny BERT without dropout: dropout masks are drawn per rank, so only without them does a 2-rank
    client compute what one process computes."""
    from common.tiny_models import create_tiny_bert

    create_tiny_bert(target, num_labels=5, seed=0)
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config_path.write_text(json.dumps(config))
    return str(target)


def _config(model_dir: str, method: str, batch: int, steps: int | None, accumulation: int, other: dict):
    from common.config import RunConfig
    from tests.integration.conftest import tiny_run_config

    return RunConfig.from_flat(tiny_run_config(model_dir, method=method, per_device_train_batch_size=batch,
                                               max_local_steps=steps, gradient_accumulation_steps=accumulation,
                                               learning_rate=LEARNING_RATE, **other))


def _rows(count: int) -> list[dict]:
    words = ["market", "match", "film", "vote", "chip", "goal", "album", "shares", "minister", "phone"]
    return [{"text": " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12 + i % 9)), "label": i % 5}
            for i in range(count)]


def _solo_rounds(model_dir: str, scenario: str) -> list[dict]:
    """One process at batch 2b: each round's task (as the coordinator would send it) and the result."""
    from client.trainer import LocalTrainer
    from common.adapter import AdapterState, ClientUpdate
    from common.aggregation import AggregationSettings
    from common.methods import get_method
    from common.methods.base import Recipient

    method_name, rows, steps, accumulation, rounds, other = SCENARIOS[scenario]
    config = _config(model_dir, method_name, 2 * PER_RANK_BATCH, steps, accumulation, other)
    trainer = LocalTrainer(config, _rows(rows), 5, show_progress=False)
    method = get_method(method_name)
    adapter = {k: v.float() for k, v in trainer.built.get_adapter_state().items()}
    state: dict[str, torch.Tensor] = {}
    settings = AggregationSettings(scaling=config.model.scaling, rank=config.model.lora_rank,
                                   max_update_norm=config.federation.max_effective_lora_update_norm)
    recorded = []
    for round_index in range(1, rounds + 1):
        task = method.task_tensors(adapter, state, Recipient(round_index, rank=config.model.lora_rank,
                                                             base_residual_round=trainer.base_residual_round))
        seed = 1000 + round_index
        result = trainer.train_round(round_index, dict(task), seed, base_residual_round=round_index - 1)
        recorded.append({"round": round_index, "task": task, "seed": seed, "tensors": result.tensors,
                         "loss": result.train_loss, "steps": result.local_steps, "examples": result.num_examples})
        whole = AdapterState.from_state_dict(method.complete_upload(adapter, result.tensors))
        # A second, made-up client, so that a server step leaves fedex_lora a non-zero residual.
        other = AdapterState.from_state_dict({k: v * (1.5 if k.endswith("lora_A.weight") else -0.5)
                                              for k, v in whole.to_state_dict().items()})
        step = method.server_step(adapter, state, [ClientUpdate("a", rows, whole), ClientUpdate("b", rows, other)],
                                  settings, round_index)
        adapter = {k: v.float() for k, v in step.adapter.to_state_dict().items()}
        state = {k: v.float() for k, v in step.state.items()}
    return recorded


def _rank_main(rank: int, world: int, port: int, model_dir: str, tasks_path: str, out_dir: str) -> None:
    """One rank, as torchrun would start it: the handoff, then every scenario's recorded tasks at batch b."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    from client.connection import ReceivedTask
    from client.distributed import start_process_group
    from client.handoff import Handoff
    from client.trainer import LocalTrainer

    env = TorchrunEnv.from_environ(os.environ)
    start_process_group(env, "cpu", timeout_s=120)
    group = DataParallelGroup(env, "cpu")
    out = Path(out_dir)

    # The handoff: rank 0 waits 6 s on a "coordinator" while the group's timeout is 4 s; IDLE orders keep
    # rank 1 from timing out. Then a task, and an abort with an exit code.
    handoff = Handoff(timeout_s=4)
    sent = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.tensor([1.5, -2.0])}
    if rank == 0:
        assert handoff.wait_on(lambda: time.sleep(6) or "joined") == "joined"
        handoff.task(ReceivedTask(round=3, method="fedavg", round_seed=77, tensors=sent, payload_bytes=0,
                                  base_residual_round=2))
        handoff.wait_on(lambda: None)               # the upload: the followers listen again
        handoff.abort(6, "task refused")
    else:
        order, tensors = handoff.receive()
        stop, _ = handoff.receive()
        torch.save({"order": (order.kind, order.round, order.round_seed, order.base_residual_round),
                    "tensors": tensors, "stop": (stop.kind, stop.exit_code, stop.reason)}, out / "handoff.pt")

    recorded = torch.load(tasks_path)
    results = {}
    for scenario, rounds in recorded.items():
        method_name, rows, steps, accumulation, _, other = SCENARIOS[scenario]
        config = _config(model_dir, method_name, PER_RANK_BATCH, steps, accumulation, other)
        trainer = LocalTrainer(config, _rows(rows), 5, show_progress=False, group=group)
        results[scenario] = []
        for entry in rounds:
            result = trainer.train_round(entry["round"], dict(entry["task"]), entry["seed"],
                                         base_residual_round=entry["round"] - 1)
            results[scenario].append({"tensors": result.tensors, "loss": result.train_loss,
                                      "steps": result.local_steps, "examples": result.num_examples})
    torch.save(results, out / f"results-{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("two-ranks")
    model_dir = _no_dropout_model(work / "model")
    solo = {scenario: _solo_rounds(model_dir, scenario) for scenario in SCENARIOS}
    torch.save({s: [{k: e[k] for k in ("round", "task", "seed")} for e in rounds] for s, rounds in solo.items()},
               work / "tasks.pt")
    mp.spawn(_rank_main, args=(2, free_port(), model_dir, str(work / "tasks.pt"), str(work)), nprocs=2, join=True)
    return solo, [torch.load(work / f"results-{rank}.pt") for rank in range(2)], torch.load(work / "handoff.pt")


def test_rank_zero_hands_over_tasks_and_keeps_the_others_waiting_past_the_timeout(two_ranks):
    _, _, handoff = two_ranks
    assert handoff["order"] == ("task", 3, 77, 2)
    assert handoff["tensors"]["a"].dtype == torch.bfloat16
    torch.testing.assert_close(handoff["tensors"], {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3),
                                                    "b": torch.tensor([1.5, -2.0])}, rtol=0, atol=0)
    assert handoff["stop"] == ("abort", 6, "task refused")


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_two_ranks_at_batch_b_train_what_one_process_trains_at_batch_2b(two_ranks, scenario):
    solo, ranks, _ = two_ranks
    for expected, rank0, rank1 in zip(solo[scenario], ranks[0][scenario], ranks[1][scenario], strict=True):
        torch.testing.assert_close(rank0["tensors"], rank1["tensors"], rtol=0, atol=0)   # DDP keeps ranks equal
        assert_same_training(rank0["tensors"], expected["tensors"], lr=LEARNING_RATE)
        assert rank0["loss"] == pytest.approx(expected["loss"], rel=1e-5)               # the global batches' loss
        assert (rank0["steps"], rank0["examples"]) == (expected["steps"], expected["examples"])
