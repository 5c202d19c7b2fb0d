"""Hand-written CPU kernels for x86 CPUs with AVX2 (`gemma/cpu/csrc/`): a bf16 matmul (`bf16_linear.cpp`), fused
RMSNorm and rotary embedding, and decode attention over the paged KV pools (`decode_ops.cpp`). They are the fast path
at every size where the CPU has no native bf16, and for decode-sized inputs where it has (gemma.cpu.fastpath measures
where PyTorch's oneDNN takes over).

On such CPUs (AVX2 without AVX-512-BF16 or AMX: most AMD EPYCs before Zen 4, older Intel Xeons) PyTorch has no
fast bf16 matmul: measured on 2 AVX2 cores, `F.linear` reads a bf16 weight at ~11-16 GB/s for one row of input
(the memory can give ~25-29) and computes ~13-17 GFLOP/s for many; the fp32 path (MKL) computes 40-100 GFLOP/s but
reads twice the bytes and is slowest of all on the 262k-row tied LM head (~250 ms for 32 rows). The kernel widens
bf16 to fp32 in registers: one-row decode reads weights at ~20-24 GB/s and big batches run at 70-95 GFLOP/s, with
no second copy of the weights. The products and the fp32 accumulation are those of any bf16 GEMM; only the order
of the additions differs (tests/gemma/test_cpu_fastpath.py compares against fp32 maths).

A decode step also runs ~2000 small PyTorch ops, ~5-10 us of dispatch each on 2 slow cores; the fused RMSNorm (one
call for ~11 ops), rotary embedding (one for ~8) and MLP activation (`gelu_mul`: gelu_tanh(gate) * up) compute what
those ops compute (the rotary embedding and the activation to the bit, the norm up to the order of its mean's
additions). `huge_pages` moves weights and KV pools to 2 MiB pages (transparent huge pages): a decode step streams
every weight once, and through 4 KiB pages a TLB miss every 4 KiB kept the bf16 kernel's reads ~10-20% slower.
`decode_attention` (`attention.cpp`, AVX-512F and AVX2 variants) replaces the engine's per-layer gather of every
sequence's keys and values into a padded copy (~40 ms a step at 32 sequences) by reading the pools where they are,
in fp32, each row's keys split in chunks over the cores. `decode_layers` runs every decoder layer of an engine step
of single-token decodes in one call (the modules' computations with the same roundings in the same order, so the same
bits), and `argmax` is the sampler's greedy pick in one pass (~10x ATen's reduction over a 262k vocabulary).

Where the CPU has AVX-512-BF16 (`avx512_bf16`), the bf16 matmul runs a variant built on `vdpbf16ps` for bf16
inputs (chosen at run time; the same build keeps the AVX2 code for other CPUs): the same products, summed in
another fixed order. Measured on a 2-core Intel Xeon with AVX-512-BF16 and AMX (2026-12-05), one-row products read
the 270M's LM head at ~21-23 GB/s against ~19-20 for the AVX2 variant, and its 72 layer matrices in ~11-12 ms
against ~13. Where the CPU has AVX-512F but no bf16 instructions (Intel Skylake-SP to Ice Lake), a variant widens
and multiplies on 16 lanes (it also takes fp32 x on AVX-512-BF16 CPUs); on the same Xeon, forced, one-row products
take ~10-25% less time than the AVX2 variant's and batches the same. `set_isa("avx2")` or GEMMA_CPU_BF16_ISA=avx2
forces the AVX2 variant (tests run every variant the CPU has on one machine).

It is compiled at first use with torch's own extension builder (a C++ compiler and ninja; ~1 min on 2 cores,
cached under `TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions). Where it cannot be built or run,
`available()` is False and callers keep PyTorch's matmul.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("bf16_linear.cpp", "decode_ops.cpp", "quant.cpp",
                                                                  "attention.cpp")]
ISA_ENV = "GEMMA_CPU_BF16_ISA"  # "avx2" forces the AVX2 bf16 matmul on an AVX-512-BF16 CPU; default: the best it has
ATTENTION_ISA_ENV = "GEMMA_CPU_ATTENTION_ISA"  # "avx2" forces decode attention's AVX2 variant on an AVX-512 CPU
_lock = threading.Lock()
_module: Any = None
_error: str | None = None


def cpu_supported() -> bool:
    """Whether this CPU runs the kernel: x86 with AVX2 and FMA (PyTorch's own dispatch level says so)."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def load() -> Any:
    """The compiled extension (built once per machine, loaded once per process); raises if it cannot be had."""
    global _module, _error
    with _lock:
        if _module is None and _error is None:
            try:
                if not cpu_supported():
                    raise RuntimeError(f"needs AVX2 (this CPU: {torch.backends.cpu.get_cpu_capability()})")
                from torch.utils.cpp_extension import load as build

                logger.info("cpu kernels: building or loading gemma/cpu/csrc (the first build takes ~1 min)")
                _module = build(
                    name="gemma_cpu_kernels", sources=[str(s) for s in SOURCES],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"],
                )
                if os.environ.get(ISA_ENV):
                    _module.bf16_set_isa(os.environ[ISA_ENV], -1)
                if os.environ.get(ATTENTION_ISA_ENV):
                    _module.attention_set_isa(os.environ[ATTENTION_ISA_ENV])
                logger.info("cpu kernels: bf16 matmul variant %s, attention %s", _module.bf16_isa(),
                            _module.attention_isa())
            except Exception as exc:  # no compiler, no ninja, a CPU without AVX2: PyTorch's matmul stays
                _error = f"{type(exc).__name__}: {exc}"
                logger.warning("cpu kernels: unavailable, keeping PyTorch's bf16 matmul (%s)", _error)
        if _module is None:
            raise RuntimeError(f"the bf16 CPU kernel is unavailable: {_error}")
        return _module


def available() -> bool:
    """Whether the kernel can be used here (builds it on the first call)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight)` for a contiguous bf16 `weight` (N, K) with K % 8 == 0 and x (..., K) on the CPU:
    fp32 accumulation, the result in x's dtype. `out` (contiguous, x's dtype or fp32) receives it instead, fp32
    holding exactly `result.float()`."""
    flat = out.view(-1, weight.shape[0]) if out is not None else None
    y = load().linear_bf16(x.reshape(-1, x.shape[-1]), weight, flat)
    return y.view(*x.shape[:-1], weight.shape[0])


def set_isa(name: str) -> str:
    """Which variant the bf16 matmul runs: "auto" (the best this CPU has), "avx2", "avx512" (AVX-512F) or
    "avx512_bf16" (vdpbf16ps for bf16 x): the same products, other additions (see bf16_linear.cpp); returns the one
    chosen. Raises where the CPU lacks it."""
    return load().bf16_set_isa(name, -1)


def isa() -> str:
    """The variant the bf16 matmul runs: "avx512_bf16", "avx512" or "avx2"."""
    return load().bf16_isa()


def set_attention_isa(name: str) -> str:
    """Which variant decode attention runs: "auto" (the best this CPU has), "avx2" or "avx512" (AVX-512F: the same
    products, other additions); returns the one chosen. Raises where the CPU lacks it."""
    return load().attention_set_isa(name)


def attention_isa() -> str:
    """The variant decode attention runs: "avx512" or "avx2"."""
    return load().attention_isa()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm (gemma.layers.RMSNorm: fp32, scaled by `1 + weight`) of a CPU `x`, in x's dtype."""
    return load().rms_norm(x, weight, eps)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`F.gelu(gate, approximate="tanh") * up` for bf16 CPU tensors of one shape, bit for bit (the same fp32 maths
    and SLEEF tanh as ATen's vectorized gelu, in one pass)."""
    return load().gelu_mul(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """gemma.layers.apply_rope for bf16 x (B, H, T, D) and tables (B, T, D) on the CPU, bit for bit."""
    return load().rope_bf16(x, cos, sin)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor, scale: float,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Attention of one query per row, reading keys and values in place: q (n, H, D), k/v (B, P, Hkv, D) pools
    (B == 1: one pool for every row, B == n: one per row), slots (n, S) int64, allowed (n, S) bool. Row i attends
    the keys at slots[i, j] where allowed[i, j], in fp32 (scores soft-capped when `softcap`); (n, H, D) bf16. A
    row's result depends only on its own query and keys (attention.cpp)."""
    return load().decode_attention(q, k, v, slots, allowed, scale, softcap)


def huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Move the storages of these CPU tensors (each of 64 KiB or more, once) side by side into regions of up to 256 MiB
    backed by 2 MiB pages (transparent huge pages, `madvise`), the bytes unchanged and every tensor sharing a storage
    following it: weights stream ~10-20% faster (decode_ops.cpp). Returns the bytes moved (0 where the OS gives no
    huge pages)."""
    return load().huge_pages([t for t in tensors if t.device.type == "cpu"])


def usable(weight: torch.Tensor) -> bool:
    """Whether `weight` has the layout the kernel takes."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[1] % 8 == 0)


def loaded() -> bool:
    """Whether the extension is already loaded in this process (never builds it): for callers such as the sampler
    that use a kernel only where a model already made the kernels this process's path."""
    return _module is not None


def argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of an fp32 (S, V) CPU tensor, the same indices (first maximum; a NaN wins), in one pass."""
    return load().argmax_rows(x)


def decode_plan() -> Any:
    """An empty plan of decoder layers for `decode_layers`; gemma.cpu.fastpath fills it once per model with
    `plan.add(norms, q_norm, k_norm, weights, qtypes, rows, counts, num_heads, num_kv_heads, eps, scale, softcap,
    kv_group, rope_table)`: q/k/v, o, gate/up and down as weights (q/k/v and gate/up each one or more, `counts`),
    their ggml types (0: bf16) and the row counts from which each takes the batched product."""
    return load().DecodePlan()


def decode_layers(
    plan: Any, x: torch.Tensor, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
    write_slots: list[torch.Tensor], slots: list[torch.Tensor], allowed: list[torch.Tensor], cos: list[torch.Tensor],
    sin: list[torch.Tensor],
) -> torch.Tensor:
    """Every decoder layer of `plan` for n single-token decodes x (n, C) over paged KV pools (P, Hkv, D), one per
    layer, in one call: the unfused layers' computations with the same roundings in their order, so the same bits (see
    gemma.cpu.fastpath.decode_step). write_slots (n,), slots and allowed (n, S): per KV group; cos/sin (1, n, D):
    per rope table."""
    return load().decode_layers(plan, x, k_pools, v_pools, write_slots, slots, allowed, cos, sin)
