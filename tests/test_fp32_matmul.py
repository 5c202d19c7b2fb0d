"""Batched half-precision matmuls in fp32 (gemma.parallel's `use_fp32_matmul`), for CPUs whose bf16 / fp16
matmuls lack native instructions: the same products of the same bf16 values, rounded the same way."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from conftest import write_hf_checkpoint

from gemma import GemmaForCausalLM
from gemma.engine import EngineConfig, LLMEngine
from gemma.parallel import (
    FP32_MATMUL_MIN_ROWS,
    ColumnParallelLinear,
    ParallelLMHead,
    slow_half_matmul,
    use_fp32_matmul,
)
from gemma.sampling import SamplingParams


def test_many_rows_use_the_fp32_copy_and_one_row_the_bf16_weight():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48).to(torch.bfloat16)
    head = ParallelLMHead(64, 100).to(torch.bfloat16)
    assert use_fp32_matmul(torch.nn.ModuleList([layer, head])) == (64 * 48 + 64 * 100) * 4
    w = layer.weight
    many = torch.randn(2, FP32_MATMUL_MIN_ROWS, 64).to(torch.bfloat16)
    assert torch.equal(layer(many), F.linear(many.float(), w.float()).to(torch.bfloat16))
    assert torch.equal(head(many), F.linear(many.float(), head.weight.float()).to(torch.bfloat16))
    one = many[:1, :1]
    assert torch.equal(layer(one), F.linear(one, w))
    assert use_fp32_matmul(ColumnParallelLinear(8, 8)) == 0  # fp32 weights need no copy


def test_only_half_precision_on_cpu_can_be_slow():
    assert not slow_half_matmul(torch.device("cpu"), torch.float32)
    assert not slow_half_matmul(torch.device("cuda"), torch.bfloat16)


def test_model_logits_stay_within_bf16_error_of_fp32(tmp_path):
    path = write_hf_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    ref = GemmaForCausalLM.from_pretrained(path)
    half = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    fast = copy.deepcopy(half)
    assert use_fp32_matmul(fast) > 0
    ids = torch.randint(10, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        err_native = (half(input_ids=ids).logits.float() - want).abs().max().item()
        err_fast = (fast(input_ids=ids).logits.float() - want).abs().max().item()
    assert err_fast <= 2 * err_native + 1e-3, (err_fast, err_native)


def test_engine_with_fp32_matmul_on_serves_a_bf16_model(tmp_path):
    path = write_hf_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="4MiB", fp32_matmul="on"))
    assert engine.model.lm_head.fp32_weight is not None
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i in range(6):
        engine.add_request(str(i), list(range(10, 20 + 3 * i)), params)
    outs = engine.run_to_completion([str(i) for i in range(6)])
    assert all(len(outs[str(i)].token_ids) == 6 for i in range(6))
    assert engine.kv.usage == 0.0
