"""The reference study's own configuration keys, read as ours.

Users bring the study's YAML files unchanged. Most of its keys are ours already (docs/DESIGN.md §6,
including ``output_dir``, ``weight_decay`` and ``per_device_eval_batch_size``); the others are renamed
to ours (``algorithm`` is our ``method``), or taken with one logged line saying that they have no effect
here and why. ``translate`` does this on the flat mapping read from a file, before
``RunConfig.from_flat`` checks the values. It never drops a key silently, and a study key given
together with our own name for it must agree with it.

``ineffective_settings`` keeps the same promise for our own keys: a key that the chosen data, task or
method does not read (``text_column`` for the embedded BBC News data, ``mu`` for fedavg) is named in a
logged line instead of being ignored in silence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.config import RunConfig

RENAMED = {"algorithm": "method", "torch_dtype": "dtype", "partition_type": "partitioning"}
"""Study key -> our key for the same setting."""

DTYPE_SPELLINGS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                   "bf16": "bfloat16", "torch.float32": "float32", "torch.float16": "float16",
                   "torch.bfloat16": "bfloat16", "auto": "float32"}
"""Other spellings of a dtype (the study's, transformers'), as our ``dtype`` values. ``auto`` reads as
float32: the dtype stays explicit here, so that every client loads the base model alike."""

NO_EFFECT = {
    "checkpoint_every": "every round is committed to the checkpoint atomically here (--resume continues after "
                        "the last one), so there is nothing to space out",
    "trust_remote_code": "models load with the architectures transformers itself ships; no code from a model "
                         "repository is run",
}
"""Study keys that are accepted and have no effect here, and why."""


@dataclass
class Translation:
    """The flat mapping in our keys, and one line per study key saying what became of it."""

    values: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def translate(values: Mapping[str, Any]) -> Translation:
    """``values`` with the study's keys in ours, and notes for the keys renamed, rewritten or without effect."""
    from common.config import ConfigError

    out = dict(values)
    notes: list[str] = []
    for study_key, ours in RENAMED.items():
        if study_key not in out:
            continue
        value = out.pop(study_key)
        if ours == "dtype" and isinstance(value, str):
            value = DTYPE_SPELLINGS.get(value, value)
        if ours in values and values[ours] != value:
            raise ConfigError(f"{study_key}={values[study_key]!r} and {ours}={values[ours]!r} disagree: they are the "
                              f"same setting ({study_key} is the reference study's name for {ours}); keep one")
        out[ours] = value
        notes.append(f"{study_key}: {values[study_key]} read as {ours}: {value}")
    if _is_zero(out.get("max_effective_lora_update_norm")):
        out["max_effective_lora_update_norm"] = None
        notes.append("max_effective_lora_update_norm: 0.0 means no clip in the study; read as null (no clip)")
    for study_key, why in NO_EFFECT.items():
        if study_key in out:
            notes.append(f"{study_key}: {out.pop(study_key)!r} accepted, no effect: {why}")
    return Translation(out, notes)


EMBEDDED_DATASETS = ("bbc_news",)
READ_BY_SUBSPACE_REG = ("mu", "alpha", "lambda_reg")


def ineffective_settings(config: "RunConfig", given: Iterable[str]) -> list[str]:
    """One line per reason, naming the keys in ``given`` (those a file or override set) that this run does
    not read for that reason."""
    given = set(given)
    data, federation = config.data, config.federation
    unread: dict[str, str] = {}
    if data.dataset in EMBEDDED_DATASETS:
        for key in ("text_column", "label_column", "dataset_split"):
            unread[key] = f"the embedded dataset {data.dataset} has fixed columns and one split"
    if data.dataset in EMBEDDED_DATASETS or Path(data.dataset).expanduser().exists():
        for key in ("dataset_config", "dataset_revision"):
            unread[key] = "only a hub dataset has configurations and revisions"
    elif data.task == "multiple_choice":
        unread["text_column"] = "multiple_choice reads HellaSwag's columns (ctx_a, ctx_b, endings)"
    if data.partitioning == "iid":
        unread["dirichlet_alpha"] = "partitioning is iid"
        unread["partition_field"] = "partitioning is iid"
    if federation.method != "subspace_reg":
        for key in READ_BY_SUBSPACE_REG:
            unread[key] = f"read only by subspace_reg's regularizer, and method is {federation.method}"
    if federation.min_clients_per_round is not None:
        unread["min_sampled_fraction"] = "min_clients_per_round is set and takes precedence"
    by_reason: dict[str, list[str]] = {}
    for key, why in unread.items():
        if key in given:
            by_reason.setdefault(why, []).append(key)
    return [f"{', '.join(keys)}: no effect in this run ({why})" for why, keys in by_reason.items()]
