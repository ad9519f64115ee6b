"""The adapter state that crosses the wire: LoRA factors per layer plus other trainable tensors.

Tensor names are PEFT state-dict keys without the adapter name, e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``.
A *layer* is the prefix before ``.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
REFERENCE_SUFFIX = ".reference_basis"
"""``<layer>.reference_basis``: the coordinator's basis U (d, r) of a layer's reference subspace, sent with
the global adapter to clients of a method with a regularizer and kept in checkpoints (docs/DESIGN.md §4.4)."""
REFERENCE_GAIN_SUFFIX = ".reference_gain"
"""``<layer>.reference_gain``: the scalar g with B_g = g U (subspace_reg sends U and g instead of B_g)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted linear layer: effective update dW = s * B @ A."""

    A: torch.Tensor  # (r, k); (n, r, k) for a stack of n layers of one shape (common/aggregation.py)
    B: torch.Tensor  # (d, r); (n, d, r) stacked

    @property
    def rank(self) -> int:
        return self.A.shape[-2]


@dataclass(frozen=True)
class AdapterState:
    """LoRA factors per layer plus every other trainable tensor (classifier head...)."""

    lora: dict[str, LoraFactors]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> "AdapterState":
        """Split a flat PEFT-style state dict into per-layer factors and the rest."""
        a_parts: dict[str, torch.Tensor] = {}
        b_parts: dict[str, torch.Tensor] = {}
        extra: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if name.endswith(LORA_A_SUFFIX):
                a_parts[name[: -len(LORA_A_SUFFIX)]] = tensor
            elif name.endswith(LORA_B_SUFFIX):
                b_parts[name[: -len(LORA_B_SUFFIX)]] = tensor
            else:
                extra[name] = tensor
        if a_parts.keys() != b_parts.keys():
            lonely = sorted(a_parts.keys() ^ b_parts.keys())
            raise ValueError(f"LoRA layers without both lora_A and lora_B: {lonely[:5]}")
        lora = {layer: LoraFactors(A=a_parts[layer], B=b_parts[layer]) for layer in sorted(a_parts)}
        return cls(lora=lora, extra=dict(sorted(extra.items())))

    def to_state_dict(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for layer, factors in self.lora.items():
            tensors[layer + LORA_A_SUFFIX] = factors.A
            tensors[layer + LORA_B_SUFFIX] = factors.B
        tensors.update(self.extra)
        return tensors


@dataclass(frozen=True)
class ClientUpdate:
    """What one client reported for one round."""

    client: str
    num_examples: int
    state: AdapterState


def truncate_to_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` rank components of every factor a task carries (heterogeneous client ranks):
    lora_A's rows (r, k) -> (rank, k), lora_B's and the reference basis's columns (d, r) -> (d, rank).
    Other tensors (head, gains, base-weight residuals) are left whole. Where the global factors are SVD-ordered
    (svd, subspace_reg) this is the best rank-``rank`` part of s B_g A_g; elsewhere the first components."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(LORA_A_SUFFIX) and tensor.shape[0] > rank:
            tensor = tensor[:rank].contiguous()                     # (rank, k)
        elif name.endswith((LORA_B_SUFFIX, REFERENCE_SUFFIX)) and tensor.shape[1] > rank:
            tensor = tensor[:, :rank].contiguous()                  # (d, rank)
        out[name] = tensor
    return out


def pad_to_rank(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """A rank-r_i adapter as a rank-``rank`` one: zero rows under lora_A, zero columns after lora_B. Every
    product B A is unchanged, so the server step sees uniform ranks and its weighted sums stay exact."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(LORA_A_SUFFIX) and tensor.shape[0] < rank:
            tensor = torch.cat([tensor, tensor.new_zeros(rank - tensor.shape[0], tensor.shape[1])], dim=0)
        elif name.endswith(LORA_B_SUFFIX) and tensor.shape[1] < rank:
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], rank - tensor.shape[1])], dim=1)
        out[name] = tensor
    return out


def round_to_wire(tensors: dict[str, torch.Tensor], wire_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Each floating tensor rounded to ``wire_dtype`` and back to its own dtype: what a receiver holds after the
    wire. A no-op (the same tensors) when the wire is float32 and the tensors are float32."""
    return {name: t if t.dtype == wire_dtype or not t.is_floating_point() else t.to(wire_dtype).to(t.dtype)
            for name, t in tensors.items()}
