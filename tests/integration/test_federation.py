"""Two rounds of each method through a real coordinator and 3 real client processes on loopback."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.adapter import AdapterState
from tests.integration.conftest import run_federation, tiny_run_config

pytestmark = pytest.mark.integration

METRIC_KEYS = {
    "round", "method", "accuracy", "loss", "train_loss", "cancellation_ratio", "client_global_cosine",
    "pairwise_client_cosine", "basis_overlap", "basis_overlap_sq", "update_subspace_overlap", "aggregation_error",
    "participants", "partitions", "num_examples", "sampled", "stragglers", "dropped", "bytes_down", "bytes_up",
    "client_train_seconds", "mean_client_train_seconds", "aggregation_seconds", "eval_seconds", "round_seconds",
}
METHODS = ["fedavg", "svd", "fedsvd", "subspace_reg"]


@pytest.fixture(scope="module", params=METHODS)
def finished_run(request, tmp_path_factory, tiny_model_dir):
    method = request.param
    config = tiny_run_config(tiny_model_dir, method=method)
    return method, config, run_federation(tmp_path_factory.mktemp(f"federation-{method}"), config)


def _adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_run_completes_with_every_metric_every_round(finished_run):
    method, config, run = finished_run
    assert run.client_codes == [0, 0, 0], run.client_logs
    lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert METRIC_KEYS <= line.keys(), METRIC_KEYS - line.keys()
        assert line["method"] == method
        assert sorted(line["participants"]) == ["client-0", "client-1", "client-2"]
        assert 0.0 <= line["accuracy"] <= 1.0 and line["bytes_up"] > 0 and line["bytes_down"] > 0
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["final_accuracy"] == lines[-1]["accuracy"]
    for name in ("config.yaml", "partition_stats.json"):
        assert (run.run_dir / name).is_file()


def test_every_saved_adapter_loads_with_peft(finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    _, _, run = finished_run
    for directory in ["round_001", "round_002", "best"]:
        path = run.run_dir / "adapters" / directory
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=5)
        model = PeftModel.from_pretrained(base, str(path))
        saved = _adapter(path)
        loaded = {name: p for name, p in model.named_parameters() if "lora_B" in name}
        assert loaded, "no LoRA parameters were loaded"
        for name, parameter in loaded.items():
            key = name.replace(".default", "")
            assert torch.equal(parameter.detach(), saved[key]), name


def test_method_specific_structure(finished_run):
    method, config, run = finished_run
    scaling = config["lora_alpha"] / config["lora_rank"]
    final = AdapterState.from_state_dict(_adapter(run.run_dir / "adapters" / "round_002"))
    if method == "fedavg":
        _check_fedavg_is_weighted_mean(run, final)
    elif method == "subspace_reg":
        _check_subspace_reg_structure(run, final, scaling)
    elif method == "fedsvd":
        for layer, factors in final.lora.items():
            gram = factors.A.double() @ factors.A.double().T     # (r, r): orthogonal rows of equal norm
            assert torch.allclose(gram, gram[0, 0] * torch.eye(gram.shape[0], dtype=gram.dtype),
                                  rtol=1e-4, atol=1e-6 * float(gram[0, 0]) + 1e-12), layer


def _check_fedavg_is_weighted_mean(run, final: AdapterState) -> None:
    updates_dir = run.run_dir / "updates" / "round_002"
    files = sorted(updates_dir.glob("*.safetensors"))
    assert len(files) == 3
    weights, states = [], []
    for file in files:
        with safe_open(str(file), "pt") as handle:
            weights.append(int(handle.metadata()["num_examples"]))
        states.append(load_file(str(file)))
    total = sum(weights)
    for key, value in final.to_state_dict().items():
        expected = sum(w / total * s[key].double() for w, s in zip(weights, states))
        assert torch.allclose(value.double(), expected, rtol=1e-5, atol=1e-7), key


def _check_subspace_reg_structure(run, final: AdapterState, scaling: float) -> None:
    for layer, factors in final.lora.items():
        gram = factors.B.double().T @ factors.B.double()         # (r, r): orthogonal columns of equal norm
        assert torch.allclose(gram, gram[0, 0] * torch.eye(gram.shape[0], dtype=gram.dtype),
                              rtol=1e-4, atol=1e-6 * float(gram[0, 0]) + 1e-12), layer
    # Round 2's task carried the orthonormal reference basis U of round 1's aggregate and the gain g, not
    # B_g beside them (the wire carries each fact once): the client's B_g = g U is round 1's B_g.
    round1 = AdapterState.from_state_dict(_adapter(run.run_dir / "adapters" / "round_001"))
    received = [load_file(str(d / "round_002.safetensors")) for d in run.received_dirs
                if (d / "round_002.safetensors").exists()]
    assert received, "no client received round 2"
    for tensors in received:
        bases = {k[: -len(".reference_basis")]: v for k, v in tensors.items() if k.endswith(".reference_basis")}
        assert bases.keys() == round1.lora.keys()
        for layer, basis in bases.items():
            U = basis.double()                                   # (d, r)
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-5), layer
            B = round1.lora[layer].B.double()
            assert torch.allclose(U @ (U.T @ B), B, rtol=1e-4, atol=1e-6), layer   # span(B_g) = span(U)
            assert layer + ".lora_B.weight" not in tensors
            gain = tensors[layer + ".reference_gain"]
            assert gain.shape == () and torch.allclose(gain * basis, round1.lora[layer].B, rtol=1e-6, atol=1e-7), layer
