"""Factored vs dense federated-LoRA math at RoBERTa-large shapes.

    python -m bench.math            # full: dense side on all 145 layers
    python -m bench.math --quick    # < 60 s on 2 cores: dense side on one layer per shape, extrapolated

Shapes (RoBERTa-large, LoRA r = 8 on query, key, value and every dense): 24 layers x
{query, key, value, attention.output.dense: 1024 -> 1024; intermediate.dense: 1024 -> 4096
(B (4096, r), A (r, 1024)); output.dense: 4096 -> 1024} + pooler.dense 1024 -> 1024 = 145 layers.

Timed side by side in one run:
- aggregation: the subspace_reg server step (common.aggregation, layers batched by shape) vs the dense
  reference (tests/common/dense_reference.py: form each d x k product, full torch.linalg.svd), K = 3 and 10;
- regularizer forward + backward as one call from scratch (common.regularizer.subspace_regularizer vs the
  dense formula as written: the target's pair); and per training step, the stricter pair:
  SubspaceRegularizer (the round's reference prepared once, as a client does) vs the dense formula with
  its constant s B_g A_g formed once.

Targets (issue 14, item 5), each a ratio of the two sides of this run: regularizer forward + backward
(one call) >= 100x the dense formula, aggregation at K = 10 >= 300x; the relative differences stay at rounding.
The last line printed is one JSON object with the headline figures and whether each target is met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from common.adapter import AdapterState, ClientUpdate, LoraFactors
from common.aggregation import AggregationSettings, aggregate
from common.regularizer import SubspaceRegularizer, subspace_regularizer
from tests.common.dense_reference import dense_layer_step, dense_regularizer

RANK = 8
LORA_ALPHA = 16.0
SCALING = LORA_ALPHA / RANK
CLIP = 15.0  # max_effective_lora_update_norm of the RoBERTa-large reference configuration
MU, ALPHA, LAMBDA = 0.05, 0.01, 1e-5
TARGETS = {"regularizer": 100.0, "aggregation_k10": 300.0}
"""Speedup over the dense side each measurement must reach (issue 14, item 5)."""


def roberta_large_layers() -> dict[str, tuple[int, int]]:
    """Layer name -> (d_out, k_in) for every adapted linear layer of RoBERTa-large."""
    layers: dict[str, tuple[int, int]] = {}
    for i in range(24):
        prefix = f"roberta.encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            layers[f"{prefix}.{name}"] = (1024, 1024)
        layers[f"{prefix}.intermediate.dense"] = (4096, 1024)
        layers[f"{prefix}.output.dense"] = (1024, 4096)
    layers["roberta.pooler.dense"] = (1024, 1024)
    return layers


def random_state(gen: torch.Generator, shapes: dict[str, tuple[int, int]], b_scale: float) -> AdapterState:
    """float32 factors: A ~ N(0, 1/k) (PEFT-like), B ~ N(0, b_scale^2) (a trained B)."""
    return AdapterState(lora={
        layer: LoraFactors(A=torch.randn(RANK, k, generator=gen) / k**0.5, B=b_scale * torch.randn(d, RANK, generator=gen))
        for layer, (d, k) in shapes.items()
    })


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls and the last call's result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))


def dense_subset(shapes: dict[str, tuple[int, int]], per_shape: int | None) -> list[str]:
    """The first ``per_shape`` layers of each distinct shape (all layers when None)."""
    chosen, seen = [], {}
    for layer, shape in shapes.items():
        if per_shape is None or seen.get(shape, 0) < per_shape:
            chosen.append(layer)
            seen[shape] = seen.get(shape, 0) + 1
    return chosen


def extrapolate(shapes: dict[str, tuple[int, int]], per_layer: dict[str, float]) -> float:
    """Total over all layers from the timed ones: mean time per shape x number of layers of that shape."""
    by_shape: dict[tuple[int, int], list[float]] = {}
    for layer, seconds in per_layer.items():
        by_shape.setdefault(shapes[layer], []).append(seconds)
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    return sum(counts[shape] * statistics.mean(times) for shape, times in by_shape.items())


def bench_aggregation(shapes: dict[str, tuple[int, int]], clients: int, repeats: int,
                      dense_per_shape: int | None, seed: int) -> dict[str, float | int]:
    gen = torch.Generator().manual_seed(seed)
    global_state = random_state(gen, shapes, b_scale=0.02)
    updates = [ClientUpdate(client=f"client-{i}", num_examples=50 + 7 * i, state=random_state(gen, shapes, 0.02))
               for i in range(clients)]
    settings = AggregationSettings(scaling=SCALING, rank=RANK, max_update_norm=CLIP)

    factored_s, result = timed(lambda: aggregate("subspace_reg", global_state, updates, settings), repeats)

    per_layer: dict[str, float] = {}
    worst = 0.0
    for layer in dense_subset(shapes, dense_per_shape):
        seconds, dense = timed(lambda: dense_layer_step("subspace_reg", layer, global_state, updates,
                                                        SCALING, RANK, CLIP), 1)
        per_layer[layer] = seconds
        new = result.state.lora[layer]
        signs = torch.sign((result.reference_basis[layer].double() * dense.U).sum(0))  # SVD sign convention
        worst = max(worst,
                    rel(SCALING * new.B.double() @ new.A.double(), dense.product),
                    rel(new.B.double() * signs, dense.B),
                    rel(new.A.double() * signs[:, None], dense.A))
    dense_s = extrapolate(shapes, per_layer)
    return {"clients": clients, "factored_s": factored_s, "dense_s": dense_s, "speedup": dense_s / factored_s,
            "rel_error": worst, "dense_layers_timed": len(per_layer), "layers": len(shapes)}


def dense_regularizer_prepared(reference: dict[str, LoraFactors]) -> Callable:
    """The dense formula with its constant s B_g A_g (d, k) formed once per round, as a dense training
    loop would keep it: the fair counterpart of a prepared ``SubspaceRegularizer``. Prepare it for the
    layers being timed only: 145 such constants take 1.2 GB."""
    constant = {layer: (SCALING * f.B @ f.A).detach() for layer, f in reference.items()}

    def penalty(local: dict) -> torch.Tensor:
        total = 0.0
        for layer, (a, b) in local.items():
            f = reference[layer]
            diff = SCALING * b @ a - constant[layer]  # (d, k)
            total = total + (0.5 * MU * diff.square().sum() + 0.5 * ALPHA * (b - f.B).square().sum()
                             + 0.5 * LAMBDA * (a.square().sum() + b.square().sum()))
        return total / len(local)

    return penalty


def bench_regularizer(shapes: dict[str, tuple[int, int]], repeats: int, dense_per_shape: int | None,
                      seed: int) -> dict[str, float | int]:
    """Forward + backward of R, two ways on each side, all in this run:

    - one call (the figure of the target, as issue 14 states it): everything from scratch
      (``subspace_regularizer`` against the dense formula as written);
    - per step, the stricter pair: what a client repeats at every training step of a round, the
      reference prepared once (``SubspaceRegularizer``) against the dense formula keeping s B_g A_g.
    """
    gen = torch.Generator().manual_seed(seed)
    reference = random_state(gen, shapes, b_scale=0.02).lora
    # Clients train near the reference: a 5 % perturbation of each factor.
    local = {layer: ((f.A + 0.05 * f.A.std() * torch.randn(f.A.shape, generator=gen)).requires_grad_(),
                     (f.B + 0.05 * f.B.std() * torch.randn(f.B.shape, generator=gen)).requires_grad_())
             for layer, f in reference.items()}

    def forward_backward(penalty: Callable, subset: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        value = penalty(subset)
        leaves = [t for pair in subset.values() for t in pair]
        return value.detach(), list(torch.autograd.grad(value, leaves))

    def one_call(subset: dict) -> torch.Tensor:
        return subspace_regularizer(subset, reference, SCALING, MU, ALPHA, LAMBDA)

    def dense_formula(subset: dict) -> torch.Tensor:
        return dense_regularizer(subset, reference, SCALING, MU, ALPHA, LAMBDA)

    prepared = SubspaceRegularizer(reference, SCALING, MU, ALPHA, LAMBDA)
    forward_backward(prepared, local)  # the first step prepares the constants
    # The factored side is cheap: more repeats make its median steady on a busy machine.
    step_s, _ = timed(lambda: forward_backward(prepared, local), 10 * repeats + 1)
    one_call_s, _ = timed(lambda: forward_backward(one_call, local), 4 * repeats + 1)

    # Per-layer dense timings (extrapolated by shape), and per-layer results to compare.
    per_layer_step: dict[str, float] = {}
    per_layer_formula: dict[str, float] = {}
    worst_same_dtype = worst_vs_f64 = dense_f32_vs_f64 = 0.0
    for layer in dense_subset(shapes, dense_per_shape):
        one = {layer: local[layer]}
        dense_step = dense_regularizer_prepared({layer: reference[layer]})  # its (d, k) constant, once
        for penalty in (dense_step, dense_formula):  # untimed first calls: the timed ones find warm memory
            forward_backward(penalty, one)
        per_layer_step[layer], _ = timed(lambda: forward_backward(dense_step, one), repeats)
        seconds, (d_value, d_grads) = timed(lambda: forward_backward(dense_formula, one), repeats)
        per_layer_formula[layer] = seconds
        f_value, f_grads = forward_backward(prepared, one)
        one64 = {layer: tuple(t.detach().double().requires_grad_() for t in local[layer])}
        t_value = dense_regularizer(one64, {layer: LoraFactors(reference[layer].A.double(), reference[layer].B.double())},
                                    SCALING, MU, ALPHA, LAMBDA)
        t_grads = torch.autograd.grad(t_value, list(one64[layer]))
        for f, d, t in zip([f_value, *f_grads], [d_value, *d_grads], [t_value.detach(), *t_grads]):
            worst_same_dtype = max(worst_same_dtype, rel(f, d))
            worst_vs_f64 = max(worst_vs_f64, rel(f, t))
            dense_f32_vs_f64 = max(dense_f32_vs_f64, rel(d, t))
    dense_step_s = extrapolate(shapes, per_layer_step)
    dense_formula_s = extrapolate(shapes, per_layer_formula)
    return {"factored_s": step_s, "dense_s": dense_step_s, "speedup": dense_step_s / step_s,
            "one_call_factored_s": one_call_s, "one_call_dense_s": dense_formula_s,
            "one_call_speedup": dense_formula_s / one_call_s,
            "rel_error": worst_same_dtype, "factored_f32_vs_dense_f64": worst_vs_f64,
            "dense_f32_vs_dense_f64": dense_f32_vs_f64, "dense_layers_timed": len(per_layer_step), "layers": len(shapes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="time the dense side on one layer per distinct shape and extrapolate (< 60 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (default 1: on a shared 2-core machine, "
                             "2 threads collapse under oversubscription and the timings become noise)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    shapes = roberta_large_layers()
    dense_per_shape = 1 if args.quick else None
    repeats = 2 if args.quick else 5
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    print(f"{len(shapes)} adapted layers, r = {RANK}, s = {SCALING}, clip = {CLIP}; "
          f"dense side on {'one layer per shape, extrapolated by shape' if args.quick else 'every layer'}")

    summary: dict[str, object] = {"mode": "quick" if args.quick else "full", "layers": len(shapes), "rank": RANK,
                                  "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
    for clients in (3, 10):
        row = bench_aggregation(shapes, clients, repeats, dense_per_shape, args.seed)
        print(f"aggregation subspace_reg K={clients:2d}: factored {row['factored_s'] * 1e3:8.1f} ms, "
              f"dense {row['dense_s']:8.2f} s ({row['dense_layers_timed']} layers timed), "
              f"speedup {row['speedup']:7.0f}x, max rel diff {row['rel_error']:.1e}")
        summary[f"aggregation_k{clients}"] = row
    reg = bench_regularizer(shapes, repeats, dense_per_shape, args.seed)
    print(f"regularizer fwd+bwd (float32), one call: factored {reg['one_call_factored_s'] * 1e3:8.1f} ms, "
          f"dense formula {reg['one_call_dense_s'] * 1e3:8.1f} ms, speedup {reg['one_call_speedup']:6.1f}x")
    print(f"regularizer fwd+bwd (float32), per step: factored {reg['factored_s'] * 1e3:8.1f} ms, "
          f"dense {reg['dense_s'] * 1e3:8.1f} ms ({reg['dense_layers_timed']} layers timed), "
          f"speedup {reg['speedup']:6.1f}x, max rel diff {reg['rel_error']:.1e} "
          f"(vs float64 dense: factored {reg['factored_f32_vs_dense_f64']:.1e}, "
          f"dense float32 {reg['dense_f32_vs_dense_f64']:.1e})")
    summary["regularizer"] = reg
    k3, k10 = summary["aggregation_k3"], summary["aggregation_k10"]
    summary.update({
        "aggregation_speedup": k3["speedup"],  # type: ignore[index]
        "aggregation_k10_speedup": k10["speedup"],  # type: ignore[index]
        "aggregation_rel_error": max(summary[f"aggregation_k{k}"]["rel_error"] for k in (3, 10)),  # type: ignore[index]
        "regularizer_speedup": reg["one_call_speedup"],
        "regularizer_step_speedup": reg["speedup"],
        "regularizer_rel_error": reg["rel_error"],
    })
    # The target is the measure: subspace_regularizer against the dense formula, one call each.
    measured = {"regularizer": (reg["one_call_speedup"], "regularizer forward + backward (one call vs the dense formula)"),
                "aggregation_k10": (k10["speedup"], "aggregation subspace_reg K = 10")}  # type: ignore[index]
    met = {}
    for key, (speedup, label) in measured.items():
        met[key] = speedup >= TARGETS[key]
        print(f"target {label}: {speedup:.1f}x the dense side, target >= {TARGETS[key]:.0f}x: "
              f"{'met' if met[key] else 'NOT met'}")
    summary["targets"] = {key: {"speedup": measured[key][0], "target": TARGETS[key], "met": met[key]} for key in TARGETS}
    summary["targets_met"] = all(met.values())
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
