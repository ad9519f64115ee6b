"""metrics.jsonl's scalars as TensorBoard event files, one step per committed round.

``tensorboard --logdir runs/`` then shows every run of a folder side by side. The event files live in
``<run>/tensorboard/`` and hold the same numbers as metrics.jsonl, grouped into panels by what they
measure; metrics.jsonl stays the record (the report reads it), the events are a view of it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PANELS = {
    "eval": ("accuracy", "loss", "eval_examples"),
    "train": ("train_loss", "mean_client_train_seconds"),
    "alignment": ("basis_overlap", "basis_overlap_sq", "update_subspace_overlap", "cancellation_ratio",
                  "client_global_cosine", "pairwise_client_cosine", "aggregation_error"),
    "bytes": ("bytes_down", "bytes_up", "residual_bytes_down"),
    "seconds": ("round_seconds", "aggregation_seconds", "eval_seconds"),
}
"""Panel -> the metrics line's scalar keys shown in it (tag ``panel/key``). Other numeric keys of the line
go to ``other/``; per-client values (dicts) become one curve per client, ``clients/<key>/<client>``."""

_PANEL_OF = {key: panel for panel, keys in PANELS.items() for key in keys}
NOT_SCALARS = ("round", "timestamp", "attempt")


def scalars_of(line: dict[str, Any]) -> dict[str, float]:
    """tag -> value of one metrics line; null (NaN or infinity when written) is left out, as TensorBoard
    would draw it as a gap anyway."""
    out: dict[str, float] = {}
    for key, value in line.items():
        if key in NOT_SCALARS:
            continue
        if isinstance(value, dict):
            for client, number in value.items():
                if _is_number(number):
                    out[f"clients/{key}/{client}"] = float(number)
        elif _is_number(value):
            out[f"{_PANEL_OF.get(key, 'other')}/{key}"] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class MetricsBoard:
    """Writes each committed round's scalars under ``directory``; on a resume, events of rounds after the
    committed one (written before a crash) are purged, as metrics.jsonl's lines are."""

    def __init__(self, directory: Path, resume_after_round: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter   # needs the tensorboard package (requirements.txt)

        purge = None if resume_after_round is None else resume_after_round + 1
        self.writer = SummaryWriter(log_dir=str(directory), purge_step=purge, flush_secs=10)

    def add(self, line: dict[str, Any]) -> None:
        step = int(line["round"])
        for tag, value in scalars_of(line).items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=line.get("timestamp"))
        self.writer.flush()          # one round at a time: the dashboard shows a round as soon as it commits

    def close(self) -> None:
        self.writer.close()
