"""Command line of the coordinator: ``python -m server --config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, parse_overrides


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Run the federated LoRA coordinator: it waits for num_clients clients, samples them each "
                    "round, aggregates their LoRA factors and evaluates the global adapter.",
        epilog="Example: python -m server --config configs/minilm_bbc.yaml --address 0.0.0.0:50051 "
               "method=fedavg num_rounds=5",
    )
    parser.add_argument("--config", help="flat YAML run configuration (see configs/); defaults if omitted")
    parser.add_argument("--address", default="[::]:50051",
                        help="host:port to listen on; port 0 picks a free port (default: [::]:50051)")
    parser.add_argument("--run-dir", help="where outputs go (default: runs/<time>-<method>)")
    parser.add_argument("--address-file", help="write the bound host:port to this file once listening")
    parser.add_argument("--wait-for-clients", type=float, default=600.0, metavar="SECONDS",
                        help="give up if num_clients have not joined within this time (default: 600)")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. num_rounds=5")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = RunConfig.load(args.config, parse_overrides(args.overrides))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = args.run_dir or str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.federation.method}")
    from server.app import serve   # heavy imports after argument checks, so --help stays fast

    summary = serve(config, run_dir, args.address, args.address_file, args.wait_for_clients)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
