"""The operator's view of a running federation: the run's round and phase, and each client's state.

The coordinator builds a ``RunStatus`` under its lock (``Coordinator.status``); the Status RPC sends it
(server/servicer.py) and ``python -m server status`` prints it (server/status_cli.py). Nothing here
changes the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from server.registry import ClientRecord
from server.rounds import RoundState

PHASES = ("waiting_for_clients", "training", "aggregating", "finished")
CLIENT_STATES = ("joined", "training", "uploaded", "dropped", "gone")


@dataclass(frozen=True)
class ClientStatus:
    name: str
    state: str                      # one of CLIENT_STATES
    reason: str                     # why it was dropped, or why it is gone; "" otherwise
    seconds_since_keepalive: float  # -1: not seen by this coordinator process
    rounds_participated: int
    partition: int
    num_examples: int
    lora_rank: int


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    method: str
    round: int                      # the open round, else the last committed one
    num_rounds: int
    rounds_completed: int
    phase: str                      # one of PHASES
    elapsed_seconds: float
    eta_seconds: float              # -1: unknown
    clients: list[ClientStatus] = field(default_factory=list)
    finished_reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def client_state(record: ClientRecord, current: RoundState | None) -> tuple[str, str]:
    """(state, reason) of one client against the latest round (open, or closing)."""
    if current is not None and record.client_id in current.sampled:
        if record.client_id in current.updates:
            return "uploaded", ""
        if record.client_id in current.dropped:
            return "dropped", current.dropped[record.client_id]
        if current.open:
            return "training", ""
    if not record.client_id:
        return "gone", "has not rejoined since the coordinator restarted"
    if record.keepalive_lost:
        return "gone", "connection lost (keep-alive stream closed)"
    return "joined", ""


def eta_seconds(durations: list[float], rounds_left: int, current_elapsed: float) -> float:
    """Rounds still to run x the mean round of this process, less what the open round has taken so far;
    -1 while no round has completed here (nothing to estimate from)."""
    if rounds_left <= 0:
        return 0.0
    if not durations:
        return -1.0
    return max(0.0, sum(durations) / len(durations) * rounds_left - current_elapsed)


def format_status(status: RunStatus) -> str:
    """The human view: one header block, then a table of clients."""
    eta = "unknown" if status.eta_seconds < 0 else _duration(status.eta_seconds)
    lines = [
        f"run {status.run_id or '-'}  method {status.method}",
        f"round {status.round}/{status.num_rounds} ({status.rounds_completed} committed), phase {status.phase}, "
        f"elapsed {_duration(status.elapsed_seconds)}, ETA {eta}",
    ]
    if status.finished_reason:
        lines.append(f"finished: {status.finished_reason}")
    header = ("client", "state", "keep-alive", "rounds", "partition", "examples", "rank")
    rows = [(c.name, c.state + (f" ({c.reason})" if c.reason else ""),
             "-" if c.seconds_since_keepalive < 0 else f"{c.seconds_since_keepalive:.1f}s ago",
             str(c.rounds_participated), str(c.partition), str(c.num_examples), str(c.lora_rank))
            for c in status.clients]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"
