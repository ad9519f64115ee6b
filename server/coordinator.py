"""The round state machine: sample, hand out the global adapter, collect, aggregate, commit.

Free of grpc: the servicer calls ``join``, ``next_task`` and ``submit``; the
driver thread calls ``run``. One lock and one condition variable guard all
round state; long polls wait on the condition.

One round t:
  1. ``_open_round``: sample m partitions (seeded from (seed, t), common/sampling.py), wake the long polls.
  2. sampled clients fetch the task (``next_task``: the method's task tensors, truncated to the client's
     rank, in the wire dtype; encoded once per distinct (rank, residual state)), train, ``submit``
     (checked against the method's expected upload at the client's rank, zero-padded back to the global rank).
  3. ``_wait_for_updates`` returns when all sampled clients reported or the
     deadline passed; ``_close_round`` aggregates with common/, measures the
     alignment metrics, evaluates, saves the adapter, commits, logs a line.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from common.adapter import AdapterState, ClientUpdate, pad_to_rank, round_to_wire, truncate_to_rank
from common.aggregation import AggregationSettings
from common.clipping import ClipReference, clip_update
from common.codec import DTYPES, TensorSpec, encode_tensors
from common.config import RunConfig
from common.metrics import alignment_metrics
from common.sampling import sample_clients
from common.methods import Recipient, get_method
from common.validation import ExpectedTensors, PayloadRejected
from server.adapter_card import AdapterCard
from server.errors import BadRequest, DuplicateUpdate, NotAccepting, PayloadTooLarge, UploadInProgress
from server.outputs import RunDirectory, summarize
from server.registry import ClientRecord, ClientRegistry
from server.rounds import DEADLINE_REASON, ClosedRound, RoundState, TaskPayload, UploadStats, metrics_record
from server.status import ClientStatus, RunStatus, client_state, eta_seconds

log = logging.getLogger(__name__)


class StopRequested(Exception):
    """The operator asked the coordinator to stop (SIGTERM, Ctrl-C) before the last round."""


class QuorumLost(RuntimeError):
    """Too few sampled clients reported and the quorum policy (or its retries) gave up."""


class GlobalModel(Protocol):
    """What the coordinator needs of the model: server-side evaluation and PEFT-format saving."""

    def evaluate(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def save(self, tensors: dict[str, torch.Tensor], directory: Any) -> None: ...

    def add_to_base(self, increment: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add B A to each named layer's frozen base weight (a method's base-weight residual, fedex_lora)."""


@dataclass(frozen=True)
class Task:
    round: int
    method: str
    round_seed: int
    specs: list[TensorSpec]
    buffer: bytes
    base_residual_round: int = 0
    """The round through which the task's base-weight residual (if any) brings the client's base weights."""


@dataclass(frozen=True)
class WaitHint:
    reason: str


@dataclass(frozen=True)
class RunFinished:
    rounds_completed: int
    reason: str


def round_seed(seed: int, round_index: int, partition: int) -> int:
    """Seed of one client's local training in one round: a pure function of (seed, round, partition)."""
    digest = hashlib.sha256(f"{seed}/{round_index}/{partition}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Coordinator:
    def __init__(self, config: RunConfig, run_dir: RunDirectory, model: GlobalModel,
                 initial_state: dict[str, torch.Tensor], partition_sizes: list[int],
                 poll_timeout_s: float = 10.0, run_id: str = "", label_names: list[str] | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.model = model
        self.method = get_method(config.federation.method)
        self.wire_dtype = DTYPES[config.federation.wire_dtype]
        self.settings = AggregationSettings(
            scaling=config.model.scaling, rank=config.model.lora_rank,
            max_update_norm=config.federation.max_effective_lora_update_norm, wire_dtype=self.wire_dtype,
        )
        self.partition_sizes = partition_sizes
        self.max_examples_per_client = config.federation.max_examples_per_client or max(partition_sizes)
        self.registry = ClientRegistry(partition_sizes)
        self.poll_timeout_s = poll_timeout_s
        # The global adapter as the clients hold it after the wire (rounded to wire_dtype; float32 in memory).
        self._global: dict[str, torch.Tensor] = round_to_wire(
            {k: v.detach().to(torch.float32).clone() for k, v in initial_state.items()}, self.wire_dtype)
        # No upload, whatever the method, round or client rank, may be larger than the global adapter in float32.
        self.max_payload_bytes = ExpectedTensors.like(self._global).max_bytes
        self._uploading: set[str] = set()  # names of clients with an upload stream in progress
        self._method_state: dict[str, torch.Tensor] = {}  # the method's tensors kept between rounds (reference bases)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._round: RoundState | None = None
        self._finished: RunFinished | None = None
        self._completed_rounds = 0
        self._best_accuracy = -math.inf
        self._stop_requested = False
        self._informed: set[str] = set()   # client ids told that the run is over
        self.run_id = run_id
        self.label_names = label_names or []        # for the saved adapters' model card and labels.json
        # The operator's view (server/status.py): what the run is doing, and how long rounds take here.
        self._phase = "waiting_for_clients"
        self._started = time.monotonic()
        self._round_started = time.monotonic()
        self._round_durations: list[float] = []        # committed rounds of this process, seconds each
        self._participation: Counter[str] = Counter()  # client name -> committed rounds it took part in

    def restore(self) -> int:
        """Continue from the run directory's last committed round; returns that round (0: nothing committed)."""
        loaded = self.run_dir.load_checkpoint()
        if loaded is None:
            self.run_dir.truncate_metrics(after_round=0)
            return 0
        state, tensors = loaded
        adapter = {k: v for k, v in tensors.items() if k in self._global}
        mismatched = sorted(k for k in adapter.keys() | self._global.keys()
                            if k not in adapter or k not in self._global or adapter[k].shape != self._global[k].shape)
        if mismatched:
            raise ValueError(f"checkpoint in {self.run_dir.checkpoint} does not match this model and config "
                             f"(differing tensors: {mismatched[:3]}); resume with the run's own config.yaml")
        self._global = {k: v.to(torch.float32) for k, v in adapter.items()}
        self._method_state = {k: v for k, v in tensors.items() if k not in self._global}
        increments = self.method.base_increments(self._method_state)
        for increment in increments:       # the evaluation model's base weights, as they were at the commit
            self.model.add_to_base(increment)
        self._completed_rounds = int(state["round"])
        self._best_accuracy = float(state.get("best_accuracy", -math.inf))
        self.registry.restore(state.get("registry", []))
        self.run_dir.truncate_metrics(after_round=self._completed_rounds)
        self._participation.update(name for line in self.run_dir.read_metrics() for name in line["participants"])
        log.info("resuming after committed round %d (clients rejoin by name)%s", self._completed_rounds,
                 f"; {len(increments)} base-weight increments re-applied" if increments else "")
        return self._completed_rounds

    # ------------------------------------------------------------------ servicer API

    def join(self, name: str, requested_partition: int, device: str, declared_examples: int = 0,
             own_data: bool = False, requested_rank: int = 0) -> ClientRecord:
        """Register a client. One with its own data declares its size here and is bound to it (at most
        max_examples_per_client); one without is bound to the size of the partition it is given. Its LoRA rank
        is its partition's entry in client_ranks, else the rank it asks for (--rank), else lora_rank."""
        if declared_examples > self.max_examples_per_client:
            raise BadRequest(f"client {name!r} declares {declared_examples} examples of its own data, above "
                             f"max_examples_per_client={self.max_examples_per_client} (without the key: the largest "
                             f"partition); the coordinator's operator can raise max_examples_per_client")
        record = self.registry.join(name, requested_partition, device, declared_examples, own_data,
                                    rank_for=lambda partition: self._rank_for(name, partition, requested_rank))
        if record.declaring:
            log.info("client %s registered (partition %d): loading its own data, to declare its size", name,
                     record.partition)
        else:
            log.info("client %s joined (partition %d, %d examples%s, %s)", name, record.partition,
                     record.num_examples, " of its own data" if record.own_data else "", device or "unknown device")
        with self._changed:
            self._changed.notify_all()
        return record

    def _rank_for(self, name: str, partition: int, requested: int) -> int:
        """The rank the client of ``partition`` trains at; BadRequest for a request the run cannot honour."""
        global_rank = self.config.model.lora_rank
        if requested > global_rank:
            raise BadRequest(f"client {name!r} asks for LoRA rank {requested}, above the run's lora_rank={global_rank} "
                             f"(the global adapter's rank); start it with --rank {global_rank} or less")
        rank = self.config.client_rank(partition, requested)
        if requested and rank != requested:
            raise BadRequest(f"client {name!r} asks for LoRA rank {requested}, but the run's client_ranks gives "
                             f"partition {partition} rank {rank}; drop --rank or change client_ranks")
        return rank

    def keepalive(self, client_id: str, is_open: bool) -> None:
        """A heartbeat (is_open) or the end of a client's KeepAlive stream (not is_open)."""
        self.registry.keepalive(client_id, is_open)
        if not is_open:
            with self._changed:
                self._changed.notify_all()   # the round waiter drops the client now, not at the deadline

    def finished_for(self, client_id: str) -> RunFinished | None:
        """The run's end, once over, recording that this client has been told."""
        with self._changed:
            if self._finished is None:
                return None
            self._informed.add(client_id)
            self._changed.notify_all()
            return self._finished

    def wait_until_clients_informed(self, timeout_s: float) -> None:
        """After the run: give every connected client the chance to learn it is over (long poll or keep-alive)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                live = {r.client_id for r in self.registry.records() if r.client_id and not r.keepalive_lost}
                remaining = deadline - time.monotonic()
                if live <= self._informed or remaining <= 0:
                    return
                self._changed.wait(min(remaining, 0.2))

    def heartbeat_interval_s(self) -> float:
        return max(0.5, self.config.federation.heartbeat_timeout_s / 4)

    def next_task(self, client_id: str, timeout_s: float | None = None,
                  base_residual_round: int = 0) -> Task | WaitHint | RunFinished:
        """Long poll: block until this client has work, the run is over, or the poll times out.
        ``base_residual_round``: the last round whose base-weight residual the client has folded in."""
        record = self.registry.get(client_id)
        if base_residual_round > self._completed_rounds:
            raise BadRequest(f"client {record.name!r} has folded base-weight residuals through round "
                             f"{base_residual_round}, but this run has committed {self._completed_rounds} rounds "
                             f"(the coordinator resumed from another run directory?); restart the client, which "
                             f"starts again from the pretrained base weights")
        deadline = time.monotonic() + (self.poll_timeout_s if timeout_s is None else timeout_s)
        with self._changed:
            while True:
                if self._finished is not None:
                    return self._finished
                current = self._round
                if current is not None and current.open and client_id in current.sampled \
                        and client_id not in current.updates and client_id not in current.dropped:
                    # Fetching again is allowed (the stream may have broken); the payload is identical.
                    recipient = Recipient(round=current.index, rank=record.rank,
                                          base_residual_round=base_residual_round)
                    payload = self._task_payload(current, client_id, recipient)
                    current.deliveries[client_id] = current.deliveries.get(client_id, 0) + 1
                    current.bytes_down += len(payload.buffer)
                    current.residual_bytes_down += payload.residual_bytes
                    return Task(round=current.index, method=self.config.federation.method,
                                round_seed=round_seed(self.config.federation.seed, current.index, record.partition),
                                specs=payload.specs, buffer=payload.buffer,
                                base_residual_round=self._completed_rounds)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    reason = "not sampled this round" if current is not None else "waiting for clients to join"
                    return WaitHint(reason=reason)
                self._changed.wait(remaining)

    def _task_payload(self, current: RoundState, client_id: str, recipient: Recipient) -> TaskPayload:
        """The encoded task for one recipient: the method's tensors, truncated to its rank, in the wire dtype
        (base-weight residuals in float32). A task without catch-up residual is encoded once per rank and shared;
        one that catches a client up is kept for that client alone (replaced if it asks again for another state),
        so a client cannot make the coordinator hold one payload per residual state it claims."""
        up_to_date = not self.method.base_residual_suffixes or recipient.base_residual_round == self._completed_rounds
        key = (recipient.rank, recipient.base_residual_round)
        if up_to_date and key in current.payloads:
            return current.payloads[key]
        if not up_to_date and client_id in current.catch_up and current.catch_up[client_id][0] == key:
            return current.catch_up[client_id][1]
        payload = self._encode_task(recipient)
        if up_to_date:
            current.payloads[key] = payload
        else:
            current.catch_up[client_id] = (key, payload)
        return payload

    def _encode_task(self, recipient: Recipient) -> TaskPayload:
        tensors = truncate_to_rank(self.method.task_tensors(self._global, self._method_state, recipient),
                                   recipient.rank)
        residual = self.method.base_residual_suffixes

        def is_residual(name: str) -> bool:
            return bool(residual) and name.endswith(residual)

        specs, buffer = encode_tensors({name: t if is_residual(name) else t.to(self.wire_dtype)
                                        for name, t in tensors.items()})
        return TaskPayload(specs, buffer, sum(spec.nbytes for spec in specs if is_residual(spec.name)))

    def _expected_upload(self, record: ClientRecord, round_index: int) -> ExpectedTensors:
        """What this client's upload must hold: the method's say, at the client's rank."""
        return self.method.expected_upload(truncate_to_rank(self._global, record.rank), round_index)

    def check_upload_header(self, client_id: str, round_index: int, num_examples: int,
                            specs: list[TensorSpec], total_bytes: int) -> ClientRecord:
        """Reject an upload before its payload is read: its round, its claimed size, its tensors and their size."""
        record = self.registry.get(client_id)
        if num_examples != record.num_examples:
            source = ("its own data, as declared at join" if record.own_data
                      else f"partition {record.partition}, as the coordinator handed it out")
            raise BadRequest(f"upload from {record.name!r} claims num_examples={num_examples}; this client holds "
                             f"{record.num_examples} examples ({source}); the aggregation weight is that size")
        try:
            self._expected_upload(record, round_index).check_specs(specs, repr(record.name))
        except PayloadRejected as error:
            raise BadRequest(str(error)) from None
        if total_bytes > self.max_payload_bytes:
            raise PayloadTooLarge(f"upload of {total_bytes} bytes exceeds the coordinator's limit of "
                                  f"{self.max_payload_bytes} bytes (the global adapter in float32)")
        with self._lock:
            self._check_round_accepts(record, round_index)
        return record

    @contextmanager
    def upload_slot(self, record: ClientRecord) -> Iterator[None]:
        """One upload stream per client at a time: a second concurrent stream is refused, not buffered."""
        with self._lock:
            if record.name in self._uploading:
                raise UploadInProgress(f"an upload from {record.name!r} is already in progress; "
                                       f"retry once it has finished")
            self._uploading.add(record.name)
        try:
            yield
        finally:
            with self._lock:
                self._uploading.discard(record.name)

    def submit(self, record: ClientRecord, round_index: int, tensors: dict[str, torch.Tensor],
               stats: UploadStats) -> None:
        """Store one upload whose header passed check_upload_header. Nothing changes unless every check passes."""
        try:
            clean = self._expected_upload(record, round_index).check_values(
                tensors, repr(record.name), max_norm=self.config.federation.max_update_norm)
        except PayloadRejected as error:
            raise BadRequest(str(error)) from None
        # The factors the client held frozen (fedsvd's A, ...) come from the global adapter it received (at its
        # rank); a lower-rank client's factors are zero-padded to the global rank, which keeps B A unchanged.
        whole = pad_to_rank(self.method.complete_upload(truncate_to_rank(self._global, record.rank), clean),
                            self.settings.rank)   # lora_rank, the global adapter's
        update = ClientUpdate(client=record.name, num_examples=record.num_examples,
                              state=AdapterState.from_state_dict(whole))
        with self._changed:
            self._check_round_accepts(record, round_index)   # the round may have closed meanwhile
            assert self._round is not None
            self._round.updates[record.client_id] = (update, stats)
            self._changed.notify_all()
        log.info("round %d: update from %s (%d examples, loss %.4f, %.1fs)",
                 round_index, record.name, record.num_examples, stats.train_loss, stats.train_seconds)

    def _check_round_accepts(self, record: ClientRecord, round_index: int) -> None:
        current = self._round
        if current is None or self._finished is not None:
            raise NotAccepting(f"no round is open; update for round {round_index} from {record.name!r} rejected")
        if round_index != current.index:
            raise NotAccepting(f"update for round {round_index} from {record.name!r} rejected: "
                               f"the open round is {current.index}")
        if not current.open:
            raise NotAccepting(f"round {round_index} is closed; late update from {record.name!r} rejected")
        if record.client_id not in current.sampled:
            raise NotAccepting(f"client {record.name!r} was not sampled in round {round_index}")
        if record.client_id in current.dropped:
            raise NotAccepting(f"client {record.name!r} was dropped from round {round_index} "
                               f"({current.dropped[record.client_id]}); its update no longer counts")
        if record.client_id in current.updates:
            raise DuplicateUpdate(f"client {record.name!r} already reported for round {round_index}")

    # ------------------------------------------------------------------ driver

    def status(self) -> RunStatus:
        """The run's round and phase and every client's state, for the Status RPC."""
        with self._changed:
            current = self._round if self._finished is None else None
            open_round = current.index if current is not None and current.open else None
            clients = []
            for record in sorted(self.registry.records(), key=lambda r: r.partition):
                state, reason = client_state(record, current)
                clients.append(ClientStatus(
                    name=record.name, state=state, reason=reason,
                    seconds_since_keepalive=time.monotonic() - record.last_seen if record.client_id else -1.0,
                    rounds_participated=self._participation[record.name], partition=record.partition,
                    num_examples=record.num_examples or self.partition_sizes[record.partition],
                    lora_rank=record.rank or self.config.model.lora_rank))
            num_rounds = self.config.federation.num_rounds
            in_round = time.monotonic() - self._round_started if self._phase != "waiting_for_clients" else 0.0
            return RunStatus(
                run_id=self.run_id, method=self.config.federation.method,
                round=open_round or self._completed_rounds, num_rounds=num_rounds,
                rounds_completed=self._completed_rounds, phase=self._phase,
                elapsed_seconds=time.monotonic() - self._started,
                eta_seconds=0.0 if self._finished else eta_seconds(
                    self._round_durations, num_rounds - self._completed_rounds, in_round),
                clients=clients, finished_reason=self._finished.reason if self._finished else "")

    def request_stop(self) -> None:
        with self._changed:
            self._stop_requested = True
            self._changed.notify_all()

    def run(self, wait_for_clients_s: float = 600.0) -> dict[str, Any]:
        """Drive every round to the end; returns the run summary."""
        num_rounds = self.config.federation.num_rounds
        try:
            self._wait_for_clients(wait_for_clients_s)
            for round_index in range(self._completed_rounds + 1, num_rounds + 1):
                if self._stop_requested:
                    raise StopRequested(f"stop requested before round {round_index}")
                self._run_round(round_index)
            summary = {**summarize(self.run_dir.read_metrics()), "status": "completed"}
            self.run_dir.write_json("summary.json", summary)
            self._finish(f"all {num_rounds} rounds completed")
            return summary
        except (StopRequested, QuorumLost) as stop:
            log.error("%s", stop)
            status = "stopped" if isinstance(stop, StopRequested) else "quorum_lost"
            summary = {**summarize(self.run_dir.read_metrics()), "status": status, "stopped_early": str(stop)}
            self.run_dir.write_json("summary.json", summary)
            self._finish(str(stop))
            return summary
        except BaseException as error:
            self._finish(f"run aborted: {error}")
            raise

    def _finish(self, reason: str) -> None:
        with self._changed:
            self._phase = "finished"
            self._finished = RunFinished(rounds_completed=self._completed_rounds, reason=reason)
            self._changed.notify_all()

    def _wait_for_clients(self, timeout_s: float) -> None:
        needed = len(self.partition_sizes)
        deadline = time.monotonic() + timeout_s
        last_logged = -1
        with self._changed:
            while self.registry.num_joined() < needed:
                if self._stop_requested:
                    raise StopRequested("stop requested while waiting for clients")
                joined = self.registry.num_joined()
                if joined != last_logged:
                    log.info("waiting for clients: %d of %d joined", joined, needed)
                    last_logged = joined
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"only {joined} of {needed} clients joined within {timeout_s:.0f}s; "
                                       f"start more clients or lower num_clients")
                self._changed.wait(min(remaining, 5.0))
        log.info("all %d clients joined", needed)

    def _run_round(self, round_index: int) -> None:
        """Open, collect, and close one round; below quorum, retry with a fresh sample or stop."""
        fed = self.config.federation
        self._round_started = time.monotonic()
        for attempt in range(fed.max_round_retries + 1):
            self._open_round(round_index, attempt)
            current = self._wait_for_updates(round_index)
            quorum = fed.quorum(len(current.sampled))
            if len(current.updates) >= quorum:
                self._close_round(round_index)
                return
            dropped = {current.names[c]: why for c, why in current.dropped.items()}
            message = (f"round {round_index}: only {len(current.updates)} of {len(current.sampled)} sampled clients "
                       f"reported, below the quorum of {quorum}; dropped: {dropped}")
            self.run_dir.append_event({"event": "round_below_quorum", "round": round_index, "attempt": attempt,
                                       "reported": len(current.updates), "quorum": quorum, "dropped": dropped})
            if fed.quorum_policy == "stop":
                raise QuorumLost(message + " (quorum_policy=stop)")
            log.warning("%s; retrying with a fresh sample", message)
        raise QuorumLost(f"round {round_index} stayed below quorum after {fed.max_round_retries} retries")

    def _sample(self, round_index: int, attempt: int) -> list[int]:
        """The first attempt samples every partition (a pure function of (seed, round), which a bit-exact resume
        needs); a retry samples live sessions only (keep-alive open, heartbeat within the timeout)."""
        fed = self.config.federation
        num = len(self.partition_sizes)
        wanted = fed.clients_per_round(num)
        if attempt == 0:
            return sample_clients(num, wanted, fed.seed, round_index, scheme=fed.sampling_seeds)
        live = self._live_partitions(needed=fed.quorum(wanted), timeout_s=fed.heartbeat_timeout_s)
        if not live:
            return []
        picks = sample_clients(len(live), min(wanted, len(live)), fed.seed + 7919 * attempt, round_index,
                               scheme=fed.sampling_seeds)
        return [live[i] for i in picks]

    def _live_partitions(self, needed: int, timeout_s: float) -> list[int]:
        """Partitions held by live sessions, once at least ``needed`` are (a retry right after a failed attempt
        would otherwise sample the same few survivors, or nobody, within a millisecond); at most ``timeout_s``."""
        heartbeat_timeout = self.config.federation.heartbeat_timeout_s
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                live = [p for p in range(len(self.partition_sizes))
                        if (r := self.registry.for_partition(p)) is not None and self.registry.is_live(r, heartbeat_timeout)]
                remaining = deadline - time.monotonic()
                if len(live) >= needed or remaining <= 0 or self._stop_requested:
                    return live
                self._changed.wait(min(remaining, 0.5))

    def _open_round(self, round_index: int, attempt: int = 0) -> None:
        fed = self.config.federation
        partitions = self._sample(round_index, attempt)
        with self._changed:
            sampled: dict[str, int] = {}
            names: dict[str, str] = {}
            for partition in partitions:
                record = self.registry.for_partition(partition)
                if record is None:           # its client is still declaring its own data: it cannot train
                    log.info("round %d: partition %d has no client that can train now; skipped", round_index,
                             partition)
                    continue
                sampled[record.client_id] = partition
                names[record.client_id] = record.name
            self._round = RoundState(index=round_index, sampled=sampled, names=names, attempt=attempt)
            self._phase = "training"
            self._changed.notify_all()
        log.info("round %d/%d%s: sampled %s", round_index, fed.num_rounds,
                 f" (retry {attempt})" if attempt else "", sorted(names.values()))

    def _wait_for_updates(self, round_index: int) -> RoundState:
        """Until every sampled client reported or was dropped, or the deadline passed; then close intake."""
        fed = self.config.federation
        deadline = time.monotonic() + fed.round_timeout_s
        with self._changed:
            current = self._round
            assert current is not None and current.index == round_index
            while True:
                self._drop_dead_clients(current)
                if len(current.updates) + len(current.dropped) >= len(current.sampled):
                    break
                if self._stop_requested:
                    raise StopRequested(f"stop requested during round {round_index}; it was not committed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    for cid in current.sampled:
                        if cid not in current.updates and cid not in current.dropped:
                            current.dropped[cid] = f"{DEADLINE_REASON} ({fed.round_timeout_s:.0f}s)"
                    break
                self._changed.wait(min(remaining, 0.5))
            current.open = False
            self._phase = "aggregating"
        for cid, reason in current.dropped.items():
            log.warning("round %d: dropped %s: %s", round_index, current.names[cid], reason)
        return current

    def _drop_dead_clients(self, current: RoundState) -> None:
        """Drop sampled clients whose process or link is gone: closed KeepAlive, silent heartbeats, replaced."""
        timeout = self.config.federation.heartbeat_timeout_s
        now = time.monotonic()
        for cid in current.sampled:
            if cid in current.updates or cid in current.dropped:
                continue
            record = self.registry.find(cid)
            if record is None:
                current.dropped[cid] = "rejoined under a new session (the client restarted)"
            elif record.keepalive_lost:
                current.dropped[cid] = "connection lost (keep-alive stream closed)"
            elif now - record.last_seen > timeout:
                current.dropped[cid] = f"no heartbeat for {now - record.last_seen:.0f}s (heartbeat_timeout_s={timeout:.0f})"

    def _close_round(self, round_index: int) -> None:
        """Aggregate, evaluate, save, record, commit: each a step of its own, in that order."""
        current = self._round
        assert current is not None and current.index == round_index
        closed = self._aggregate_and_evaluate(current)
        self._save_adapters(current, closed)
        self.run_dir.append_metrics(metrics_record(self.config.federation.method, current, closed, time.time()))
        self._commit(round_index, closed)
        log.info("round %d done: accuracy %s, loss %s, basis overlap %s, cancellation %s",
                 round_index, _fmt(closed.evaluation.get("accuracy")), _fmt(closed.evaluation.get("loss")),
                 _fmt(closed.diagnostics.get("basis_overlap")), _fmt(closed.diagnostics.get("cancellation_ratio")))

    def _aggregate_and_evaluate(self, current: RoundState) -> ClosedRound:
        """Bound each client's update (client_update_clip_norm, off by default), run the method's server
        step, measure the alignment diagnostics, evaluate the new global adapter."""
        started = time.time()
        global_state = AdapterState.from_state_dict(self._global)
        bound = self.config.federation.client_update_clip_norm
        reference = ClipReference(global_state)          # the global side of every client's norm, once
        clipped = {update.client: clip_update(update.state, reference, self.settings.scaling, bound)
                   for _, update, _ in current.reported()}
        updates = [ClientUpdate(u.client, u.num_examples, clipped[u.client].state) for _, u, _ in current.reported()]
        step = self.method.server_step(self._global, self._method_state, updates, self.settings, current.index)
        new_global = {k: v.to(torch.float32).contiguous() for k, v in step.adapter.to_state_dict().items()}
        diagnostics = alignment_metrics(updates, step.adapter, self.settings.scaling, step.base_increment)
        aggregation_seconds = time.time() - started
        eval_started = time.time()
        if step.base_increment:    # fedex_lora: the residual goes into the frozen base weights, as on every client
            self.model.add_to_base(step.base_increment)
        evaluation = self.model.evaluate(new_global)
        return ClosedRound(
            clipped=clipped, new_global=new_global,
            method_state={k: v.to(torch.float32).contiguous() for k, v in step.state.items()},
            diagnostics=diagnostics, evaluation=evaluation, aggregation_seconds=aggregation_seconds,
            eval_seconds=time.time() - eval_started)

    def _save_adapters(self, current: RoundState, closed: ClosedRound) -> None:
        """The round's global adapter in PEFT's format (and as the best one when it is), the clients'
        uploads when asked; all before the commit, so a committed round always has its adapter."""
        if self.config.federation.save_client_updates:
            self.run_dir.save_client_updates(current.index, [u for _, u, _ in current.reported()])  # as uploaded
        directory = self.run_dir.round_adapter_dir(current.index)
        directory.parent.mkdir(parents=True, exist_ok=True)
        self.model.save(closed.new_global, directory)
        accuracy = closed.evaluation.get("accuracy")
        AdapterCard(self.config, self.label_names, current.index, accuracy, self.run_id).write_into(directory)
        if accuracy is not None and accuracy > self._best_accuracy:
            self._best_accuracy = accuracy
            self.run_dir.mark_best(current.index)

    def _commit(self, round_index: int, closed: ClosedRound) -> None:
        """The checkpoint's state file is renamed last: a crash before it leaves the previous round
        committed, and a resume drops metrics lines of rounds after the committed one."""
        tensors = {**closed.new_global, **closed.method_state}
        self.run_dir.commit_checkpoint(round_index, tensors, {
            "best_accuracy": self._best_accuracy, "registry": self.registry.snapshot(), "run_id": self.run_id})
        with self._changed:
            self._global = closed.new_global
            self._method_state = closed.method_state
            self._completed_rounds = round_index
            self._phase = "waiting_for_clients"      # committed: next, the next round samples its clients
            self._participation.update(update.client for _, update, _ in self._round.reported())
            self._round_durations.append(time.monotonic() - self._round_started)
        keep = self.config.federation.keep_last_adapters
        if keep is not None:        # after the commit: a resume never needs a pruned round's folder
            self.run_dir.prune_round_adapters(keep_last=keep, latest=round_index)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
