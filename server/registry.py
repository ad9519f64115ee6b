"""Who has joined: client names, session ids, data partitions and liveness."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import BadRequest, RegistryFull, UnknownClient


@dataclass
class ClientRecord:
    client_id: str              # session id; "" for a name restored from a checkpoint that has not rejoined yet
    name: str
    partition: int
    device: str
    num_examples: int = 0       # what each upload must claim: its partition's size, or its declared own data
    rank: int = 0               # the LoRA rank it trains at (client_ranks, its --rank, or lora_rank)
    own_data: bool = False      # trains on data of its own (--data), whose size it declared at join
    declaring: bool = False     # own data not loaded yet: not counted as joined, never sampled, until it rejoins
    joined_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    keepalive_open: bool = False
    keepalive_lost: bool = False    # its KeepAlive stream ended: the process or its connection is gone


class ClientRegistry:
    """Maps names to partitions (stable across rejoins) and session ids to records.

    A client that joins again under the same name gets a fresh id and keeps its
    partition; its old id stops being valid, so a stale process cannot report
    on behalf of the new one.
    """

    def __init__(self, partition_sizes: list[int]) -> None:
        self._partition_sizes = partition_sizes
        self._num_partitions = len(partition_sizes)
        self._lock = threading.Lock()
        self._by_id: dict[str, ClientRecord] = {}
        self._by_name: dict[str, ClientRecord] = {}

    def join(self, name: str, requested_partition: int, device: str, declared_examples: int = 0,
             own_data: bool = False, rank_for: Callable[[int], int] = lambda partition: 0) -> ClientRecord:
        """Register a session; ``declared_examples`` > 0 binds it to the size of its own data (checked by the
        caller against the run's cap), 0 to the size of the partition it holds, unless ``own_data`` says the
        size will come with a second join. ``rank_for(partition)`` gives its LoRA rank, or raises to refuse
        the join before anything is registered."""
        if not name or len(name) > 128:
            raise BadRequest(f"client_name {name!r} must be 1 to 128 characters")
        with self._lock:
            previous = self._by_name.get(name)
            if previous is not None:
                if requested_partition not in (-1, previous.partition):
                    raise BadRequest(f"client {name!r} holds partition {previous.partition}; "
                                     f"it cannot switch to {requested_partition}")
                partition = previous.partition
            else:
                partition = self._assign_partition(name, requested_partition)
            rank = rank_for(partition)
            if previous is not None:
                self._by_id.pop(previous.client_id, None)
            record = ClientRecord(client_id=secrets.token_hex(16), name=name, partition=partition, device=device,
                                  num_examples=declared_examples or self._partition_sizes[partition],
                                  own_data=own_data or declared_examples > 0,
                                  declaring=own_data and declared_examples == 0, rank=rank)
            self._by_id[record.client_id] = record
            self._by_name[name] = record
            return record

    def _assign_partition(self, name: str, requested: int) -> int:
        taken = {record.partition for record in self._by_name.values()}
        if requested != -1:
            if not 0 <= requested < self._num_partitions:
                raise BadRequest(f"partition_index {requested} is out of range [0, {self._num_partitions})")
            if requested in taken:
                raise BadRequest(f"partition {requested} is already held by another client; "
                                 f"pick another index or let the coordinator assign one (-1)")
            return requested
        free = [p for p in range(self._num_partitions) if p not in taken]
        if not free:
            raise RegistryFull(f"all {self._num_partitions} partitions are taken; client {name!r} cannot join "
                               f"(raise num_clients or rejoin under an existing name)")
        return free[0]

    def get(self, client_id: str) -> ClientRecord:
        """The record of a live session id, with its last_seen refreshed; UnknownClient otherwise."""
        with self._lock:
            record = self._by_id.get(client_id)
            if record is not None:
                record.last_seen = time.monotonic()
        if record is None:
            raise UnknownClient(f"unknown client id {client_id[:12]!r}; join first (or again after a "
                                f"coordinator restart)")
        return record

    def find(self, client_id: str) -> ClientRecord | None:
        """Like get, without refreshing liveness; None for a replaced or unknown id."""
        with self._lock:
            return self._by_id.get(client_id)

    def keepalive(self, client_id: str, is_open: bool) -> None:
        with self._lock:
            record = self._by_id.get(client_id)
            if record is None:
                return
            record.last_seen = time.monotonic()
            if is_open:
                record.keepalive_open, record.keepalive_lost = True, False
            elif record.keepalive_open:
                record.keepalive_open, record.keepalive_lost = False, True

    @staticmethod
    def is_live(record: ClientRecord, heartbeat_timeout_s: float) -> bool:
        """A session that can be sampled: its KeepAlive stream is open and its last heartbeat is recent.
        A session whose stream never opened (a process that joined and died, or exited at once) is not."""
        return (bool(record.client_id) and record.keepalive_open and not record.keepalive_lost
                and time.monotonic() - record.last_seen <= heartbeat_timeout_s)

    def for_partition(self, partition: int) -> ClientRecord | None:
        with self._lock:
            for record in self._by_name.values():
                if record.partition == partition and record.client_id and not record.declaring:
                    return record
        return None

    def num_joined(self) -> int:
        """Sessions that joined and whose connection has not been seen to close."""
        with self._lock:
            return sum(1 for record in self._by_name.values()
                       if record.client_id and not record.keepalive_lost and not record.declaring)

    def records(self) -> list[ClientRecord]:
        with self._lock:
            return list(self._by_name.values())

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [{"name": r.name, "partition": r.partition, "device": r.device} for r in self._by_name.values()]

    def restore(self, entries: list[dict]) -> None:
        """Names and partitions from a checkpoint; each client must join again to get a session id."""
        with self._lock:
            for entry in entries:
                self._by_name[entry["name"]] = ClientRecord(client_id="", name=entry["name"],
                                                            partition=int(entry["partition"]),
                                                            device=entry.get("device", ""))
