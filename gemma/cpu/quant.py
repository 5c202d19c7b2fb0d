"""GGUF-quantized weights kept in their blocks on the CPU (`quantization="gguf"`, vLLM's name for it; "auto", the
engine's default, means it for a .gguf on the CPU at tensor-parallel size 1).

A `.gguf` file stores most matrices in llama.cpp's block formats (the shipped Gemma 3 270M: a Q8_0 embedding, which
is also the tied LM head, and Q5_0 / Q4_K / Q6_K layers). Loaded with `quantization="gguf"` (gemma.weights), every
`Linear` and the token embedding whose type is one of `KERNEL_TYPES` keeps those bytes: the module's `weight`
becomes a uint8 buffer (rows, bytes per row), `qtype` names the format, and
- a `Linear`'s product (`matmul`, the seam gemma.parallel exposes) is `QuantMatmul` (gemma/cpu/csrc/quant.cpp).
  Below `dense_rows` rows of x (decode) the products are integer, as llama.cpp computes them but for x's scales: x
  is quantized per 16 values (llama.cpp: 32 or 256) to int8 with one fp32 scale, each weight block is unpacked in
  registers and the codes' products are summed exactly in int32 (vpdpbusd with AVX-512-VNNI, else AVX2's
  vpmaddubsw), the scales applied in fp32; a step reads only the file's bytes. From `dense_rows` rows on (prefill,
  big batches) the weights are dequantized in chunks and multiplied by PyTorch's matmul (oneDNN's AMX /
  AVX-512-BF16 kernels where the CPU has them). gemma.cpu.fastpath measures `dense_rows` per weight shape at
  start-up (`DENSE_ROWS` until then);
- the embedding becomes `QuantEmbedding`, whose lookup dequantizes only the rows asked for; a tied LM head shares
  the embedding's bytes and multiplies by them.
The AVX-512 variant runs where the CPU has AVX-512F/BW/VL and VNNI, else the AVX2 one (GEMMA_CPU_QUANT_ISA=avx2
forces it, as on a CPU without AVX-512). Activations stay in the model's dtype (bf16 by default for a GGUF) between
the products. Resident weight memory is about the file's size (246 MB for the 270M instead of 536 MB in bf16).

Other types (F16, BF16, F32 norms, Q4_1, Q2_K, ...) are dequantized to the model's dtype at load, as with
`quantization=None`. Only tensor-parallel size 1 on the CPU is supported (a row-parallel shard would cut through
the blocks); other settings are refused with an error naming `quantization`. A quantized model cannot be saved as
safetensors (load it with `quantization=None` for that).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from gemma.cpu import kernels
from gemma.gguf_file import QuantTensor
from gemma.layers import ScaledEmbedding
from gemma.parallel import Linear

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("gguf",)
NEVER = 2**62  # a row count no input reaches
DENSE_ROWS = 16  # until measured: where the dequantized product overtook on 2 cores of an AVX-512 Xeon (fastpath)
# ggml type ids with a kernel: Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K
KERNEL_TYPES = frozenset({2, 6, 8, 12, 13, 14})
ISA_ENV = "GEMMA_CPU_QUANT_ISA"  # "avx2" forces the AVX2 kernels on an AVX-512 CPU; default: the best it has


def _ops() -> object:
    kernels.load()  # the quantized kernels are part of the CPU kernels extension (raises, naming why, without it)
    ops = torch.ops.gemma_quant
    forced = os.environ.get(ISA_ENV)
    if forced and ops.isa() != forced:
        ops.set_isa(forced)
    return ops


def set_isa(name: str) -> str:
    """Which variant the kernels run: "auto" (the best this CPU has), "avx2" or "avx512"; returns the one chosen."""
    return _ops().set_isa(name)


def isa() -> str:
    """The variant the kernels run: "avx512" or "avx2"."""
    return _ops().isa()


def linear(
    x: torch.Tensor, weight: torch.Tensor, qtype: int, out: torch.Tensor | None = None, dense_rows: int = NEVER
) -> torch.Tensor:
    """`x @ W^T` for W in blocks `weight` (N, bytes per row) of ggml type `qtype`, x (..., K) bf16 or fp32; the
    result in x's dtype, or written into `out` (x's dtype, or fp32 holding the values x's dtype rounds them to).
    Below `dense_rows` rows of x: integer products on x quantized per 16 values (llama.cpp's scheme, which takes
    32 or 256 values per scale); from there on: W dequantized in chunks, PyTorch's matmul."""
    flat = out.view(-1, weight.shape[0]) if out is not None else None
    y = _ops().linear(x.reshape(-1, x.shape[-1]), weight, qtype, flat, dense_rows)
    return y.view(*x.shape[:-1], weight.shape[0])


def dequantize(weight: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float rows (N, cols) that blocks `weight` (N, bytes per row) stand for."""
    return _ops().dequantize(weight, qtype, cols, dtype)


def is_quantized(module: nn.Module) -> bool:
    """Whether `module`'s weight is kept in GGUF blocks."""
    return "qtype" in module.__dict__


class QuantMatmul:
    """`Linear.matmul` on the layer's GGUF blocks (gemma/cpu/csrc/quant.cpp): integer products below `dense_rows`
    rows of x, the dequantized product from there on (gemma.cpu.fastpath measures it per weight shape)."""

    name = "gguf"

    def __init__(self, linear: Linear) -> None:
        self.linear = linear
        self.dense_rows = DENSE_ROWS

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m = self.linear
        return linear(x.to(m.compute_dtype), m.weight, m.qtype, out, self.dense_rows)


class QuantEmbedding(ScaledEmbedding):
    """The scaled token embedding on GGUF blocks: a lookup dequantizes the rows it returns, in `compute_dtype`."""

    qtype: int
    compute_dtype: torch.dtype

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _ops().embedding(input_ids, self.weight, self.qtype, self.embedding_dim, self.compute_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # the normalizer in the compute dtype, as ScaledEmbedding casts it to a float weight's
        norm = self._normalizer
        if norm is None or norm.dtype != self.compute_dtype:
            norm = self._normalizer = torch.tensor(self.embedding_dim**0.5, dtype=self.compute_dtype)
        return self.lookup(input_ids) * norm


def keep_quantized(module: nn.Module, tensor: QuantTensor, dtype: torch.dtype) -> None:
    """Make `module` (a `Linear` or the `ScaledEmbedding`, at TP size 1) compute with `tensor`'s blocks, its
    activations in `dtype`."""
    if not isinstance(module, (Linear, ScaledEmbedding)) or module.tp.size != 1:
        raise ValueError(f"quantization='gguf': cannot keep {type(module).__name__}'s weight quantized")
    module._parameters.pop("weight", None)
    module.register_buffer("weight", tensor.data)
    module.qtype, module.compute_dtype = tensor.qtype, dtype
    if isinstance(module, Linear):
        module.matmul = QuantMatmul(module)
    else:
        module.__class__ = QuantEmbedding


def check(quantization: str | None, path_suffix: str, device: torch.device | str, tp_size: int) -> None:
    """Raise a ValueError naming `quantization` where it cannot be served: not a .gguf, not the CPU, TP > 1."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None or one of {QUANTIZATIONS}, got {quantization!r}")
    if path_suffix != ".gguf":
        raise ValueError("quantization='gguf' needs a .gguf checkpoint")
    if torch.device(device).type != "cpu":
        raise ValueError(f"quantization='gguf' runs on the CPU only (device {device}); use quantization=None")
    if tp_size != 1:
        raise ValueError(f"quantization='gguf' supports tp_size 1 only (got {tp_size}); use quantization=None")
    if not kernels.available():
        raise ValueError("quantization='gguf' needs the CPU kernels (gemma.cpu.kernels), which are unavailable here")
