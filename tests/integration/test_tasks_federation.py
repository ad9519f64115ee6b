"""HellaSwag-format multiple choice through a real coordinator and 3 real client processes on loopback:
a tiny RoBERTa with a multiple-choice head (subspace_reg) and a tiny Llama scoring endings (fedavg)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.config import RunConfig
from common.modeling import build_model
from common.tasks import load_task_data
from common.tiny_models import create_tiny_llama, create_tiny_roberta
from tests.common.hellaswag_factory import write_hellaswag_jsonl
from tests.integration.conftest import run_federation, tiny_run_config

pytestmark = pytest.mark.integration

CASES = {
    "roberta": (create_tiny_roberta, "subspace_reg"),
    "llama": (create_tiny_llama, "fedavg"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def finished_run(request, tmp_path_factory):
    kind = request.param
    create, method = CASES[kind]
    workdir = tmp_path_factory.mktemp(f"hellaswag-{kind}")
    model_dir = create(workdir / "model", seed=0)
    data_file = write_hellaswag_jsonl(workdir / "hellaswag.jsonl", 48)
    config = tiny_run_config(
        model_dir, method=method, task="multiple_choice", dataset=str(data_file), partition_field="activity_label",
        target_modules=["auto"], max_train_samples=None, max_eval_samples=None, eval_fraction=0.25,
        min_client_size=4, max_length=40, per_device_train_batch_size=4, max_local_steps=2)
    return kind, config, run_federation(workdir, config)


def test_two_rounds_complete_with_metrics(finished_run):
    kind, config, run = finished_run
    assert run.client_codes == [0, 0, 0], run.client_logs
    lines = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["round"] for line in lines] == [1, 2]
    for line in lines:
        assert line["method"] == config["method"]
        assert sorted(line["participants"]) == ["client-0", "client-1", "client-2"]
        assert 0.0 <= line["accuracy"] <= 1.0 and line["loss"] > 0 and line["train_loss"] > 0
        assert line["bytes_up"] > 0
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 2


def test_saved_adapters_load_with_peft_and_reproduce_the_reported_accuracy(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice

    kind, config, run = finished_run
    auto_class = AutoModelForMultipleChoice if kind == "roberta" else AutoModelForCausalLM
    for directory in ("round_001", "round_002", "best"):
        path = run.run_dir / "adapters" / directory
        saved = load_file(str(path / "adapter_model.safetensors"))
        assert any(k.endswith(".lora_B.weight") for k in saved)
        has_head = any(".classifier." in k for k in saved)
        assert has_head == (kind == "roberta")                            # a causal LM exchanges LoRA only
        model = PeftModel.from_pretrained(auto_class.from_pretrained(config["model_name"]), str(path))
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                assert torch.equal(parameter.detach(), saved[name.replace(".default", "")]), name

    # The final adapter, evaluated here on the same held-out rows, gives the accuracy the coordinator reported.
    run_config = RunConfig.from_flat(config)
    data = load_task_data(run_config.data, seed=run_config.federation.seed)
    built = build_model(run_config.model, num_labels=data.num_labels, seed=run_config.federation.seed,
                        task=run_config.data.task)
    built.set_adapter_state(load_file(str(run.run_dir / "adapters" / "round_002" / "adapter_model.safetensors")))
    metrics = built.evaluate(data.eval, run_config.data)
    last = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["num_examples"] == len(data.eval) == 12
    assert metrics["accuracy"] == pytest.approx(last["accuracy"])
    assert metrics["loss"] == pytest.approx(last["loss"], rel=1e-4)
