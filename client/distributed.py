"""One client as a torch.distributed job: detecting torchrun, the process group, data-parallel training.

``torchrun --nproc-per-node N -m client ...`` starts N processes (ranks) of one client. Each rank
builds the model on its own device and trains on its own slice of every global batch; the ranks'
gradients are averaged by DistributedDataParallel, so the N ranks take the optimizer steps a single
process would take on the whole global batch (per_device_train_batch_size x N rows). Only rank 0
speaks to the coordinator (client/handoff.py passes the tasks on).

``python -m client`` without torchrun uses ``SOLO``: one rank, no process group, and every method
below reduces to the identity, so a single-process client trains exactly as it always has.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from client.connection import ClientSetupError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1     # prctl(2): the signal this process gets when its parent dies

DEFAULT_TIMEOUT_S = 300.0
"""How long a rank waits in a collective for the others before it gives up (--dist-timeout)."""


class DistributedSetupError(ClientSetupError):
    """The torchrun environment or the requested device cannot make a process group."""


@dataclass(frozen=True)
class TorchrunEnv:
    """What torchrun tells each process it starts (WORLD_SIZE, RANK, LOCAL_RANK)."""

    world_size: int
    rank: int
    local_rank: int

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise DistributedSetupError(f"WORLD_SIZE={self.world_size}: a distributed client has at least 2 ranks")
        if not 0 <= self.rank < self.world_size:
            raise DistributedSetupError(f"RANK={self.rank} is outside 0..{self.world_size - 1} (WORLD_SIZE="
                                        f"{self.world_size}); start the client with torchrun, which sets both")
        if self.local_rank < 0:
            raise DistributedSetupError(f"LOCAL_RANK={self.local_rank}: must be >= 0")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "TorchrunEnv | None":
        """The job's layout when started by torchrun with more than one process; None otherwise (a plain
        ``python -m client``, or torchrun with one process, which gains nothing from a process group)."""
        world = _env_int(environ, "WORLD_SIZE", default=1)
        if world <= 1:
            return None
        missing = [name for name in ("RANK", "LOCAL_RANK") if name not in environ]
        if missing:
            raise DistributedSetupError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the client "
                                        f"with torchrun (or python -m torch.distributed.run), which sets them")
        return cls(world_size=world, rank=_env_int(environ, "RANK"), local_rank=_env_int(environ, "LOCAL_RANK"))


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        assert default is not None
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"{name}={text!r} is not an integer; torchrun sets it") from None


def rank_device(requested: str, env: TorchrunEnv) -> str:
    """The device of this rank: ``cpu``, or ``cuda:LOCAL_RANK`` for ``--device cuda``.

    A numbered ``cuda:N`` is refused: under torchrun each rank takes the GPU of its local rank, and
    CUDA_VISIBLE_DEVICES picks which GPUs the job sees."""
    if requested == "cpu":
        return "cpu"
    if requested != "cuda":
        raise DistributedSetupError(f"--device {requested} under torchrun: use --device cuda (rank r trains on "
                                    f"cuda:LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES) or --device cpu")
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise DistributedSetupError(f"LOCAL_RANK={env.local_rank} but this node sees {count} GPU(s): start at most "
                                    f"{count} processes per node (--nproc-per-node) or widen CUDA_VISIBLE_DEVICES")
    return f"cuda:{env.local_rank}"


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of ``size`` rows that ``rank`` trains on: contiguous, disjoint,
    covering the batch, as even as possible (a full batch of b x world_size rows gives every rank b)."""
    return size * rank // world_size, size * (rank + 1) // world_size


def _rank_seed(seed: int, rank: int) -> int:
    """Rank 0 keeps the round seed; every other rank gets its own, unrelated to the seeds of other rounds
    and ranks (numpy's SeedSequence of the pair, as common/sampling.py derives round seeds)."""
    if rank == 0:
        return seed
    low, high = np.random.SeedSequence([seed, rank]).generate_state(2, dtype=np.uint32)
    return ((int(high) << 32) | int(low)) & (2**63 - 1)


class RankGroup:
    """The ranks one client trains with, as LocalTrainer sees them. This base class is one process alone
    (``SOLO``): the whole batch, no wrapper, no collective."""

    rank = 0
    world_size = 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list) -> tuple[list, float]:
        """This rank's rows of a global batch and the factor its mean loss is scaled by, n_r x world / n, so
        that the ranks' average gradient is the gradient of the mean loss over all n rows. Full batches
        give 1.0. A rank left without rows (a last batch smaller than the world) trains on the batch's
        first row at factor 0: it must still take part in the gradient average, and adds nothing to it."""
        lo, hi = shard_bounds(len(rows), self.rank, self.world_size)
        if lo == hi:
            return rows[:1], 0.0
        return rows[lo:hi], (hi - lo) * self.world_size / len(rows)

    def dropout_seed(self, seed: int) -> int:
        """The seed of this rank's dropout masks in a round seeded ``seed`` (ranks must not share masks)."""
        return _rank_seed(seed, self.rank)

    @contextlib.contextmanager
    def data_parallel(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module to run forward passes through for one round: here the model itself."""
        yield model

    def gradient_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward; ``sync`` False defers the gradient average
        (accumulation micro-batches before the optimizer step). Here nothing to defer."""
        return contextlib.nullcontext()

    def batch_losses(self, losses: list[float], rows: list[int], sizes: list[int]) -> list[float]:
        """Each micro-batch's mean task loss over the whole global batch, from this rank's mean ``losses``
        over its ``rows`` rows of batches of ``sizes`` rows. Here this rank's losses are the batches'."""
        return losses


SOLO = RankGroup()


class DataParallelGroup(RankGroup):
    """The ranks of a torchrun job: DistributedDataParallel over the default process group."""

    def __init__(self, env: TorchrunEnv, device: str) -> None:
        self.rank = env.rank
        self.world_size = env.world_size
        self.device = device

    @contextlib.contextmanager
    def data_parallel(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """A DistributedDataParallel wrapper for one round, built after the round has set requires_grad:
        DDP registers the parameters that train when it is built, and which do changes from round to round
        (fedsvd and ffa_lora freeze A, rolora alternates A and B). Dropped at the end of the round, which
        removes its gradient hooks (the next round's wrapper adds its own)."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
        # No initial broadcast: every rank starts the round from the same received adapter on the same
        # base weights (the same model build, the same residuals), so rank 0's copy would change nothing.
        # The buffers (position ids) are constants: nothing to sync before each forward either.
        wrapped = DistributedDataParallel(model, device_ids=device_ids, init_sync=False, forward_sync_buffers=False)
        try:
            yield wrapped
        finally:
            del wrapped

    def gradient_sync(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else model.no_sync()

    def batch_losses(self, losses: list[float], rows: list[int], sizes: list[int]) -> list[float]:
        import torch.distributed as dist

        # One collective per round: the ranks' loss sums per micro-batch, added up.
        sums = torch.tensor([loss * count for loss, count in zip(losses, rows)], dtype=torch.float64)   # (steps,)
        device = self.device if dist.get_backend() == "nccl" else "cpu"
        sums = sums.to(device)
        dist.all_reduce(sums)
        return (sums.cpu() / torch.tensor(sizes, dtype=torch.float64)).tolist()


def die_with_the_agent() -> None:
    """Have Linux stop this rank when its parent, torchrun's agent, dies: the agent stops its ranks when one
    fails, but an agent killed outright (kill -9) cannot, and an orphaned rank 0 would go on speaking for a
    client that is gone, under the name its restart comes back with. Elsewhere: nothing (best effort)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError) as error:
        log.debug("cannot ask to be stopped with torchrun's agent: %r", error)
        return
    if os.getppid() != parent:        # the agent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_process_group(env: TorchrunEnv, device: str, timeout_s: float) -> None:
    """Join torchrun's process group: NCCL for CUDA ranks, gloo for CPU ranks, every collective bounded by
    ``timeout_s`` so that no rank waits forever for one that hangs."""
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d (local rank %d) on %s: process group up (%s, timeout %.0fs)", env.rank, env.world_size,
             env.local_rank, device, backend, timeout_s)


def stop_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
