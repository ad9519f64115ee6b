"""Command line of the coordinator: ``python -m server --config FILE [key=value ...]``, and
``python -m server status --coordinator HOST:PORT`` to ask a running one how its run is going."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, keys_help_text, parse_overrides
from common.devices import device_problem, log_level


EXIT_CODES = {"completed": 0, "stopped": 0, "quorum_lost": 1}
"""A run stopped by the operator (SIGTERM) ended as asked; one that lost its quorum failed."""


def _method_names() -> tuple[str, ...]:
    from common.methods import method_names   # the registry (imports torch): the one list of methods

    return method_names()


def parse_args(argv: list[str]) -> argparse.Namespace:
    epilog = textwrap.fill(
        "Methods (method=NAME, common/methods/): " + ", ".join(_method_names()) + ". "
        "Example: python -m server --config configs/minilm_bbc.yaml --address 0.0.0.0:50051 "
        "method=fedavg num_rounds=5. A running coordinator's view of its clients: "
        "python -m server status --coordinator HOST:PORT [--json] (see python -m server status --help).", width=100)
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description=textwrap.fill("Run the federated LoRA coordinator: it waits for num_clients clients, samples "
                                  "them each round, aggregates their LoRA factors and evaluates the global adapter. "
                                  "A configuration error exits with 2, a failed run with 1.", width=100),
        epilog=epilog + "\n\n" + keys_help_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="flat YAML run configuration (see configs/); defaults if omitted")
    parser.add_argument("--address", default="[::]:50051",
                        help="host:port to listen on; port 0 picks a free port (default: [::]:50051)")
    parser.add_argument("--run-dir", help="where outputs go (default: the config's output_dir, else "
                                          "runs/<time>-<method>)")
    parser.add_argument("--address-file", help="write the bound host:port to this file once listening")
    parser.add_argument("--wait-for-clients", type=float, default=600.0, metavar="SECONDS",
                        help="give up if num_clients have not joined within this time (default: 600)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its last committed round")
    parser.add_argument("--token-file", help="require this shared token from clients (or set SUBSPACEFL_TOKEN)")
    parser.add_argument("--tls-cert", help="server certificate (PEM); enables TLS")
    parser.add_argument("--tls-key", help="server private key (PEM)")
    parser.add_argument("--tls-ca", help="CA (PEM) that signs client certificates; enables mutual TLS")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N: where the coordinator evaluates the global adapter (default: "
                             "cuda:0 when this host has a GPU, else cpu); keep it off the GPUs your clients train on")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="CPU threads for torch (aggregation, metrics, evaluation); on a machine whose cores "
                             "other processes keep busy, 1 avoids threads waiting on each other (default: torch's, "
                             "one per core)")
    parser.add_argument("--log-level", type=log_level, default="INFO",
                        help="debug, info, warning or error (default: info); debug also shows a failure's traceback")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_rounds=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:                 # python -m server status --coordinator HOST:PORT
        from server.status_cli import main as status_main

        return status_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RunConfig.load(args.config, parse_overrides(args.overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    problem = device_problem(args.device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.resume and not (args.run_dir or config.federation.output_dir):
        print("error: --resume needs --run-dir (the run to continue), or output_dir in the config", file=sys.stderr)
        return 2
    run_dir = args.run_dir or config.federation.output_dir or \
        str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.federation.method}")
    if args.threads is not None and args.threads < 1:
        print(f"error: --threads {args.threads}: give a positive number of threads", file=sys.stderr)
        return 2
    from server.app import serve   # heavy imports after argument checks, so --help stays fast

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from server.security import SecurityConfig

    try:
        token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get("SUBSPACEFL_TOKEN")
        security = SecurityConfig(token=token or None, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = serve(config, run_dir, args.address, args.address_file, args.wait_for_clients,
                        resume=args.resume, security=security, device=args.device)
    except ConfigError as error:   # refused run directory or resume
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:     # operational: too few clients joined, the address is taken, ...
        if args.log_level <= logging.DEBUG:
            raise
        print(f"error: {error} (run with --log-level debug for the traceback)", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return EXIT_CODES.get(summary.get("status", "completed"), 1)


if __name__ == "__main__":
    sys.exit(main())
