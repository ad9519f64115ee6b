"""Subspace-Reg regularizer: value and gradients equal the dense formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapter import LoraFactors
from common.regularizer import subspace_regularizer
from tests.common.dense_reference import dense_regularizer
from tests.common.factories import F64, make_generator, rel_err

TOL = 1e-6


def make_case(seed: int, rank: int, shapes: list[tuple[int, int]], dtype: torch.dtype = F64, spread: float = 0.3):
    """Live (A, B) leaves near a random reference, and the reference factors."""
    gen = make_generator(seed)
    local, reference = {}, {}
    for i, (d, k) in enumerate(shapes):
        a_g = torch.randn(rank, k, generator=gen, dtype=F64)
        b_g = torch.randn(d, rank, generator=gen, dtype=F64)
        a = (a_g + spread * torch.randn(rank, k, generator=gen, dtype=F64)).to(dtype).requires_grad_()
        b = (b_g + spread * torch.randn(d, rank, generator=gen, dtype=F64)).to(dtype).requires_grad_()
        local[f"layer.{i}"] = (a, b)
        reference[f"layer.{i}"] = LoraFactors(A=a_g.to(dtype), B=b_g.to(dtype))
    return local, reference


def grads(value: torch.Tensor, local: dict) -> list[torch.Tensor]:
    leaves = [t for pair in local.values() for t in pair]
    return list(torch.autograd.grad(value, leaves))


@settings(max_examples=40, deadline=None)
@given(
    rank=st.sampled_from([1, 2, 4, 8]),
    dims=st.lists(st.tuples(st.integers(8, 24), st.integers(8, 24)), min_size=1, max_size=3),
    coefficients=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 0.1)),
    scaling=st.floats(0.25, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_value_and_gradients_match_dense(rank, dims, coefficients, scaling, seed) -> None:
    mu, alpha, lambda_reg = coefficients
    local, reference = make_case(seed, rank, dims)
    factored = subspace_regularizer(local, reference, scaling, mu, alpha, lambda_reg)
    dense = dense_regularizer(local, reference, scaling, mu, alpha, lambda_reg)
    assert factored.shape == ()
    assert rel_err(factored.detach(), dense.detach()) <= TOL
    for g_f, g_d in zip(grads(factored, local), grads(dense, local)):
        assert rel_err(g_f, g_d) <= TOL


@settings(max_examples=25, deadline=None)
@given(rank=st.sampled_from([1, 2, 4, 8]), mu=st.floats(0, 1), alpha=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_zero_at_reference_without_l2(rank, mu, alpha, seed) -> None:
    _, reference = make_case(seed, rank, [(10, 13), (13, 10)])
    local = {layer: (f.A.clone().requires_grad_(), f.B.clone().requires_grad_()) for layer, f in reference.items()}
    value = subspace_regularizer(local, reference, 2.0, mu, alpha, 0.0)
    assert value.item() == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads(value, local))


def test_float32_close_to_float64_dense() -> None:
    local32, reference32 = make_case(3, 8, [(64, 48), (48, 96)], dtype=torch.float32, spread=1e-3)
    local64 = {l: (a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for l, (a, b) in local32.items()}
    value = subspace_regularizer(local32, reference32, 2.0, 0.05, 0.01, 1e-5)
    assert value.dtype == torch.float32
    dense = dense_regularizer(local64, {l: LoraFactors(f.A.double(), f.B.double()) for l, f in reference32.items()},
                              2.0, 0.05, 0.01, 1e-5)
    assert rel_err(value.detach(), dense.detach()) <= 1e-4
    for g_f, g_d in zip(grads(value, local32), grads(dense, local64)):
        assert rel_err(g_f, g_d) <= 1e-4


def test_reference_gets_no_gradient() -> None:
    local, reference = make_case(4, 2, [(9, 9)])
    ref_a = reference["layer.0"].A.clone().requires_grad_()
    ref = {"layer.0": LoraFactors(A=ref_a, B=reference["layer.0"].B)}
    subspace_regularizer(local, ref, 2.0, 0.05, 0.01, 1e-5).backward()
    assert ref_a.grad is None
    assert local["layer.0"][0].grad is not None


def test_missing_layer_and_bad_inputs() -> None:
    local, reference = make_case(5, 2, [(9, 9), (9, 11)])
    with pytest.raises(ValueError, match=r"'layer\.1'"):
        subspace_regularizer(local, {"layer.0": reference["layer.0"]}, 2.0, 0.05, 0.01, 1e-5)
    bad = {"layer.0": LoraFactors(A=torch.zeros(3, 9, dtype=F64), B=torch.zeros(9, 3, dtype=F64)), "layer.1": reference["layer.1"]}
    with pytest.raises(ValueError, match=r"'layer\.0'.*\(2, 9\).*\(3, 9\)"):
        subspace_regularizer(local, bad, 2.0, 0.05, 0.01, 1e-5)
    with pytest.raises(ValueError, match="mu=-1"):
        subspace_regularizer(local, reference, 2.0, -1.0, 0.01, 1e-5)
    with pytest.raises(ValueError, match="scaling"):
        subspace_regularizer(local, reference, 0.0, 0.05, 0.01, 1e-5)
    with pytest.raises(ValueError, match="empty"):
        subspace_regularizer({}, reference, 2.0, 0.05, 0.01, 1e-5)


def test_frozen_a_gets_no_gradient_and_b_matches_dense() -> None:
    """fedsvd-style clients freeze A: only B is a leaf that wants a gradient."""
    local, reference = make_case(6, 4, [(12, 10), (10, 15)])
    frozen = {layer: (a.detach(), b) for layer, (a, b) in local.items()}
    factored = subspace_regularizer(frozen, reference, 2.0, 0.05, 0.01, 1e-5)
    dense = dense_regularizer(frozen, reference, 2.0, 0.05, 0.01, 1e-5)
    leaves = [b for _, b in frozen.values()]
    for g_f, g_d in zip(torch.autograd.grad(factored, leaves), torch.autograd.grad(dense, leaves)):
        assert rel_err(g_f, g_d) <= TOL


def test_gradients_accumulate_like_autograd() -> None:
    local, reference = make_case(7, 2, [(9, 9), (9, 9), (11, 7)])
    for _ in range(2):
        subspace_regularizer(local, reference, 2.0, 0.05, 0.01, 1e-5).backward()
    accumulated = [t.grad.clone() for pair in local.values() for t in pair]
    once = grads(dense_regularizer(local, reference, 2.0, 0.05, 0.01, 1e-5), local)
    for g_acc, g_once in zip(accumulated, once):
        assert rel_err(g_acc, 2 * g_once) <= TOL


def test_layers_batched_by_shape_equal_each_layer_alone() -> None:
    """Layers of equal shape are stacked into one batched computation; batching must not mix them: the
    value and every gradient equal the mean of each layer's regularizer computed on its own (float64
    rounding). Three groups: three (12, 9) layers, two (9, 14) and one (7, 7) alone in its group."""
    shapes = [(12, 9), (9, 14), (12, 9), (7, 7), (9, 14), (12, 9)]
    local, reference = make_case(8, 4, shapes)
    batched = subspace_regularizer(local, reference, 2.0, 0.05, 0.01, 1e-5)
    batched_grads = grads(batched, local)
    per_layer = [subspace_regularizer({layer: pair}, reference, 2.0, 0.05, 0.01, 1e-5) for layer, pair in local.items()]
    assert rel_err(batched.detach(), (sum(per_layer) / len(per_layer)).detach()) <= 1e-13
    for (layer, pair), value, g_batched in zip(local.items(), per_layer, zip(batched_grads[::2], batched_grads[1::2])):
        for g_b, g_alone in zip(g_batched, torch.autograd.grad(value / len(local), list(pair))):
            assert rel_err(g_b, g_alone) <= 1e-13


def test_prepared_regularizer_equals_one_call_over_many_steps() -> None:
    """A ``SubspaceRegularizer`` prepared once for the round gives what ``subspace_regularizer`` gives at each
    step, bit for bit, while the live factors move (its kept constants are the reference's only), and for a
    subset of the layers."""
    from common.regularizer import SubspaceRegularizer

    local, reference = make_case(9, 4, [(12, 9), (9, 14), (12, 9)])
    prepared = SubspaceRegularizer(reference, 2.0, 0.05, 0.01, 1e-5)
    optimizer = torch.optim.SGD([t for pair in local.values() for t in pair], lr=0.5)
    for _ in range(3):
        value = prepared(local)
        expected = subspace_regularizer(local, reference, 2.0, 0.05, 0.01, 1e-5)
        assert torch.equal(value, expected)
        for g_p, g_e in zip(grads(value, local), grads(expected, local)):
            assert torch.equal(g_p, g_e)
        optimizer.zero_grad()
        prepared(local).backward()
        optimizer.step()
    subset = {"layer.1": local["layer.1"]}
    assert torch.equal(prepared(subset), subspace_regularizer(subset, reference, 2.0, 0.05, 0.01, 1e-5))
    with pytest.raises(ValueError, match="lambda_reg"):
        SubspaceRegularizer(reference, 2.0, 0.05, 0.01, -1.0)


def test_float32_at_roberta_large_width_keeps_dense_accuracy() -> None:
    """At d = 4096 (RoBERTa-large's intermediate.dense B) the float32 value and gradients stay as close to the
    float64 formula as the dense float32 formula does (the round's B_g^T B_g once lost 9e-7 relative here)."""
    gen = make_generator(21)
    a_g = torch.randn(8, 1024, generator=gen, dtype=F64) / 32
    b_g = 0.02 * torch.randn(4096, 8, generator=gen, dtype=F64)
    a = (a_g + 0.05 * a_g.std() * torch.randn(a_g.shape, generator=gen, dtype=F64)).float().requires_grad_()
    b = (b_g + 0.05 * b_g.std() * torch.randn(b_g.shape, generator=gen, dtype=F64)).float().requires_grad_()
    reference = {"l": LoraFactors(A=a_g.float(), B=b_g.float())}
    exact_local = {"l": (a.detach().double().requires_grad_(), b.detach().double().requires_grad_())}
    exact = dense_regularizer(exact_local, {"l": LoraFactors(a_g, b_g)}, 2.0, 0.05, 0.01, 1e-5)
    value = subspace_regularizer({"l": (a, b)}, reference, 2.0, 0.05, 0.01, 1e-5)
    dense = dense_regularizer({"l": (a, b)}, reference, 2.0, 0.05, 0.01, 1e-5)
    want = [exact.detach(), *grads(exact, exact_local)]
    dense_errors = [rel_err(x, y) for x, y in zip([dense.detach(), *grads(dense, {"l": (a, b)})], want)]
    factored_errors = [rel_err(x, y) for x, y in zip([value.detach(), *grads(value, {"l": (a, b)})], want)]
    for factored, dense_error in zip(factored_errors, dense_errors):
        assert factored <= max(1.5 * dense_error, 3e-7), (factored_errors, dense_errors)
