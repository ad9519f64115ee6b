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

No (d, k) product is formed. Per layer, one QR of X = [B_1 .. B_K, B_g, B_R] (d, m) and one of
Y^T = [A_1; ..; A_K; A_g; A_R]^T (k, m) put every factor in the coordinates of Q_x and Q_y, which
keep norms, inner products and subspaces: B_i = Q_x R_x,i. So <dW_i, dW_j> = s^2 tr((B_i^T B_j)(A_j A_i^T))
comes from R's columns, the norms of sums of products from the (<= m, <= m) core R_x diag(w) R_y^T
(exact, no cancellation of large Gram terms), and the bases and overlaps from SVDs of R's (<= m, r)
blocks instead of (d, r) matrices. Layers of one shape are stacked and done in one batched call each
(RoBERTa-large: three groups for 145 layers), in chunks of layers whose working memory stays under
``CHUNK_BYTES``. Everything runs in float64.

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

from common.adapter import AdapterState, ClientUpdate

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
# Each takes a stack of equally shaped layers (leading dimensions ...) and returns per-layer results:
# the layers of one shape are independent, so one batched QR / SVD / matmul replaces a loop per layer.
# A basis is returned with its numerical rank, its columns beyond that rank set to zero, which is
# what truncating it would give in every product below.


def _numerical_ranks(singular_values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(...,) ranks: the singular values (..., q) above max(rows, cols) * eps * sigma_max (0 for a zero matrix)."""
    if singular_values.shape[-1] == 0:
        return torch.zeros(singular_values.shape[:-1], dtype=torch.long)
    top = singular_values[..., :1]  # (..., 1)
    tolerance = top * max(rows, cols) * torch.finfo(singular_values.dtype).eps
    ranks = (singular_values > tolerance).sum(dim=-1)
    return torch.where(top[..., 0] > 0.0, ranks, 0)  # not > 0: zero (or NaN) matrix


def _masked(u: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """u (..., d, q) with the columns at and beyond each matrix's rank (...,) set to zero."""
    keep = torch.arange(u.shape[-1]) < ranks.unsqueeze(-1)  # (..., q)
    return u * keep.unsqueeze(-2)


def orth(b: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal bases of span(B) for B (..., p, r): (Q (..., p, r), rho (...,)), rho the numerical rank
    of the original B (rows, r) whose coordinates these are."""
    u, sigma, _ = torch.linalg.svd(b, full_matrices=False)  # (..., p, r), (..., r)
    ranks = _numerical_ranks(sigma, rows, b.shape[-1])
    return _masked(u, ranks), ranks


def left_singular_basis(b: torch.Tensor, a: torch.Tensor, rank: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors of B A for B (..., p, r), A (..., r, q), factored:
    (U (..., p, r), kept (...,)), kept = min(rank, numerical rank of the original (rows, cols) product).

    With A^T = Q_a R_a, B A = (B R_a^T) Q_a^T and Q_a has orthonormal columns, so B A and the
    thin (p, r) matrix B R_a^T share their left singular vectors and singular values.
    """
    r_a = torch.linalg.qr(a.mT, mode="r").R  # (..., min(q, r), r)
    u, sigma, _ = torch.linalg.svd(b @ r_a.mT, full_matrices=False)  # (..., p, min(q, r)), (..., min(q, r))
    kept = _numerical_ranks(sigma, rows, cols).clamp(max=rank)
    return _masked(u, kept), kept


def client_gram(r_b: torch.Tensor, r_a: torch.Tensor, count: int, scaling: float) -> torch.Tensor:
    """G (K, K), summed over the layers of the stack, with G_ij = <s B_i A_i, s B_j A_j>_F
    = s^2 tr((B_i^T B_j)(A_j A_i^T)), from the clients' columns of the R factors of B_s (n, ., K r) and
    A_s^T (n, ., K r): B_i^T B_j = R_b,i^T R_b,j and A_i A_j^T = R_a,i^T R_a,j."""
    rank = r_a.shape[-1] // count
    # tr((B_i^T B_j)(A_j A_i^T)) = sum_ab (B_i^T B_j)_ab (A_i A_j^T)_ab: elementwise, then block sums.
    products = (r_b.mT @ r_b) * (r_a.mT @ r_a)  # (n, K r, K r)
    return scaling**2 * products.reshape(-1, count, rank, count, rank).sum(dim=(0, 2, 4))


def subspace_overlap_sq(q_1: torch.Tensor, rank_1: torch.Tensor, q_2: torch.Tensor,
                        rank_2: torch.Tensor) -> list[float | None]:
    """||Q_1^T Q_2||_F^2 / min(rank_1, rank_2), in [0, 1], for bases (..., d, q) of ranks (...,) broadcast
    together, flattened in order; None where either basis is empty."""
    smaller = torch.minimum(rank_1, rank_2)  # (...,)
    values = (torch.linalg.matrix_norm(q_1.mT @ q_2) ** 2 / smaller.clamp(min=1)).clamp(0.0, 1.0)
    return [value if size > 0 else None for value, size in zip(values.flatten().tolist(), smaller.flatten().tolist())]


# --------------------------------------------------------------------------- helpers


def _stacked(per_layer: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """(n, m, cols) float64 on the CPU: for each of n layers, its matrices (rows_i, cols) one under the other
    (sum rows_i = m), each converted as it is copied in."""
    first = per_layer[0]
    stacked = torch.empty((len(per_layer), sum(b.shape[0] for b in first), first[0].shape[1]), dtype=_DTYPE)
    for out, blocks in zip(stacked, per_layer):
        row = 0
        for block in blocks:
            out[row:row + block.shape[0]].copy_(block.detach())
            row += block.shape[0]
    return stacked


def _groups(new_global: AdapterState, base_increment: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[list[str]]:
    """The layers in groups of equal shapes (the new global factors and the base residual's width), each
    group in the adapter's order (RoBERTa-large: 145 layers in three groups)."""
    groups: dict[tuple, list[str]] = {}
    for layer, f in new_global.lora.items():
        residual = base_increment.get(layer)
        width = None if residual is None else tuple(residual[0].shape) + tuple(residual[1].shape)
        groups.setdefault((tuple(f.A.shape), tuple(f.B.shape), width), []).append(layer)
    return list(groups.values())


CHUNK_BYTES = 64 << 20
"""Working memory the layers of one batched call may take (float64 stacks, their QR factors and the (K r, K r)
client Grams): a group of equal layers is split into chunks under it, so the metrics' peak grows with the
sampled clients, not with the layers times the clients squared (MiniLM at K = 100: +615 MB in one call before,
+108 MB, and 4.7 -> 2.9 s)."""


def _chunks(layers: list[str], rows: int, cols: int, columns: int, client_columns: int) -> list[list[str]]:
    """``layers`` (of one shape: B (rows, .), A (., cols)) in consecutive chunks whose working memory stays
    within CHUNK_BYTES; ``columns``: m, the factors' columns side by side; ``client_columns``: K r."""
    per_layer = 8 * (3 * (rows + cols) * columns + 3 * client_columns ** 2)    # bytes, float64
    size = max(1, CHUNK_BYTES // per_layer)
    return [layers[i: i + size] for i in range(0, len(layers), size)]


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

    client_rank = updates[0].state.lora[next(iter(new_global.lora))].A.shape[0]
    chunks = []
    for group in _groups(new_global, base_increment or {}):
        (d, rank), k = new_global.lora[group[0]].B.shape, new_global.lora[group[0]].A.shape[1]
        residual_width = base_increment[group[0]][0].shape[1] if base_increment and group[0] in base_increment else 0
        chunks += _chunks(group, d, k, count * client_rank + rank + residual_width, count * client_rank)
    for layers in chunks:
        (d, rank), k = new_global.lora[layers[0]].B.shape, new_global.lora[layers[0]].A.shape[1]
        increments = [base_increment[layer] for layer in layers] if base_increment and layers[0] in base_increment else []
        # Per layer X = [B_1 .. B_K, B_g, B_R] (d, m) and Y = [A_1; ..; A_K; A_g; A_R] (m, k), stacked over the
        # group (n, ., .) with X column-major (what LAPACK reads). One QR each, X = Q_x R_x, Y^T = Q_y R_y:
        # every factor is then R's block of columns, in coordinates Q_x / Q_y preserve (norms, inner
        # products, subspaces), so all the diagnostics below run on (<= m, m) matrices instead of (d, m).
        residuals = increments or [(None, None)] * len(layers)
        x = _stacked([[u.state.lora[layer].B.mT for u in updates] + [new_global.lora[layer].B.mT]
                      + ([] if b_res is None else [b_res.mT]) for layer, (b_res, _) in zip(layers, residuals)]).mT
        y = _stacked([[u.state.lora[layer].A for u in updates] + [new_global.lora[layer].A]
                      + ([] if a_res is None else [a_res]) for layer, (_, a_res) in zip(layers, residuals)]).mT
        # x (n, d, m) column-major, y (n, k, m) = Y^T column-major; the clients' columns come first, then
        # the global's r, then the residual's.
        client_rank = updates[0].state.lora[layers[0]].A.shape[0]
        width = count * client_rank
        r_x = torch.linalg.qr(x, mode="r").R  # (n, p, m), p = min(d, m)
        r_y = torch.linalg.qr(y, mode="r").R  # (n, q, m), q = min(k, m)

        gram += client_gram(r_x[..., :width], r_y[..., :width], count, scaling)
        mixture = (scaling * weights).repeat_interleave(client_rank)  # (K r_c,)
        # ||sum p_i dW_i|| = ||R_x,c diag(s p) R_y,c^T||; dW_g - dW: weights (-s p, s, 1) on all m columns.
        mean_sq += float((torch.linalg.matrix_norm((r_x[..., :width] * mixture) @ r_y[..., :width].mT) ** 2).sum())
        signed = torch.cat([-mixture, torch.full((rank,), float(scaling), dtype=_DTYPE),
                            torch.ones(x.shape[-1] - width - rank, dtype=_DTYPE)])  # (m,)
        error_sq += float((torch.linalg.matrix_norm((r_x * signed) @ r_y.mT) ** 2).sum())

        b_g, a_g = r_x[..., width:width + rank], r_y[..., width:width + rank].mT  # (n, p, r), (n, r, q)
        b_i = r_x[..., :width].unflatten(-1, (count, client_rank)).movedim(-2, 1)  # (n, K, p, r_c)
        a_i = r_y[..., :width].unflatten(-1, (count, client_rank)).movedim(-2, 1).mT  # (n, K, r_c, q)
        q_g, rho_g = orth(b_g, d)  # (n, p, r), (n,)
        u_g, kept_g = left_singular_basis(b_g, a_g, rank, d, k)  # (n, p, r), (n,)
        q_i, rho_i = orth(b_i, d)  # (n, K, p, r_c), (n, K)
        u_i, kept_i = left_singular_basis(b_i, a_i, rank, d, k)  # (n, K, p, r_c), (n, K)
        g = (slice(None), None)  # the global basis of each layer against each of its K clients
        released = subspace_overlap_sq(q_i, rho_i, q_g[g], rho_g[g])  # layer by layer, client by client
        overlap += [None if value is None else math.sqrt(value) for value in released]
        overlap_sq += subspace_overlap_sq(u_g[g], kept_g[g], q_i, rho_i)
        update_overlap += subspace_overlap_sq(u_i, kept_i, u_g[g], kept_g[g])

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
