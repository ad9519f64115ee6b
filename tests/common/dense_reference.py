"""Dense reference implementations: form every d x k product and use full torch.linalg.svd.

Slow and obviously correct: the factored code in common/ must match these (docs/DESIGN.md §4, §5).
Everything here follows the formulas literally; nothing is shared with common/ beyond the
dataclasses of common.adapter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors

F64 = torch.float64


@dataclass(frozen=True)
class DenseLayerStep:
    B: torch.Tensor  # (d, r)
    A: torch.Tensor  # (r, k)
    product: torch.Tensor  # (d, k) s B A
    U: torch.Tensor  # (d, r) left singular vectors of the (clipped) target, or of the new product (fedavg)
    S: torch.Tensor  # (r,) singular values of the clipped target M (not divided by s)
    target: torch.Tensor  # (d, k) clipped M
    gain: float


def weights_of(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    counts = torch.tensor([float(u.num_examples) for u in updates], dtype=F64)
    return counts / counts.sum()


def dense_target(method: str, layer: str, global_state: AdapterState, updates: Sequence[ClientUpdate],
                 scaling: float) -> torch.Tensor:
    """M (d, k) before clipping."""
    p = weights_of(updates)
    if method == "fedsvd":
        b_mean = sum(p[i] * u.state.lora[layer].B.to(F64) for i, u in enumerate(updates))
        return scaling * b_mean @ global_state.lora[layer].A.to(F64)
    return sum(p[i] * scaling * (u.state.lora[layer].B.to(F64) @ u.state.lora[layer].A.to(F64))
               for i, u in enumerate(updates))


def clip(m: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    norm = torch.linalg.matrix_norm(m)
    if max_norm is not None and norm > max_norm:
        return m * (max_norm / norm)
    return m


def dense_layer_step(method: str, layer: str, global_state: AdapterState, updates: Sequence[ClientUpdate],
                     scaling: float, rank: int, max_norm: float | None) -> DenseLayerStep:
    p = weights_of(updates)
    if method == "fedavg":
        a = sum(p[i] * u.state.lora[layer].A.to(F64) for i, u in enumerate(updates))
        b = sum(p[i] * u.state.lora[layer].B.to(F64) for i, u in enumerate(updates))
        product = scaling * b @ a
        u_full, s_full, _ = torch.linalg.svd(product, full_matrices=False)
        return DenseLayerStep(B=b, A=a, product=product, U=u_full[:, :rank], S=s_full[:rank],
                              target=product, gain=1.0)
    m = clip(dense_target(method, layer, global_state, updates, scaling), max_norm)
    u_full, s_full, vh_full = torch.linalg.svd(m / scaling, full_matrices=False)
    u, sigma, vh = u_full[:, :rank], s_full[:rank], vh_full[:rank]
    if method == "svd":
        b, a = u * sigma.sqrt(), sigma.sqrt()[:, None] * vh
    elif method == "fedsvd":
        b, a = u * sigma, vh
    elif method == "subspace_reg":
        b, a = u, sigma[:, None] * vh
    else:
        raise ValueError(method)
    product_norm = torch.linalg.matrix_norm(scaling * b @ a)
    gain = math.sqrt(float(torch.linalg.matrix_norm(m)) / float(product_norm)) if product_norm > 0 else 1.0
    b, a = gain * b, gain * a
    return DenseLayerStep(B=b, A=a, product=scaling * b @ a, U=u, S=sigma * scaling, target=m, gain=gain)


def dense_server_step(method: str, global_state: AdapterState, updates: Sequence[ClientUpdate],
                      scaling: float, rank: int, max_norm: float | None
                      ) -> tuple[dict[str, DenseLayerStep], dict[str, torch.Tensor]]:
    """Per layer dense step, plus the p-weighted mean of every extra tensor."""
    layers = {layer: dense_layer_step(method, layer, global_state, updates, scaling, rank, max_norm)
              for layer in global_state.lora}
    p = weights_of(updates)
    extra = {key: sum(p[i] * u.state.extra[key].to(F64) for i, u in enumerate(updates))
             for key in global_state.extra}
    return layers, extra


# --------------------------------------------------------------------------- metrics


def _rank_of(singular_values: torch.Tensor, rows: int, cols: int) -> int:
    if singular_values.numel() == 0 or not float(singular_values[0]) > 0:
        return 0
    tol = float(singular_values[0]) * max(rows, cols) * torch.finfo(F64).eps
    return int((singular_values > tol).sum())


def dense_orth(b: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(b, full_matrices=False)
    return u[:, :_rank_of(s, *b.shape)]


def dense_top_left(m: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :min(rank, _rank_of(s, *m.shape))]


def _overlap_sq(q1: torch.Tensor, q2: torch.Tensor) -> float | None:
    smaller = min(q1.shape[1], q2.shape[1])
    if smaller == 0:
        return None
    return min(max(float(torch.linalg.matrix_norm(q1.T @ q2) ** 2) / smaller, 0.0), 1.0)


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _div(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def dense_alignment_metrics(updates: Sequence[ClientUpdate], new_global: AdapterState,
                            scaling: float) -> dict[str, float | None]:
    p = weights_of(updates)
    count = len(updates)
    layers = list(new_global.lora)
    dw = [{l: scaling * u.state.lora[l].B.to(F64) @ u.state.lora[l].A.to(F64) for l in layers} for u in updates]
    dw_g = {l: scaling * new_global.lora[l].B.to(F64) @ new_global.lora[l].A.to(F64) for l in layers}
    mean = {l: sum(p[i] * dw[i][l] for i in range(count)) for l in layers}

    def inner(x: dict, y: dict) -> float:
        return float(sum((x[l] * y[l]).sum() for l in layers))

    def norm(x: dict) -> float:
        return math.sqrt(max(inner(x, x), 0.0))

    mean_norm = norm(mean)
    client_norms = [norm(d) for d in dw]
    if mean_norm <= 1e-12 * float(sum(p[i] * client_norms[i] for i in range(count))):
        mean_norm = 0.0  # same round-off rule as common.metrics.NEGLIGIBLE

    def cos(x: dict, y: dict) -> float | None:
        value = _div(inner(x, y), norm(x) * norm(y))
        return None if value is None else min(max(value, -1.0), 1.0)

    overlap, overlap_sq, update_overlap = [], [], []
    for l in layers:
        rank = new_global.lora[l].A.shape[0]
        q_g = dense_orth(new_global.lora[l].B.to(F64))
        u_g = dense_top_left(dw_g[l], rank)
        for i, u in enumerate(updates):
            q_i = dense_orth(u.state.lora[l].B.to(F64))
            released = _overlap_sq(q_i, q_g)
            overlap.append(None if released is None else math.sqrt(released))
            overlap_sq.append(_overlap_sq(u_g, q_i))
            update_overlap.append(_overlap_sq(dense_top_left(dw[i][l], rank), u_g))
    error = {l: dw_g[l] - mean[l] for l in layers}
    return {
        "cancellation_ratio": _div(mean_norm, float(sum(p[i] * client_norms[i] for i in range(count)))),
        "client_global_cosine": _mean([cos(dw[i], mean) for i in range(count)]),
        "pairwise_client_cosine": _mean([cos(dw[i], dw[j]) for i, j in combinations(range(count), 2)]),
        "basis_overlap": _mean(overlap),
        "basis_overlap_sq": _mean(overlap_sq),
        "update_subspace_overlap": _mean(update_overlap),
        "aggregation_error": _div(norm(error), mean_norm),
    }


# --------------------------------------------------------------------------- regularizer


def dense_regularizer(local: Mapping[str, tuple[torch.Tensor, torch.Tensor]], reference: Mapping[str, LoraFactors],
                      scaling: float, mu: float, alpha: float, lambda_reg: float) -> torch.Tensor:
    """(1/P) sum_l [mu/2 ||s B A - s B_g A_g||^2 + alpha/2 ||B - B_g||^2 + lambda/2 (||A||^2 + ||B||^2)], dense."""
    total = 0.0
    for layer, (a, b) in local.items():
        a_g = reference[layer].A.to(a.dtype).detach()
        b_g = reference[layer].B.to(b.dtype).detach()
        diff = scaling * b @ a - scaling * b_g @ a_g  # (d, k): the product the factored code avoids
        total = total + (0.5 * mu * diff.square().sum() + 0.5 * alpha * (b - b_g).square().sum()
                         + 0.5 * lambda_reg * (a.square().sum() + b.square().sum()))
    return total / len(local)
