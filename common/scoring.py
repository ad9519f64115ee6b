"""Choice scoring with a causal LM: every choice is a continuation of the context.

For a row with context x and choices y_1 .. y_C (HellaSwag's endings, or the
label names of a classification task), the score of choice c is its
length-normalized log-likelihood after the context,

    score_c = (1 / T_c) * sum_{t=1..T_c} log p(y_c,t | x, y_c,<t)

where T_c is the number of tokens of y_c. The prediction is argmax_c score_c and
the training loss is the cross-entropy over the choices,

    loss = -log softmax(score)_label = logsumexp_c(score_c) - score_label.

Sequences are laid out *left*-padded, ``[pad .. pad, bos, context, choice]``, so
every choice ends at the last position and the model only has to produce logits
for the last K + 1 positions (K = the longest choice in the batch), not for the
whole (N, L, V) sequence: with a 49k-token vocabulary that is the difference
between megabytes and gigabytes per step. Position ids are counted from the first
real token, so the padding changes nothing (the tests check that).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

CONTEXT_KEEPS_START = "start"
"""Truncate a long context at its end (classification: a document's start says most)."""
CONTEXT_KEEPS_END = "end"
"""Truncate a long context at its start (multiple choice: the ending continues the last words)."""


# --------------------------------------------------------------------------- encoding


def encode_choices(tokenizer: Any, contexts: list[str], choices: list[list[str]], max_length: int,
                   keep: str = CONTEXT_KEEPS_END) -> dict[str, torch.Tensor]:
    """Token ids of every (context, choice) pair, left-padded to the longest, as (B, C, L) tensors.

    Returns ``input_ids``, ``attention_mask`` and ``choice_mask`` (1 on the choice's
    own tokens: the ones that are scored), each (B, C, L). A sequence never exceeds
    ``max_length``: the choice keeps up to ``max_length - 2`` tokens (room for a start
    token and one context token), the context is cut to what is left.
    """
    num_choices = {len(c) for c in choices}
    if len(num_choices) != 1:
        raise ValueError(f"every row needs the same number of choices; got {sorted(num_choices)}")
    C = num_choices.pop()
    start = _start_tokens(tokenizer)
    pairs = [(ctx, choice) for ctx, row in zip(contexts, choices, strict=True) for choice in row]
    context_ids, choice_ids = _split_tokenize(tokenizer, pairs)
    sequences: list[tuple[list[int], int]] = []  # (token ids, number of choice tokens at the end)
    for ctx, target in zip(context_ids, choice_ids, strict=True):
        target = target[: max(1, max_length - len(start) - 1)]
        budget = max(0, max_length - len(start) - len(target))
        ctx = (ctx[:budget] if keep == CONTEXT_KEEPS_START else ctx[len(ctx) - budget:]) if budget else []
        prefix = start + ctx
        if not prefix:
            # Neither a start token nor context: the first choice token needs something to follow.
            prefix = [_pad_id(tokenizer)]
        sequences.append((prefix + target, len(target)))
    return _left_pad(sequences, _pad_id(tokenizer), len(contexts), C)


def _start_tokens(tokenizer: Any) -> list[int]:
    # Tokenizers differ in whether they add a BOS themselves; we add it (or nothing) once, explicitly.
    bos = getattr(tokenizer, "bos_token_id", None)
    return [int(bos)] if bos is not None else []


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _split_tokenize(tokenizer: Any, pairs: list[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
    """Context ids and choice ids, where the choice's ids are those of ``context + " " + choice`` past the
    context's: tokenizers merge across the boundary differently when the two are tokenized apart."""
    contexts = [ctx.rstrip() for ctx, _ in pairs]
    choices = [choice.strip() for _, choice in pairs]
    wholes = [f"{ctx} {choice}" if ctx else choice for ctx, choice in zip(contexts, choices, strict=True)]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    choice_ids: list[list[int]] = []
    for i, (ctx, whole) in enumerate(zip(context_ids, whole_ids, strict=True)):
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            choice_ids.append(list(whole[len(ctx):]))
        else:
            # The boundary merged into the context's last token: tokenize the choice alone.
            choice_ids.append(list(tokenizer(" " + choices[i], add_special_tokens=False)["input_ids"]))
        if not choice_ids[-1]:
            raise ValueError(f"choice {pairs[i][1]!r} has no tokens; every choice needs some text")
    return [list(c) for c in context_ids], choice_ids


def _left_pad(sequences: list[tuple[list[int], int]], pad_id: int, B: int, C: int) -> dict[str, torch.Tensor]:
    L = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((B * C, L), pad_id, dtype=torch.long)          # (N, L)
    attention_mask = torch.zeros((B * C, L), dtype=torch.long)            # (N, L)
    choice_mask = torch.zeros((B * C, L), dtype=torch.long)               # (N, L)
    for n, (ids, num_target) in enumerate(sequences):
        input_ids[n, L - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[n, L - len(ids):] = 1
        choice_mask[n, L - num_target:] = 1
    return {"input_ids": input_ids.view(B, C, L), "attention_mask": attention_mask.view(B, C, L),
            "choice_mask": choice_mask.view(B, C, L)}


# --------------------------------------------------------------------------- scoring


def normalized_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of the masked target tokens per sequence.

    logits (N, K, V): position k predicts targets[:, k]; targets (N, K); mask (N, K),
    1 on the tokens that count. Returns (N,) in float32.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)                     # (N, K, V)
    token = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)       # (N, K)
    weights = mask.to(token.dtype)                                        # (N, K)
    # Masked positions may hold anything (padding, context): zero them, never multiply -inf by 0.
    token = torch.where(weights > 0, token, torch.zeros_like(token))
    return token.sum(-1) / weights.sum(-1).clamp(min=1.0)                 # (N,)


def choice_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Length-normalized log-likelihood of every choice, (B, C), for a batch from ``encode_choices``."""
    B, C, L = batch["input_ids"].shape
    input_ids = batch["input_ids"].reshape(B * C, L)                      # (N, L)
    attention_mask = batch["attention_mask"].reshape(B * C, L)            # (N, L)
    choice_mask = batch["choice_mask"].reshape(B * C, L)                  # (N, L)
    K = int(choice_mask.sum(-1).max())
    # Count positions from each sequence's first real token, so left padding does not shift them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)           # (N, L)
    logits = _last_logits(model, input_ids, attention_mask, position_ids, K + 1)  # (N, K + 1, V)
    # Logits at position t predict token t + 1: the last K + 1 positions' first K predict the last K tokens.
    scores = normalized_log_likelihoods(logits[:, :-1], input_ids[:, L - K:], choice_mask[:, L - K:])  # (N,)
    return scores.view(B, C)


def choice_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the choices: scores (B, C) act as logits."""
    return F.cross_entropy(scores.float(), labels)


def _last_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits (N, keep, V) of the last ``keep`` positions; asks the model for no more when it can."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    logits = model(**kwargs).logits                                       # (N, keep or L, V)
    return logits[:, -keep:]


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether the underlying transformers model's forward takes ``argument`` (PEFT passes kwargs through)."""
    model = getattr(model, "module", model)     # a DistributedDataParallel wrapper passes kwargs through too
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return argument in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
