"""Command line of the coordinator: ``python -m server --config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, parse_overrides


EXIT_CODES = {"completed": 0, "stopped": 0, "quorum_lost": 1}
"""A run stopped by the operator (SIGTERM) ended as asked; one that lost its quorum failed."""


def _method_names() -> tuple[str, ...]:
    from common.methods import method_names   # the registry (imports torch): the one list of methods

    return method_names()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Run the federated LoRA coordinator: it waits for num_clients clients, samples them each "
                    "round, aggregates their LoRA factors and evaluates the global adapter.",
        epilog="Methods (method=NAME, common/methods/): " + ", ".join(_method_names()) + ". "
               "Example: python -m server --config configs/minilm_bbc.yaml --address 0.0.0.0:50051 "
               "method=fedavg num_rounds=5",
    )
    parser.add_argument("--config", help="flat YAML run configuration (see configs/); defaults if omitted")
    parser.add_argument("--address", default="[::]:50051",
                        help="host:port to listen on; port 0 picks a free port (default: [::]:50051)")
    parser.add_argument("--run-dir", help="where outputs go (default: runs/<time>-<method>)")
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
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_rounds=5")
    return parser.parse_args(argv)


def check_device(device: str | None) -> str | None:
    """What is wrong with ``--device`` on this host, or None."""
    if device is None or device == "cpu":
        return None
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        return f"--device {device}: use cpu, cuda or cuda:N"
    import torch

    if not torch.cuda.is_available():
        return f"--device {device} but CUDA is not available here; use --device cpu"
    if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
        return f"--device {device} but this host has {torch.cuda.device_count()} GPU(s): cuda:0..cuda:" \
               f"{torch.cuda.device_count() - 1}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RunConfig.load(args.config, parse_overrides(args.overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device_problem = check_device(args.device)
    if device_problem:
        print(f"error: {device_problem}", file=sys.stderr)
        return 2
    if args.resume and not args.run_dir:
        print("error: --resume needs --run-dir (the run to continue)", file=sys.stderr)
        return 2
    run_dir = args.run_dir or str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.federation.method}")
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
    print(json.dumps(summary, indent=2))
    return EXIT_CODES.get(summary.get("status", "completed"), 1)


if __name__ == "__main__":
    sys.exit(main())
