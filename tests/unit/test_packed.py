"""Prepacked bf16 linear layers (worker/packed.py) compute what the plain layers compute."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from common.model_files import resolve
from worker.model import load_model
from worker.packed import PackedLinear, prepacking_available

pytestmark = pytest.mark.skipif(not prepacking_available(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN prepacked linear ops")


def test_bf16_model_is_prepacked_and_gives_the_plain_logits(tiny_model_dir):
    loaded = load_model(resolve(str(tiny_model_dir)), "", "cpu", "bf16", 1, rows_hint=4)
    packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
    plain_model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).eval()
    plain_linears = [m for m in plain_model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(packed) == len(plain_linears) > 0  # every projection and the (tied) LM head

    ids = torch.tensor([[5, 900, 33, 17, 2000, 44], [1000, 1001, 1002, 1003, 1004, 1005]])
    with torch.inference_mode():
        got = loaded.model(input_ids=ids).logits.float()
        want = plain_model(input_ids=ids).logits.float()
    assert torch.equal(got, want)


def test_packed_linear_matches_f_linear_for_any_row_count():
    weight, bias = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    layer = PackedLinear(weight, bias, rows_hint=32)
    for shape in [(1, 64), (7, 64), (32, 1, 64), (3, 5, 64)]:
        x = torch.randn(*shape).bfloat16()
        assert torch.equal(layer(x), torch.nn.functional.linear(x, weight, bias)), shape


def test_fp32_models_are_left_alone(tiny_loaded):
    assert not any(isinstance(m, PackedLinear) for m in tiny_loaded.model.modules())
