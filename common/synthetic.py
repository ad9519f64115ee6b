"""Benchmark-only adapter layouts: the LoRA factors of a known model, built without loading the model.

A run whose config sets ``synthetic_layout`` measures the federation itself (bench/round_overhead.py,
bench/scale.py): the coordinator starts from the adapter built here instead of a model's, skips evaluation,
and its clients (``python -m client --bench-echo``) load neither a model nor data, upload the received
factors slightly perturbed, and claim the example counts of ``synthetic_partition_sizes``. Every check of an
upload still runs: the expected tensors are the global adapter's, as in any run.

Layouts, named by ``synthetic_layout``:

- ``roberta-large``: 24 layers x {query, key, value, attention.output.dense: 1024 -> 1024;
  intermediate.dense: 1024 -> 4096; output.dense: 4096 -> 1024} + pooler.dense 1024 -> 1024 = 145 adapted
  layers; at r = 8 in float32, A and B are 14,221,312 bytes (the issue-14 payload);
- ``minilm``: the same on all-MiniLM-L6-v2's shapes (6 layers, hidden 384, intermediate 1536): 37 layers;
- ``encoder:LxHxI``: the same on L layers of hidden size H and intermediate size I (small ones for tests).

Only LoRA factors: no classifier head, so the payload is exactly the factors' bytes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from common.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX


@dataclass(frozen=True)
class EncoderLayout:
    """A BERT-like encoder's adapted linear layers (query, key, value, dense) and a pooler."""

    family: str        # the PEFT key prefix: bert, roberta
    layers: int
    hidden: int
    intermediate: int

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Layer name -> (d_out, d_in) of each adapted linear layer, in the model's order."""
        h, i = self.hidden, self.intermediate
        prefix = f"base_model.model.{self.family}"
        shapes: dict[str, tuple[int, int]] = {}
        for n in range(self.layers):
            block = f"{prefix}.encoder.layer.{n}"
            for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                         "attention.output.dense"):
                shapes[f"{block}.{name}"] = (h, h)
            shapes[f"{block}.intermediate.dense"] = (i, h)
            shapes[f"{block}.output.dense"] = (h, i)
        shapes[f"{prefix}.pooler.dense"] = (h, h)
        return shapes


NAMED_LAYOUTS: dict[str, EncoderLayout] = {
    "roberta-large": EncoderLayout("roberta", layers=24, hidden=1024, intermediate=4096),
    "minilm": EncoderLayout("bert", layers=6, hidden=384, intermediate=1536),
}
_CUSTOM = re.compile(r"encoder:(\d+)x(\d+)x(\d+)")


def parse_layout(spec: str) -> EncoderLayout:
    """``roberta-large``, ``minilm`` or ``encoder:LxHxI``; ValueError naming the accepted forms otherwise."""
    if spec in NAMED_LAYOUTS:
        return NAMED_LAYOUTS[spec]
    match = _CUSTOM.fullmatch(spec)
    if match and all(int(g) >= 1 for g in match.groups()):
        layers, hidden, intermediate = (int(g) for g in match.groups())
        return EncoderLayout("bert", layers, hidden, intermediate)
    raise ValueError(f"synthetic_layout={spec!r}: use {', '.join(NAMED_LAYOUTS)} or encoder:LxHxI "
                     f"(layers x hidden x intermediate, e.g. encoder:2x64x256)")


def synthetic_adapter(spec: str, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """The initial adapter, as PEFT initialises LoRA: A (r, k) Kaiming-uniform, B (d, r) zero; float32."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer, (d, k) in parse_layout(spec).linear_shapes().items():
        bound = 1.0 / math.sqrt(k)                      # kaiming_uniform_(a=sqrt(5)) on a (r, k) weight
        tensors[layer + LORA_A_SUFFIX] = (torch.rand(rank, k, generator=generator) * 2 - 1) * bound  # (r, k)
        tensors[layer + LORA_B_SUFFIX] = torch.zeros(d, rank)                                       # (d, r)
    return tensors


def payload_bytes(spec: str, rank: int, element_size: int = 4) -> int:
    """Bytes of A and B of every layer at ``rank`` (float32 unless told)."""
    return element_size * rank * sum(d + k for d, k in parse_layout(spec).linear_shapes().values())


SYNTHETIC_EXAMPLES_PER_CLIENT = 100
"""What each client of a synthetic run holds, and so claims: equal weights (p_i = 1 / m)."""


def synthetic_partition_sizes(num_clients: int) -> list[int]:
    """The partition sizes of a synthetic run (no data is loaded on either side)."""
    return [SYNTHETIC_EXAMPLES_PER_CLIENT] * num_clients


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    """Each tensor plus seeded Gaussian noise of standard deviation ``scale``: a stand-in for local training
    that moves every factor (B too, which starts at zero), deterministically per seed."""
    generator = torch.Generator().manual_seed(seed)
    return {name: t.to(torch.float32) + scale * torch.randn(t.shape, generator=generator)
            for name, t in tensors.items()}
