"""SVD (FlexLoRA-style redistribution): clients train A and B; the server re-factorizes the mean product.

Server step, per layer: M = sum p_i s B_i A_i; clip; M/s = U S V^T (rank r); B_g = U S^1/2,
A_g = S^1/2 V^T; gain (common/aggregation.py ``client_mixture_target``, ``split_balanced``).
"""

from __future__ import annotations

from common.aggregation import get_strategy
from common.methods.base import Method


class Svd(Method):
    name = "svd"
    label = "SVD"
    strategy = get_strategy("svd")
