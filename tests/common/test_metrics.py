"""Alignment metrics: factored == dense, degenerate cases give None (never NaN)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapter import AdapterState, ClientUpdate, LoraFactors
from common.aggregation import AggregationSettings, aggregate
from common.metrics import METRIC_NAMES, alignment_metrics
from tests.common.dense_reference import dense_alignment_metrics
from tests.common.factories import DEFAULT_SHAPES, make_generator, random_state, random_updates

SCALING = 2.0
TOL = 1e-6


def assert_close(factored: dict, dense: dict) -> None:
    assert set(factored) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        f, d = factored[name], dense[name]
        assert (f is None) == (d is None), name
        if d is not None:
            assert math.isclose(f, d, rel_tol=TOL, abs_tol=1e-9), (name, f, d)


@settings(max_examples=30, deadline=None)
@given(
    num_clients=st.sampled_from([1, 2, 3, 5]),
    rank=st.sampled_from([1, 2, 4, 8]),
    method=st.sampled_from(["fedavg", "svd", "fedsvd", "subspace_reg"]),
    d=st.integers(8, 20),
    k=st.integers(8, 20),
    seed=st.integers(0, 2**31 - 1),
)
def test_factored_metrics_match_dense(num_clients: int, rank: int, method: str, d: int, k: int, seed: int) -> None:
    shapes = {"layer.a": (d, k), "layer.b": (k, d + 3)}
    gen = make_generator(seed)
    global_state = random_state(gen, shapes, rank)
    updates = random_updates(gen, shapes, rank, num_clients)
    new_global = aggregate(method, global_state, updates, AggregationSettings(SCALING, rank, 5.0)).state
    factored = alignment_metrics(updates, new_global, SCALING)
    assert_close(factored, dense_alignment_metrics(updates, new_global, SCALING))
    if num_clients == 1:
        assert factored["pairwise_client_cosine"] is None
    for name in ("basis_overlap", "basis_overlap_sq", "update_subspace_overlap"):
        assert 0.0 <= factored[name] <= 1.0


def test_rank_deficient_factors_match_dense() -> None:
    """B with a zero column and a client with zero B: orth() uses the rank present."""
    gen = make_generator(11)
    global_state = random_state(gen, DEFAULT_SHAPES, 4)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3)
    lora = {}
    for layer, f in updates[0].state.lora.items():
        b = f.B.clone()
        b[:, 1] = 0.0
        lora[layer] = LoraFactors(A=f.A, B=b)
    updates[0] = ClientUpdate("client-0", 5, AdapterState(lora=lora))
    zero = {layer: LoraFactors(A=f.A, B=torch.zeros_like(f.B)) for layer, f in updates[1].state.lora.items()}
    updates[1] = ClientUpdate("client-1", 7, AdapterState(lora=zero))
    new_global = aggregate("subspace_reg", global_state, updates, AggregationSettings(SCALING, 4, None)).state
    assert_close(alignment_metrics(updates, new_global, SCALING),
                 dense_alignment_metrics(updates, new_global, SCALING))


def test_identical_clients() -> None:
    gen = make_generator(12)
    state = random_state(gen, DEFAULT_SHAPES, 4)
    updates = [ClientUpdate(f"c{i}", 10 + i, state) for i in range(3)]
    new_global = aggregate("svd", state, updates, AggregationSettings(SCALING, 4, None)).state
    metrics = alignment_metrics(updates, new_global, SCALING)
    for name in ("cancellation_ratio", "client_global_cosine", "pairwise_client_cosine",
                 "basis_overlap", "basis_overlap_sq", "update_subspace_overlap"):
        assert math.isclose(metrics[name], 1.0, rel_tol=1e-9), name
    assert metrics["aggregation_error"] < 1e-12


def test_opposite_clients_cancel() -> None:
    gen = make_generator(13)
    state = random_state(gen, DEFAULT_SHAPES, 2)
    negated = AdapterState(lora={l: LoraFactors(A=f.A, B=-f.B) for l, f in state.lora.items()})
    updates = [ClientUpdate("a", 4, state), ClientUpdate("b", 4, negated)]
    metrics = alignment_metrics(updates, state, SCALING)
    assert metrics["cancellation_ratio"] == 0.0
    assert math.isclose(metrics["pairwise_client_cosine"], -1.0)
    assert metrics["client_global_cosine"] is None  # the mean update is zero
    assert metrics["aggregation_error"] is None


@pytest.mark.parametrize("method", ["fedavg", "svd", "fedsvd", "subspace_reg"])
def test_all_b_zero_is_finite_and_json_safe(method: str) -> None:
    gen = make_generator(14)
    global_state = random_state(gen, DEFAULT_SHAPES, 4, zero_b=True)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 3, zero_b=True)
    new_global = aggregate(method, global_state, updates, AggregationSettings(SCALING, 4, 5.0)).state
    metrics = alignment_metrics(updates, new_global, SCALING)
    for name in ("cancellation_ratio", "client_global_cosine", "pairwise_client_cosine",
                 "basis_overlap", "basis_overlap_sq", "update_subspace_overlap", "aggregation_error"):
        assert metrics[name] is None, name
    assert_close(metrics, dense_alignment_metrics(updates, new_global, SCALING))
    json.dumps(metrics, allow_nan=False)


def test_one_client() -> None:
    gen = make_generator(15)
    global_state = random_state(gen, DEFAULT_SHAPES, 4)
    updates = random_updates(gen, DEFAULT_SHAPES, 4, 1)
    new_global = aggregate("subspace_reg", global_state, updates, AggregationSettings(SCALING, 4, None)).state
    metrics = alignment_metrics(updates, new_global, SCALING)
    assert metrics["pairwise_client_cosine"] is None
    assert math.isclose(metrics["cancellation_ratio"], 1.0)
    assert metrics["aggregation_error"] < 1e-9
    assert math.isclose(metrics["update_subspace_overlap"], 1.0)
    json.dumps(metrics, allow_nan=False)


def test_empty_updates_are_refused() -> None:
    gen = make_generator(16)
    global_state = random_state(gen, DEFAULT_SHAPES, 4)
    with pytest.raises(ValueError, match="empty"):
        alignment_metrics([], global_state, SCALING)

def test_layers_batched_by_shape_and_a_base_residual_match_dense() -> None:
    """Layers of one shape are computed as one stack (three groups here, one of three layers); with a base
    residual B_R A_R on some layers (fedex_lora's), the aggregation error measures dW_g + R against dW."""
    shapes = {"g.0": (12, 9), "h.0": (9, 14), "g.1": (12, 9), "single": (7, 7), "g.2": (12, 9)}
    gen = make_generator(17)
    global_state = random_state(gen, shapes, 4)
    updates = random_updates(gen, shapes, 4, 3)
    new_global = aggregate("svd", global_state, updates, AggregationSettings(SCALING, 4, None)).state
    assert_close(alignment_metrics(updates, new_global, SCALING), dense_alignment_metrics(updates, new_global, SCALING))

    # A residual that makes the new global model exactly the weighted mean on the 12 x 9 layers.
    weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    weights = weights / weights.sum()
    residual = {}
    for layer in ("g.0", "g.1", "g.2"):
        b_res = torch.cat([SCALING * float(w) * u.state.lora[layer].B for w, u in zip(weights, updates)]
                          + [-SCALING * new_global.lora[layer].B], dim=1)  # (d, 4 + 3 * 4)
        a_res = torch.cat([u.state.lora[layer].A for u in updates] + [new_global.lora[layer].A], dim=0)
        residual[layer] = (b_res, a_res)
    with_residual = alignment_metrics(updates, new_global, SCALING, residual)
    mean = {layer: sum(float(w) * SCALING * u.state.lora[layer].B @ u.state.lora[layer].A
                       for w, u in zip(weights, updates)) for layer in shapes}
    error_sq = sum(float(torch.linalg.matrix_norm(SCALING * new_global.lora[layer].B @ new_global.lora[layer].A
                                                  - mean[layer])) ** 2 for layer in ("h.0", "single"))
    mean_norm = math.sqrt(sum(float(torch.linalg.matrix_norm(m)) ** 2 for m in mean.values()))
    assert math.isclose(with_residual["aggregation_error"], math.sqrt(error_sq) / mean_norm, rel_tol=1e-9)
    for name in METRIC_NAMES:
        if name != "aggregation_error":
            assert math.isclose(with_residual[name], alignment_metrics(updates, new_global, SCALING)[name], rel_tol=1e-12)


def test_chunks_of_layers_give_the_metrics_of_one_batched_group(monkeypatch) -> None:
    """A group of equal layers is split into chunks under a memory budget (CHUNK_BYTES); one layer per chunk
    gives the same diagnostics as the whole group at once (to float64 rounding), base residual included."""
    import common.metrics as metrics

    shapes = {f"g.{i}": (12, 9) for i in range(5)} | {"h.0": (9, 14)}
    gen = make_generator(23)
    updates = random_updates(gen, shapes, 4, 5)
    new_global = aggregate("svd", random_state(gen, shapes, 4), updates, AggregationSettings(SCALING, 4, None)).state
    residual = {f"g.{i}": (torch.randn(12, 3, generator=gen, dtype=torch.float64),
                           torch.randn(3, 9, generator=gen, dtype=torch.float64)) for i in range(5)}
    whole = alignment_metrics(updates, new_global, SCALING, residual)
    assert len(metrics._chunks([f"g.{i}" for i in range(5)], 12, 9, 5 * 4 + 4 + 3, 5 * 4)) == 1
    monkeypatch.setattr(metrics, "CHUNK_BYTES", 1)
    assert metrics._chunks([f"g.{i}" for i in range(5)], 12, 9, 27, 20) == [[f"g.{i}"] for i in range(5)]
    chunked = alignment_metrics(updates, new_global, SCALING, residual)
    for name in METRIC_NAMES:
        assert math.isclose(chunked[name], whole[name], rel_tol=1e-12), name
