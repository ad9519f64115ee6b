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
