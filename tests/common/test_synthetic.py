"""Benchmark-only synthetic adapter layouts (common/synthetic.py)."""

import pytest
import torch

from common.config import ConfigError, RunConfig
from common.synthetic import parse_layout, payload_bytes, perturbed, synthetic_adapter


def test_roberta_large_r8_is_the_issue_payload():
    layout = parse_layout("roberta-large")
    assert len(layout.linear_shapes()) == 145                     # 24 x 6 + pooler
    assert payload_bytes("roberta-large", 8) == 14_221_312
    assert payload_bytes("minilm", 8) == 4 * 8 * (6 * (4 * 768 + 2 * 1920) + 768)


def test_the_adapter_has_the_layout_and_peft_initialisation():
    tensors = synthetic_adapter("encoder:2x16x32", rank=4, seed=0)
    assert sum(t.numel() * 4 for t in tensors.values()) == payload_bytes("encoder:2x16x32", 4)
    a = tensors["base_model.model.bert.encoder.layer.1.intermediate.dense.lora_A.weight"]
    b = tensors["base_model.model.bert.encoder.layer.1.intermediate.dense.lora_B.weight"]
    assert a.shape == (4, 16) and b.shape == (32, 4) and not b.any() and a.abs().max() <= 1 / 4
    assert all(torch.equal(t, u) for t, u in zip(tensors.values(), synthetic_adapter("encoder:2x16x32", 4, 0).values()))


def test_perturbation_is_small_seeded_and_moves_zeros():
    tensors = synthetic_adapter("encoder:1x8x8", rank=2, seed=0)
    once, again, other = perturbed(tensors, 1), perturbed(tensors, 1), perturbed(tensors, 2)
    for name, value in tensors.items():
        assert torch.equal(once[name], again[name]) and not torch.equal(once[name], other[name])
        assert 0 < (once[name] - value).abs().max() < 1e-2


@pytest.mark.parametrize("spec", ["bert-base", "encoder:2x16", "encoder:0x16x32"])
def test_a_bad_layout_is_a_config_error_naming_the_forms(spec):
    with pytest.raises(ConfigError, match="roberta-large, minilm or encoder:LxHxI"):
        RunConfig.from_flat({"synthetic_layout": spec})
