"""Soak: many rounds of the tiny model on loopback, with clients killed (kill -9) and restarted at random.

    python -m bench.soak                       # 300 rounds, 4 clients (10-20 min on 2 cores)
    python -m bench.soak --quick               # 30 rounds, 3 clients, 2 kills (about a minute)
    python -m bench.soak --rounds 100 --clients 4 --kills 5 --seed 3 --out soak.json

A real coordinator process and real client processes (tests/integration/harness.Federation) run a tiny
random BERT on bbc_news. While the run goes, a seeded random generator picks rounds at which a random
client is killed with SIGKILL and restarted at once under the same --name (it rejoins and gets its
partition back). The victim is drawn among the clients that are up (a killed client is up again once
it has taken part in a round opened after its restart), and one client at least always stays up. Kills
only happen inside a window that leaves rounds for the restarted client: a restart loads torch and
transformers, several seconds, which are many tiny rounds (--quick makes rounds longer for this).

At every committed round (a new line in RUN_DIR/metrics.jsonl) the coordinator's RSS (VmRSS),
open file descriptors (/proc/PID/fd) and threads are sampled.

Checks (exit code 1 when one fails): the coordinator exits 0; summary.json says completed with every
round; metrics.jsonl holds rounds 1..R in order; in every round the participants are distinct, not
empty and a subset of the round's sampled clients; every killed client took part in a round opened
after its restart; every client process still running at the end exits 0; RSS and descriptor growth
from round 10 (warm-up) to the last round are under 10%.

The last line printed is one JSON object with the figures. tests/integration/test_soak.py runs a
short version through run_soak().
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.integration.harness import Federation

WARMUP_ROUND = 10
GROWTH_TARGET = 0.10       # RSS and descriptors may grow less than 10% after warm-up
QUICK_LOCAL_STEPS = 15     # short runs: rounds of about a second, so a restarted client has rounds left
FINAL_WINDOW = 10          # the checks use the peak over the last 10 rounds (and the last round for RSS)
POLL_S = 0.05


def soak_config(model_dir: str, rounds: int, clients: int, seed: int = 7, max_local_steps: int = 2,
                **overrides) -> dict:
    """The integration tests' tiny run config (tests/integration/conftest.tiny_run_config), set up for a soak."""
    config = {
        "model_name": model_dir, "lora_rank": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "dense"],
        "dataset": "bbc_news", "num_clients": clients, "dirichlet_alpha": 0.3, "min_client_size": 8,
        "max_train_samples": 240, "max_eval_samples": 40, "max_length": 32,
        "per_device_train_batch_size": 8, "max_local_steps": max_local_steps, "learning_rate": 5e-3,
        "client_fraction": 0.5, "num_rounds": rounds, "seed": seed,
        "min_clients_per_round": 1, "quorum_policy": "retry", "max_round_retries": 3,
        "heartbeat_timeout_s": 5, "round_timeout_s": 60, "save_client_updates": False,
    }
    config.update(overrides)
    return config


@dataclass
class Sample:
    round: int          # rounds committed when sampled
    seconds: float      # since the coordinator started
    rss_kb: int
    fds: int
    threads: int
    clients_down: int = 0   # killed clients not back yet (each connected client holds a socket)


@dataclass
class Kill:
    client: int
    name: str
    planned_round: int          # the round the plan drew
    at_round: int               # rounds committed when the client was killed
    after_round: int            # rounds committed once the old process was gone
    back_round: int | None = None   # first round opened after the restart in which it took part


@dataclass
class SoakResult:
    rounds: int
    clients: int
    seed: int
    workdir: str
    coordinator_exit: int | None = None
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    kills_planned: int = 0
    kills_skipped: int = 0      # planned kills that could not happen inside the kill window
    restarts: int = 0
    client_exits: dict[str, int | None] = field(default_factory=dict)
    wall_s: float = 0.0
    fd_kinds_round10: dict[str, int] = field(default_factory=dict)
    fd_kinds_last: dict[str, int] = field(default_factory=dict)
    log_counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    # ---- figures

    def sample_at(self, round_index: int) -> Sample | None:
        """The first sample taken once round_index was committed."""
        return next((s for s in self.samples if s.round >= round_index), None)

    @property
    def last_sample(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    @property
    def warmup(self) -> Sample | None:
        return self.sample_at(min(WARMUP_ROUND, self.rounds))

    def final_window(self) -> list[Sample]:
        """Samples of the last FINAL_WINDOW rounds (after warm-up). The very last sample may come after the
        clients were told the run is over and closed their connections; the window still has them."""
        first = self.warmup
        start = max(first.round if first else 0, self.rounds - FINAL_WINDOW + 1)
        return [s for s in self.samples if s.round >= start]

    def peak(self, attribute: str) -> int | None:
        """Largest value over the final window."""
        return max((getattr(s, attribute) for s in self.final_window()), default=None)

    def growth(self, attribute: str, peak: bool = False) -> float | None:
        """From warm-up to the last round (peak=True: to the largest value over the final window)."""
        first, last = self.warmup, self.last_sample
        value = self.peak(attribute) if peak else (getattr(last, attribute) if last else None)
        if first is None or value is None or getattr(first, attribute) == 0:
            return None
        return value / getattr(first, attribute) - 1.0

    # ---- checks

    @property
    def completed(self) -> bool:
        return (self.coordinator_exit == 0 and self.summary.get("status") == "completed"
                and self.summary.get("rounds_completed") == self.rounds
                and [m.get("round") for m in self.metrics] == list(range(1, self.rounds + 1)))

    def participant_problems(self) -> list[str]:
        problems = []
        for line in self.metrics:
            participants, sampled = line.get("participants", []), line.get("sampled", [])
            if not participants:
                problems.append(f"round {line.get('round')}: no participants")
            if len(set(participants)) != len(participants):
                problems.append(f"round {line.get('round')}: repeated participants {participants}")
            if not set(participants) <= set(sampled):
                problems.append(f"round {line.get('round')}: participants {participants} not within sampled {sampled}")
            partitions = line.get("partitions", [])
            if len(set(partitions)) != len(partitions):
                problems.append(f"round {line.get('round')}: repeated partitions {partitions}")
        return problems

    @property
    def participants_ok(self) -> bool:
        return bool(self.metrics) and not self.participant_problems()

    @property
    def comebacks_ok(self) -> bool:
        return all(kill.back_round is not None for kill in self.kills)

    @property
    def clients_ok(self) -> bool:
        return bool(self.client_exits) and all(code == 0 for code in self.client_exits.values())

    @property
    def rss_ok(self) -> bool:
        growths = [self.growth("rss_kb"), self.growth("rss_kb", peak=True)]
        return None not in growths and max(growths) < GROWTH_TARGET

    def fd_allowance(self) -> float | None:
        """Descriptors allowed over the final window: the warm-up count, plus one socket for each client that was
        down at warm-up (restarting), plus 10%."""
        first = self.warmup
        return None if first is None else (first.fds + first.clients_down) * (1.0 + GROWTH_TARGET)

    @property
    def fds_ok(self) -> bool:
        allowed, peak = self.fd_allowance(), self.peak("fds")
        return allowed is not None and peak is not None and peak <= allowed

    def failures(self) -> list[str]:
        checks = {
            "the run did not complete every round (coordinator exit, summary.json, metrics.jsonl)": self.completed,
            "participants not distinct or not within sampled: " + "; ".join(self.participant_problems()[:3]):
                self.participants_ok,
            "a killed client never took part again": self.comebacks_ok,
            "a client process did not exit 0: " + json.dumps(self.client_exits): self.clients_ok,
            f"coordinator RSS grew {_pct(self.growth('rss_kb'))} to the last round, "
            f"{_pct(self.growth('rss_kb', peak=True))} to the final window's peak (target < 10%)": self.rss_ok,
            f"coordinator descriptors peaked at {self.peak('fds')} over the final window, above "
            f"{self.fd_allowance()} (warm-up count plus clients down then, plus 10%)": self.fds_ok,
        }
        failed = [what for what, ok in checks.items() if not ok]
        if self.kills_skipped:
            failed.append(f"{self.kills_skipped} planned kill(s) found no time inside the kill window")
        if self.error:
            failed.insert(0, self.error)
        return failed

    def figures(self) -> dict:
        first, last = self.warmup, self.last_sample
        mb = lambda s: round(s.rss_kb / 1024, 1) if s else None      # noqa: E731
        retried = [m["round"] for m in self.metrics if m.get("attempt", 0) > 0]
        return {
            "rounds": self.rounds, "clients": self.clients, "seed": self.seed,
            "rounds_completed": self.summary.get("rounds_completed", len(self.metrics)),
            "kills": len(self.kills), "kills_planned": self.kills_planned, "restarts": self.restarts,
            "kill_rounds": [k.at_round for k in self.kills], "back_rounds": [k.back_round for k in self.kills],
            "warmup_round": first.round if first else None, "last_round": last.round if last else None,
            "rss_mb_round10": mb(first), "rss_mb_last": mb(last), "rss_growth": _round(self.growth("rss_kb")),
            "rss_mb_peak_final": round(self.peak("rss_kb") / 1024, 1) if self.peak("rss_kb") else None,
            "rss_growth_peak_final": _round(self.growth("rss_kb", peak=True)),
            "rss_mb_max_after_warmup": max((round(s.rss_kb / 1024, 1) for s in self.samples
                                            if first and s.round >= first.round), default=None),
            "fds_round10": first.fds if first else None, "fds_last": last.fds if last else None,
            "fd_growth": _round(self.growth("fds")), "fds_peak_final": self.peak("fds"),
            "fd_growth_peak_final": _round(self.growth("fds", peak=True)),
            "clients_down_round10": first.clients_down if first else None,
            "fds_max_after_warmup": max((s.fds for s in self.samples if first and s.round >= first.round), default=None),
            "threads_round10": first.threads if first else None, "threads_last": last.threads if last else None,
            "fd_kinds_round10": self.fd_kinds_round10, "fd_kinds_last": self.fd_kinds_last,
            "retried_rounds": retried, "coordinator_log": self.log_counts,
            "wall_s": round(self.wall_s, 1), "completed": self.completed, "participants_ok": self.participants_ok,
            "comebacks_ok": self.comebacks_ok, "clients_ok": self.clients_ok,
            "rss_ok": self.rss_ok, "fds_ok": self.fds_ok, "ok": not self.failures(),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


# ------------------------------------------------------------------ /proc


def process_sample(pid: int, round_index: int, started: float) -> Sample | None:
    """VmRSS, open descriptors and threads of a live process; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:                   # a zombie has no memory lines
        return None
    return Sample(round=round_index, seconds=round(time.monotonic() - started, 2),
                  rss_kb=int(fields["VmRSS"].split()[0]), fds=fds, threads=int(fields["Threads"].split()[0]))


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by kind (socket, pipe, anon_inode:..., file, /dev/...), to explain a growth."""
    kinds: Counter[str] = Counter()
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return {}
    for entry in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{entry}")
        except OSError:
            continue
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":")[0]] += 1
        elif target.startswith("anon_inode:"):
            kinds[target.split("[")[0]] += 1
        elif target.startswith("/dev/"):
            kinds[target] += 1
        else:
            kinds["file"] += 1
    return dict(sorted(kinds.items()))


class MetricsTail:
    """New lines of metrics.jsonl, read incrementally (only complete lines)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines = path, 0, []

    def poll(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        new = [json.loads(line) for line in chunk[:end].decode().splitlines() if line.strip()]
        self.lines.extend(new)
        return new


# ------------------------------------------------------------------ the soak


def plan_kills(rng: random.Random, kills: int, first: int, last: int) -> list[int]:
    """Distinct rounds in [first, last] after which a client is killed, drawn by rng, sorted."""
    window = list(range(max(1, first), last + 1))
    return sorted(rng.sample(window, min(kills, len(window))))


def default_kill_window(rounds: int) -> tuple[int, int]:
    """Kills after warm-up on long runs, the last one leaving a fifth of the run to come back."""
    if rounds < 100:                       # short runs (tests, --quick): kills early, two thirds left to come back
        return 3, max(3, rounds // 3)
    return WARMUP_ROUND + 1, rounds - max(15, rounds // 5)


def run_soak(rounds: int = 300, clients: int = 4, kills: int | None = None, seed: int = 0,
             workdir: str | Path | None = None, model_dir: str | None = None, max_local_steps: int = 2,
             kill_window: tuple[int, int] | None = None, timeout_s: float | None = None,
             progress: Callable[[str], None] | None = print, progress_every: int = 10,
             **config_overrides) -> SoakResult:
    """Run the soak and return what it measured (checks: SoakResult.failures()).

    kills: how many clients to kill (default rounds // 20); kill_window: (first, last) rounds where a
    kill may happen (default_kill_window); timeout_s: the whole run's limit (default 60 s + 6 s a round).
    Every process started here is killed before returning, whatever happens.
    """
    if clients < 2:
        raise ValueError("a soak needs at least 2 clients (one stays up while another restarts)")
    kills = max(1, rounds // 20) if kills is None else kills
    first, last = kill_window or default_kill_window(rounds)
    rng = random.Random(seed)
    plan = plan_kills(rng, kills, first, last)
    timeout_s = timeout_s if timeout_s is not None else 60.0 + 6.0 * rounds
    say = progress or (lambda _line: None)

    workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        from common.tiny_models import create_tiny_bert

        model_dir = create_tiny_bert(workdir / "tiny-bert", num_labels=5, seed=0)
    config = soak_config(model_dir, rounds, clients, max_local_steps=max_local_steps, **config_overrides)
    result = SoakResult(rounds=rounds, clients=clients, seed=seed, workdir=str(workdir), kills_planned=len(plan))
    say(f"soak: {rounds} rounds, {clients} clients, kills planned after rounds {plan} "
        f"(window {first}..{last}), seed {seed}, work directory {workdir}")

    started = time.monotonic()
    with Federation(workdir, config) as federation:
        try:
            _drive(federation, result, plan, last, rng, started, timeout_s, say, progress_every)
        except Exception as error:      # the figures so far still come back; failures() names the error
            result.error = f"{type(error).__name__}: {error}"
        finally:
            result.wall_s = time.monotonic() - started
            if federation.coordinator is not None and federation.coordinator.poll() is not None:
                result.coordinator_exit = federation.coordinator.returncode
            for index, process in sorted(federation.clients.items()):
                try:       # once the run is over the clients are told on their next poll or heartbeat
                    wait_s = 30 if result.coordinator_exit is not None else 0.1
                    result.client_exits[f"client-{index}"] = process.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    result.client_exits[f"client-{index}"] = None
            result.log_counts = _log_counts(federation.log("coordinator.log"))
            summary_path = federation.run_dir / "summary.json"
            if summary_path.exists():
                result.summary = json.loads(summary_path.read_text())
    return result


def _drive(federation: Federation, result: SoakResult, plan: list[int], kill_until: int, rng: random.Random,
           started: float, timeout_s: float, say: Callable[[str], None], progress_every: int) -> None:
    federation.start_coordinator()
    federation.wait_address()
    coordinator = federation.coordinator
    assert coordinator is not None
    for index in range(result.clients):
        federation.start_client(index)
    tail = MetricsTail(federation.run_dir / "metrics.jsonl")
    result.metrics = tail.lines
    pending: dict[int, Kill] = {}          # killed clients that have not taken part again yet
    next_kill = 0
    deadline = time.monotonic() + timeout_s
    last_reported = 0
    while True:
        new = tail.poll()
        committed = len(tail.lines)
        exited = coordinator.poll() is not None
        if new:
            for line in new:
                for index, kill in list(pending.items()):
                    if line["round"] >= kill.after_round + 2 and kill.name in line.get("participants", []):
                        kill.back_round = line["round"]
                        del pending[index]
            sample = process_sample(coordinator.pid, committed, started)
            if sample is not None:
                sample.clients_down = len(pending)
                result.samples.append(sample)
                if not result.fd_kinds_round10 and committed >= min(WARMUP_ROUND, result.rounds):
                    result.fd_kinds_round10 = fd_kinds(coordinator.pid)
                if committed < result.rounds:          # before the clients are told the run is over
                    result.fd_kinds_last = fd_kinds(coordinator.pid) or result.fd_kinds_last
            if committed - last_reported >= progress_every or committed == result.rounds:
                last_reported = committed
                shown = result.samples[-1] if result.samples else None
                say(f"round {committed:4d}/{result.rounds}  rss {shown.rss_kb / 1024 if shown else 0:7.1f} MB  "
                    f"fds {shown.fds if shown else '?':>4}  threads {shown.threads if shown else '?':>3}  "
                    f"kills {len(result.kills)}  back {sum(k.back_round is not None for k in result.kills)}  "
                    f"{time.monotonic() - started:6.1f}s")
        if exited:
            result.coordinator_exit = coordinator.returncode
            tail.poll()
            return
        if next_kill < len(plan) and committed >= plan[next_kill] and committed < result.rounds:
            if committed > kill_until:
                result.kills_skipped = len(plan) - next_kill
                say(f"round {committed}: {result.kills_skipped} kill(s) left but the kill window ended at "
                    f"round {kill_until} (the earlier victims were slow to come back)")
                next_kill = len(plan)
            elif len(pending) < result.clients - 1:            # one client at least stays up
                index = rng.choice(sorted(set(federation.clients) - set(pending)))
                federation.signal_client(index, signal.SIGKILL)
                federation.clients[index].wait()
                tail.poll()
                kill = Kill(client=index, name=f"client-{index}", planned_round=plan[next_kill],
                            at_round=committed, after_round=len(tail.lines))
                federation.start_client(index)             # same --name: it rejoins with its partition
                result.kills.append(kill)
                result.restarts += 1
                pending[index] = kill
                next_kill += 1
                say(f"round {committed}: killed client-{index} (kill -9) and restarted it")
        for index, process in federation.clients.items():
            if process.poll() is not None and coordinator.poll() is None and len(tail.lines) < result.rounds:
                raise RuntimeError(f"client-{index} exited ({process.returncode}) while the run went on:\n"
                                   + federation.log(f"client-{index}.log")[-2000:])
        if time.monotonic() > deadline:
            raise TimeoutError(f"the soak ran past {timeout_s:.0f}s at round {committed}/{result.rounds}\n"
                               + federation.log("coordinator.log")[-3000:])
        time.sleep(POLL_S)


def _log_counts(log: str) -> dict[str, int]:
    """What the coordinator's log says about faults: drops by reason, retries, rejections, errors."""
    counts: Counter[str] = Counter()
    for line in log.splitlines():
        if ": dropped " in line:
            reason = line.split(": dropped ", 1)[1].split(": ", 1)[-1]
            counts["dropped: " + reason.split(" (")[0]] += 1
        elif "retrying with a fresh sample" in line:
            counts["round retried below quorum"] += 1
        elif "rejected:" in line:
            counts["rejected: " + line.split("rejected:", 1)[1].strip()[:60]] += 1
        elif " joined (partition" in line:
            counts["joins"] += 1
        if "Traceback" in line:
            counts["tracebacks"] += 1
        if " ERROR " in line or line.startswith("ERROR"):
            counts["ERROR lines"] += 1
    return dict(sorted(counts.items()))


# ------------------------------------------------------------------ command line


def print_table(result: SoakResult, figures: dict) -> None:
    first, last = result.warmup, result.last_sample
    window = result.final_window()
    span = f"{window[0].round}-{window[-1].round}" if window else "?"
    print()
    print(f"| coordinator | round {first.round if first else '?'} (warm-up) | round {last.round if last else '?'} (last) "
          f"| growth | peak over rounds {span} | growth | target |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(f"| RSS | {figures['rss_mb_round10']} MB | {figures['rss_mb_last']} MB | {_pct(figures['rss_growth'])} "
          f"| {figures['rss_mb_peak_final']} MB | {_pct(figures['rss_growth_peak_final'])} | < +10% |")
    print(f"| open file descriptors | {figures['fds_round10']} | {figures['fds_last']} | {_pct(figures['fd_growth'])} "
          f"| {figures['fds_peak_final']} | {_pct(figures['fd_growth_peak_final'])} | < +10% |")
    print(f"| threads | {figures['threads_round10']} | {figures['threads_last']} | | | | |")
    print()
    print(f"rounds completed      {figures['rounds_completed']} of {result.rounds} "
          f"(coordinator exit {result.coordinator_exit}, status {result.summary.get('status')})")
    print(f"kills / restarts      {figures['kills']} / {figures['restarts']} (planned {figures['kills_planned']}); "
          f"killed after rounds {figures['kill_rounds']}, back in rounds {figures['back_rounds']}")
    print(f"participants          {'distinct and sampled in every round' if result.participants_ok else 'PROBLEM'}")
    print(f"retried rounds        {figures['retried_rounds'] or 'none'}")
    print(f"clients down          {figures['clients_down_round10']} at warm-up")
    print(f"max after warm-up     RSS {figures['rss_mb_max_after_warmup']} MB, fds {figures['fds_max_after_warmup']}")
    print(f"descriptors by kind   round {first.round if first else '?'}: {figures['fd_kinds_round10']}; "
          f"round {result.rounds - 1}: {figures['fd_kinds_last']}")
    print(f"coordinator log       {figures['coordinator_log']}")
    print(f"client exit codes     {result.client_exits}")
    print(f"wall time             {figures['wall_s']} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 300; 30 with --quick)")
    parser.add_argument("--clients", type=int, default=None, help="client processes (default 4; 3 with --quick)")
    parser.add_argument("--kills", type=int, default=None, help="clients to kill (default rounds/20; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a short run: 30 rounds, 3 clients, 2 kills")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (default 0)")
    parser.add_argument("--max-local-steps", type=int, default=None,
                        help="local steps per round (default 2; 15 with --quick: rounds of about a second, so a "
                             "restarted client has rounds left to come back)")
    parser.add_argument("--out", default=None, help="also write the figures and every sample to this JSON file")
    parser.add_argument("--workdir", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (kept anyway on failure)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (30 if args.quick else 300)
    clients = args.clients or (3 if args.quick else 4)
    kills = args.kills if args.kills is not None else (2 if args.quick else None)

    # A SIGTERM ends the soak through the same cleanup as a failure (every process it started is killed).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run_soak(rounds=rounds, clients=clients, kills=kills, seed=args.seed, workdir=args.workdir,
                      max_local_steps=args.max_local_steps or (QUICK_LOCAL_STEPS if args.quick else 2))
    figures = result.figures()
    print_table(result, figures)
    failures = result.failures()
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps({**figures, "samples": [asdict(s) for s in result.samples],
                                              "kills_detail": [asdict(k) for k in result.kills]}, indent=1) + "\n")
    if failures or args.keep or args.workdir:
        print(f"work directory kept: {result.workdir}")
    else:
        shutil.rmtree(result.workdir, ignore_errors=True)
    print(json.dumps(figures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
