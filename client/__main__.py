"""Command line of a client: ``python -m client --coordinator HOST:PORT``."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from common.devices import device_problem, log_level


def _positive_rank(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rank {text}: a LoRA rank is a positive integer")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Run one federated LoRA client: it joins the coordinator, receives the run configuration "
                    "and its data partition, then trains locally whenever it is sampled, until the run is over.",
        epilog="Example: python -m client --coordinator coordinator.example:50051 --name gpu-host-1 --device cuda:0. "
               "One client on 4 GPUs (rank 0 speaks to the coordinator, every rank trains with DDP): "
               "torchrun --standalone --nproc-per-node 4 -m client --coordinator coordinator.example:50051 "
               "--name gpu-host-1 --device cuda",
    )
    parser.add_argument("--coordinator", required=True, help="host:port of the coordinator")
    parser.add_argument("--name", default=None,
                        help="stable client name; rejoining under it keeps the partition (default: hostname-pid)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (default: cpu)")
    parser.add_argument("--data", default=None,
                        help="train on this local csv/json/jsonl/parquet file instead of a partition of the run's data")
    parser.add_argument("--partition", type=int, default=-1,
                        help="ask for this partition index (default: the coordinator assigns one)")
    parser.add_argument("--rank", type=_positive_rank, default=0, metavar="R",
                        help="train at LoRA rank R (heterogeneous ranks; at most the run's lora_rank; "
                             "default: the rank the run gives this client, client_ranks or lora_rank)")
    parser.add_argument("--patience", type=float, default=300.0, metavar="SECONDS",
                        help="exit if the coordinator stays unreachable this long (default: 300)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: from the run config)")
    parser.add_argument("--save-received", default=None, metavar="DIR",
                        help="debugging: save every received task's tensors under DIR")
    parser.add_argument("--token-file", help="the coordinator's shared token (or set SUBSPACEFL_TOKEN)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signed the coordinator's certificate; enables TLS")
    parser.add_argument("--tls-cert", help="this client's certificate (PEM), for mutual TLS")
    parser.add_argument("--tls-key", help="this client's private key (PEM), for mutual TLS")
    parser.add_argument("--allow-insecure-token", action="store_true",
                        help="send the token without TLS to a coordinator that is not on loopback; acceptable only "
                             "on a private network that no one else can reach, such as the compose network on one "
                             "host (default: refuse, exit 2)")
    parser.add_argument("--dist-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="under torchrun (one client as several processes): how long a rank waits in a "
                             "collective for the others before the whole client stops (default: 300)")
    parser.add_argument("--bench-echo", action="store_true",
                        help="benchmark only: load no model and no data, and answer each task with the received "
                             "factors slightly perturbed (client/bench_echo.py); needs a run whose config sets "
                             "synthetic_layout (bench/round_overhead.py, bench/scale.py)")
    parser.add_argument("--log-level", type=log_level, default="INFO",
                        help="debug, info, warning or error (default: info); debug also shows a failure's traceback")
    args = parser.parse_args(argv)
    if args.bench_echo and args.data:
        parser.error("--bench-echo loads no data: drop --data")
    return args


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds, e.g. 300")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    name = args.name or f"{socket.gethostname()}-{os.getpid()}"
    from client.connection import ClientSetupError
    from client.distributed import TorchrunEnv

    try:
        torchrun = TorchrunEnv.from_environ(os.environ)
    except ClientSetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # Under torchrun every rank logs, to the same console: say which one speaks.
    who = name if torchrun is None else f"{name} rank {torchrun.rank}/{torchrun.world_size}"
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s [{who}] %(name)s: %(message)s")
    problem = device_problem(args.device)      # before joining: a bad device must not hold a partition
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from client.connection import ClientSecurity
    from client.distributed import DEFAULT_TIMEOUT_S
    from client.exit_codes import exit_code
    from client.runtime import ClientOptions, run_client

    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("SUBSPACEFL_TOKEN")
    security = ClientSecurity(token=token or None, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                              allow_insecure_token=args.allow_insecure_token)
    options = ClientOptions(coordinator=args.coordinator, name=name, device=args.device, data=args.data,
                            partition=args.partition, patience_s=args.patience, save_received=args.save_received,
                            threads=args.threads, rank=args.rank, security=security,
                            dist_timeout_s=args.dist_timeout or DEFAULT_TIMEOUT_S, bench_echo=args.bench_echo)
    logger = logging.getLogger("client")
    try:
        return run_client(options)
    except ClientSetupError as error:     # a token without TLS, unreadable certificate files, a bad torchrun setup
        print(f"error: {error}", file=sys.stderr)
        return exit_code(error)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        code = exit_code(error)
        if code == 1 and args.log_level <= logging.DEBUG:      # unexpected: the traceback says where
            raise
        if code == 1:
            logger.error("%s: %s (run with --log-level debug for the traceback)", type(error).__name__, error)
            return code
        logger.error("%s", error)         # CoordinatorGone, NotAuthenticated, RunChanged, JoinRefused, bad tasks
        return code


if __name__ == "__main__":
    sys.exit(main())
