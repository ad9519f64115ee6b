"""The client's main loop: join, load model and data shard, then fetch / train / upload until the run is over."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import grpc
import torch
from safetensors.torch import save_file

from client.bench_echo import EchoTrainer
from client.connection import (ClientSecurity, ClientSetupError, CoordinatorConnection, CorruptTask, JoinInfo,
                               ReceivedTask, RunChanged, RunFinished, WaitHint)
from client.distributed import (DEFAULT_TIMEOUT_S, SOLO, DataParallelGroup, RankGroup, TorchrunEnv,
                                die_with_the_agent, rank_device, start_process_group, stop_process_group)
from client.exit_codes import exit_code
from client.handoff import ALONE, FINISHED, TASK, Alone, Handoff, Order
from client.trainer import LocalTrainer
from common.config import RunConfig
from common.federated_data import fingerprint, partition_dataset
from common.tasks import load_task_data

log = logging.getLogger(__name__)

MAX_CORRUPT_FETCHES = 3
"""Damaged task downloads in a row (digest mismatch, truncation) before the client gives up."""


@dataclasses.dataclass
class ClientOptions:
    coordinator: str
    name: str
    device: str = "cpu"
    data: str | None = None
    """A local data file of this client's own; without it the client trains on its partition of the run's data."""
    partition: int = -1
    patience_s: float = 300.0
    save_received: str | None = None
    """Debugging: write every received task's tensors to DIR/round_NNN.safetensors."""
    threads: int | None = None
    rank: int = 0
    """The LoRA rank to train at (--rank; heterogeneous ranks, at most the run's lora_rank); 0: the run's."""
    security: ClientSecurity = dataclasses.field(default_factory=ClientSecurity)
    dist_timeout_s: float = DEFAULT_TIMEOUT_S
    """Under torchrun: how long a rank waits in a collective for the others before the job fails."""
    bench_echo: bool = False
    """Benchmark only (--bench-echo): load no model and no data; upload each task's factors slightly perturbed
    (client/bench_echo.py). Needs a run whose config sets synthetic_layout."""

    def __post_init__(self) -> None:
        if self.bench_echo and self.data is not None:
            raise ValueError("--bench-echo loads no data: drop --data (or --bench-echo)")
        if not self.dist_timeout_s > 0:
            raise ValueError(f"--dist-timeout {self.dist_timeout_s}: must be a positive number of seconds "
                             f"(default {DEFAULT_TIMEOUT_S:.0f})")


def _load_rows(config: RunConfig, options: ClientOptions, partition_index: int, expected_fingerprint: str):
    if options.data:
        own = dataclasses.replace(config.data, dataset=options.data)
        data = load_task_data(own, seed=config.federation.seed)
        log.info("training on own data %s: %d rows", options.data, len(data.train))
        return data.train, len(data.label_names)
    data = load_task_data(config.data, seed=config.federation.seed)
    partition = partition_dataset(config, data.partition_values)
    indices = partition.indices[partition_index]
    if fingerprint(indices) != expected_fingerprint:
        raise RuntimeError(f"partition {partition_index} differs from the coordinator's (fingerprint mismatch): "
                           f"the client's data or package versions differ from the coordinator's")
    log.info("partition %d: %d rows", partition_index, len(indices))
    return [data.train[i] for i in indices], len(data.label_names)


class ClientSession:
    """This process's membership: its session id, renewed by rejoining under the same name when the
    coordinator no longer knows it (a coordinator restart, or a drop after a cut link)."""

    def __init__(self, connection: CoordinatorConnection, options: ClientOptions) -> None:
        self.connection = connection
        self.options = options
        self.num_examples = 0          # declared size of own data; 0 while training on a partition
        # With own data, the first join fetches the run's config (needed to load the data) and marks this
        # client as declaring: it is neither counted nor sampled until it joins again with its size.
        self.info: JoinInfo = connection.join(options.name, options.partition, options.device,
                                              own_data=options.data is not None, lora_rank=options.rank)

    @property
    def client_id(self) -> str:
        return self.info.client_id

    def rejoin(self, num_examples: int | None = None) -> None:
        """Join again under the same name (keeping the partition); ``num_examples`` declares own data's size."""
        if num_examples is not None:
            self.num_examples = num_examples
        info = self.connection.join(self.options.name, self.info.partition_index, self.options.device,
                                    self.num_examples, own_data=self.options.data is not None,
                                    lora_rank=self.options.rank)
        if info.run_id != self.info.run_id:
            raise RunChanged(f"the coordinator now serves run {info.run_id}, not {self.info.run_id}; "
                             f"restart this client to join the new run")
        log.info("rejoined run %s as partition %d", info.run_id, info.partition_index)
        self.info = info


def run_client(options: ClientOptions) -> int:
    """Run this client until the run is over (0) or it must stop (an exception; client/exit_codes.py).
    Started by torchrun with several processes, each is one rank of the client (client/distributed.py)."""
    torchrun = TorchrunEnv.from_environ(os.environ)
    if torchrun is None:
        return _lead(options, ALONE, SOLO, options.device)
    if options.bench_echo:
        raise ClientSetupError("--bench-echo trains nothing: run it as one process, not under torchrun")
    device = rank_device(options.device, torchrun)
    die_with_the_agent()
    start_process_group(torchrun, device, options.dist_timeout_s)
    group = DataParallelGroup(torchrun, device)
    handoff = Handoff(options.dist_timeout_s)
    if torchrun.rank == 0:
        try:
            code = _lead(options, handoff, group, device)
        except BaseException as error:
            handoff.abort(exit_code(error), str(error))
            raise
        handoff.finished()
    else:
        code = _follow(options, handoff, group, device)
    # Only after an orderly end: after an error a peer may be gone, and tearing down could wait on it.
    stop_process_group()
    return code


def _lead(options: ClientOptions, followers: Alone | Handoff, group: RankGroup, device: str) -> int:
    """The client's side of the protocol, on a single-process client or on rank 0: join, then fetch, train
    and upload until the run is over. ``followers`` are the other ranks (none for a single process): every
    coordinator call goes through ``followers.wait_on``, and what they need to train is handed to them."""
    connection = CoordinatorConnection(options.coordinator, patience_s=options.patience_s, security=options.security)
    try:
        session = followers.wait_on(lambda: ClientSession(connection, options))
        info = session.info
        followers.joined(info)
        config = RunConfig.from_json(info.run_config_json)
        torch.set_num_threads(options.threads or config.train.torch_threads)
        rank = info.lora_rank or config.model.lora_rank
        log.info("%s joined run %s as partition %d of %d (method %s, LoRA rank %d)", options.name, info.run_id,
                 info.partition_index, info.num_partitions, config.federation.method, rank)
        connection.start_keepalive(lambda: session.client_id, info.heartbeat_interval_s)
        trainer = _trainer(config, options, session, followers, group, device, rank)
        expected = trainer.expected_task()
        corrupt_fetches = 0
        while True:
            try:
                try:
                    task = followers.wait_on(lambda: connection.next_task(session.client_id, expected,
                                                                          trainer.base_residual_round))
                    corrupt_fetches = 0
                except CorruptTask as damaged:
                    corrupt_fetches += 1
                    if corrupt_fetches >= MAX_CORRUPT_FETCHES:
                        raise
                    log.warning("%s; fetching it again", damaged)
                    continue
                if isinstance(task, WaitHint):       # not sampled: the long poll already waited
                    continue
                _do_round(connection, session, trainer, task, options, followers)
            except RunFinished as finished:
                after = "" if finished.rounds_completed is None else f" after {finished.rounds_completed} rounds"
                log.info("run over%s: %s", after, finished.reason)
                return 0
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                log.warning("the coordinator does not know this session (%s); rejoining", error.details())
                followers.wait_on(session.rejoin)
    finally:
        connection.close()


def _trainer(config: RunConfig, options: ClientOptions, session: ClientSession, followers: Alone | Handoff,
             group: RankGroup, device: str, rank: int) -> LocalTrainer | EchoTrainer:
    """The model and data shard this client trains on; with --bench-echo, neither (client/bench_echo.py)."""
    info = session.info
    if options.bench_echo:
        return EchoTrainer(config, rank, info.partition_index, info.num_partitions)
    if config.model.synthetic_layout is not None:
        raise ClientSetupError(f"this run is benchmark-only (synthetic_layout={config.model.synthetic_layout}): "
                               f"there is no model to train; start this client with --bench-echo")
    rows, num_labels = _load_rows(config, options, info.partition_index, info.partition_fingerprint)
    if options.data:
        # Own data: its size is known only now (loading it needs the run's config); declare it, and every
        # upload of this session is bound to it.
        followers.wait_on(lambda: session.rejoin(num_examples=len(rows)))
    return LocalTrainer(config, rows, num_labels, device=device, rank=rank, group=group)


def _follow(options: ClientOptions, handoff: Handoff, group: RankGroup, device: str) -> int:
    """Ranks 1..N-1 of a distributed client: the same model and data as rank 0, trained on the tasks it
    hands over, until it says the run is over (0) or that it stopped (its exit code)."""
    order, _ = handoff.receive()
    if order.join is None:
        return _stopped(order)
    info = order.join
    config = RunConfig.from_json(info.run_config_json)
    torch.set_num_threads(options.threads or config.train.torch_threads)
    rows, num_labels = _load_rows(config, options, info.partition_index, info.partition_fingerprint)
    trainer = LocalTrainer(config, rows, num_labels, device=device, rank=info.lora_rank or config.model.lora_rank,
                           group=group, show_progress=False)
    log.info("rank %d/%d ready on %s", group.rank, group.world_size, device)
    while True:
        order, tensors = handoff.receive()
        if order.kind != TASK:
            return _stopped(order)
        trainer.train_round(order.round, tensors, order.round_seed, order.base_residual_round)


def _stopped(order: Order) -> int:
    if order.kind == FINISHED:
        log.info("run over (rank 0 says)")
        return 0
    log.error("rank 0 stopped (exit %d): %s", order.exit_code, order.reason)
    return order.exit_code


def _do_round(connection: CoordinatorConnection, session: ClientSession, trainer: LocalTrainer | EchoTrainer,
              task: ReceivedTask, options: ClientOptions, followers: Alone | Handoff) -> None:
    log.info("round %d: received %d tensors (%.2f MB), training", task.round, len(task.tensors),
             task.payload_bytes / 1e6)
    if options.save_received:
        target = Path(options.save_received)
        target.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in task.tensors.items()}, str(target / f"round_{task.round:03d}.safetensors"))
    followers.task(task)                     # every rank trains on it; rank 0 alone uploads
    result = trainer.train_round(task.round, task.tensors, task.round_seed, task.base_residual_round)
    try:
        reply = followers.wait_on(lambda: connection.submit(session.client_id, task.round, result.num_examples,
                                                            result.tensors, result.train_loss,
                                                            result.train_seconds, result.local_steps))
        log.info("round %d: trained %d steps in %.1fs (loss %.4f), uploaded %d bytes", task.round,
                 result.local_steps, result.train_seconds, result.train_loss, reply.bytes_received)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.ALREADY_EXISTS:
            log.info("round %d: update already recorded (a retried upload)", task.round)
        elif error.code() == grpc.StatusCode.FAILED_PRECONDITION:
            log.warning("round %d: update not accepted: %s", task.round, error.details())
        else:
            raise
