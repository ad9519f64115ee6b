"""FedAvg (FedIT): clients train A and B on the task loss; the server averages each factor.

Server step, per layer (common/aggregation.py ``FedAvg``): A_g = sum p_i A_i, B_g = sum p_i B_i.
Sends the global adapter, uploads all of it: the base ``Method`` as it is.
"""

from __future__ import annotations

from common.aggregation import get_strategy
from common.methods.base import Method


class FedAvg(Method):
    name = "fedavg"
    label = "FedAvg"
    strategy = get_strategy("fedavg")
