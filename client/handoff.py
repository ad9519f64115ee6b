"""Rank 0 passes on what the coordinator says to the other ranks of a distributed client.

Only rank 0 speaks gRPC. The other ranks (followers) wait for its orders, each one a broadcast on a
gloo group of its own (CPU tensors, and never interleaved with DDP's gradient collectives):

- JOINED: the run configuration, partition and LoRA rank from the coordinator's reply to Join;
- TASK: a round to train (round index, round seed, base_residual_round) and its tensors, sent as the
  wire codec lays them out (one byte buffer, one broadcast);
- IDLE: nothing yet. Rank 0 runs every coordinator call (join, long poll, upload, with their retries)
  in a background thread and sends IDLE every ``tick_s`` meanwhile, so that a follower's wait for an
  order never comes near the process group's timeout however long the coordinator takes, while a rank
  that hangs or dies is still noticed within it;
- FINISHED: the run is over, exit 0;
- ABORT: rank 0 stops with an error; every rank exits with its exit code.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from client.connection import JoinInfo, ReceivedTask
from common.codec import TensorSpec, decode_tensors, encode_tensors

log = logging.getLogger(__name__)

T = TypeVar("T")

JOINED, TASK, IDLE, FINISHED, ABORT = "joined", "task", "idle", "finished", "abort"
MAX_TICK_S = 30.0


@dataclass(frozen=True)
class Order:
    kind: str
    join: JoinInfo | None = None
    round: int = 0
    round_seed: int = 0
    base_residual_round: int = 0
    specs: list[TensorSpec] = field(default_factory=list)
    payload_bytes: int = 0
    exit_code: int = 0
    reason: str = ""


def tick_interval(timeout_s: float) -> float:
    """IDLE orders come well within the collective timeout: a quarter of it, at most every 30 s."""
    return min(MAX_TICK_S, timeout_s / 4)


class _Background:
    """One coordinator call on a daemon thread (a daemon: an interrupted rank 0 must not wait at exit for a
    long poll to end); its result, or its exception, re-raised on the caller's thread."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.done = threading.Event()
        self._result = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._result = call()
            except BaseException as error:  # noqa: BLE001 - handed over to the waiting thread whole
                self._error = error
            finally:
                self.done.set()

        threading.Thread(target=run, name="coordinator-call", daemon=True).start()

    def result(self):
        if self._error is not None:
            raise self._error
        return self._result


class Alone:
    """A client of one process: no one to hand anything to; coordinator calls run on the calling thread."""

    def wait_on(self, call: Callable[[], T]) -> T:
        return call()

    def joined(self, info: JoinInfo) -> None:
        pass

    def task(self, task: ReceivedTask) -> None:
        pass


ALONE = Alone()


class Handoff:
    """Both ends of the orders; built on every rank at once (creating the group is a collective)."""

    def __init__(self, timeout_s: float) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.tick_s = tick_interval(timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.listening = True
        """Rank 0's view: whether the followers are waiting for an order (False while they train)."""
        self.broken = False
        """A broadcast failed: the group cannot carry a last ABORT."""

    # ---------------------------------------------------------------- rank 0

    def wait_on(self, call: Callable[[], T]) -> T:
        """Run a coordinator call on rank 0, sending IDLE every tick_s until it returns (or raises)."""
        self.listening = True        # every call happens while the followers wait for the next order
        pending = _Background(call)
        while not pending.done.wait(self.tick_s):
            self._send(Order(IDLE))
        return pending.result()

    def joined(self, info: JoinInfo) -> None:
        self._send(Order(JOINED, join=info))

    def task(self, task: ReceivedTask) -> None:
        specs, buffer = encode_tensors(task.tensors)
        self._send(Order(TASK, round=task.round, round_seed=task.round_seed,
                         base_residual_round=task.base_residual_round, specs=specs, payload_bytes=len(buffer)))
        self._broadcast_bytes(bytearray(buffer))
        self.listening = False       # the followers train now, in DDP's collectives until the round ends

    def finished(self) -> None:
        self._send(Order(FINISHED))

    def abort(self, exit_code: int, reason: str) -> None:
        """Tell the followers to exit, when they can hear it; otherwise torchrun stops them once rank 0 exits."""
        if not self.listening or self.broken:
            return
        try:
            self._send(Order(ABORT, exit_code=exit_code, reason=reason))
        except Exception as error:  # noqa: BLE001 - rank 0 is exiting on an earlier error anyway
            log.debug("could not tell the other ranks to stop: %r", error)

    def _send(self, order: Order) -> None:
        self._broadcast_object(order)

    # ---------------------------------------------------------------- ranks 1..N-1

    def receive(self) -> tuple[Order, dict[str, torch.Tensor]]:
        """The next order other than IDLE, with its tensors (TASK) or none."""
        while True:
            order = self._broadcast_object(None)
            if order.kind == IDLE:
                continue
            if order.kind != TASK:
                return order, {}
            buffer = self._broadcast_bytes(bytearray(order.payload_bytes))
            return order, decode_tensors(order.specs, buffer)

    # ---------------------------------------------------------------- the broadcasts

    def _broadcast_object(self, order: Order | None) -> Order:
        holder = [order]
        try:
            self._dist.broadcast_object_list(holder, src=0, group=self.group)
        except Exception:
            self.broken = True
            raise
        return holder[0]

    def _broadcast_bytes(self, buffer: bytearray) -> bytearray:
        if not buffer:
            return buffer
        tensor = torch.frombuffer(buffer, dtype=torch.uint8)      # (payload_bytes,) sharing the buffer
        try:
            self._dist.broadcast(tensor, src=0, group=self.group)
        except Exception:
            self.broken = True
            raise
        return buffer
