"""The per-client update bound: factored norm equals the dense one; a clipped update lands on the bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adapter import AdapterState, LoraFactors
from common.clipping import clip_update, update_norm


def _state(seed: int, d: int, k: int, r: int, layers: int = 2, frozen_a: AdapterState | None = None) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for i in range(layers):
        A = frozen_a.lora[f"l{i}"].A if frozen_a is not None else torch.randn(r, k, generator=g, dtype=torch.float64)
        lora[f"l{i}"] = LoraFactors(A=A, B=torch.randn(d, r, generator=g, dtype=torch.float64))
    return AdapterState(lora=lora, extra={"head": torch.randn(3, 4, generator=g, dtype=torch.float64)})


def _dense_norm(update: AdapterState, reference: AdapterState, s: float) -> float:
    """Form every d x k product: the reference the factored norm must match."""
    total = sum(float(torch.sum((s * f.B @ f.A - s * reference.lora[n].B @ reference.lora[n].A) ** 2))
                for n, f in update.lora.items())
    total += sum(float(torch.sum((t - reference.extra[n]) ** 2)) for n, t in update.extra.items())
    return total ** 0.5


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 12), k=st.integers(1, 12), r=st.integers(1, 4), seed=st.integers(0, 10_000),
       s=st.floats(0.1, 4.0))
def test_factored_update_norm_equals_the_dense_norm(d, k, r, seed, s):
    update, reference = _state(seed, d, k, r), _state(seed + 1, d, k, r)
    assert update_norm(update, reference, s) == pytest.approx(_dense_norm(update, reference, s), rel=1e-9, abs=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), fraction=st.floats(0.01, 0.99))
def test_a_clipped_update_lands_on_the_bound_and_moves_every_tensor_toward_the_global_one(seed, fraction):
    update, reference = _state(seed, 9, 7, 3), _state(seed + 1, 9, 7, 3)
    norm = _dense_norm(update, reference, 2.0)
    bound = fraction * norm
    clipped = clip_update(update, reference, 2.0, bound)
    assert clipped.norm == pytest.approx(norm, rel=1e-9)
    assert 0.0 <= clipped.factor < 1.0
    after = _dense_norm(clipped.state, reference, 2.0)
    assert after <= bound * (1 + 1e-12) and after == pytest.approx(bound, rel=1e-6)
    c = clipped.factor
    for name, factors in clipped.state.lora.items():
        assert torch.allclose(factors.A, reference.lora[name].A + c * (update.lora[name].A - reference.lora[name].A))
        assert torch.allclose(factors.B, reference.lora[name].B + c * (update.lora[name].B - reference.lora[name].B))
    assert torch.allclose(clipped.state.extra["head"],
                          reference.extra["head"] + c * (update.extra["head"] - reference.extra["head"]))


def test_an_update_within_the_bound_or_without_one_is_returned_unchanged():
    update, reference = _state(0, 6, 5, 2), _state(1, 6, 5, 2)
    norm = _dense_norm(update, reference, 1.5)
    for bound in (None, norm * 1.01):
        clipped = clip_update(update, reference, 1.5, bound)
        assert clipped.state is update and clipped.factor == 1.0


def test_with_a_shared_a_the_clip_is_linear():
    # FedSVD trains B only: the update s (B_i - B_g) A_g is linear in c, so c = bound / norm exactly.
    reference = _state(3, 8, 6, 2)
    update = _state(4, 8, 6, 2, frozen_a=reference)
    update = AdapterState(lora=update.lora, extra=reference.extra)
    norm = update_norm(update, reference, 2.0)
    clipped = clip_update(update, reference, 2.0, norm / 4)
    assert clipped.factor == pytest.approx(0.25, rel=1e-12)


def test_identical_client_and_global_have_a_zero_update():
    reference = _state(5, 4, 4, 2)
    assert update_norm(reference, reference, 2.0) == pytest.approx(0.0, abs=1e-12)
    assert clip_update(reference, reference, 2.0, 1e-3).factor == 1.0


def test_one_prepared_reference_serves_every_client_of_a_round():
    """The coordinator prepares the global side once (ClipReference) and clips each client against it: the
    same norms as the dense formula, and the same clipped updates as with the plain reference, float32
    factors included (a client's upload), with layers of different shapes."""
    from common.clipping import ClipReference

    def mixed(seed: int) -> AdapterState:
        g = torch.Generator().manual_seed(seed)
        shapes = {"q": (16, 12), "ffn_in": (40, 12), "ffn_out": (12, 40)}
        return AdapterState(lora={n: LoraFactors(A=torch.randn(3, k, generator=g), B=torch.randn(d, 3, generator=g))
                                  for n, (d, k) in shapes.items()}, extra={"head": torch.randn(5, generator=g)})

    reference = mixed(0)
    prepared = ClipReference(reference)
    for seed in (1, 2, 3):
        update = mixed(seed)
        dense = _dense_norm(AdapterState(
            lora={n: LoraFactors(A=f.A.double(), B=f.B.double()) for n, f in update.lora.items()},
            extra={n: t.double() for n, t in update.extra.items()}), AdapterState(
            lora={n: LoraFactors(A=f.A.double(), B=f.B.double()) for n, f in reference.lora.items()},
            extra={n: t.double() for n, t in reference.extra.items()}), 2.0)
        shared = clip_update(update, prepared, 2.0, dense / 3)
        assert shared.norm == pytest.approx(dense, rel=1e-12)
        alone = clip_update(update, reference, 2.0, dense / 3)
        assert shared.factor == alone.factor and shared.norm == alone.norm
        assert all(torch.equal(shared.state.lora[n].B, alone.state.lora[n].B) for n in update.lora)
