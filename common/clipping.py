"""A per-client bound on the update itself: each client's effective update, measured against the current
global adapter in factored form, clipped to a norm bound before it is weighted.

For one client with factors (A_i, B_i) per layer and the global (A_g, B_g), its update is

    ||Delta||^2 = sum_layers ||s B_i A_i - s B_g A_g||_F^2 + sum_extra ||T_i - T_g||_F^2

(``extra``: the other trainable tensors, such as a classifier head). Clipping moves every tensor of the
client toward the global one, theta(c) = theta_g + c (theta_i - theta_g), with the largest c in [0, 1]
whose update norm is within the bound. The product is bilinear in c:

    B(c) A(c) - B_g A_g = c (dB A_g + B_g dA) + c^2 dB dA
                        = [dB, B_g, dB] @ diag(c, c, c^2) @ [A_g; dA; dA]          # (d, 3r) (3r, 3r) (3r, k)

so its norm is tr(G_L D G_R D) with the (3r, 3r) Gram matrices G_L, G_R computed once and D = diag(c):
no (d, k) product is ever formed. c is found by bisection, which keeps the invariant
||Delta(lo)|| <= bound, so the clipped update never exceeds the bound whatever the shape of the curve.
Client-level differential privacy builds on exactly this bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.adapter import AdapterState, LoraFactors

BISECTION_STEPS = 60


@dataclass(frozen=True)
class ClippedUpdate:
    state: AdapterState
    norm: float          # the update's norm before clipping
    factor: float        # c: 1.0 when the update was within the bound


class ClipReference:
    """The global adapter that every client's update is measured against, prepared once per round: per layer
    A_g and B_g in float64 and their Grams R = B_g^T B_g (r, r) and X = A_g A_g^T (r, r), shared by all the
    round's clients instead of formed again for each."""

    def __init__(self, state: AdapterState) -> None:
        self.state = state
        self.layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for layer, factors in state.lora.items():
            A_g, B_g = factors.A.double(), factors.B.double()       # (r, k), (d, r)
            self.layers[layer] = (A_g, B_g, B_g.T @ B_g, A_g @ A_g.T)


class _UpdateGeometry:
    """||Delta(c)||^2 of one client's update against the global adapter as a polynomial in c, in float64.

    With D = diag(c I_2r, c^2 I_r) the layer's term is s^2 tr(D G_L D G_R) = s^2 sum_ij d_i d_j G_L[i, j] G_R[i, j]
    (both Grams symmetric), so summed over layers

        ||Delta(c)||^2 = c^2 (s^2 S_11 + extra) + 2 c^3 s^2 S_12 + c^4 s^2 S_22,

    S_ab the sums of G_L * G_R over the blocks (first 2r, last r) of rows and columns. The (3r, 3r) Grams
    repeat their (r, r) blocks: with P = dB^T dB, Q = dB^T B_g, R = B_g^T B_g on the left and
    X = A_g A_g^T, Y = A_g dA^T, Z = dA dA^T on the right,

        G_L = [[P, Q, P], [Q^T, R, Q^T], [P, Q, P]],   G_R = [[X, Y, Y], [Y^T, Z, Z], [Y^T, Z, Z]],
        S_11 = <P, X> + 2 <Q, Y> + <R, Z>,   S_12 = <P, Y> + <Q^T, Z>,   S_22 = <P, Z>,

    so a client costs four (r, r) products per layer (R and X come with the ClipReference), and every
    bisection step is then three multiplications instead of a pass over the layers.
    """

    def __init__(self, update: AdapterState, reference: ClipReference, scaling: float) -> None:
        inner = torch.zeros(4, 3, dtype=torch.float64)    # <L, M> for L in (P, Q, R, Q^T), M in (X, Y, Z)
        # Layer by layer: each layer's operands stay in cache (stacking the layers of one shape first was
        # 1.6x slower here, and 2x for the earlier (3r, 3r) form).
        for layer, mine in update.lora.items():
            A_g, B_g, R, X = reference.layers[layer]
            dA, dB = mine.A - A_g, mine.B - B_g                     # (r, k), (d, r): float64 (A_g, B_g are)
            P, Q = dB.T @ dB, dB.T @ B_g                            # (r, r) each
            Y, Z = A_g @ dA.T, dA @ dA.T                            # (r, r) each
            inner += torch.stack([P, Q, R, Q.T]).flatten(1) @ torch.stack([X, Y, Z]).flatten(1).T   # (4, 3)
        (px, py, pz), (_, qy, _), (_, _, rz), (_, _, qtz) = inner.tolist()
        s_11, s_12, s_22 = px + 2 * qy + rz, py + qtz, pz
        extra_sq = sum(float(torch.sum((update.extra[name].double() - value.double()) ** 2))
                       for name, value in reference.state.extra.items())
        self.coefficients = (scaling**2 * s_11 + extra_sq, 2.0 * scaling**2 * s_12, scaling**2 * s_22)

    def norm(self, c: float) -> float:
        quadratic, cubic, quartic = self.coefficients
        return max(c * c * (quadratic + c * (cubic + c * quartic)), 0.0) ** 0.5


def _prepared(reference: AdapterState | ClipReference) -> ClipReference:
    return reference if isinstance(reference, ClipReference) else ClipReference(reference)


def update_norm(update: AdapterState, reference: AdapterState | ClipReference, scaling: float) -> float:
    """||Delta||: the client's effective update against the global adapter (factored, float64)."""
    return _UpdateGeometry(update, _prepared(reference), scaling).norm(1.0)


def clip_update(update: AdapterState, reference: AdapterState | ClipReference, scaling: float,
                bound: float | None) -> ClippedUpdate:
    """Move the client's tensors toward the global ones until its update norm is within ``bound``. Pass the
    round's ClipReference when clipping several clients against the same global adapter."""
    reference = _prepared(reference)
    geometry = _UpdateGeometry(update, reference, scaling)
    norm = geometry.norm(1.0)
    if bound is None or norm <= bound:
        return ClippedUpdate(update, norm, 1.0)
    lo, hi = 0.0, 1.0                                   # norm(lo) <= bound < norm(hi)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if geometry.norm(mid) <= bound:
            lo = mid
        else:
            hi = mid
    return ClippedUpdate(_interpolate(update, reference.state, lo), norm, lo)


def _interpolate(update: AdapterState, reference: AdapterState, c: float) -> AdapterState:
    """theta_g + c (theta_i - theta_g) for every tensor, in the update's dtype."""
    def toward(mine: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
        return (glob.double() + c * (mine.double() - glob.double())).to(mine.dtype)

    return AdapterState(
        lora={layer: LoraFactors(A=toward(f.A, reference.lora[layer].A), B=toward(f.B, reference.lora[layer].B))
              for layer, f in update.lora.items()},
        extra={name: toward(t, reference.extra[name]) for name, t in update.extra.items()},
    )
