"""The Subspace-Reg client regularizer (docs/DESIGN.md §4), computed from r x r Gram blocks, never the d x k product.

    R = (1/P) sum_l [ mu/2 ||s B A - s B_g A_g||_F^2 + alpha/2 ||B - B_g||_F^2 + lambda/2 (||A||_F^2 + ||B||_F^2) ]

over the P adapted layers, with (A, B) the client's live LoRA parameters and (A_g, B_g)
the global factors it received (constants).

The proximal term never forms the (d, k) product. Writing dA = A - A_g, dB = B - B_g,

    B A - B_g A_g = dB A + B_g dA,

and with X_b = [dB, B_g] (d, 2r), X_a = [A; dA] (2r, k) that is X_b X_a, so

    ||B A - B_g A_g||_F^2 = tr((X_b^T X_b)(X_a X_a^T))
                          = tr(dB^T dB . A A^T) + 2 tr(dB^T B_g . dA A^T) + tr(B_g^T B_g . dA dA^T),

traces of products of r x r Gram blocks. Expanding around the reference (rather than
||BA||^2 - 2<BA, B_g A_g> + ||B_g A_g||^2) keeps every term as small as the distance to the
reference: no cancellation of large numbers, so the value is exactly 0 at A = A_g, B = B_g and
accurate in float32 close to it, which is where the clients train. Cost O((d + k) r^2) per layer
instead of O(d k r).

Layers of equal shape are independent, so they are stacked and handled by batched matmuls: a
transformer has a few distinct shapes and a hundred-odd layers (RoBERTa-large: 97 of its 145 adapted
layers are 1024 x 1024), and this term is evaluated at every training step. Each group is five
batched r x r blocks forward and, backward, two fused products per factor (``_GroupPenalty``):

    E = A A^T, F = A dA^T, H = dA dA^T,   P = dB^T dB, Q = dB^T B_g,   R = B_g^T B_g (a constant).

The reference is constant over a round, so ``SubspaceRegularizer`` stacks it by shape and forms R
once, and each training step stacks only the live factors. The backward pass is written out from
the same blocks: a first-order gradient, which is all training needs (no double backward).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch.autograd.function import once_differentiable

from common.adapter import LoraFactors

logger = logging.getLogger(__name__)


def _check_coefficient(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name}={value!r}: must be a finite non-negative number (0 disables the term)")


def _trace(x: torch.Tensor) -> torch.Tensor:
    """Sum of the traces of a stack of square matrices (n, r, r)."""
    return x.diagonal(dim1=-2, dim2=-1).sum()


class _GroupPenalty(torch.autograd.Function):
    """Sum over a stack of n equally shaped layers of the bracket in R (not yet divided by P).

    Inputs a (n, r, k), b (n, d, r) live; a_ref (n, r, k), b_ref (n, d, r) and gram_ref = B_g^T B_g
    (n, r, r) constants; weights c_prox = mu s^2 / 2, c_alpha = alpha / 2, c_l2 = lambda / 2. With
    X_a = [A; dA] (n, 2r, k) and X_b = [dB, B_g] (n, d, 2r), the r x r blocks

        X_a X_a^T = [[E, F], [F^T, H]] = [[A A^T, A dA^T], [., dA dA^T]],
        dB^T X_b  = [P, Q] = [dB^T dB, dB^T B_g],   R = B_g^T B_g,

    give

        ||Y||^2 = tr(P E) + 2 tr(Q F^T) + tr(R H),   Y = B A - B_g A_g = dB A + B_g dA (never formed),
        ||B||^2 = tr(P) + 2 tr(Q) + tr(R)           (B = dB + B_g),

    and the gradients (d||Y||^2/dA = 2 B^T Y, d||Y||^2/dB = 2 Y A^T, plus the alpha and l2 terms)
    are each one batched product of a (n, r, 2r) block matrix with X_a or X_b:

        dR/dA   = 2 [c_prox (P + Q^T) + c_l2 I,  c_prox (Q + R)] [A; dA]
        dR/dB^T = 2 [c_prox E + (c_alpha + c_l2) I,  c_prox F + c_l2 I] [dB^T; B_g^T]

    X_a and X_b are written into preallocated buffers rather than concatenated (a concatenation
    along the last axis of (n, d, r) blocks cost as much as all the products). The Gram of X_a is
    one product with 2r x 2r outputs, which a CPU BLAS runs twice as fast per flop as three
    separate r x r ones. dR/dB is computed as its transpose, (n, r, d): a batched product whose
    output has r columns (8) runs several times slower than the same product laid out (r, d).
    Differentiable once (enough for training).
    """

    @staticmethod
    def forward(ctx, a, b, a_ref, b_ref, gram_ref, c_prox: float, c_alpha: float, c_l2: float):  # type: ignore[override]
        n, r, k = a.shape
        d = b.shape[-2]
        x_a = a.new_empty(n, 2 * r, k)  # [A; dA]
        x_a[:, :r] = a
        torch.sub(a, a_ref, out=x_a[:, r:])
        x_b = b.new_empty(n, d, 2 * r)  # [dB, B_g]
        torch.sub(b, b_ref, out=x_b[..., :r])
        x_b[..., r:] = b_ref
        gram_a = x_a @ x_a.mT  # (n, 2r, 2r) [[E, F], [F^T, H]]
        p_q = x_b[..., :r].mT @ x_b  # (n, r, 2r) [P, Q]
        e, f, h = gram_a[:, :r, :r], gram_a[:, :r, r:], gram_a[:, r:, r:]  # (n, r, r) each
        p, q = p_q[..., :r], p_q[..., r:]  # (n, r, r) each
        # tr(X Z^T) = sum X * Z
        proximal = (p * e).sum() + 2.0 * (q * f).sum() + (gram_ref * h).sum()  # ||B A - B_g A_g||_F^2
        value = (c_prox * proximal
                 + c_alpha * _trace(p)  # ||B - B_g||_F^2
                 + c_l2 * (_trace(e) + _trace(p) + 2.0 * _trace(q) + _trace(gram_ref)))  # ||A||_F^2 + ||B||_F^2
        ctx.save_for_backward(x_a, x_b, gram_a, p_q, gram_ref)
        ctx.coefficients = (c_prox, c_alpha, c_l2)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):  # type: ignore[override]
        x_a, x_b, gram_a, p_q, gram_ref = ctx.saved_tensors
        c_prox, c_alpha, c_l2 = ctx.coefficients
        r = x_a.shape[-2] // 2
        eye = torch.eye(r, dtype=x_a.dtype, device=x_a.device)  # (r, r)
        e, f = gram_a[:, :r, :r], gram_a[:, :r, r:]
        p, q = p_q[..., :r], p_q[..., r:]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            k_a = torch.cat([c_prox * (p + q.mT) + c_l2 * eye, c_prox * (q + gram_ref)], dim=-1)  # (n, r, 2r)
            grad_a = (2.0 * grad_value) * k_a @ x_a  # (n, r, k)
        if ctx.needs_input_grad[1]:
            k_b = torch.cat([c_prox * e + (c_alpha + c_l2) * eye, c_prox * f + c_l2 * eye], dim=-1)  # (n, r, 2r)
            grad_b = ((2.0 * grad_value) * k_b @ x_b.mT).mT  # (n, r, d) transposed: (n, d, r)
        return grad_a, grad_b, None, None, None, None, None, None


class SubspaceRegularizer:
    """R for one round's reference (A_g, B_g): the constants prepared once, then one call per training step.

    The reference is fixed for the whole round while the client takes many steps, so its stacks by
    shape and the Grams B_g^T B_g are built once, on first use for the live factors' dtype and device,
    instead of at every step. ``local`` may be any subset of the reference's layers.
    """

    def __init__(self, reference: Mapping[str, LoraFactors], scaling: float, mu: float, alpha: float,
                 lambda_reg: float) -> None:
        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"scaling={scaling!r}: must be a positive finite number (lora_alpha / lora_rank)")
        _check_coefficient("mu", mu)
        _check_coefficient("alpha", alpha)
        _check_coefficient("lambda_reg", lambda_reg)
        self._reference = reference
        self._coefficients = (0.5 * mu * scaling**2, 0.5 * alpha, 0.5 * lambda_reg)  # c_prox, c_alpha, c_l2
        self._constants: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def __call__(self, local: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Scalar R over ``local``, which maps each adapted layer to its live (A (r, k), B (d, r)).

        Gradients flow to the live factors only; P = len(local).
        """
        if len(local) == 0:
            raise ValueError("local is empty: pass the (lora_A, lora_B) parameters of every adapted layer")
        groups: dict[tuple, list[str]] = {}
        for layer, (a, b) in local.items():
            ref = self._reference.get(layer)
            if ref is None:
                raise ValueError(
                    f"layer {layer!r} has no global reference factors; the reference must cover every adapted "
                    f"layer (it has {len(self._reference)} layers)"
                )
            if ref.A.shape != a.shape or ref.B.shape != b.shape or a.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"layer {layer!r}: local lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the "
                    f"reference's {tuple(ref.A.shape)} / {tuple(ref.B.shape)}; use the global LoRA rank"
                )
            groups.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device), []).append(layer)

        total: torch.Tensor | None = None
        for (_, _, dtype, device), layers in groups.items():
            a = torch.stack([local[layer][0] for layer in layers])  # (n, r, k)
            b = torch.stack([local[layer][1] for layer in layers]).to(dtype)  # (n, d, r)
            a_ref, b_ref, gram_ref = self._group_constants(tuple(layers), dtype, device)
            penalty = _GroupPenalty.apply(a, b, a_ref, b_ref, gram_ref, *self._coefficients)
            total = penalty if total is None else total + penalty
        assert total is not None  # local is non-empty
        return total / len(local)

    def _group_constants(self, layers: tuple[str, ...], dtype: torch.dtype,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_g (n, r, k), B_g (n, d, r) and B_g^T B_g (n, r, r) of a group, stacked once and kept."""
        key = (layers, dtype, device)
        if key not in self._constants:
            # The reference is a constant: detached, so no gradient may flow into the global factors.
            a_ref = torch.stack([self._reference[layer].A.detach() for layer in layers]).to(device=device, dtype=dtype)
            b_ref = torch.stack([self._reference[layer].B.detach() for layer in layers]).to(device=device, dtype=dtype)
            # In float64 (once per round): a float32 batched product with a transposed (d, r) operand lost
            # up to 9e-7 relative over d = 4096 rows, where the Gram inside the old concatenation kept 8e-8.
            gram_ref = (b_ref.double().mT @ b_ref.double()).to(dtype)  # (n, r, r)
            self._constants[key] = (a_ref, b_ref, gram_ref)
        return self._constants[key]


def subspace_regularizer(
    local: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    reference: Mapping[str, LoraFactors],
    scaling: float,
    mu: float,
    alpha: float,
    lambda_reg: float,
) -> torch.Tensor:
    """Scalar R = (1/P) sum_l [ mu/2 ||s B A - s B_g A_g||^2 + alpha/2 ||B - B_g||^2 + lambda/2 (||A||^2 + ||B||^2) ].

    ``local`` maps each adapted layer to its live (A (r, k), B (d, r)); gradients flow to
    them. ``reference`` maps each layer to the global factors, used as constants in the
    dtype and device of the local ones. P = len(local). One call; a training loop prepares a
    ``SubspaceRegularizer`` once per round instead.
    """
    return SubspaceRegularizer(reference, scaling, mu, alpha, lambda_reg)(local)
