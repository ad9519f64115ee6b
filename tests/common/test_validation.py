"""check_values decides on finiteness and max_norm exactly as the float64 norm does."""

import math

import pytest
import torch

from common.validation import NORM_MARGIN, ExpectedTensors, PayloadRejected


def _check(value: torch.Tensor, max_norm=None):
    return ExpectedTensors.like({"t": value}).check_values({"t": value}, "test", max_norm=max_norm)


def test_finite_values_whose_float32_norm_overflows_are_accepted():
    value = torch.full((4,), 1e30)                     # finite; squares overflow float32, not float64
    assert math.isinf(float(torch.linalg.vector_norm(value)))
    assert torch.equal(_check(value)["t"], value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_refused(bad):
    with pytest.raises(PayloadRejected, match="contains NaN or Inf"):
        _check(torch.tensor([1.0, bad]))


def test_the_bound_is_decided_by_the_float64_norm_near_it():
    value = torch.full((10_000,), 0.1)
    exact = float(torch.linalg.vector_norm(value, dtype=torch.float64))
    _check(value, max_norm=exact)                       # at the bound: accepted (norm > bound refuses)
    with pytest.raises(PayloadRejected, match="above max_update_norm"):
        _check(value, max_norm=math.nextafter(exact, 0.0))
    _check(value, max_norm=exact * (1 + 2 * NORM_MARGIN))
    with pytest.raises(PayloadRejected, match=f"norm {exact:.4g} above"):
        _check(value, max_norm=exact * (1 - 2 * NORM_MARGIN))
