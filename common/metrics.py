"""Alignment diagnostics of one round (docs/DESIGN.md §5), computed from the LoRA factors.

Effective updates dW_i = s B_i A_i (each client's uploaded A and B), weights
p_i = n_i / sum_j n_j, mean update dW = sum_i p_i dW_i, new global update dW_g = s B_g A_g.
Norms and inner products run over all layers together: ||X||^2 = sum_l ||X_l||_F^2.

- cancellation_ratio      = ||dW|| / sum_i p_i ||dW_i||
- client_global_cosine    = mean_i cos(dW_i, dW)
- pairwise_client_cosine  = mean_{i<j} cos(dW_i, dW_j)              (None with one client)
- basis_overlap           = mean_{l,i} clamp(||Q_i^T Q_g||_F / sqrt(r), 0, 1),  Q = orth(B)
- basis_overlap_sq        = mean_{l,i} ||U_g^T Q_i||_F^2 / r,  U_g = top-r left singular vectors of dW_g
- update_subspace_overlap = mean_{l,i} ||U_i^T U_g||_F^2 / r,  U_i = top-r left singular vectors of dW_i
- aggregation_error       = ||dW_g - dW|| / ||dW||   (dW_g + R when the method folds a residual R into the
                            base weights: fedex_lora, whose error is then zero up to rounding)

No (d, k) product is formed: <dW_i, dW_j> = s^2 tr((B_i^T B_j)(A_j A_i^T)), and the norms of
sums of products come from the QR core of the stacked factors (exact, no cancellation of
large Gram terms). Everything runs in float64.

Rank handling (the choice documented here): orth() and "top-r" keep only the rank actually
present, i.e. singular values above max(rows, cols) * eps * sigma_max (torch.linalg.matrix_rank's
default). A zero or rank-deficient B therefore has a smaller (possibly empty) basis instead of
the arbitrary directions a plain QR would invent. Each overlap divides by the smaller of the two
ranks, which is the LoRA rank r whenever both factors are full rank (the released formula), and
a (layer, client) pair where either basis is empty is left out of the mean. A ratio whose
denominator is zero (every update zero, say) is None, never NaN: the results go into JSON; the
mean update counts as zero when it is below round-off of the clients' norms (``NEGLIGIBLE``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from itertools import combinations

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors, stack_factors

logger = logging.getLogger(__name__)

_DTYPE = torch.float64

NEGLIGIBLE = 1e-12
"""The mean update counts as zero when ||sum p_i dW_i|| <= NEGLIGIBLE * sum p_i ||dW_i||: cancellation
below float64 round-off (opposite clients, say) is indistinguishable from exact cancellation, and
dividing by that round-off would turn cosines and the aggregation error into noise."""

METRIC_NAMES = (
    "cancellation_ratio",
    "client_global_cosine",
    "pairwise_client_cosine",
    "basis_overlap",
    "basis_overlap_sq",
    "update_subspace_overlap",
    "aggregation_error",
)


# --------------------------------------------------------------------------- factored primitives


def _numerical_rank(singular_values: torch.Tensor, rows: int, cols: int) -> int:
    """Singular values above max(rows, cols) * eps * sigma_max (0 for an all-zero matrix)."""
    if singular_values.numel() == 0:
        return 0
    top = float(singular_values[0])
    if not top > 0.0:
        return 0
    tolerance = top * max(rows, cols) * torch.finfo(singular_values.dtype).eps
    return int((singular_values > tolerance).sum())


def orth(b: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, rho) of span(B) for B (d, r), rho its numerical rank."""
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)  # (d, r), (r,)
    return u[:, : _numerical_rank(sigma, *b.shape)]


def left_singular_basis(b: torch.Tensor, a: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors (d, <= rank) of B A for B (d, r), A (r, k), factored.

    With A^T = Q_a R_a, B A = (B R_a^T) Q_a^T and Q_a has orthonormal columns, so B A and the
    thin (d, r) matrix B R_a^T share their left singular vectors and singular values.
    """
    _, r_a = torch.linalg.qr(a.T)  # (min(k, r), r)
    u, sigma, _ = torch.linalg.svd(b @ r_a.T, full_matrices=False)  # (d, q), (q,)
    present = _numerical_rank(sigma, b.shape[0], a.shape[1])
    return u[:, : min(rank, present)]


def norm_of_weighted_sum(b_stack: torch.Tensor, weights: torch.Tensor, a_stack: torch.Tensor) -> float:
    """||B_s diag(w) A_s||_F via QR on both sides: ||R_b diag(w) R_a^T||_F, a (<= m, <= m) core."""
    _, r_b = torch.linalg.qr(b_stack)  # (m_b, m)
    _, r_a = torch.linalg.qr(a_stack.T)  # (m_a, m)
    return float(torch.linalg.matrix_norm((r_b * weights) @ r_a.T))


def client_gram(factors: Sequence[LoraFactors], scaling: float) -> torch.Tensor:
    """G (K, K) with G_ij = <s B_i A_i, s B_j A_j>_F = s^2 tr((B_i^T B_j)(A_j A_i^T))."""
    rank = factors[0].rank
    b_stack, a_stack = stack_factors(factors)  # (d, K r), (K r, k)
    # tr((B_i^T B_j)(A_j A_i^T)) = sum_ab (B_i^T B_j)_ab (A_i A_j^T)_ab: elementwise, then block sums.
    products = (b_stack.T @ b_stack) * (a_stack @ a_stack.T)  # (K r, K r)
    count = len(factors)
    return scaling**2 * products.reshape(count, rank, count, rank).sum(dim=(1, 3))


def subspace_overlap_sq(q_1: torch.Tensor, q_2: torch.Tensor) -> float | None:
    """||Q_1^T Q_2||_F^2 / min(rank_1, rank_2), in [0, 1]; None if either basis is empty."""
    smaller = min(q_1.shape[1], q_2.shape[1])
    if smaller == 0:
        return None
    value = float(torch.linalg.matrix_norm(q_1.T @ q_2) ** 2) / smaller
    return min(max(value, 0.0), 1.0)


# --------------------------------------------------------------------------- helpers


def _as_cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=_DTYPE)


def _ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, None when undefined (zero or non-finite) instead of NaN / inf."""
    if not (denominator > 0.0 and math.isfinite(denominator) and math.isfinite(numerator)):
        return None
    value = numerator / denominator
    return value if math.isfinite(value) else None


def _cosine(inner: float, norm_1: float, norm_2: float) -> float | None:
    value = _ratio(inner, norm_1 * norm_2)
    return None if value is None else min(max(value, -1.0), 1.0)


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _validate(updates: Sequence[ClientUpdate], scaling: float) -> None:
    """What the metrics themselves require; the updates were checked at the coordinator's boundary
    (same layers, shapes and rank as the global adapter, finite values, positive example counts)."""
    if len(updates) == 0:
        raise ValueError("updates is empty: alignment metrics need at least one client update")
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling={scaling!r}: must be a positive finite number (lora_alpha / lora_rank)")


# --------------------------------------------------------------------------- the metrics


def alignment_metrics(
    updates: Sequence[ClientUpdate], new_global: AdapterState, scaling: float,
    base_increment: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, float | None]:
    """The alignment diagnostics of docs/DESIGN.md §5 (formulas in the module docstring). ``base_increment``
    (layer -> (B_R (d, m), A_R (m, k))): the round's base-weight residual, part of the new global model.

    Keys are ``METRIC_NAMES``; a value is None where the quantity is undefined (one client for
    the pairwise cosine, zero updates for ratios and cosines, empty bases for overlaps).
    """
    _validate(updates, scaling)
    count = len(updates)
    counts = torch.tensor([u.num_examples for u in updates], dtype=_DTYPE)
    weights = counts / counts.sum()  # (K,) p_i

    gram = torch.zeros(count, count, dtype=_DTYPE)  # sum over layers of <dW_i, dW_j>
    mean_sq = 0.0  # ||sum p_i dW_i||^2
    error_sq = 0.0  # ||dW_g - sum p_i dW_i||^2
    overlap: list[float | None] = []
    overlap_sq: list[float | None] = []
    update_overlap: list[float | None] = []

    for layer, glob in new_global.lora.items():
        a_g = _as_cpu64(glob.A)  # (r, k)
        b_g = _as_cpu64(glob.B)  # (d, r)
        rank = a_g.shape[0]
        clients = [LoraFactors(A=_as_cpu64(u.state.lora[layer].A), B=_as_cpu64(u.state.lora[layer].B)) for u in updates]
        client_rank = clients[0].rank

        gram += client_gram(clients, scaling)
        b_stack, a_stack = stack_factors(clients)  # (d, K r_c), (K r_c, k)
        mixture = (scaling * weights).repeat_interleave(client_rank)  # (K r_c,)
        mean_sq += norm_of_weighted_sum(b_stack, mixture, a_stack) ** 2
        # dW_g - dW as one stacked product: [B_g, B_1 .. B_K] diag(s, -s p_i ..) [A_g; A_1; ..; A_K].
        b_res, a_res = (base_increment or {}).get(layer, (b_g[:, :0], a_g[:0]))   # (d, m), (m, k); m = 0: none
        b_res, a_res = _as_cpu64(b_res), _as_cpu64(a_res)
        error_sq += norm_of_weighted_sum(
            torch.cat([b_g, b_res, b_stack], dim=1),
            torch.cat([torch.full((rank,), float(scaling), dtype=_DTYPE), torch.ones(b_res.shape[1], dtype=_DTYPE),
                       -mixture]),
            torch.cat([a_g, a_res, a_stack], dim=0),
        ) ** 2

        q_g = orth(b_g)  # (d, rho_g)
        u_g = left_singular_basis(b_g, a_g, rank)  # (d, <= r)
        for f in clients:
            q_i = orth(f.B)  # (d, rho_i)
            released = subspace_overlap_sq(q_i, q_g)
            overlap.append(None if released is None else math.sqrt(released))
            overlap_sq.append(subspace_overlap_sq(u_g, q_i))
            update_overlap.append(subspace_overlap_sq(left_singular_basis(f.B, f.A, rank), u_g))

    norms = gram.diagonal().clamp(min=0.0).sqrt()  # (K,) ||dW_i||
    mean_norm = math.sqrt(mean_sq)
    weighted_norm_sum = float(weights @ norms)  # sum p_i ||dW_i||
    if mean_norm <= NEGLIGIBLE * weighted_norm_sum:
        mean_norm = 0.0
    inner_with_mean = (gram @ weights).tolist()  # <dW_i, dW>
    metrics: dict[str, float | None] = {
        "cancellation_ratio": _ratio(mean_norm, weighted_norm_sum),
        "client_global_cosine": _mean(
            [_cosine(inner_with_mean[i], float(norms[i]), mean_norm) for i in range(count)]
        ),
        "pairwise_client_cosine": _mean(
            [_cosine(float(gram[i, j]), float(norms[i]), float(norms[j])) for i, j in combinations(range(count), 2)]
        ),
        "basis_overlap": _mean(overlap),
        "basis_overlap_sq": _mean(overlap_sq),
        "update_subspace_overlap": _mean(update_overlap),
        "aggregation_error": _ratio(math.sqrt(error_sq), mean_norm),
    }
    logger.debug("alignment metrics over %d layers and %d clients: %s", len(new_global.lora), count, metrics)
    return metrics
