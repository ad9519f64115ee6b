"""Start a local federation on 127.0.0.1: one coordinator and N client processes.

    python -m scripts.local_federation --config configs/minilm_bbc.yaml [key=value ...]

Each process logs to <run-dir>/logs/; this launcher prints one line per round
and the run summary, and stops every process it started, whatever happens.

With --nproc-per-client N every client is a torchrun job of N processes (one client,
N ranks training with DDP; client/distributed.py); with --devices the devices are
taken N at a time, e.g. --nproc-per-client 2 --devices cuda:0,cuda:1,cuda:2,cuda:3
puts client 0 on cuda:0,1 and client 1 on cuda:2,3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import ConfigError, RunConfig, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
_SHIPPED = Path(__file__).resolve().parent / "configs"
CONFIGS = _SHIPPED if _SHIPPED.is_dir() else ROOT / "configs"
"""configs/ of this checkout; installed (pip install .), the copy shipped as scripts/configs/."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.local_federation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None,
                        help="run configuration (flat YAML; default: configs/minilm_bbc.yaml, which an installed "
                             "package ships as scripts/configs/minilm_bbc.yaml)")
    parser.add_argument("--run-dir", help="output directory (default: runs/<time>-<method>)")
    parser.add_argument("--tiny-model", action="store_true",
                        help="use a tiny randomly initialised BERT created on the fly (smoke tests)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="stop everything after this many seconds")
    parser.add_argument("--devices", type=parse_devices, default=None, metavar="DEV1,DEV2",
                        help="spread the clients over these devices: client i trains on the (i mod n)-th, "
                             "e.g. cuda:0,cuda:1 (default: every client on the client's default device, cpu)")
    parser.add_argument("--nproc-per-client", type=_positive_int, default=1, metavar="N",
                        help="start each client as a torchrun job of N processes (ranks) training with DDP; the "
                             "global batch is per_device_train_batch_size x N (default: 1, a plain process)")
    parser.add_argument("--status-every", type=int, default=0, metavar="N",
                        help="print the coordinator's status table (python -m server status) every N rounds "
                             "(default: 0, only on SIGUSR1: kill -USR1 <launcher pid>)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method=fedavg")
    return parser.parse_args(argv)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive whole number of processes, e.g. 2")
    return value


def parse_devices(text: str) -> list[str]:
    devices = [item.strip() for item in text.split(",")]
    if not devices or any(not item for item in devices):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated devices, e.g. cuda:0,cuda:1")
    return devices


def client_device_args(index: int, devices: list[str] | None) -> list[str]:
    """Round-robin over the given devices, as scripts/gpu_reference.sh does; none given: the client's default."""
    return ["--device", devices[index % len(devices)]] if devices else []


def device_groups(devices: list[str], nproc: int) -> list[list[str]]:
    """The devices taken ``nproc`` at a time, one group per torchrun client (clients take groups round-robin);
    a group is all CPU, or numbered GPUs (cuda:N), each listed once."""
    if len(devices) % nproc:
        raise ValueError(f"--devices lists {len(devices)} devices, which do not split into groups of "
                         f"--nproc-per-client {nproc}: list a multiple of {nproc}")
    groups = [devices[start:start + nproc] for start in range(0, len(devices), nproc)]
    for group in groups:
        if all(device == "cpu" for device in group):
            continue
        if not all(device.startswith("cuda:") and device[5:].isdigit() for device in group):
            raise ValueError(f"--devices group {','.join(group)}: a torchrun client's devices are all cpu or all "
                             f"numbered GPUs (cuda:0,cuda:1)")
        if len(set(group)) != len(group):
            raise ValueError(f"--devices group {','.join(group)} names a GPU twice: each rank needs its own GPU")
    return groups


def torchrun_command(nproc: int, job_id: str) -> list[str]:
    """``python -m torch.distributed.run`` (torchrun) for one client of ``nproc`` ranks on this host: what
    --standalone does (a c10d rendezvous on a free port), with the endpoint named 127.0.0.1 rather than
    localhost, so the job stays on loopback whatever localhost resolves to."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", job_id,
            "--local-addr", "127.0.0.1"]


def client_launch(index: int, address: str, devices: list[str] | None, nproc: int,
                  environ: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Client ``index``'s command line and environment: a plain process, or a torchrun job whose GPUs are
    chosen with CUDA_VISIBLE_DEVICES (rank r trains on the r-th of them, --device cuda)."""
    identity = ["--coordinator", address, "--name", f"client-{index}", "--partition", str(index)]
    if nproc == 1:
        return [sys.executable, "-m", "client", *identity, *client_device_args(index, devices)], dict(environ)
    env = dict(environ)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")     # the ranks talk over loopback, like everything here
    device_args: list[str] = []
    if devices:
        groups = device_groups(devices, nproc)
        group = groups[index % len(groups)]
        if group[0] == "cpu":
            device_args = ["--device", "cpu"]
        else:
            # cuda:N counts the GPUs this launcher sees: map through its own CUDA_VISIBLE_DEVICES, if set.
            visible = [item for item in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if item.strip()]
            indices = [int(device[5:]) for device in group]
            if visible and max(indices) >= len(visible):
                raise ValueError(f"--devices {','.join(group)}: CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
                                 f" shows only {len(visible)} GPU(s)")
            env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in indices)
            device_args = ["--device", "cuda"]
    return [*torchrun_command(nproc, f"client-{index}"), "-m", "client", *identity, *device_args], env


def _fmt(value, spec: str = ".4f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "  n/a "


def format_round(line: dict) -> str:
    return (f"round {line['round']:>3}  acc {_fmt(line.get('accuracy'))}  loss {_fmt(line.get('loss'))}  "
            f"overlap {_fmt(line.get('basis_overlap'), '.5f')}  cancel {_fmt(line.get('cancellation_ratio'))}  "
            f"down {line.get('bytes_down', 0) / 1e6:6.2f} MB  up {line.get('bytes_up', 0) / 1e6:6.2f} MB  "
            f"{line.get('round_seconds', 0.0):5.1f} s  clients {','.join(str(p) for p in line.get('partitions', []))}")


def print_status(address: str) -> None:
    """The coordinator's own view (its Status RPC), as ``python -m server status`` prints it."""
    import grpc

    from server.status import format_status
    from server.status_cli import fetch_status, parse_args as status_args

    try:
        print(format_status(fetch_status(status_args(["--coordinator", address, "--timeout", "5"]))), flush=True)
    except grpc.RpcError as error:
        print(f"status: no answer from {address}: {error.code().name}", file=sys.stderr, flush=True)


def _start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log_path, "w")
    return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)


def _stop_all(processes: list[subprocess.Popen], grace_s: float = 5.0) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        overrides = parse_overrides(args.overrides)
        # Absolute paths: the coordinator and the clients run in ROOT, not in this process's directory.
        config_path = Path(args.config or CONFIGS / "minilm_bbc.yaml").absolute()
        config = RunConfig.load(config_path, overrides)
        if args.devices and args.nproc_per_client > 1:
            device_groups(args.devices, args.nproc_per_client)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{config.federation.method}"
                   ).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny_model:
        from common.tiny_models import create_tiny_bert

        overrides["model_name"] = create_tiny_bert(run_dir / "tiny_model", num_labels=5,
                                                   seed=config.federation.seed)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    address_file = run_dir / "coordinator.address"
    address_file.unlink(missing_ok=True)
    override_args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    coordinator = _start([sys.executable, "-m", "server", "--config", str(config_path), "--address", "127.0.0.1:0",
                          "--run-dir", str(run_dir), "--address-file", str(address_file), *override_args],
                         run_dir / "logs" / "coordinator.log", env)
    processes = [coordinator]
    num_clients = config.data.num_clients
    print(f"run directory {run_dir}\nmethod {config.federation.method}, {config.federation.num_rounds} rounds, "
          f"{num_clients} clients, model {overrides.get('model_name', config.model.model_name)}", flush=True)
    try:
        deadline = time.monotonic() + args.timeout
        while not address_file.exists():
            if coordinator.poll() is not None:
                print(f"coordinator exited early (code {coordinator.returncode}); see {run_dir}/logs/coordinator.log",
                      file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                raise TimeoutError("the coordinator did not start listening in time")
            time.sleep(0.2)
        address = address_file.read_text().strip()
        spread = f" over {','.join(args.devices)}" if args.devices else ""
        ranks = f" of {args.nproc_per_client} ranks each (torchrun)" if args.nproc_per_client > 1 else ""
        print(f"coordinator on {address}; starting {num_clients} clients{ranks}{spread} (logs in {run_dir}/logs/)",
              flush=True)
        for index in range(num_clients):
            command, client_env = client_launch(index, address, args.devices, args.nproc_per_client, env)
            processes.append(_start(command, run_dir / "logs" / f"client-{index}.log", client_env))
        printed = 0
        wanted = []                                            # SIGUSR1: print the status table once
        signal.signal(signal.SIGUSR1, lambda *_: wanted.append(True))
        print(f"status: kill -USR1 {os.getpid()} (or python -m server status --coordinator {address})", flush=True)
        reported_exits: set[int] = set()
        metrics_path = run_dir / "metrics.jsonl"
        while True:
            if metrics_path.exists():
                lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
                for line in lines[printed:]:
                    record = json.loads(line)
                    print(format_round(record), flush=True)
                    if args.status_every > 0 and record["round"] % args.status_every == 0:
                        wanted.append(True)
                printed = len(lines)
            if wanted:
                wanted.clear()
                print_status(address)
            if coordinator.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run did not finish within {args.timeout:.0f}s")
            for index, process in enumerate(processes[1:]):
                if index not in reported_exits and process.poll() not in (None, 0):
                    reported_exits.add(index)
                    print(f"warning: client-{index} exited with code {process.returncode}; "
                          f"see {run_dir}/logs/client-{index}.log", file=sys.stderr)
            time.sleep(0.5)
        if coordinator.returncode != 0:
            print(f"coordinator failed (code {coordinator.returncode}); see {run_dir}/logs/coordinator.log",
                  file=sys.stderr)
            return coordinator.returncode or 1
        for process in processes[1:]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        summary = json.loads((run_dir / "summary.json").read_text())
        print("summary " + json.dumps(summary, indent=2), flush=True)
        print(run_dir, flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping the federation", file=sys.stderr)
        return 130
    finally:
        _stop_all(processes)


if __name__ == "__main__":
    sys.exit(main())
