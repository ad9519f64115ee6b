"""The coordinator's copy of the model: evaluates a global adapter and saves it in PEFT's format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.config import RunConfig
from common.modeling import build_model, default_device

log = logging.getLogger(__name__)


class ServerModel:
    def __init__(self, config: RunConfig, eval_rows: list[dict], num_labels: int, device: str | None = None) -> None:
        self.config = config
        self.eval_rows = eval_rows
        device = device or default_device()  # a GPU when the coordinator's host has one (4-bit models need it)
        log.info("loading model %s for server-side evaluation on %s", config.model.model_name, device)
        # The run seed fixes the initial LoRA A and head: every client starts from this state.
        self.built = build_model(config.model, num_labels=num_labels, seed=config.federation.seed, device=device,
                                 task=config.data.task)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return self.built.get_adapter_state()

    def evaluate(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        self.built.set_adapter_state(tensors)
        train = self.config.train
        batch_size = train.per_device_eval_batch_size or max(32, train.per_device_train_batch_size)
        return self.built.evaluate(self.eval_rows, self.config.data, batch_size=batch_size)

    def save(self, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
        self.built.save_adapter(tensors, directory)

    def add_to_base(self, increment: dict) -> None:
        """A base-weight residual (fedex_lora), folded in exactly as every client folds it in: per layer, factors
        (B (d, m), A (m, k)) or a dense (d, k) tensor (``fedex_lora.base_residual_through``, to rebuild a round's model)."""
        self.built.add_to_base_weights(increment)


class SyntheticModel:
    """Benchmark only (``synthetic_layout``): the adapter of common/synthetic.py, no model behind it. Evaluation
    is skipped (an empty result: accuracy and loss are null in metrics.jsonl); saving writes the adapter's
    tensors as safetensors, so a round still costs its disk writes."""

    def __init__(self, config: RunConfig) -> None:
        from common.synthetic import synthetic_adapter

        layout = config.model.synthetic_layout
        assert layout is not None, "SyntheticModel is for runs with synthetic_layout"
        log.info("benchmark run: synthetic adapter layout %s at rank %d; no model, no evaluation", layout,
                 config.model.lora_rank)
        self._initial = synthetic_adapter(layout, config.model.lora_rank, config.federation.seed)

    def initial_state(self) -> dict[str, torch.Tensor]:
        return dict(self._initial)

    def evaluate(self, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def save(self, tensors: dict[str, torch.Tensor], directory: str | Path) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(Path(directory) / "adapter_model.safetensors"))

    def add_to_base(self, increment: dict) -> None:
        """No base weights to fold a residual into (fedex_lora): nothing is evaluated."""
