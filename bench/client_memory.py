"""Memory of one client process of the default run, stage by stage (issue 14, item 6).

    python -m bench.client_memory                   # configs/minilm_bbc.yaml, its largest partition, 3 rounds
    python -m bench.client_memory --quick           # 1 round of 3 steps
    python -m bench.client_memory --partition 6 gradient_checkpointing=true     # config overrides as key=value

A fresh Python process runs the client's own path, without a coordinator: the imports of ``python -m
client`` (client.runtime), the run configuration and torch threads as a joined client sets them, its
partition of the data (client.runtime._load_rows, checked against the partition fingerprint as the
coordinator would send it), the LocalTrainer (model and LoRA), then rounds of LocalTrainer.train_round on
the tasks the method sends (round 1: the initial adapter; subspace_reg from round 2: A_g, the head, U and g
per layer). After each stage it reads /proc/self: RSS, its peak (VmHWM), anonymous and file-backed RSS, and
PSS / USS (smaps_rollup: file pages shared with other clients, such as torch's libraries and the mmapped
model weights, counted once across processes).

Parts: what each stage adds to RSS; ``peak``: VmHWM at the end; ``idle``: RSS after the last round, what a
client holds while it waits to be sampled (7 of the 10 clients of the default run at any time).
Target (issue 14): peak RSS <= 600 MB per client for the default configuration.

Prints a table and, last, one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_MB = 600.0
CONFIG = "configs/minilm_bbc.yaml"


def _memory() -> dict[str, float]:
    """This process's memory in MB, from /proc/self (Linux)."""
    status = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            status[key] = int(value.split()[0]) / 1024
    rollup = {}
    smaps = Path("/proc/self/smaps_rollup")
    if smaps.exists():
        for line in smaps.read_text().splitlines()[1:]:
            key, _, value = line.partition(":")
            rollup[key] = int(value.split()[0]) / 1024
    return {"rss_mb": status["VmRSS"], "peak_mb": status["VmHWM"], "anon_mb": status["RssAnon"],
            "file_mb": status["RssFile"], "pss_mb": rollup.get("Pss", float("nan")),
            "uss_mb": rollup.get("Private_Clean", 0.0) + rollup.get("Private_Dirty", 0.0)}


def _report(stage: str, **extra: object) -> None:
    print("STAGE " + json.dumps({"stage": stage, **_memory(), **extra}), flush=True)


def _child(spec: dict) -> int:
    """The client's path, stage by stage (runs in its own process: the stages are that process's memory)."""
    _report("start")
    import torch

    import client.runtime as runtime                     # what `python -m client` imports to run
    from client.trainer import LocalTrainer
    from common.config import RunConfig

    _report("imports", modules=len(sys.modules),
            heavy=sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "pandas", "pyarrow", "sklearn"}))
    config = RunConfig.load(spec["config"], spec["overrides"])
    torch.set_num_threads(config.train.torch_threads)   # as a joined client does
    options = runtime.ClientOptions(coordinator="none", name="bench")
    rows, num_labels = runtime._load_rows(config, options, spec["partition"], spec["fingerprint"])
    _report("data", rows=len(rows))
    trainer = LocalTrainer(config, rows, num_labels, show_progress=False)
    _report("model")
    start = trainer.built.get_adapter_state()
    for round_index in range(1, spec["rounds"] + 1):
        task = dict(start) if round_index == 1 else _task(config, start, round_index)
        result = trainer.train_round(round_index, task, seed=round_index)
        del task
        _report(f"round {round_index}", train_loss=result.train_loss, seconds=result.train_seconds,
                steps=result.local_steps)
    return 0


def _task(config, start: dict, round_index: int) -> dict:
    """A later round's task as the method sends it (subspace_reg: U and g per layer instead of B_g)."""
    if config.federation.method != "subspace_reg":
        return dict(start)
    from bench.client_overhead import _subspace_task

    return _subspace_task(start, round_index, seed=round_index)


def _fingerprint(config_path: str, overrides: dict, partition: int) -> tuple[str, int]:
    """(The partition fingerprint the coordinator sends a joining client, the partition); -1: the largest."""
    from common.config import RunConfig
    from common.federated_data import fingerprint, partition_dataset
    from common.tasks import load_task_data

    config = RunConfig.load(config_path, overrides)
    data = load_task_data(config.data, seed=config.federation.seed)
    parts = partition_dataset(config, data.partition_values).indices
    if partition < 0:
        partition = max(range(len(parts)), key=lambda j: len(parts[j]))
    return fingerprint(parts[partition]), partition


def measure(config_path: str, overrides: dict, partition: int, rounds: int, timeout_s: float = 3600.0) -> dict:
    """Run the client's path in a fresh process; its stages, in order."""
    fingerprint, partition = _fingerprint(config_path, overrides, partition)
    spec = {"config": config_path, "overrides": overrides, "partition": partition, "rounds": rounds,
            "fingerprint": fingerprint}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}   # as the launcher sets
    env.setdefault("HF_HUB_OFFLINE", "1")
    done = subprocess.run([sys.executable, "-m", "bench.client_memory", "--child", json.dumps(spec)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"the client process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    stages = [json.loads(line[len("STAGE "):]) for line in done.stdout.splitlines() if line.startswith("STAGE ")]
    return {"partition": partition, "stages": stages}


def summarize(stages: list[dict]) -> dict:
    """Parts (what each stage added to RSS), peak and idle RSS against the target."""
    by_name = {stage["stage"]: stage for stage in stages}
    parts, previous = {}, 0.0
    for stage in stages:
        parts[stage["stage"]] = stage["rss_mb"] - previous
        previous = stage["rss_mb"]
    last = stages[-1]
    first_round = by_name.get("round 1", last)
    return {"parts_mb": parts, "peak_rss_mb": last["peak_mb"], "idle_rss_mb": last["rss_mb"],
            "idle_pss_mb": last["pss_mb"], "idle_uss_mb": last["uss_mb"],
            "peak_in_round_1_mb": first_round["peak_mb"], "target_mb": TARGET_MB,
            "peak_ok": last["peak_mb"] <= TARGET_MB, "idle_ok": last["rss_mb"] <= TARGET_MB}


def _parse_overrides(items: list[str]) -> dict:
    from common.config import parse_overrides

    return parse_overrides(items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 3 steps")
    parser.add_argument("--config", default=CONFIG, help=f"run configuration (default {CONFIG}, make run's)")
    parser.add_argument("--partition", type=int, default=-1,
                        help="the client's partition (default -1: the largest, the client with the most rows)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds to train (default 3; quick 1)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. method=fedavg")
    args = parser.parse_args(argv)
    if args.child is not None:
        return _child(json.loads(args.child))
    overrides = _parse_overrides(args.overrides)
    if args.quick:
        overrides.setdefault("max_local_steps", 3)
    rounds = args.rounds or (1 if args.quick else 3)
    began = time.time()
    measured = measure(args.config, overrides, args.partition, rounds)
    stages = measured["stages"]
    figures = summarize(stages)
    print(f"{'stage':<10} {'RSS':>8} {'+RSS':>8} {'peak':>8} {'anon':>8} {'file':>8} {'PSS':>8} {'USS':>8}  (MB)")
    for stage in stages:
        print(f"{stage['stage']:<10} {stage['rss_mb']:8.1f} {figures['parts_mb'][stage['stage']]:+8.1f} "
              f"{stage['peak_mb']:8.1f} {stage['anon_mb']:8.1f} {stage['file_mb']:8.1f} {stage['pss_mb']:8.1f} "
              f"{stage['uss_mb']:8.1f}")
    print(f"peak RSS {figures['peak_rss_mb']:.0f} MB, idle RSS {figures['idle_rss_mb']:.0f} MB "
          f"(PSS {figures['idle_pss_mb']:.0f}, USS {figures['idle_uss_mb']:.0f}); target <= {TARGET_MB:.0f} MB: "
          f"peak {'met' if figures['peak_ok'] else 'NOT met'}, idle {'met' if figures['idle_ok'] else 'NOT met'}")
    summary = {"bench": "client_memory", "mode": "quick" if args.quick else "full", "config": args.config,
               "overrides": overrides, "partition": measured["partition"], "rounds": rounds,
               "rows": next((s.get("rows") for s in stages if "rows" in s), None), **figures, "stages": stages,
               "wall_s": round(time.time() - began, 1), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
