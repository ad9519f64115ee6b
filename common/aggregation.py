"""Server-side aggregation of client LoRA factors (docs/DESIGN.md §4).

Per adapted layer, with client weights p_i = n_i / sum_j n_j and s = lora_alpha / r:

- ``fedavg``:        A_g = sum p_i A_i ;  B_g = sum p_i B_i
- ``svd``:           M = sum p_i s B_i A_i ; clip ; M/s = U S V^T (rank r) ; B_g = U S^1/2, A_g = S^1/2 V^T ; rescale
- ``fedsvd``:        M = s (sum p_i B_i) A_g(prev) ; clip ; B_g = U S, A_g = V^T ; rescale
- ``subspace_reg``:  as svd but B_g = U, A_g = S V^T ; rescale

clip:    if ||M||_F > c then M <- M c / ||M||_F.
rescale: both new factors times g = sqrt(||M||_F / ||s B_g A_g||_F) (M clipped), so the new
         product keeps the clipped target's norm; g = 1 when the target is zero.

Every other trainable tensor (classifier head, ``modules_to_save``) is the p-weighted mean.
fedavg averages the factors themselves and does not clip (the table in docs/DESIGN.md §4 clips M only).

When the target has fewer than r non-zero singular values (one client of rank < r, every B
still zero), the missing singular values are zero and U, V are completed with arbitrary
orthonormal directions, so shapes stay (d, r) / (r, k) and nothing is NaN. Each singular
pair's sign is fixed (largest entry of U's column positive) so the output is deterministic.

The d x k product M is never formed. Stacking B_s = [B_1 .. B_K] (d, Kr) and
A_s = [A_1; ..; A_K] (Kr, k) gives M = B_s diag(w) A_s with w = s p_i repeated r times;
QR on both sides (B_s = Q_b R_b, A_s^T = Q_a R_a) leaves a small core R_b diag(w) R_a^T
(Kr, Kr) whose SVD, lifted back through Q_b and Q_a, is the exact SVD of M in
O((d + k)(Kr)^2). Only R is needed from each QR: Q stays implicit in LAPACK's Householder
reflectors (geqrf) and lifts just the r kept singular vectors (ormqr). Everything is computed in
float64 and returned in the dtype of the global adapter's tensors.

Layers are independent and a model has few distinct layer shapes (RoBERTa-large: 145 adapted
layers, 97 of them 1024 x 1024), so the layers of one shape are stacked and every step above runs
once per shape group as batched QR / SVD / matmul (``layers_by_shape``, ``aggregate_group``), with
the same result per layer as one layer alone, to float64 rounding.

This module is the server step's math only. A method (what is sent, what trains, the client's
penalty, what is uploaded, this step) is one class in common/methods/; a new method whose step
is new math brings its own strategy (or target / split function) from here.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors

logger = logging.getLogger(__name__)

COMPUTE_DTYPE = torch.float64
"""Aggregation runs in float64: the SVD's small singular values and the gain need the headroom."""

_COMPLETION_SEED = 0
"""Seed of the fixed Gaussian draw that completes an orthonormal basis (deterministic output)."""


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class AggregationSettings:
    """What the server step needs besides the factors."""

    scaling: float
    """s = lora_alpha / r: the effective update is s * B A."""
    rank: int
    """r of the new global factors: B_g is (d, r), A_g is (r, k)."""
    max_update_norm: float | None
    """Clip c on ||M||_F (``max_effective_lora_update_norm``); None disables clipping."""
    wire_dtype: torch.dtype = torch.float32
    """What the new global factors travel in (``wire_dtype``): a method's step (common/methods/) rounds its
    result to it, so that the coordinator keeps what its clients receive. The math here ignores it."""

    def __post_init__(self) -> None:
        if not (isinstance(self.scaling, (int, float)) and math.isfinite(self.scaling) and self.scaling > 0):
            raise ValueError(f"scaling={self.scaling!r}: must be a positive finite number (lora_alpha / lora_rank)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r}: must be a positive integer (the LoRA rank, 8 in the reference study)")
        clip = self.max_update_norm
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"max_update_norm={clip!r}: must be a positive finite number, or None to disable clipping")
        if self.wire_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"wire_dtype={self.wire_dtype!r}: use torch.float32, torch.bfloat16 or torch.float16")


@dataclass(frozen=True)
class AggregationResult:
    """The new global adapter and, per layer, the orthonormal reference subspace U."""

    state: AdapterState
    """New global adapter, in the dtype of the previous global adapter's tensors."""
    reference_basis: dict[str, torch.Tensor]
    """Per layer U (d, r), orthonormal columns: the top-r left singular subspace of the new
    global update s B_g A_g (completed with arbitrary orthonormal directions when its rank is < r)."""


@runtime_checkable
class Strategy(Protocol):
    """The server step's math of one method (the rest of the method: common/methods/)."""

    name: str

    def aggregate(
        self, global_state: AdapterState, updates: Sequence[ClientUpdate], settings: AggregationSettings
    ) -> AggregationResult: ...


# --------------------------------------------------------------------------- low-rank linear algebra
#
# Every function here works on one layer's matrices or, unchanged, on a stack of n layers of one
# shape (a leading batch dimension): torch's QR, SVD and matmul are batched over leading dimensions.


@dataclass(frozen=True)
class _LowRankSvd:
    """Top singular triplets of M: u (d, q), v (k, q) orthonormal columns, s (q,) descending
    (stacked: (n, d, q), (n, k, q), (n, q))."""

    u: torch.Tensor  # (n, d, q)
    s: torch.Tensor  # (n, q)
    v: torch.Tensor  # (n, k, q)


def _householder_qr(x: torch.Tensor, overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduced QR of x (n, rows, m) with Q left implicit: (reflectors, tau, R (n, min(rows, m), m)).

    R is exactly ``torch.linalg.qr``'s (the same LAPACK geqrf); Q is never formed, because only a few
    of its columns' combinations are ever needed (``_apply_q``): forming it (orgqr) costs as much as
    the factorization, and multiplying by it as much again. ``overwrite``: the reflectors are written
    over x (column-major, as LAPACK reads it), saving a copy of the whole stack; x is then consumed.
    """
    if overwrite and x.mT.is_contiguous():
        tau = x.new_empty(*x.shape[:-2], min(x.shape[-2:]))
        reflectors, tau = torch.geqrf(x, out=(x, tau))  # (n, rows, m), (n, min(rows, m))
    else:
        reflectors, tau = torch.geqrf(x)  # (n, rows, m), (n, min(rows, m))
    return reflectors, tau, reflectors[..., : tau.shape[-1], :].triu()


def _apply_q(reflectors: torch.Tensor, tau: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Q_reduced @ small (n, min(rows, m), q) -> (n, rows, q), from geqrf's reflectors (LAPACK ormqr)."""
    rows = reflectors.shape[-2]
    padded = small.new_zeros(*small.shape[:-2], rows, small.shape[-1])  # (n, rows, q): the full Q times [small; 0]
    padded[..., : small.shape[-2], :] = small
    return torch.ormqr(reflectors, tau, padded)


def _top_svd_of_weighted_product(
    b_stack: torch.Tensor, weights: torch.Tensor, a_stack: torch.Tensor, rank: int, overwrite: bool = False
) -> tuple[_LowRankSvd, torch.Tensor]:
    """Top-``rank`` SVD of M = B_s diag(w) A_s and ||M||_F (n,), without forming the (d, k) product M.
    ``overwrite``: b_stack and a_stack are the caller's scratch, consumed by the QRs.

    Exact: M = Q_b (R_b diag(w) R_a^T) Q_a^T with orthonormal Q_b, Q_a, so M's singular values
    are the small core's and its singular vectors are the core's lifted through Q_b and Q_a.
    Only the kept ``rank`` vectors are lifted (the lift is the costly (d, m) x (m, rank) part).
    """
    reflectors_b, tau_b, r_b = _householder_qr(b_stack, overwrite)  # R_b (n, m_b, m)
    reflectors_a, tau_a, r_a = _householder_qr(a_stack.mT, overwrite)  # R_a (n, m_a, m)
    core = (r_b * weights) @ r_a.mT  # (n, m_b, m_a), m_b = min(d, m), m_a = min(k, m)
    u_core, sigma, vh_core = torch.linalg.svd(core, full_matrices=False)  # (n, m_b, q), (n, q), (n, q, m_a)
    kept = min(rank, sigma.shape[-1])
    top = _LowRankSvd(u=_apply_q(reflectors_b, tau_b, u_core[..., :kept]),  # (n, d, kept)
                      s=sigma[..., :kept],
                      v=_apply_q(reflectors_a, tau_a, vh_core[..., :kept, :].mT))  # (n, k, kept)
    return top, torch.linalg.vector_norm(sigma, dim=-1)


def _complete_orthonormal(basis: torch.Tensor, width: int) -> torch.Tensor:
    """Extend orthonormal columns (n, d, q) to (n, d, width) with directions orthogonal to them.

    The new columns only ever meet zero singular values, so any orthonormal completion is
    correct; a fixed-seed Gaussian draw (the same for every layer) keeps the result deterministic
    and, unlike picking unit vectors, can never fall inside span(basis).
    """
    rows, q = basis.shape[-2:]
    if q >= width:
        return basis[..., :width]
    generator = torch.Generator(device="cpu").manual_seed(_COMPLETION_SEED)
    draw = torch.randn(rows, width - q, generator=generator, dtype=basis.dtype).to(basis.device)  # (d, width - q)
    # Householder QR of [basis | draw]: its trailing columns are orthonormal and orthogonal to basis.
    q_full, _ = torch.linalg.qr(torch.cat([basis, draw.expand(*basis.shape[:-1], -1)], dim=-1))  # (n, d, width)
    return torch.cat([basis, q_full[..., q:]], dim=-1)


def _canonical_signs(svd: _LowRankSvd) -> _LowRankSvd:
    """Flip each singular pair so that the largest-magnitude entry of u's column is positive.

    SVD fixes singular vectors only up to a joint sign; pinning it makes the output
    deterministic across LAPACK builds and comparable between rounds.
    """
    if svd.u.shape[-1] == 0:
        return svd
    rows = svd.u.abs().argmax(dim=-2, keepdim=True)  # (n, 1, q)
    signs = torch.sign(torch.gather(svd.u, -2, rows))  # (n, 1, q)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return _LowRankSvd(u=svd.u * signs, s=svd.s, v=svd.v * signs)


def _truncate(svd: _LowRankSvd, rank: int) -> _LowRankSvd:
    """Exactly ``rank`` triplets: the top ones, padded with zero singular values when M has fewer."""
    kept = svd.s.shape[-1]
    if kept >= rank:
        return _LowRankSvd(u=svd.u[..., :rank], s=svd.s[..., :rank], v=svd.v[..., :rank])
    padding = svd.s.new_zeros(*svd.s.shape[:-1], rank - kept)
    return _LowRankSvd(
        u=_complete_orthonormal(svd.u, rank),  # (n, d, rank)
        s=torch.cat([svd.s, padding], dim=-1),  # (n, rank)
        v=_complete_orthonormal(svd.v, rank),  # (n, k, rank)
    )


def left_basis_of_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> torch.Tensor:
    """U (d, rank), orthonormal: the top-``rank`` left singular subspace of B A (d, k), factored
    (stacked: B (n, d, r), A (n, r, k) give (n, d, rank)).

    Directions beyond the rank of B A are an arbitrary orthonormal completion.
    """
    ones = torch.ones(b.shape[-1], dtype=b.dtype, device=b.device)
    top, _ = _top_svd_of_weighted_product(b, ones, a, rank)
    return _canonical_signs(_truncate(top, rank)).u


# --------------------------------------------------------------------------- validation


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _validate_global(global_state: AdapterState, settings: AggregationSettings) -> None:
    if not global_state.lora:
        raise ValueError("global_state has no LoRA layers: build it from the PEFT model's adapter state dict")
    for layer, factors in global_state.lora.items():
        a, b = factors.A, factors.B
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"global layer {layer!r}: lora_A {_shape(a)} and lora_B {_shape(b)} are not (r, k) and (d, r) "
                "with one rank r; rebuild the global adapter from a PEFT state dict"
            )
        d, k = b.shape[0], a.shape[1]
        if settings.rank > min(d, k):
            raise ValueError(
                f"rank={settings.rank}: layer {layer!r} is {d} x {k}, so the rank can be at most {min(d, k)}; "
                "lower lora_rank or drop this module from target_modules"
            )
    for key, tensor in global_state.extra.items():
        if not tensor.is_floating_point():
            raise ValueError(
                f"global extra tensor {key!r} has dtype {tensor.dtype}: only floating-point trainable tensors "
                "can be averaged; keep buffers out of the adapter state"
            )


def validate_inputs(global_state: AdapterState, updates: Sequence[ClientUpdate], settings: AggregationSettings) -> None:
    """What the server step itself requires: at least one update, and a global adapter the rank fits.

    The updates are trusted: the coordinator checks every upload once, at its boundary (names,
    shapes, dtypes, finite values against the global adapter, the example count it is bound to;
    server/coordinator.py ``check_upload_header`` / ``submit``, common/validation.py)."""
    if len(updates) == 0:
        raise ValueError("updates is empty: aggregate only after at least one client has reported")
    _validate_global(global_state, settings)


def client_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """p_i = n_i / sum_j n_j, float64 (K,)."""
    counts = torch.tensor([u.num_examples for u in updates], dtype=COMPUTE_DTYPE)
    return counts / counts.sum()


# --------------------------------------------------------------------------- shared skeleton


@dataclass(frozen=True)
class GroupInputs:
    """The layers of one shape, stacked (n layers), in float64: the previous global factors and the clients'
    factors side by side. Layers are independent, so a method's step runs once per group, batched over n.
    Built for one ``aggregate_group`` call, which owns them: a step may overwrite the stacks in place."""

    global_factors: LoraFactors  # A (n, r_g, k), B (n, d, r_g)
    client_b: torch.Tensor  # (n, d, K r_c): per layer B_s = [B_1 .. B_K], column-major (what LAPACK's QR reads)
    client_a: torch.Tensor  # (n, K r_c, k): per layer A_s = [A_1; ..; A_K]
    weights: torch.Tensor  # (K,) p_i

    @property
    def clients(self) -> list[LoraFactors]:
        """K x [A (n, r_c, k), B (n, d, r_c)]: each client's factors, views into the stacks."""
        rank = self.client_a.shape[-2] // self.weights.shape[0]
        return [LoraFactors(A=self.client_a[..., i * rank:(i + 1) * rank, :], B=self.client_b[..., i * rank:(i + 1) * rank])
                for i in range(self.weights.shape[0])]


@dataclass(frozen=True)
class GroupOutput:
    factors: LoraFactors  # A (n, r, k), B (n, d, r), float64
    basis: torch.Tensor  # (n, d, r) orthonormal columns


def layers_by_shape(state: AdapterState) -> list[list[str]]:
    """The adapter's layers grouped by the shapes, dtypes and device of their factors, each group in the
    adapter's order (RoBERTa-large: 145 layers in three groups, 97 of them 1024 x 1024)."""
    groups: dict[tuple, list[str]] = {}
    for layer, f in state.lora.items():
        key = (tuple(f.A.shape), tuple(f.B.shape), f.A.dtype, f.B.dtype, f.A.device)
        groups.setdefault(key, []).append(layer)
    return list(groups.values())


def _stacked(tensors: Sequence[torch.Tensor], like: torch.Tensor, rows: int) -> torch.Tensor:
    """Equally shaped tensors (rows_i, cols), in order, as one float64 (n, rows, cols) stack on ``like``'s
    device: consecutive tensors fill each (rows, cols) block top to bottom.

    Written in one pass (each tensor converted as it is copied in): stacking first and converting the
    stack after read and wrote the group's data twice, tens of MB per group at RoBERTa-large shapes."""
    first = tensors[0]
    stack = torch.empty((len(tensors), *first.shape), dtype=COMPUTE_DTYPE, device=like.device)  # (n rows / rows_i, rows_i, cols)
    for block, t in zip(stack, tensors):
        block.copy_(t)
    return stack.view(-1, rows, stack.shape[-1])


def _unstacked(stack: torch.Tensor, like: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, a contiguous tensor of its own in ``like``'s dtype (not a view of the group's stack)."""
    return [t.to(dtype=like.dtype, copy=True, memory_format=torch.contiguous_format) for t in stack.unbind(0)]


class LayerwiseStrategy(ABC):
    """Validation, grouping of layers by shape, head averaging and dtype handling shared by every method.

    A method only supplies ``aggregate_group``, which sees float64 stacks of the layers of one shape:
    layers are independent, so batched QR, SVD and matmul over a group replace a Python loop per layer.
    """

    name: str

    def aggregate(
        self, global_state: AdapterState, updates: Sequence[ClientUpdate], settings: AggregationSettings
    ) -> AggregationResult:
        validate_inputs(global_state, updates, settings)
        weights = client_weights(updates)  # (K,)
        lora: dict[str, LoraFactors] = {}
        basis: dict[str, torch.Tensor] = {}
        for layers in layers_by_shape(global_state):
            old = global_state.lora[layers[0]]
            r_g, r_c = old.A.shape[0], updates[0].state.lora[layers[0]].A.shape[0]
            # B is stacked as B^T, (n, r, d), and used through a transposed view: column-major, what LAPACK's
            # QR reads. The clients' factors are stacked side by side at once: B_s, A_s without a second copy.
            inputs = GroupInputs(
                global_factors=LoraFactors(A=_stacked([global_state.lora[layer].A for layer in layers], old.A, r_g),
                                           B=_stacked([global_state.lora[layer].B.mT for layer in layers], old.B, r_g).mT),
                client_b=_stacked([u.state.lora[layer].B.mT for layer in layers for u in updates], old.B, len(updates) * r_c).mT,
                client_a=_stacked([u.state.lora[layer].A for layer in layers for u in updates], old.A, len(updates) * r_c),
                weights=weights.to(old.A.device),
            )
            out = self.aggregate_group(layers, inputs, settings)
            for layer, a, b, u in zip(layers, _unstacked(out.factors.A, old.A), _unstacked(out.factors.B, old.B),
                                      _unstacked(out.basis, old.B)):
                lora[layer], basis[layer] = LoraFactors(A=a, B=b), u
        lora = {layer: lora[layer] for layer in global_state.lora}  # the adapter's order
        basis = {layer: basis[layer] for layer in global_state.lora}
        extra = {key: _weighted_mean([u.state.extra[key] for u in updates], weights, like)
                 for key, like in global_state.extra.items()}
        logger.debug("%s aggregated %d layers and %d extra tensors from %d clients",
                     self.name, len(lora), len(extra), len(updates))
        return AggregationResult(state=AdapterState(lora=lora, extra=extra), reference_basis=basis)

    @abstractmethod
    def aggregate_group(self, layers: list[str], inputs: GroupInputs, settings: AggregationSettings) -> GroupOutput:
        """New float64 factors (A (n, r, k), B (n, d, r)) and orthonormal U (n, d, r) of the n ``layers``."""


def _as_compute(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.to(device=like.device, dtype=COMPUTE_DTYPE)


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sum_i p_i x_i in float64, returned in ``like``'s dtype and device."""
    total = torch.zeros(like.shape, dtype=COMPUTE_DTYPE, device=like.device)
    for weight, tensor in zip(weights.tolist(), tensors):
        total += weight * _as_compute(tensor, like)
    return total.to(like.dtype)


# --------------------------------------------------------------------------- fedavg


class FedAvg(LayerwiseStrategy):
    """FedIT: A_g = sum p_i A_i, B_g = sum p_i B_i (no clip: the factors themselves are averaged).

    A rank larger than the clients' pads zero rows / columns, which leave the product unchanged.
    """

    name = "fedavg"

    def aggregate_group(self, layers: list[str], inputs: GroupInputs, settings: AggregationSettings) -> GroupOutput:
        client_rank = inputs.global_factors.rank
        if settings.rank < client_rank:
            raise ValueError(
                f"rank={settings.rank}: fedavg averages factors and keeps the clients' rank {client_rank} "
                f"(layer {layers[0]!r}); set rank >= {client_rank} or use svd / subspace_reg to truncate"
            )
        a = sum(w * f.A for w, f in zip(inputs.weights.tolist(), inputs.clients))  # (n, r_c, k)
        b = sum(w * f.B for w, f in zip(inputs.weights.tolist(), inputs.clients))  # (n, d, r_c)
        pad = settings.rank - client_rank
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], pad, a.shape[-1])], dim=-2)  # (n, r, k)
        b = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], dim=-1)  # (n, d, r)
        return GroupOutput(factors=LoraFactors(A=a, B=b), basis=left_basis_of_product(b, a, settings.rank))


# --------------------------------------------------------------------------- re-factorizing methods

TargetFn = Callable[[GroupInputs, float], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""(inputs, s) -> (B_s (n, d, m), w (m,), A_s (n, m, k)) with each layer's target M = B_s diag(w) A_s."""

SplitFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(U (n, d, r), sigma (n, r) = S / s, V (n, k, r)) -> (B (n, d, r), A (n, r, k)) with B A = U diag(sigma) V^T
per layer (written with ``mT`` and ``unsqueeze(-1/-2)`` it reads the same for one layer as for a stack)."""


def client_mixture_target(inputs: GroupInputs, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = sum p_i s B_i A_i as stacked factors: B_s = [B_1 .. B_K], A_s = [A_1; ..; A_K]."""
    client_rank = inputs.client_a.shape[-2] // inputs.weights.shape[0]
    weights = (scaling * inputs.weights).repeat_interleave(client_rank)  # (K r_c,)
    return inputs.client_b, weights, inputs.client_a  # (n, d, K r_c), (K r_c,), (n, K r_c, k)


def frozen_a_target(inputs: GroupInputs, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M = s (sum p_i B_i) A_g: fedsvd's clients trained B only, against the previous round's A_g."""
    b_mean = sum(w * f.B for w, f in zip(inputs.weights.tolist(), inputs.clients))  # (n, d, r_g)
    a_prev = inputs.global_factors.A  # (n, r_g, k)
    weights = torch.full((a_prev.shape[-2],), scaling, dtype=a_prev.dtype, device=a_prev.device)  # (r_g,)
    return b_mean, weights, a_prev


def split_balanced(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """svd: B = U S^1/2, A = S^1/2 V^T."""
    root = sigma.sqrt()  # (n, r)
    return u * root.unsqueeze(-2), root.unsqueeze(-1) * v.mT


def split_orthonormal_a(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fedsvd: B = U S, A = V^T (orthonormal rows, what the clients freeze next round)."""
    return u * sigma.unsqueeze(-2), v.mT.clone()


def split_orthonormal_b(u: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """subspace_reg: B = U (orthonormal columns: the reference subspace), A = S V^T."""
    return u.clone(), sigma.unsqueeze(-1) * v.mT


@dataclass(frozen=True)
class RefactorizingStrategy(LayerwiseStrategy):
    """Build the target M, clip it, take its rank-r SVD, split it into factors and rescale (per layer,
    batched over the layers of one shape)."""

    name: str
    target: TargetFn
    split: SplitFn

    def aggregate_group(self, layers: list[str], inputs: GroupInputs, settings: AggregationSettings) -> GroupOutput:
        b_stack, weights, a_stack = self.target(inputs, settings.scaling)  # (n, d, m), (m,), (n, m, k)
        # The stacks are this call's own (GroupInputs are built per group): the QRs may overwrite them.
        top, target_norm = _top_svd_of_weighted_product(b_stack, weights, a_stack, settings.rank, overwrite=True)
        sigma = top.s  # (n, <= r) top singular values of M; target_norm (n,) = ||M||_F from all of them
        clip = settings.max_update_norm
        if clip is not None:
            clipped = target_norm > clip  # (n,)
            for i in clipped.nonzero().flatten().tolist() if logger.isEnabledFor(logging.DEBUG) else ():
                logger.debug("%s layer %s: ||M||_F = %.4g clipped to %.4g", self.name, layers[i], target_norm[i], clip)
            sigma = torch.where(clipped.unsqueeze(-1), sigma * (clip / target_norm).unsqueeze(-1), sigma)
            target_norm = torch.where(clipped, torch.full_like(target_norm, clip), target_norm)
        kept = _canonical_signs(_truncate(_LowRankSvd(u=top.u, s=sigma, v=top.v), settings.rank))
        b, a = self.split(kept.u, kept.s / settings.scaling, kept.v)  # (n, d, r), (n, r, k)
        kept_norm = torch.linalg.vector_norm(kept.s, dim=-1)  # (n,) ||s B A||_F before the gain
        # Truncation drops energy; the gain puts the clipped target's norm back. A zero
        # target (every B still zero) has nothing to restore: leave it, never divide by 0.
        nonzero = kept_norm > 0.0
        gain = torch.where(nonzero, (target_norm / torch.where(nonzero, kept_norm, 1.0)).sqrt(), 1.0)  # (n,)
        gain = gain[:, None, None]
        return GroupOutput(factors=LoraFactors(A=a * gain, B=b * gain), basis=kept.u)


# --------------------------------------------------------------------------- registry

STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a method to ``STRATEGIES`` under its name (names are unique)."""
    if strategy.name in STRATEGIES:
        raise ValueError(f"strategy {strategy.name!r} is already registered; pick another name")
    STRATEGIES[strategy.name] = strategy
    return strategy


register(FedAvg())
register(RefactorizingStrategy(name="svd", target=client_mixture_target, split=split_balanced))
register(RefactorizingStrategy(name="fedsvd", target=frozen_a_target, split=split_orthonormal_a))
register(RefactorizingStrategy(name="subspace_reg", target=client_mixture_target, split=split_orthonormal_b))


def get_strategy(name: str) -> Strategy:
    """The registered strategy called ``name``; ValueError naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; known methods: {', '.join(STRATEGIES)}") from None


def aggregate(
    method: str, global_state: AdapterState, updates: Sequence[ClientUpdate], settings: AggregationSettings
) -> AggregationResult:
    """One server step of ``method`` (see the module docstring for each method's formula)."""
    return get_strategy(method).aggregate(global_state, updates, settings)
