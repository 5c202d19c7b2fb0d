"""The CPU fast path (gemma.cpu.fastpath's `set_cpu_matmul`): the AVX2 bf16 kernel (gemma.cpu.kernels) and fp32
weight copies give the products of the same bf16 values, summed in fp32; the fused modules and the fused decode layer
compute what the plain modules compute."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tests.helpers.checkpoints import FAMILIES, write_hf_checkpoint
from tests.helpers.gguf_writer import write_gguf
from tests.helpers.tokenizer_fixtures import write_sentencepiece_model

from gemma import GemmaForCausalLM
from gemma.cpu import kernels as cpu_kernels
from gemma.cpu.fastpath import (
    FP32_MATMUL_MIN_ROWS,
    KernelAttention,
    KernelRMSNorm,
    matmul_of,
    set_cpu_matmul,
    slow_half_matmul,
)
from gemma.engine import EngineConfig, LLMEngine
from gemma.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
from gemma.model import GemmaAttention
from gemma.parallel import ColumnParallelLinear, ParallelLMHead
from gemma.sampling import SamplingParams

def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512_bf16" in f.read()
    except OSError:
        return False


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags


needs_kernel = pytest.mark.skipif(not cpu_kernels.cpu_supported(), reason="the bf16 kernel needs an AVX2 CPU")


# the bf16 matmul's variants this CPU runs: AVX2 always (forced on an AVX-512 CPU, as on an AVX2-only one)
BF16_ISAS = ["avx2"] + (["avx512"] if _has_avx512() else []) + (["avx512_bf16"] if _has_avx512_bf16() else [])


@pytest.fixture(params=BF16_ISAS)
def isa(request):
    assert cpu_kernels.set_isa(request.param) == request.param
    yield request.param
    cpu_kernels.set_isa("auto")


@pytest.fixture(params=sorted({BF16_ISAS[0], BF16_ISAS[-1]}))
def isa_ends(request):
    """AVX2 and the best variant this CPU has: for tests of whole models, whose code around the products is the same
    under every variant (the kernel tests above run each one)."""
    assert cpu_kernels.set_isa(request.param) == request.param
    yield request.param
    cpu_kernels.set_isa("auto")


def fp32_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


@needs_kernel
def test_the_kernel_builds_on_an_avx2_cpu():
    assert cpu_kernels.available(), cpu_kernels._error  # a broken build must fail here, not fall back silently


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 15, 16, 17, 40])
@pytest.mark.parametrize("out_features", [4, 37, 300])
def test_kernel_matches_fp32_maths_to_one_bf16_rounding(rows, out_features, isa):
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, 96, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16)
    got = cpu_kernels.linear_bf16(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    into = torch.full((rows, out_features), float("nan"))  # fp32 `out`: exactly the bf16 result, widened
    assert cpu_kernels.linear_bf16(x, w, out=into) is not None and torch.equal(into, got.float())
    want = fp32_reference(x, w)
    # the same products summed in another order: at most one bf16 rounding step apart
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-4)
    assert (got.float() - want).abs().mean() < 2**-9 * want.abs().mean()  # most are exactly the rounded sum


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 5, 8), (2, 33, 40), (3, 7, 72), (4, 130, 1000), (5, 9, 2056), (16, 4, 64)])
def test_kernel_odd_shapes_and_strided_x_match_fp32_maths(shape, isa):
    """K not a multiple of the variants' chunks (8, 32), row counts around the tiles' (3 rows of x, 4 of w), a
    bf16 x whose rows are strided: the same result as fp32 maths up to a bf16 rounding."""
    M, N, K = shape
    g = torch.Generator().manual_seed(M * N + K)
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    wide = torch.randn(M, K + 24, generator=g).to(torch.bfloat16)
    x = wide[:, 8 : 8 + K]  # rows K + 24 apart
    got = cpu_kernels.linear_bf16(x, w)
    assert torch.equal(got, cpu_kernels.linear_bf16(x.contiguous(), w))
    torch.testing.assert_close(got.float(), fp32_reference(x, w), rtol=2**-7, atol=1e-3)


@needs_kernel
def test_bf16_isa_env_forces_avx2_and_variants_differ_only_in_rounding(monkeypatch):
    """GEMMA_CPU_BF16_ISA=avx2 runs the AVX2 variant on any CPU (how the AVX2 path is tested on AVX-512 machines);
    where the CPU has AVX-512-BF16 that is the default, and both give fp32 maths' result up to a bf16 rounding."""
    monkeypatch.setattr(cpu_kernels, "_module", None)  # load again: the variable is read at load
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "avx2")
    try:
        assert cpu_kernels.isa() == "avx2"
        g = torch.Generator().manual_seed(3)
        w = torch.randn(2000, 640, generator=g).to(torch.bfloat16)
        x = torch.randn(2, 640, generator=g).to(torch.bfloat16)
        avx2 = cpu_kernels.linear_bf16(x, w)
        assert cpu_kernels.set_isa("auto") == BF16_ISAS[-1]
        best = cpu_kernels.linear_bf16(x, w)
        for got in (avx2, best):
            torch.testing.assert_close(got.float(), fp32_reference(x, w), rtol=2**-7, atol=1e-3)
        with pytest.raises(RuntimeError, match="isa must be"):
            cpu_kernels.set_isa("sse2")
    finally:
        cpu_kernels.set_isa("auto")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_rows_are_batch_invariant(isa, dtype):
    """Each output row is computed in the same order whatever the batch: batched decode equals one at a time."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(130, 72, generator=g).to(torch.bfloat16)
    x = torch.randn(33, 72, generator=g).to(dtype)
    batched = cpu_kernels.linear_bf16(x, w)
    for i in (0, 1, 2, 15, 16, 32):
        assert torch.equal(batched[i : i + 1], cpu_kernels.linear_bf16(x[i : i + 1], w))
        assert torch.equal(batched[i : i + 3], cpu_kernels.linear_bf16(x[i : i + 3], w))


@needs_kernel
def test_kernel_rows_are_independent_of_threads_and_their_shares(isa):
    """Threads own contiguous shares of the weight rows and take the rest of a slower one's share: every row is
    computed once, in its own order, whoever computes it. More threads than cores make shares run unevenly."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(1037, 96, generator=g).to(torch.bfloat16)
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [cpu_kernels.linear_bf16(x[:m], w) for m in (1, 3)]
        for n in (2, 3, 5, 8):
            torch.set_num_threads(n)
            for _ in range(20):
                assert torch.equal(cpu_kernels.linear_bf16(x[:1], w), one[0])
                assert torch.equal(cpu_kernels.linear_bf16(x, w), one[1])
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one[1].float(), fp32_reference(x, w), rtol=2**-7, atol=1e-2)


@needs_kernel
def test_kernel_mode_routes_bf16_linears_and_keeps_shapes():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48).to(torch.bfloat16)
    head = ParallelLMHead(64, 100).to(torch.bfloat16)
    odd = ColumnParallelLinear(12, 8).to(torch.bfloat16)  # in_features not a multiple of 8: PyTorch's matmul
    assert set_cpu_matmul(torch.nn.ModuleList([layer, head, odd]), "kernel") == ("kernel", 0)
    assert [matmul_of(m) for m in (layer, head, odd)] == ["kernel", "kernel", "torch"]
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    assert layer(x).shape == (2, 5, 48) and head(x).shape == (2, 5, 100)
    torch.testing.assert_close(layer(x).float(), fp32_reference(x, layer.weight), rtol=2**-7, atol=1e-4)
    assert set_cpu_matmul(layer, "torch") == ("torch", 0) and matmul_of(layer) == "torch"


@needs_kernel
def test_fused_rope_is_bit_identical_to_apply_rope():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 16, generator=g).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, D), not contiguous
    positions = torch.tensor([[0, 1, 2], [7, 100, 4000]])
    cos, sin = rope_cos_sin(positions, rope_inv_freq(16, 10000.0), torch.bfloat16)
    assert torch.equal(cpu_kernels.rope(x, cos, sin), apply_rope(x, cos, sin))


@needs_kernel
def test_huge_pages_move_storages_with_their_views_and_values():
    w = torch.randn(1536, 640).to(torch.bfloat16)  # 1.9 MiB: together with the next, more than a huge page
    o = torch.randn(640, 1024).to(torch.bfloat16)
    tiny = torch.ones(10)
    view, want, before = w[10:20], (w.clone(), o.clone()), w.data_ptr()
    moved = cpu_kernels.huge_pages([w, view, o, tiny])
    if huge_pages_offered():
        assert moved == w.nbytes + o.nbytes
        assert w.data_ptr() != before and w.data_ptr() % (2 << 20) == 0 and o.data_ptr() == w.data_ptr() + w.nbytes
    assert torch.equal(w, want[0]) and torch.equal(o, want[1]) and view.data_ptr() == w.data_ptr() + 10 * 640 * 2
    view[0, 0] = 5.0  # still one storage
    assert w[10, 0] == 5.0
    del w, view  # the region lives on with o
    assert torch.equal(o, want[1])
    assert cpu_kernels.huge_pages([o]) == 0  # moved once
    assert cpu_kernels.huge_pages([torch.ones(1000)]) == 0  # less than a huge page in all


def huge_pages_offered() -> bool:
    """Whether this kernel gives transparent huge pages on request (its mode "always" or "madvise")."""
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@needs_kernel
def test_gelu_mul_is_pytorchs_two_ops_bit_for_bit():
    every = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(torch.bfloat16)  # every bf16, NaNs and infs too
    g = torch.Generator().manual_seed(4)
    up = torch.randn(every.shape, generator=g).to(torch.bfloat16)

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())

    assert same(cpu_kernels.gelu_mul(every[None], up[None]), F.gelu(every, approximate="tanh")[None] * up)
    gu = torch.randn(3, 2 * 2051, generator=g).to(torch.bfloat16)  # 2051: a partial vector at each row's end
    gate, up = gu.chunk(2, dim=-1)  # strided rows, as the joined gate/up product gives them
    assert same(cpu_kernels.gelu_mul(gate, up), F.gelu(gate, approximate="tanh") * up)
    assert same(cpu_kernels.gelu_mul(gate[None], up[None]), (F.gelu(gate, approximate="tanh") * up)[None])
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_kernels.gelu_mul(gate.float(), up.float())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_rms_norm_matches_the_module(dtype):
    g = torch.Generator().manual_seed(3)
    norm = RMSNorm(640, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(640, generator=g) * 0.5)
    norm = norm.to(dtype)
    x = (torch.randn(4, 7, 640, generator=g) * 3).to(dtype)
    want = norm(x)
    got = cpu_kernels.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    # the mean's additions in another order: fp32 rounding apart, so at most one bf16 step
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    if dtype == torch.bfloat16:
        assert (got == want).float().mean() > 0.99


def test_fp32_mode_copies_weights_for_many_rows_and_keeps_bf16_for_one():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(64, 48).to(torch.bfloat16)
    head = ParallelLMHead(64, 100).to(torch.bfloat16)
    assert set_cpu_matmul(torch.nn.ModuleList([layer, head]), "fp32") == ("fp32", (64 * 48 + 64 * 100) * 4)
    w = layer.weight
    many = torch.randn(2, FP32_MATMUL_MIN_ROWS, 64).to(torch.bfloat16)
    assert torch.equal(layer(many), F.linear(many.float(), w.float()).to(torch.bfloat16))
    assert torch.equal(head(many), F.linear(many.float(), head.weight.float()).to(torch.bfloat16))
    one = many[:1, :1]
    assert torch.equal(layer(one), F.linear(one, w))
    assert set_cpu_matmul(ColumnParallelLinear(8, 8), "fp32") == ("fp32", 0)  # fp32 weights need no copy


def test_auto_leaves_fp32_models_to_torch_and_bad_modes_are_refused():
    assert set_cpu_matmul(ColumnParallelLinear(8, 8), "auto") == ("torch", 0)
    with pytest.raises(ValueError, match="cpu_matmul"):
        set_cpu_matmul(ColumnParallelLinear(8, 8), "fast")
    with pytest.raises(ValueError, match="cpu_matmul"):
        EngineConfig(cpu_matmul="fast")


def test_only_half_precision_on_cpu_can_be_slow():
    assert not slow_half_matmul(torch.device("cpu"), torch.float32)
    assert not slow_half_matmul(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=needs_kernel), "fp32"])
def test_model_logits_stay_within_bf16_error_of_fp32(tmp_path, mode):
    path = write_hf_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    ref = GemmaForCausalLM.from_pretrained(path)
    half = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    set_cpu_matmul(half, "torch")
    fast = copy.deepcopy(half)
    assert set_cpu_matmul(fast, mode)[0] == mode
    ids = torch.randint(10, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        err_native = (half(input_ids=ids).logits.float() - want).abs().max().item()
        err_fast = (fast(input_ids=ids).logits.float() - want).abs().max().item()
    assert err_fast <= 2 * err_native + 1e-3, (err_fast, err_native)


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=needs_kernel), "fp32"])
def test_engine_greedy_tokens_equal_generate_under_each_mode(tmp_path, mode):
    path = write_hf_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    engine_equals_generate(path, mode)


@needs_kernel
@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_kernel_mode_engine_equals_generate_with_sliding_windows_and_soft_capping(tmp_path, family):
    """Prompts longer than the window: the decode-attention kernel reads only the window's keys from the paged pools,
    and with Gemma 2's soft-capped scores, exactly as it reads them from generate's cache."""

    engine_equals_generate(write_hf_checkpoint(tmp_path, family=family, **FAMILIES[family]), "kernel")


def engine_equals_generate(path, mode: str) -> None:
    model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="4MiB", cpu_matmul=mode))
    assert engine.cpu_matmul == mode
    assert matmul_of(engine.model.lm_head) == mode
    layer = engine.model.model.layers[0]  # the fused norm and rotary embedding come with the kernel
    assert isinstance(layer.input_layernorm, KernelRMSNorm) == isinstance(layer.self_attn, KernelAttention) == (
        mode == "kernel")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {str(i): list(range(10, 20 + 3 * i)) for i in range(6)}
    for rid, ids in prompts.items():
        engine.add_request(rid, ids, params)
    outs = engine.run_to_completion(list(prompts))
    assert engine.kv.usage == 0.0
    if mode == "kernel":  # its rows do not depend on the batch: the engine's batches equal one at a time
        for rid, ids in prompts.items():
            alone = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=[])
            assert outs[rid].token_ids == alone[0, len(ids) :].tolist(), rid
    else:
        assert all(len(outs[rid].token_ids) == 6 for rid in prompts)


def reference_attention(q, k, v, slots, allowed, scale, softcap=0.0):
    """fp32 softmax attention of each row's query over its allowed keys: q (n, H, D), k/v (B, P, Hkv, D)."""
    n, H, _ = q.shape
    out = torch.zeros(n, H, q.shape[-1])
    groups = H // k.shape[2]
    for i in range(n):
        pool = 0 if k.shape[0] == 1 else i
        keys = slots[i][allowed[i]]
        for h in range(H):
            kk, vv = k[pool, keys, h // groups].float(), v[pool, keys, h // groups].float()
            scores = kk @ q[i, h].float() * scale
            if softcap:
                scores = softcap * torch.tanh(scores / softcap)
            out[i, h] = scores.softmax(-1) @ vv
    return out


# decode attention's variants this CPU runs: AVX2 always, AVX-512F where the CPU has it
ATTENTION_ISAS = ["avx2"] + (["avx512"] if _has_avx512() else [])


@pytest.fixture(params=ATTENTION_ISAS)
def attention_isa(request):
    assert cpu_kernels.set_attention_isa(request.param) == request.param
    yield request.param
    cpu_kernels.set_attention_isa("auto")


@needs_kernel
@pytest.mark.parametrize("pools", ["shared", "per row"])
@pytest.mark.parametrize("softcap", [0.0, 5.0])
@pytest.mark.parametrize(("H", "Hkv", "D", "S"), [(4, 2, 24, 12), (6, 1, 32, 150), (8, 1, 256, 300)])
def test_decode_attention_matches_fp32_attention_over_the_allowed_slots(pools, softcap, H, Hkv, D, S,
                                                                        attention_isa):
    # S up to 300: a row's keys cut into several chunks (attention.cpp's kChunk, 64), merged; D = 24: AVX-512's
    # variant hands a head size that is no multiple of 16 to the AVX2 code
    g = torch.Generator().manual_seed(3)
    n, P = 5, S + 40
    q = torch.randn(n, H, D, generator=g).to(torch.bfloat16)
    shape = (1 if pools == "shared" else n, P, Hkv, D)
    k = (torch.randn(shape, generator=g) * 2).to(torch.bfloat16)
    v = torch.randn(shape, generator=g).to(torch.bfloat16)
    slots = torch.stack([torch.randperm(P, generator=g)[:S] for _ in range(n)])  # keys anywhere in the pool
    allowed = torch.rand(n, S, generator=g) < 0.7
    allowed[:, 0] = True
    allowed[1, S // 3 :] = False  # rows of different lengths
    got = cpu_kernels.decode_attention(q, k, v, slots, allowed, 0.2, softcap)
    assert got.dtype == torch.bfloat16 and got.shape == (n, H, D)
    want = reference_attention(q, k, v, slots, allowed, 0.2, softcap)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3)  # one bf16 rounding of the fp32 result
    # a row's result depends only on its own keys: alone, with its keys elsewhere in a pool, it is the same bits
    for i in range(n):
        keys = slots[i][allowed[i]]
        alone = cpu_kernels.decode_attention(
            q[i : i + 1], k[[0 if pools == "shared" else i]][:, keys], v[[0 if pools == "shared" else i]][:, keys],
            torch.arange(len(keys))[None], torch.ones(1, len(keys), dtype=torch.bool), 0.2, softcap,
        )
        assert torch.equal(alone[0], got[i])


@needs_kernel
def test_decode_attention_is_independent_of_threads_and_zero_for_a_row_with_no_keys(attention_isa):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 64, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 500, 1, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(1, 500, 1, 64, generator=g).to(torch.bfloat16)
    slots = torch.arange(1200).view(3, 400) % 500
    allowed = torch.ones(3, 400, dtype=torch.bool)
    allowed[2] = False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.decode_attention(q, k, v, slots, allowed, 0.125)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(cpu_kernels.decode_attention(q, k, v, slots, allowed, 0.125), one)
    assert torch.equal(one[2], torch.zeros(4, 64, dtype=torch.bfloat16))
    want = reference_attention(q[:2], k, v, slots[:2], allowed[:2], 0.125)
    torch.testing.assert_close(one[:2].float(), want, rtol=2**-7, atol=1e-3)


@needs_kernel
def test_fused_rms_norm_reads_strided_rows():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, 16, generator=g).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, D), rows strided
    w = torch.randn(16, generator=g)
    assert torch.equal(cpu_kernels.rms_norm(x, w, 1e-6), cpu_kernels.rms_norm(x.contiguous(), w, 1e-6))


@needs_kernel
def test_kernel_mode_joins_qkv_and_gate_up_into_views_of_one_matrix(tmp_path):
    path = write_hf_checkpoint(tmp_path, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    x = torch.randn(3, 5, model.config.hidden_size).to(torch.bfloat16)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    set_cpu_matmul(model, "kernel")
    separate = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], [mlp.gate_proj(x), mlp.up_proj(x)]
    assert len(attn.qkv_parts) == 1 and len(mlp.gate_up_parts) == 1
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.qkv_parts[0].weight.untyped_storage().data_ptr()
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == mlp.gate_up_parts[0].weight.untyped_storage().data_ptr()
    qkv, gate_up = attn.qkv_parts[0].weight, mlp.gate_up_parts[0].weight
    joined = cpu_kernels.linear_bf16(x, qkv), cpu_kernels.linear_bf16(x, gate_up)
    assert torch.equal(joined[0], torch.cat(separate[0], -1)) and torch.equal(joined[1], torch.cat(separate[1], -1))
    after = model.state_dict()  # same names, same values: saving or reloading is unaffected
    assert after.keys() == before.keys() and all(torch.equal(after[k], t) for k, t in before.items())
    set_cpu_matmul(model, "torch")
    assert type(attn) is GemmaAttention and "qkv_parts" not in vars(attn) and "gate_up_parts" not in vars(mlp)
    assert all(matmul_of(m) == "torch" for m in (attn.q_proj, mlp.down_proj, model.lm_head))


@needs_kernel
@pytest.mark.parametrize("V", [1, 7, 8, 9, 64, 1001])
def test_argmax_kernel_equals_torch_ties_infinities_and_nan(V):
    g = torch.Generator().manual_seed(V)
    for trial in range(20):
        x = torch.randint(-3, 3, (5, V), generator=g).float()  # many ties: the first maximum must win
        x[1] = float("-inf")
        x[2, (trial * 7) % V] = float("nan")  # ATen: the first NaN wins
        x[3, -1] = float("inf")
        x[4] = torch.randn(V, generator=g)
        assert torch.equal(cpu_kernels.argmax(x), x.argmax(-1))
    big = torch.randn(6, 2 * 262144, generator=g)[:, ::2]  # strided columns, as a sliced view
    assert torch.equal(cpu_kernels.argmax(big), big.argmax(-1))
    rows = torch.randn(8, 4096, generator=g)[::2]  # strided rows
    assert torch.equal(cpu_kernels.argmax(rows), rows.argmax(-1))


@needs_kernel
def test_each_product_is_ours_below_torch_rows_and_pytorchs_from_there(monkeypatch):
    monkeypatch.setenv("GEMMA_CPU_TORCH_ROWS", "4")
    layer = ColumnParallelLinear(64, 48).to(torch.bfloat16)
    set_cpu_matmul(layer, "kernel")
    assert layer.matmul.torch_rows == 4
    g = torch.Generator().manual_seed(5)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        want = cpu_kernels.linear_bf16(x, layer.weight) if rows < 4 else F.linear(x, layer.weight)
        assert torch.equal(layer(x), want), rows
        into = torch.empty(rows, 48)
        assert torch.equal(layer.matmul(x, out=into), want.float())


def test_without_native_bf16_our_kernel_takes_every_size(monkeypatch):
    import gemma.cpu.fastpath as fastpath

    monkeypatch.delenv("GEMMA_CPU_TORCH_ROWS", raising=False)
    monkeypatch.setattr(fastpath, "slow_half_matmul", lambda device, dtype: True)
    assert fastpath.torch_rows(torch.zeros(16, 8, dtype=torch.bfloat16)) == fastpath.NEVER


@needs_kernel
@pytest.mark.parametrize("torch_rows", [None, "2"], ids=["measured", "pytorch-from-2-rows"])
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text", "gemma3-gguf"])
def test_fused_decode_layer_equals_the_unfused_layer_bit_for_bit(tmp_path, family, torch_rows, monkeypatch, isa_ends):
    """The engine's single-token decode steps run every layer in one `cpu_kernels.decode_layers` call: with and
    without it, the same tokens and the same logprobs to the bit (Gemma 1's norms, Gemma 2's soft-capping and
    windows, Gemma 3's qk-norms and two rope tables, GGUF blocks of six types beside a bf16 matrix), mixed
    prefill + decode steps included."""

    if torch_rows:  # steps of 2+ decodes take PyTorch's product in both paths (GGUF: dequantized), single ones ours
        monkeypatch.setenv("GEMMA_CPU_TORCH_ROWS", torch_rows)
        monkeypatch.setenv("GEMMA_CPU_DENSE_ROWS", torch_rows)
    if family == "gemma3-gguf":  # q Q4_0, k Q5_0, v Q8_0, o BF16, gate Q4_K, up Q5_K, down Q6_K
        path = tmp_path / "model.gguf"
        write_gguf(path, "gemma3", write_sentencepiece_model(tmp_path / "sp"))
        model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization="gguf")
    else:
        extra = FAMILIES.get(family, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16))
        path = write_hf_checkpoint(tmp_path, family=family, **extra)
        model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=3)
    prompts = {str(i): list(range(10, 20 + 4 * i)) for i in range(5)}
    calls = []
    real = cpu_kernels.decode_layers
    monkeypatch.setattr(cpu_kernels, "decode_layers", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(fuse: bool) -> dict:
        engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="4MiB", cpu_matmul="kernel", max_num_seqs=4,
                                                     max_model_len=256))
        assert engine.runner.fused_decode  # every layer on the kernels: fusable
        engine.runner.fused_decode = fuse
        for rid, ids in prompts.items():  # 5 requests on 4 seats: the fifth prefills while the others decode
            engine.add_request(rid, ids, params)
        outs = engine.run_to_completion(list(prompts))
        return {rid: (o.token_ids, o.logprobs) for rid, o in outs.items()}

    fused = run(True)
    assert calls, "no step took the fused decode layer"
    calls.clear()
    assert run(False) == fused
    assert not calls


@needs_kernel
def test_fused_decode_layers_name_what_is_wrong_with_their_inputs(tmp_path):
    path = write_hf_checkpoint(tmp_path, family="gemma3_text", **FAMILIES["gemma3_text"])
    model = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    engine = LLMEngine(model, None, EngineConfig(kv_cache_memory="4MiB", cpu_matmul="kernel", max_num_seqs=2,
                                                 max_model_len=64))
    runner = engine.runner
    layers = len(model.model.layers)
    groups = runner.layout.group_of_layer
    from gemma.cpu.fastpath import _decode_plan

    plan = _decode_plan(model.model, groups)
    assert len(plan) == layers
    x = torch.zeros(1, model.config.hidden_size, dtype=torch.bfloat16)
    head = model.config.head_dim
    ropes = [torch.ones(1, 1, head, dtype=torch.bfloat16)] * len(model.model.rope_types())
    per_group = [torch.zeros(1, dtype=torch.long) for _ in runner.layout.windows]
    slots = [torch.zeros(1, 1, dtype=torch.long) for _ in runner.layout.windows]
    allowed = [torch.ones(1, 1, dtype=torch.bool) for _ in runner.layout.windows]
    args = dict(plan=plan, x=x, k_pools=runner.k_pools, v_pools=runner.v_pools, write_slots=per_group, slots=slots,
                allowed=allowed, cos=ropes, sin=ropes)
    assert cpu_kernels.decode_layers(**args).shape == x.shape  # well-formed: runs
    with pytest.raises(RuntimeError, match="one k and one v pool per layer"):
        cpu_kernels.decode_layers(**{**args, "k_pools": runner.k_pools[:-1]})
    with pytest.raises(RuntimeError, match=r"x \(n, C\) bf16"):
        cpu_kernels.decode_layers(**{**args, "x": x.float()})
    with pytest.raises(RuntimeError, match=r"slots/allowed \(n, S\)"):
        cpu_kernels.decode_layers(**{**args, "allowed": [a.long() for a in allowed]})
    with pytest.raises(RuntimeError, match=r"cos/sin \(1, n, D\)"):
        cpu_kernels.decode_layers(**{**args, "cos": [r[0] for r in ropes]})
    with pytest.raises(RuntimeError, match="write slot 99999999 out of"):
        cpu_kernels.decode_layers(**{**args, "write_slots": [torch.full((1,), 99999999) for _ in per_group]})
