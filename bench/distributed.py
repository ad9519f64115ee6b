"""Local training throughput of a client as N torch.distributed ranks against one process, side by side.

    python -m bench.distributed              # MiniLM on BBC News, the default client's work (~3 min on 2 cores)
    python -m bench.distributed --quick      # fewer, shorter rounds (~1 min)
    python -m bench.distributed --ranks 4 --model minilm --steps 10 --rounds 3

The work is one client's local training as configs/minilm_bbc.yaml sets it (global batches of 16 rows,
max_length 64, subspace_reg's penalty, 10 steps a round), timed with LocalTrainer.train_round after a
warm-up round; the figure is examples per second (global batch x steps / round time), the median over
the timed rounds. No coordinator: only the training a round costs.

On CPU (gloo) the sides do the same work, the same global batches:
- one process with 1 torch thread (a client's default, torch_threads: 1);
- one process with N threads (the cores the N ranks use);
- N ranks (DDP over gloo), 1 thread each, per-rank batch 16 / N.
On a machine with CUDA GPUs it reports N-GPU scaling instead: one process on one GPU with per-device batch
16, then N ranks (NCCL, one GPU each, the same per-device batch, so N times the rows per step); scaling =
examples/s of N GPUs / examples/s of one. With one GPU only the single-GPU figure is reported.

Prints the machine (cores, load average), one line per side and, last, one JSON line with the figures.
Exits 0 with {"skipped": why} where it cannot run (no torch.distributed, no gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

GLOBAL_BATCH = 16


def _config(model: str, per_device_batch: int, steps: int, max_length: int):
    from common.config import RunConfig

    return RunConfig.load("configs/minilm_bbc.yaml", {
        "model_name": model, "per_device_train_batch_size": per_device_batch, "max_local_steps": steps,
        "max_length": max_length, "max_train_samples": 2000, "max_eval_samples": 40})


def _rows(config) -> tuple[list[dict], int]:
    from common.tasks import load_task_data

    data = load_task_data(config.data, seed=config.federation.seed)
    return data.train, len(data.label_names)


def _time_rounds(trainer, rounds: int) -> list[float]:
    """Seconds of each timed round, after one warm-up round (lazy initialisation, allocator, DDP buckets)."""
    start = trainer.built.get_adapter_state()
    seconds = []
    for round_index in range(rounds + 1):
        began = time.perf_counter()
        trainer.train_round(round_index + 1, dict(start), seed=round_index)
        if round_index:
            seconds.append(time.perf_counter() - began)
    return seconds


def run_single(model: str, batch: int, steps: int, max_length: int, rounds: int, threads: int,
               device: str) -> dict:
    from client.trainer import LocalTrainer

    torch.set_num_threads(threads)
    config = _config(model, batch, steps, max_length)
    rows, labels = _rows(config)
    trainer = LocalTrainer(config, rows, labels, device=device, show_progress=False)
    seconds = _time_rounds(trainer, rounds)
    return _figures(seconds, batch * steps)


def _rank_main(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    if spec["device"] == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from client.distributed import DataParallelGroup, TorchrunEnv, rank_device, start_process_group
    from client.trainer import LocalTrainer

    env = TorchrunEnv.from_environ(os.environ)
    device = rank_device(spec["device"], env)
    start_process_group(env, device, timeout_s=600)
    config = _config(spec["model"], spec["batch"], spec["steps"], spec["max_length"])
    rows, labels = _rows(config)
    trainer = LocalTrainer(config, rows, labels, device=device, show_progress=False,
                           group=DataParallelGroup(env, device))
    seconds = _time_rounds(trainer, spec["rounds"])
    if rank == 0:
        Path(out).write_text(json.dumps(seconds))


def run_ranks(model: str, ranks: int, batch: int, steps: int, max_length: int, rounds: int, device: str) -> dict:
    import torch.multiprocessing as mp

    from tests.integration.harness import free_port

    with tempfile.TemporaryDirectory() as work:
        out = str(Path(work) / "seconds.json")
        spec = {"model": model, "batch": batch, "steps": steps, "max_length": max_length, "rounds": rounds,
                "device": device}
        mp.spawn(_rank_main, args=(ranks, free_port(), spec, out), nprocs=ranks, join=True)
        seconds = json.loads(Path(out).read_text())
    return _figures(seconds, batch * ranks * steps)


def _figures(seconds: list[float], examples_per_round: int) -> dict:
    median = statistics.median(seconds)
    return {"examples_per_s": examples_per_round / median, "round_s": median, "rounds_s": seconds,
            "examples_per_round": examples_per_round}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _skip(reason: str) -> int:
    print(f"skipped: {reason}")
    print(json.dumps({"bench": "distributed", "skipped": reason}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps a round, 2 timed rounds, max_length 32")
    parser.add_argument("--ranks", type=int, default=None,
                        help="ranks of the distributed client (default: 2 on CPU, every GPU on a CUDA machine)")
    parser.add_argument("--model", default="minilm", help="model_name (default: minilm, the embedded MiniLM)")
    parser.add_argument("--steps", type=int, default=None, help="global batches per round (default 10; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per side (default 3; quick 2)")
    parser.add_argument("--cpu", action="store_true", help="the CPU comparison even where CUDA is available")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 3)
    max_length = 32 if args.quick else 64

    import torch.distributed as dist

    if not dist.is_available():
        return _skip("this torch build has no torch.distributed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and not args.cpu else 0
    if not gpus and not dist.is_gloo_available():
        return _skip("this torch build has no gloo backend for CPU ranks")
    ranks = args.ranks or (gpus if gpus else 2)
    if ranks < 2 and not gpus:
        return _skip(f"--ranks {ranks}: a distributed client has at least 2 ranks")

    cores = _cores()
    summary: dict[str, object] = {
        "bench": "distributed", "mode": "quick" if args.quick else "full", "model": args.model, "cores": cores,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "steps": steps,
        "timed_rounds": rounds, "max_length": max_length, "load_average_start": round(os.getloadavg()[0], 2),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"torch {torch.__version__}, {cores} cores ({summary['cpu']}), load average "
          f"{summary['load_average_start']}, {gpus} GPU(s); {args.model}, max_length {max_length}, "
          f"{steps} steps a round, median of {rounds} timed rounds after a warm-up")

    def line(label: str, figures: dict) -> None:
        print(f"{label:<34} {figures['examples_per_s']:8.1f} examples/s  ({figures['examples_per_round']} examples "
              f"in {figures['round_s']:.2f} s a round)", flush=True)

    if gpus:
        summary.update(backend="nccl", gpus=gpus, per_device_batch=GLOBAL_BATCH,
                       gpu_name=torch.cuda.get_device_name(0))
        single = run_single(args.model, GLOBAL_BATCH, steps, max_length, rounds, threads=1, device="cuda:0")
        line("1 GPU, batch 16", single)
        summary["one_gpu"] = single
        if ranks < 2:
            print("N-GPU scaling needs at least 2 GPUs; only the single-GPU figure is reported")
        else:
            many = run_ranks(args.model, ranks, GLOBAL_BATCH, steps, max_length, rounds, device="cuda")
            line(f"{ranks} GPUs (DDP), batch 16 each", many)
            summary[f"gpus_{ranks}"] = many
            summary["scaling"] = many["examples_per_s"] / single["examples_per_s"]
            print(f"scaling: {summary['scaling']:.2f}x on {ranks} GPUs (ideal {ranks}x)")
    else:
        if GLOBAL_BATCH % ranks:
            return _skip(f"--ranks {ranks} does not divide the global batch of {GLOBAL_BATCH}")
        summary.update(backend="gloo", ranks=ranks, global_batch=GLOBAL_BATCH, per_rank_batch=GLOBAL_BATCH // ranks)
        one = run_single(args.model, GLOBAL_BATCH, steps, max_length, rounds, threads=1, device="cpu")
        line("1 process, 1 thread", one)
        threaded = run_single(args.model, GLOBAL_BATCH, steps, max_length, rounds, threads=ranks, device="cpu")
        line(f"1 process, {ranks} threads", threaded)
        many = run_ranks(args.model, ranks, GLOBAL_BATCH // ranks, steps, max_length, rounds, device="cpu")
        line(f"{ranks} ranks x 1 thread (DDP, gloo)", many)
        summary.update(one_process_1_thread=one, one_process_n_threads=threaded, ranks_1_thread_each=many,
                       speedup_vs_1_thread=many["examples_per_s"] / one["examples_per_s"],
                       speedup_vs_n_threads=many["examples_per_s"] / threaded["examples_per_s"])
        print(f"{ranks} ranks vs 1 process: {summary['speedup_vs_1_thread']:.2f}x its 1-thread throughput, "
              f"{summary['speedup_vs_n_threads']:.2f}x its {ranks}-thread throughput, on {cores} cores")
    summary["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
