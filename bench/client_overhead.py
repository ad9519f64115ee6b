"""The federated client's local training step against a bare PEFT loop, side by side (issue 14, P7).

    python -m bench.client_overhead             # MiniLM on BBC News as configs/minilm_bbc.yaml, 10 steps a round
    python -m bench.client_overhead --quick     # 3 steps a round, 2 timed rounds per side and method
    python -m bench.client_overhead --steps 10 --rounds 6 --model minilm

Sides, on the same rows in the same order, in one process, 1 torch thread (a client's torch_threads):
- client: ``LocalTrainer.train_round`` as a round runs it: the task loaded into the model, the method's
  objective, a fresh AdamW, the shuffled rows encoded per micro-batch, the penalty (subspace_reg), clipping,
  the upload cloned and cast to the wire dtype. For fedavg the task is the global adapter; for subspace_reg
  it is what a client receives from round 2 on: A_g, the head, and per layer the basis U and the gain g.
- bare: transformers and peft alone: the same base model (AutoModelForSequenceClassification), the same
  LoraConfig, the same tokenizer call, AdamW (weight decay 0) and gradient clipping, the model's own loss;
  no federation code. One optimizer for the whole run (no per-round work).

A timed unit is one round of ``steps`` steps. After one warm-up round per side (excluded), the sides
alternate client, bare, bare, client, ... so that load drifting over the run hits both alike.
Steps per second = steps / median round time; ratio = client / bare (targets: >= 0.9 for fedavg,
>= 0.85 for subspace_reg); paired_ratio: the median over timed rounds of bare round time / the client
round timed next to it. The regularizer's share of a subspace_reg step: its forward + backward on the
client's live factors, timed alone after each timed round (median), over the median client step.

Check that the sides do the same work: both warm-up rounds start from the same initial adapter and
seed (dropout, shuffling), so for fedavg their mean losses must agree (``same_losses``).

Prints one line per side and, last, one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

TARGETS = {"fedavg": 0.9, "subspace_reg": 0.85}
REFERENCE_GAIN = 0.05
"""The gain g of the synthetic reference B_g = g U (its value changes no cost)."""


def _config(method: str, model: str, steps: int, max_length: int, max_train_samples: int):
    from common.config import RunConfig

    return RunConfig.load("configs/minilm_bbc.yaml", {
        "method": method, "model_name": model, "max_local_steps": steps, "max_length": max_length,
        "max_train_samples": max_train_samples})


def _subspace_task(adapter: dict[str, torch.Tensor], round_index: int, seed: int) -> dict[str, torch.Tensor]:
    """What subspace_reg sends from round 2 on, made by the method itself from a synthetic reference: per
    layer an orthonormal U (d, r) of a seeded Gaussian and the gain g."""
    from common.adapter import LORA_B_SUFFIX, REFERENCE_GAIN_SUFFIX, REFERENCE_SUFFIX
    from common.methods import Recipient, get_method

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, b in adapter.items():
        if name.endswith(LORA_B_SUFFIX):
            layer = name[: -len(LORA_B_SUFFIX)]
            basis, _ = torch.linalg.qr(torch.randn(b.shape, generator=generator, dtype=torch.float64))  # (d, r)
            state[layer + REFERENCE_SUFFIX] = basis.to(torch.float32)
            state[layer + REFERENCE_GAIN_SUFFIX] = torch.tensor(REFERENCE_GAIN)
    rank = next(t.shape[0] for n, t in adapter.items() if n.endswith(".lora_A.weight"))
    return get_method("subspace_reg").task_tensors(adapter, state, Recipient(round=round_index, rank=rank))


class BareLoop:
    """A plain PEFT training loop over the client's rows: no common/, no client/ code past the rows."""

    def __init__(self, model_path: str, config, num_labels: int, rows: list[dict]) -> None:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()                          # no load report of the new head on every run
        m, t = config.model, config.train
        seed = config.federation.seed
        self.rows, self.max_length, self.batch = rows, config.data.max_length, t.per_device_train_batch_size
        self.steps, self.max_grad_norm = t.max_local_steps, t.max_grad_norm
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        torch.manual_seed(seed)                                   # the new head's init, as the client's
        base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True, dtype=torch.float32)
        lora = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=list(m.target_modules), task_type=TaskType.SEQ_CLS)
        torch.manual_seed(seed)                                   # LoRA's A init, as the client's
        self.model = get_peft_model(base, lora)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.learning_rate, weight_decay=0.0)

    def train_round(self, seed: int) -> float:
        """``steps`` steps over the rows shuffled by ``seed`` (dropout seeded by it too); the mean loss."""
        torch.manual_seed(seed)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed)).tolist()
        losses = []
        for start in range(0, min(len(order), self.steps * self.batch), self.batch):
            rows = [self.rows[i] for i in order[start:start + self.batch]]
            inputs = self.tokenizer([row["text"] for row in rows], truncation=True, max_length=self.max_length,
                                    padding=True, return_tensors="pt")
            labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
            loss = self.model(**inputs, labels=labels).loss
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return sum(losses) / len(losses)


def _time_penalty(trainer, objective, repeats: int) -> float:
    """Median seconds of the penalty's forward + backward on the client's live factors."""
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        objective.penalty(trainer.lora).backward()
        seconds.append(time.perf_counter() - began)
    for a, b in trainer.lora.values():
        a.grad = b.grad = None
    return statistics.median(seconds)


def run_method(method: str, model: str, steps: int, rounds: int, max_length: int, max_train_samples: int,
               bare: BareLoop | None, rows: list[dict], num_labels: int) -> tuple[dict, BareLoop]:
    from client.trainer import LocalTrainer
    from common.modeling import resolve_model_path

    config = _config(method, model, steps, max_length, max_train_samples)
    trainer = LocalTrainer(config, rows, num_labels, show_progress=False)
    fresh = bare is None                                             # its first round starts where the client's does
    if bare is None:
        bare = BareLoop(resolve_model_path(model), config, num_labels, rows)
    start = trainer.built.get_adapter_state()

    def task(round_index: int) -> dict[str, torch.Tensor]:
        return dict(start) if method != "subspace_reg" else _subspace_task(start, round_index, seed=round_index)

    warm_client = trainer.train_round(1, dict(start), seed=0)       # the initial adapter, as round 1 sends it
    warm_bare = bare.train_round(seed=0)
    client_s: list[float] = []
    bare_s: list[float] = []
    penalty_s: list[float] = []

    def client_round(index: int) -> None:
        began = time.perf_counter()
        result = trainer.train_round(index + 2, task(index + 2), seed=index + 1)
        client_s.append(time.perf_counter() - began)
        assert result.local_steps == steps, result.local_steps
        if method == "subspace_reg":
            objective = trainer.method.local_objective(task(index + 2), config, index + 2)
            penalty_s.append(_time_penalty(trainer, objective, repeats=3))

    def bare_round(index: int) -> None:
        began = time.perf_counter()
        bare.train_round(seed=index + 1)
        bare_s.append(time.perf_counter() - began)

    for index in range(rounds):                                      # client, bare, bare, client, ...
        first, second = (client_round, bare_round) if index % 2 == 0 else (bare_round, client_round)
        first(index)
        second(index)
    client_step = statistics.median(client_s) / steps
    bare_step = statistics.median(bare_s) / steps
    figures: dict[str, object] = {
        "client_steps_per_s": 1.0 / client_step, "bare_steps_per_s": 1.0 / bare_step,
        "ratio": bare_step / client_step, "target": TARGETS.get(method),
        # Each client round against the bare round timed next to it: less moved by load that drifts over the run.
        "paired_ratio": statistics.median(b / c for c, b in zip(client_s, bare_s, strict=True)),
        "client_rounds_s": client_s, "bare_rounds_s": bare_s,
    }
    figures["meets_target"] = figures["ratio"] >= TARGETS[method] if method in TARGETS else None
    if method == "subspace_reg":
        penalty = statistics.median(penalty_s)
        figures.update(regularizer_s=penalty, regularizer_share=penalty / client_step)
    elif fresh:                 # the bare loop's first round: from the initial adapter, as the client's
        figures.update(warmup_loss_client=warm_client.train_loss, warmup_loss_bare=warm_bare,
                       same_losses=math.isclose(warm_client.train_loss, warm_bare, rel_tol=1e-5, abs_tol=1e-6))
    return figures, bare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 steps a round, 2 timed rounds per side and method")
    parser.add_argument("--model", default="minilm", help="model_name (default: minilm, the embedded MiniLM)")
    parser.add_argument("--steps", type=int, default=None, help="steps a round (default 10, the client's; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per side and method (default 6; quick 2)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per row (default 64, the config's)")
    parser.add_argument("--max-train-samples", type=int, default=2000, help="rows to train on (default 2000)")
    parser.add_argument("--methods", default="fedavg,subspace_reg", help="comma-separated (default fedavg,subspace_reg)")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 6)

    from common.tasks import load_task_data

    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    config = _config(methods[0], args.model, steps, args.max_length, args.max_train_samples)
    data = load_task_data(config.data, seed=config.federation.seed)
    rows, num_labels = data.train, len(data.label_names)
    summary: dict[str, object] = {
        "bench": "client_overhead", "mode": "quick" if args.quick else "full", "model": args.model,
        "steps": steps, "timed_rounds": rounds, "batch": config.train.per_device_train_batch_size,
        "max_length": args.max_length, "torch_threads": 1, "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average_start": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, load average {summary['load_average_start']}; "
          f"{args.model}, batch {summary['batch']}, max_length {args.max_length}, {steps} steps a round, "
          f"median of {rounds} timed rounds per side after a warm-up, sides alternating", flush=True)
    bare = None
    for method in methods:
        figures, bare = run_method(method, args.model, steps, rounds, args.max_length, args.max_train_samples,
                                   bare, rows, num_labels)
        summary[method] = figures
        extra = (f", regularizer {figures['regularizer_s'] * 1e3:.1f} ms = {figures['regularizer_share']:.1%} of a step"
                 if "regularizer_share" in figures else
                 f", warm-up losses equal: {figures['same_losses']}" if "same_losses" in figures else "")
        print(f"{method:<13} client {figures['client_steps_per_s']:.3f} steps/s, bare PEFT "
              f"{figures['bare_steps_per_s']:.3f} steps/s: ratio {figures['ratio']:.3f} (target "
              f"{figures['target']}){extra}", flush=True)
    summary["load_average_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
