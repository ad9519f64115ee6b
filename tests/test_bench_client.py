"""bench/client_overhead.py and bench/client_memory.py run end to end on a tiny model, and what they
report is sane (never how fast: speed is the benchmarks' business, not the tests')."""

from __future__ import annotations

import json

import pytest
import torch

from bench import client_memory, client_overhead


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    from common.tiny_models import create_tiny_bert

    return create_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_labels=5, seed=0)


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_client_overhead_times_both_sides_on_the_same_work(tiny_path, capsys):
    assert client_overhead.main(["--model", tiny_path, "--steps", "2", "--rounds", "2", "--max-length", "16",
                                 "--max-train-samples", "120"]) == 0
    result = _last_json(capsys)
    assert result["bench"] == "client_overhead" and result["steps"] == 2 and result["timed_rounds"] == 2
    for method, target in (("fedavg", 0.9), ("subspace_reg", 0.85)):
        figures = result[method]
        assert figures["target"] == target
        assert len(figures["client_rounds_s"]) == len(figures["bare_rounds_s"]) == 2
        assert figures["client_steps_per_s"] > 0 and figures["bare_steps_per_s"] > 0
        assert figures["ratio"] == pytest.approx(figures["client_steps_per_s"] / figures["bare_steps_per_s"])
        assert isinstance(figures["meets_target"], bool) and figures["paired_ratio"] > 0
    # The same initial adapter, rows and seeds: the client's and the bare loop's first round agree.
    assert result["fedavg"]["same_losses"] is True
    assert 0 < result["subspace_reg"]["regularizer_share"] < 1


def test_the_subspace_task_is_what_the_method_sends_from_round_two(tiny_path):
    from common.config import RunConfig
    from common.modeling import build_model

    config = RunConfig.load("configs/minilm_bbc.yaml", {"model_name": tiny_path, "lora_rank": 4, "lora_alpha": 8})
    start = build_model(config.model, num_labels=5, seed=0).get_adapter_state()
    task = client_overhead._subspace_task(start, round_index=2, seed=2)
    assert not any(name.endswith(".lora_B.weight") for name in task)
    bases = {name: t for name, t in task.items() if name.endswith(".reference_basis")}
    assert len(bases) == sum(name.endswith(".lora_A.weight") for name in start)
    for basis in bases.values():                         # orthonormal columns
        torch.testing.assert_close(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5, rtol=0)


def test_client_memory_reports_every_stage_of_a_real_client_process(tiny_path, capsys):
    assert client_memory.main(["--rounds", "2", f"model_name={tiny_path}", "max_local_steps=2",
                               "max_train_samples=300", "max_length=16"]) == 0
    result = _last_json(capsys)
    assert result["bench"] == "client_memory" and result["rounds"] == 2 and result["rows"] > 0
    names = [stage["stage"] for stage in result["stages"]]
    assert names == ["start", "imports", "data", "model", "round 1", "round 2"]
    assert list(result["parts_mb"]) == names
    assert sum(result["parts_mb"].values()) == pytest.approx(result["idle_rss_mb"])
    for stage in result["stages"]:
        assert 0 < stage["rss_mb"] <= stage["peak_mb"] and stage["uss_mb"] <= stage["rss_mb"]
    assert result["peak_rss_mb"] == max(stage["peak_mb"] for stage in result["stages"])
    assert result["stages"][-1]["steps"] == 2
    assert result["target_mb"] == 600 and isinstance(result["peak_ok"], bool)
