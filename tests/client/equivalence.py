"""What "trains the same" means for two computations of one round that sum gradients in different orders
(one process over a global batch of 2b rows, or 2 ranks over b rows each, averaged by DDP)."""

from __future__ import annotations

import torch

MAX_AMPLIFIED_SHARE = 1e-3
"""At most this share of the elements may differ by more than float32 rounding (see below)."""


def assert_same_training(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], lr: float) -> None:
    """Equal to float32 rounding (torch.testing's float32 tolerances), element by element, but for the odd
    element whose gradient cancels to rounding level: Adam divides each gradient by its own running
    magnitude, so there a difference in the last bits of the gradient moves the element by a fraction of a
    step. Such elements must be rare (at most MAX_AMPLIFIED_SHARE of them) and within lr / 100."""
    assert actual.keys() == expected.keys()
    beyond, total = 0, 0
    for name, value in expected.items():
        got = actual[name]
        assert got.shape == value.shape and got.dtype == value.dtype, name
        torch.testing.assert_close(got, value, rtol=0, atol=lr / 100, msg=lambda m: f"{name}: {m}")
        difference = (got.double() - value.double()).abs()
        beyond += int((difference > 1e-5 + 1.3e-6 * value.double().abs()).sum())   # float32's default tolerances
        total += value.numel()
    assert beyond <= MAX_AMPLIFIED_SHARE * total, f"{beyond} of {total} elements differ beyond float32 rounding"
