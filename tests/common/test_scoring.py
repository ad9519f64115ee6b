"""Causal choice scoring: a hand-checked batch, the sequence layout, and padding invariance on a tiny Llama."""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

import pytest
import torch

from common.scoring import (
    CONTEXT_KEEPS_END,
    CONTEXT_KEEPS_START,
    choice_loss,
    choice_scores,
    encode_choices,
    normalized_log_likelihoods,
)

# --------------------------------------------------------------------------- a model with known log-likelihoods

V = 8
PAD, BOS = 0, 1
# A bigram "language model": the next-token distribution depends on the current token only,
# so every log-likelihood below can be written down by hand.
NEXT = torch.full((V, V), 1e-6)
NEXT[BOS, 2] = 1.0                         # bos -> context token 2
NEXT[2, 3], NEXT[2, 5] = 0.3, 0.7          # after the context: "3" (p=0.3) or "5" (p=0.7)
NEXT[5, 6], NEXT[5, 4] = 0.25, 0.75        # long choice "5 6 7": each further token is unlikely
NEXT[6, 7], NEXT[6, 4] = 0.25, 0.75
NEXT = NEXT / NEXT.sum(-1, keepdim=True)


class BigramLM(torch.nn.Module):
    """logits[n, t] = log NEXT[input_ids[n, t]]; honours logits_to_keep like a transformers model."""

    def __init__(self, with_logits_to_keep: bool) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(NEXT.log())
        self.with_logits_to_keep = with_logits_to_keep
        self.seen: dict = {}

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        self.seen = {"attention_mask": attention_mask, "position_ids": position_ids, "keep": logits_to_keep}
        logits = self.table[input_ids]                                    # (N, L, V)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class BigramWithoutKeep(BigramLM):
    def forward(self, input_ids, attention_mask=None, position_ids=None):  # no logits_to_keep argument
        return super().forward(input_ids, attention_mask, position_ids)


def hand_batch() -> dict[str, torch.Tensor]:
    """One row, context [bos, 2], choices "3" (1 token) and "5 6 7" (3 tokens), left-padded to L = 5."""
    input_ids = torch.tensor([[[PAD, PAD, BOS, 2, 3],
                               [BOS, 2, 5, 6, 7]]])                     # (B=1, C=2, L=5)
    attention_mask = torch.tensor([[[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]])
    choice_mask = torch.tensor([[[0, 0, 0, 0, 1], [0, 0, 1, 1, 1]]])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "choice_mask": choice_mask}


@pytest.mark.parametrize("model_class", [BigramLM, BigramWithoutKeep])
def test_hand_checked_scores_pick_the_right_choice_and_the_loss_is_the_cross_entropy(model_class) -> None:
    model = model_class(True) if model_class is BigramLM else model_class(False)
    scores = choice_scores(model, hand_batch())                           # (1, 2)

    p = NEXT  # by hand: mean log-probability of each choice's tokens after the context
    short = math.log(p[2, 3])                                             # log 0.3
    long = (math.log(p[2, 5]) + math.log(p[5, 6]) + math.log(p[6, 7])) / 3  # (log .7 + 2 log .25) / 3
    assert scores.shape == (1, 2)
    assert scores[0].tolist() == pytest.approx([short, long], rel=1e-5)
    # Unnormalized, the short choice would win (log .3 > log .7 + 2 log .25); normalized, the long one does.
    assert math.log(p[2, 3]) > math.log(p[2, 5]) + math.log(p[5, 6]) + math.log(p[6, 7])
    assert scores.argmax(-1).tolist() == [1]

    for label in (0, 1):
        expected = -[short, long][label] + math.log(math.exp(short) + math.exp(long))
        assert choice_loss(scores, torch.tensor([label])).item() == pytest.approx(expected, rel=1e-5)
    # position ids count from the first real token, so padding does not shift them
    assert model.seen["position_ids"][0].tolist() == [0, 0, 0, 1, 2]
    if model_class is BigramLM:
        assert model.seen["keep"] == 4                                    # longest choice (3) + 1


def test_normalized_log_likelihoods_ignore_masked_positions_even_when_they_are_minus_inf() -> None:
    logits = torch.zeros(1, 3, V)                                         # uniform: log p = -log V
    logits[0, 0] = float("-inf")                                          # a masked position holding -inf
    logits[0, 0, 0] = 0.0
    targets = torch.tensor([[5, 1, 2]])
    mask = torch.tensor([[0, 1, 1]])
    value = normalized_log_likelihoods(logits, targets, mask)
    assert value.tolist() == pytest.approx([-math.log(V)])


def test_gradients_reach_the_model_through_the_scores() -> None:
    model = BigramLM(True)
    loss = choice_loss(choice_scores(model, hand_batch()), torch.tensor([0]))
    loss.backward()
    assert model.table.grad is not None and model.table.grad.abs().sum() > 0
    assert model.table.grad[PAD].abs().sum() == 0                         # padding contributes nothing


# --------------------------------------------------------------------------- the sequence layout


class WordTokenizer:
    """Whitespace tokens -> ids; bos / pad like a decoder tokenizer."""

    bos_token_id, pad_token_id, eos_token_id = 1, 0, 2

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False
        return {"input_ids": [[self.vocab.setdefault(w, 10 + len(self.vocab)) for w in t.split()] for t in texts]}


def test_encode_choices_lays_out_bos_context_choice_left_padded() -> None:
    tok = WordTokenizer()
    batch = encode_choices(tok, ["the cat sat", "a dog"], [["on it", "down"], ["ran", "barked at me"]], 16)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["choice_mask"]
    assert ids.shape == attn.shape == mask.shape == (2, 2, 6)             # longest: bos + 3 + 2
    words = {v: k for k, v in tok.vocab.items()}
    for b, c, context, choice in [(0, 0, "the cat sat", "on it"), (0, 1, "the cat sat", "down"),
                                  (1, 0, "a dog", "ran"), (1, 1, "a dog", "barked at me")]:
        real = ids[b, c][attn[b, c] == 1].tolist()
        assert real[0] == tok.bos_token_id
        assert " ".join(words[i] for i in real[1:]) == f"{context} {choice}"
        assert " ".join(words[i] for i in ids[b, c][mask[b, c] == 1].tolist()) == choice
        assert attn[b, c, -1] == 1 and mask[b, c, -1] == 1                # every sequence ends at L - 1
        assert (ids[b, c][attn[b, c] == 0] == tok.pad_token_id).all()


@pytest.mark.parametrize("keep, kept", [(CONTEXT_KEEPS_END, "w5 w6 w7"), (CONTEXT_KEEPS_START, "w0 w1 w2")])
def test_long_contexts_are_cut_on_the_side_that_matters_less(keep: str, kept: str) -> None:
    tok = WordTokenizer()
    context = " ".join(f"w{i}" for i in range(8))
    batch = encode_choices(tok, [context], [["x y", "z"]], max_length=6, keep=keep)
    assert batch["input_ids"].shape[-1] == 6
    words = {v: k for k, v in tok.vocab.items()}
    real = [words.get(i, "<bos>") for i in batch["input_ids"][0, 0].tolist()]
    assert real == ["<bos>", *kept.split(), "x", "y"]


def test_a_choice_longer_than_max_length_keeps_room_for_a_predecessor() -> None:
    tok = WordTokenizer()
    batch = encode_choices(tok, ["c"], [[" ".join(["long"] * 20), "short"]], max_length=8)
    assert batch["input_ids"].shape[-1] == 8
    assert batch["choice_mask"][0, 0].sum() == 6                          # 8 - bos - one context token
    assert batch["choice_mask"][0, 0, 0] == 0


def test_rows_with_different_numbers_of_choices_are_rejected() -> None:
    with pytest.raises(ValueError, match="same number of choices"):
        encode_choices(WordTokenizer(), ["a", "b"], [["x", "y"], ["x"]], 16)


# --------------------------------------------------------------------------- a real decoder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tiny_models import create_tiny_llama

    path = create_tiny_llama(tmp_path_factory.mktemp("llama") / "llama", seed=1)
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_left_padding_changes_no_score_on_a_tiny_llama(tiny_llama) -> None:
    model, tok = tiny_llama
    short = (["a man is sitting on a roof ."], [["he starts pulling up roofing .", "he falls"]])
    long_ctx = "a woman is outside with a bucket and a dog . the dog is running around trying to avoid a bath"
    together = encode_choices(tok, [short[0][0], long_ctx], [short[1][0], ["she rinses", "she gets the dog wet"]], 64)
    alone = encode_choices(tok, *short, 64)
    assert together["input_ids"].shape[-1] > alone["input_ids"].shape[-1]   # the short row got padded
    with torch.no_grad():
        padded = choice_scores(model, together)[0]                        # (C,)
        unpadded = choice_scores(model, alone)[0]
        # and by brute force: full logits of each sequence without any padding
        brute = []
        for ids, attn, mask in zip(alone["input_ids"][0], alone["attention_mask"][0], alone["choice_mask"][0]):
            ids, mask = ids[attn == 1], mask[attn == 1]                   # (T,)
            log_probs = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].float(), -1)  # (T - 1, V)
            token = log_probs.gather(-1, ids[1:, None]).squeeze(-1)       # (T - 1,)
            brute.append(float((token * mask[1:]).sum() / mask[1:].sum()))
        brute = torch.tensor(brute)
    assert torch.allclose(padded, unpadded, atol=1e-5)
    assert torch.allclose(unpadded, brute, atol=1e-5)
