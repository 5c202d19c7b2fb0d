"""The CPU fast path: which matmul every layer of a loaded model uses, and the fused decode layer.

`set_cpu_matmul(model, mode)` is applied to a loaded, placed model by the engine's model runner (or by hand); the
model's own modules (gemma.model, gemma.layers, gemma.parallel) stay the plain algebra. It acts through the seams
they expose, without changing a parameter's name or value (saving and reloading are unaffected):
- a `Linear`'s product (`matmul`) is replaced per instance;
- `RMSNorm`, `GemmaAttention` and `GemmaMLP` become the subclasses below (`KernelRMSNorm`, ...), which compute the
  same maths with gemma.cpu.kernels; "torch" turns them back.

Why: on a CPU without native bf16 / fp16 matrix instructions (no AVX-512-BF16 or AMX: AVX2 machines, most AMD EPYCs
before Zen 4), PyTorch's half-precision matmul is slow: on 2 AVX2 cores it computes ~17 GFLOP/s against ~40-100 for
fp32, and reads a bf16 weight for one row at ~11-16 GB/s of the memory's ~25-29. The modes:
- "kernel": gemma.cpu.kernels' bf16 matmul (fp32 accumulation, no extra memory) for bf16 weights, and its fused
  RMSNorm, rotary embedding, MLP activation and decode attention; q/k/v and gate/up weights are joined into one
  matrix each (the modules' weights become views into it), so a layer makes 4 matmul calls instead of 7. Each
  product is ours below a row count and PyTorch's (oneDNN) from there on (`torch_rows`, per weight shape): on a CPU
  with native bf16 (AVX-512-BF16, AMX) oneDNN wins batches while ours wins decode-sized inputs, so the crossover is
  measured at start-up; without native bf16 ours wins at every size and no measuring is needed. GGUF blocks kept
  quantized (gemma.cpu.quant) take part alike: q/k/v and gate/up joined per run of one type, their integer products
  below a row count measured per weight shape (`dense_rows`), the dequantized product from there on. The weights are
  then moved to 2 MiB pages (`kernels.huge_pages`), where they stream faster;
- "fp32": an fp32 copy of each half-precision weight for inputs of `FP32_MATMUL_MIN_ROWS` rows or more (the
  products of bf16 values computed in fp32 and rounded back, as a bf16 GEMM with fp32 accumulation does, at 2x
  the weights' bytes in memory); fewer rows keep the half-precision weight, being bound by reading it;
- "torch": PyTorch's own;
- "auto": "kernel" for bf16 weights or GGUF blocks on the CPU where the kernels build, else "fp32" where
  `slow_half_matmul`, else "torch".

`decode_step` runs an engine step in which every sequence decodes one token as one C++ call for all layers
(`kernels.decode_layers`: the modules' computations with the same roundings in the same order, so the same bits), where
`can_fuse_decode(model)` holds.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gemma.cpu import kernels, quant
from gemma.layers import GemmaMLP, RMSNorm
from gemma.model import GemmaAttention, GemmaDecoderLayer, GemmaModel
from gemma.parallel import Linear

logger = logging.getLogger(__name__)

CPU_MATMUL_MODES = ("auto", "kernel", "fp32", "torch")
NEVER = 2**62  # a row count no input reaches: always our kernel
CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32, 64)
# the integer products' time grows with every row faster than the dequantized product's (on 2 cores of an Intel Xeon
# with AVX-512-VNNI and AMX, 2026-12-05, the latter wins from 16-32 rows on every matrix of the 270M): measuring
# stops once the dequantized product has won at two row counts in a row
DENSE_CALIBRATION_ROWS = (2, 4, 8, 16, 32, 64)
_crossover: dict[tuple[int, int, str], int] = {}  # (out, in) features, kernels.isa() -> torch_rows, once per process
_dense_crossover: dict[tuple, int] = {}  # (out, in) features, ggml type, x's dtype, quant.isa() -> dense_rows
FP32_MATMUL_MIN_ROWS = 4  # measured on 2 AVX2 cores: bf16 wins below (it reads half the bytes), fp32 above


def slow_half_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether half-precision matmuls on `device` lack native instructions (see the module doc)."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    mkldnn = torch.ops.mkldnn
    return not (mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported())


# ---- which product, by row count ------------------------------------------------------------------------------


def torch_rows(weight: torch.Tensor) -> int:
    """From how many input rows PyTorch's product of a bf16 CPU `weight` beats ours on this CPU: measured once per
    weight shape per process where the CPU has native bf16 (`CALIBRATION_ROWS`, best of 3 timings each, ~0.1-2 s
    for a model); `NEVER` without it. GEMMA_CPU_TORCH_ROWS=N sets it for every weight instead."""
    forced = os.environ.get("GEMMA_CPU_TORCH_ROWS")
    if forced:
        return int(forced)
    if slow_half_matmul(weight.device, weight.dtype):
        return NEVER  # on 2 AVX2 cores PyTorch's bf16 matmul computes ~13-17 GFLOP/s, ours 70-95 (kernels.py)
    shape = (weight.shape[0], weight.shape[1], kernels.isa())  # the variant matters: AVX-512-BF16 is faster
    if shape not in _crossover:
        _crossover[shape] = _measure(weight)
        logger.info("cpu kernels: weight %s (%s): PyTorch's matmul from %s rows on", shape[:2], shape[2],
                    "no number of" if _crossover[shape] == NEVER else _crossover[shape])
    return _crossover[shape]


def _measure(weight: torch.Tensor) -> int:
    """The smallest of CALIBRATION_ROWS from which F.linear is faster than the kernel at it and every larger one."""
    return crossover(lambda x: kernels.linear_bf16(x, weight), lambda x: F.linear(x, weight), weight.shape[1],
                     weight.dtype, weight.shape[0] * weight.shape[1])


def crossover(
    ours, theirs, cols: int, dtype: torch.dtype, size: int, rows_list=CALIBRATION_ROWS, settle: int | None = None
) -> int:
    """The smallest of `rows_list` from which `theirs(x)` is faster than `ours(x)` for x (rows, cols) of `dtype` at
    it and every larger one (best of 3 timings each); NEVER where there is none. `size`: the weight's elements;
    `settle`: stop measuring once `theirs` has won that many row counts in a row."""
    faster: list[bool] = []
    # ~10 ms of work per timing on the 270M's layers, one call on its LM head, at most 100 calls on tiny test models
    reps = max(1, min(100, int(2e7 // size)))
    for rows in rows_list:
        x = torch.randn(rows, cols).to(dtype)
        times = []
        for f in (ours, theirs):
            f(x)  # warm: first-call allocations, oneDNN's primitive for this shape
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for _ in range(reps):
                    f(x)
                best = min(best, time.perf_counter() - start)
            times.append(best)
        faster.append(times[1] < times[0])
        if settle and len(faster) >= settle and all(faster[-settle:]):
            break
    first = next((i for i in range(len(faster)) if all(faster[i:])), None)
    return NEVER if first is None else rows_list[first]


def dense_rows(weight: torch.Tensor, qtype: int, cols: int, dtype: torch.dtype) -> int:
    """From how many rows of x (in `dtype`) dequantizing GGUF blocks `weight` and multiplying with PyTorch's matmul
    beats the integer products (gemma.cpu.quant.linear): measured once per shape, type and variant per process.
    GEMMA_CPU_DENSE_ROWS=N sets it for every weight instead."""
    forced = os.environ.get("GEMMA_CPU_DENSE_ROWS")
    if forced:
        return int(forced)
    key = (weight.shape[0], cols, qtype, dtype, quant.isa())
    if key not in _dense_crossover:
        _dense_crossover[key] = crossover(
            lambda x: quant.linear(x, weight, qtype), lambda x: quant.linear(x, weight, qtype, dense_rows=1), cols,
            dtype, weight.shape[0] * cols, DENSE_CALIBRATION_ROWS, settle=2,
        )
        logger.info("cpu kernels: GGUF weight %s (type %d, %s): dequantized from %s rows on", key[:2], qtype, key[4],
                    "no number of" if _dense_crossover[key] == NEVER else _dense_crossover[key])
    return _dense_crossover[key]


def product(x: torch.Tensor, weight: torch.Tensor, rows_from: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x weight^T by the kernel below `rows_from` rows of x, by F.linear from there on; into `out` when given."""
    if x.numel() < rows_from * weight.shape[1]:
        return kernels.linear_bf16(x, weight, out=out)
    y = F.linear(x, weight)
    return y if out is None else out.copy_(y)


# ---- a Linear's product -------------------------------------------------------------------------------------


class KernelMatmul:
    """`Linear.matmul` on the bf16 kernel (fp32 accumulation, `out` written directly) below `torch_rows` rows,
    PyTorch's from there on."""

    name = "kernel"

    def __init__(self, linear: Linear, rows_from: int) -> None:
        self.linear, self.torch_rows = linear, rows_from

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return product(x, self.linear.weight, self.torch_rows, out)


class Fp32Matmul:
    """`Linear.matmul` with an fp32 copy of the half-precision weight for inputs of FP32_MATMUL_MIN_ROWS rows or
    more, rounded back to x's dtype."""

    name = "fp32"

    def __init__(self, linear: Linear) -> None:
        self.linear = linear
        self.weight = linear.weight.detach().float()

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if x.numel() >= FP32_MATMUL_MIN_ROWS * self.linear.in_features:
            y = F.linear(x.float(), self.weight).to(x.dtype)
        else:
            y = F.linear(x, self.linear.weight)
        return y if out is None else out.copy_(y)


def matmul_of(linear: Linear) -> str:
    """Which product `linear` uses: "kernel", "fp32", "gguf" (gemma.cpu.quant) or "torch"."""
    impl = linear.__dict__.get("matmul")
    return impl.name if impl is not None else "torch"


# ---- modules computed with the kernels -------------------------------------------------------------------------


class KernelRMSNorm(RMSNorm):
    """RMSNorm as one kernel call (the same maths up to the order of the mean's additions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


class KernelAttention(GemmaAttention):
    """Attention with the fused rotary embedding (bit for bit), q/k/v as one product, and the decode-attention
    kernel where each row has one query (it reads the engine's pools in place)."""

    qkv_parts: list[Part] | None = None  # q, k and v as few products (join_products); their weights are views

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_parts is None:
            return super().project_qkv(x)
        sizes = (self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features)
        q, k, v = run_parts(self.qkv_parts, x).split(sizes, dim=-1)
        return self.q_proj.add_lora(x, q), self.k_proj.add_lora(x, k), self.v_proj.add_lora(x, v)  # views: in place

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return kernels.rope(x, cos, sin)

    def decode_kernel(self, q: torch.Tensor) -> bool:
        """Whether the decode-attention kernel runs for q (n, H, Q, D): one query per row, inference."""
        return q.shape[2] == 1 and self.head_dim % 8 == 0 and not self.training

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.decode_kernel(q) or output_attentions:
            return super().attend(q, k, v, mask, output_attentions)
        # one query per row (KV-cached decode): the kernel, as the engine's paged decode runs it
        B, S = k.shape[0], k.shape[2]
        slots = torch.arange(S, device=k.device).expand(B, S)
        out = kernels.decode_attention(
            q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2), slots, mask[:, 0, 0] == 0, self.scaling,
            self.softcap or 0.0,
        )
        return out[:, :, None], None

    def attend_slots(
        self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, allowed: torch.Tensor,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        if not self.decode_kernel(q):
            return super().attend_slots(q, k_pool, v_pool, slots, allowed, bias)
        out = kernels.decode_attention(  # the pools read in place
            q[:, :, 0], k_pool[None], v_pool[None], slots, allowed[:, 0, 0], self.scaling, self.softcap or 0.0
        )
        return out[:, :, None]


class KernelMLP(GemmaMLP):
    """The MLP with gate and up as one product and the activation as one kernel call (as the fused layer does)."""

    gate_up_parts: list[Part] | None = None  # gate and up as few products (join_products); their weights are views

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up_parts is None:
            return super().gate_up(x)
        gate, up = run_parts(self.gate_up_parts, x).chunk(2, dim=-1)
        return self.gate_proj.add_lora(x, gate), self.up_proj.add_lora(x, up)

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.dtype == up.dtype == torch.bfloat16 and gate.device.type == "cpu":
            return kernels.gelu_mul(gate, up)
        return super().activate(gate, up)


SWAPS: dict[type[nn.Module], type[nn.Module]] = {RMSNorm: KernelRMSNorm, GemmaAttention: KernelAttention,
                                                 GemmaMLP: KernelMLP}


# ---- applying a mode -------------------------------------------------------------------------------------------


def set_cpu_matmul(model: nn.Module, mode: str = "auto") -> tuple[str, int]:
    """Choose the matmul of every `Linear` in `model` and the kernel modules (see the module doc); call it after the
    weights are loaded and placed. Returns the mode applied ("kernel", "fp32" or "torch") and the bytes of any fp32
    copies."""
    if mode not in CPU_MATMUL_MODES:
        raise ValueError(f"cpu_matmul must be one of {CPU_MATMUL_MODES}, got {mode!r}")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    half = [m for m in linears if m.weight.dtype in (torch.bfloat16, torch.float16)]
    if mode == "auto":
        slow = any(slow_half_matmul(m.weight.device, m.weight.dtype) for m in half)
        cpu_bf16 = bool(half) and all(m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu" for m in half)
        gguf = any(matmul_of(m) == "gguf" for m in linears)  # GGUF blocks (gemma.cpu.quant): the kernels' model
        mode = "kernel" if (cpu_bf16 or gguf) and kernels.available() else "fp32" if slow else "torch"
    _reset(model, linears)
    added = 0
    if mode == "kernel":
        kernels.load()  # raises, naming why, where the kernel cannot be built
        for m in half:
            if kernels.usable(m.weight):
                m.matmul = KernelMatmul(m, torch_rows(m.weight))
        joined = set()
        for m in list(model.modules()):
            if isinstance(m, RMSNorm) and m.weight.device.type == "cpu":
                m.__class__ = KernelRMSNorm
            elif isinstance(m, GemmaAttention) and m.q_proj.weight.device.type == "cpu" \
                    and _compute_dtype(m.q_proj) == torch.bfloat16:
                m.__class__ = KernelAttention
                m.qkv_parts = join_products([m.q_proj, m.k_proj, m.v_proj])
                joined.update((m.q_proj, m.k_proj, m.v_proj) if m.qkv_parts else ())
            elif isinstance(m, GemmaMLP):
                m.__class__ = KernelMLP
                m.gate_up_parts = join_products([m.gate_proj, m.up_proj])
                joined.update((m.gate_proj, m.up_proj) if m.gate_up_parts else ())
        for m in linears:  # the GGUF products not joined (o, down, the LM head): each measured
            if matmul_of(m) == "gguf" and m not in joined:
                m.matmul.dense_rows = dense_rows(m.weight, m.qtype, m.in_features, m.compute_dtype)
        moved = kernels.huge_pages([*model.parameters(), *model.buffers()])  # after the joins: their storage
        if moved:
            logger.info("cpu kernels: %.0f MB of weights moved to 2 MiB pages", moved / 1e6)
    elif mode == "fp32":
        for m in half:
            m.matmul = Fp32Matmul(m)
            added += m.matmul.weight.nbytes
    return mode, added


def _compute_dtype(linear: Linear) -> torch.dtype:
    """The dtype `linear` computes in: its weight's, or for GGUF blocks (gemma.cpu.quant) its activations'."""
    return linear.__dict__.get("compute_dtype", linear.weight.dtype)


def _reset(model: nn.Module, linears: list[Linear]) -> None:
    """Every module back to its plain class and product (the joined weights stay, as views: same values); a product
    on GGUF blocks stays (it is how the weights are stored, not a choice of this module)."""
    for m in linears:
        if matmul_of(m) != "gguf":
            m.__dict__.pop("matmul", None)
    for m in model.modules():
        m.__dict__.pop("decode_plan", None)
        for base, swap in SWAPS.items():
            if type(m) is swap:
                for name in ("qkv_parts", "gate_up_parts"):
                    m.__dict__.pop(name, None)
                m.__class__ = base


class Part(NamedTuple):
    """One product of a projection computed as few products: a bf16 weight on the kernel (`qtype` 0), or GGUF blocks
    of ggml type `qtype` (gemma.cpu.quant)."""

    weight: torch.Tensor
    qtype: int
    rows: int  # bf16: PyTorch's product from this many rows of x (torch_rows); GGUF: the dequantized one (dense_rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.qtype:
            return quant.linear(x, self.weight, self.qtype, dense_rows=self.rows)
        return product(x, self.weight, self.rows)


def part_of(linear: Linear) -> Part | None:
    """`linear`'s product as a Part: on the bf16 kernel or on GGUF blocks; None for any other."""
    impl = linear.__dict__.get("matmul")
    if isinstance(impl, KernelMatmul):
        return Part(linear.weight, 0, impl.torch_rows)
    if isinstance(impl, quant.QuantMatmul):
        return Part(linear.weight, linear.qtype, impl.dense_rows)
    return None


def run_parts(parts: list[Part], x: torch.Tensor) -> torch.Tensor:
    """The outputs of `parts` for x, side by side."""
    return parts[0](x) if len(parts) == 1 else torch.cat([p(x) for p in parts], dim=-1)


def join_products(linears: list[Linear]) -> list[Part] | None:
    """The products of `linears` (same input, no bias) as few calls as their weights allow: all on the bf16 kernel,
    one matrix; GGUF blocks, one matrix per run of one type. Each module's weight becomes a view of its rows (no
    memory is added) and each output element gets the same additions as in its own call. None where they do not
    qualify."""
    kinds = {matmul_of(m) for m in linears}
    if any(m.bias is not None for m in linears) or kinds not in ({"kernel"}, {"gguf"}):
        return None
    parts = []
    for qtype, run in itertools.groupby(linears, key=lambda m: m.__dict__.get("qtype", 0)):
        run = list(run)
        joined = torch.cat([m.weight.detach() for m in run])
        start = 0
        for m in run:
            if qtype:
                m._buffers["weight"] = joined[start : start + m.out_features]
            else:
                m.weight.data = joined[start : start + m.out_features]
            start += m.out_features
        rows = dense_rows(joined, qtype, run[0].in_features, run[0].compute_dtype) if qtype else torch_rows(joined)
        parts.append(Part(joined, qtype, rows))
    return parts


# ---- the fused decode layer ------------------------------------------------------------------------------------


class DecodeBatch(NamedTuple):
    """A step of n single-token decodes over the paged KV cache: every layer's pools, and per KV group where this
    step's keys go and which keys each row attends."""

    k_pools: list[torch.Tensor]  # per layer (P, Hkv, D)
    v_pools: list[torch.Tensor]
    layer_group: list[int]  # per layer: its KV group
    write_slots: list[torch.Tensor]  # per group (n,) int64: where this step's keys and values go
    slots: list[torch.Tensor]  # per group (n, S) int64: the keys row i attends (padding: any slot, not allowed)
    allowed: list[torch.Tensor]  # per group (n, S) bool


def can_fuse_decode(model: GemmaModel) -> bool:
    """Whether `decode_step` can run `model`: every layer's products on the bf16 kernel or GGUF blocks with q/k/v
    and gate/up joined, no biases, no tensor parallelism (its all-reduces sit between the ops)."""
    def fusable(layer: GemmaDecoderLayer) -> bool:
        attn, mlp = layer.self_attn, layer.mlp
        return (
            isinstance(attn, KernelAttention) and attn.head_dim % 8 == 0 and attn.o_proj.tp.size == 1
            and attn.qkv_parts is not None and isinstance(mlp, KernelMLP) and mlp.gate_up_parts is not None
            and part_of(attn.o_proj) is not None and attn.o_proj.bias is None
            and part_of(mlp.down_proj) is not None and mlp.down_proj.bias is None
            and all(isinstance(m, KernelRMSNorm) for m in _norms(layer))
        )
    return not model.training and all(fusable(layer) for layer in model.layers)


def _norms(layer: GemmaDecoderLayer) -> list[RMSNorm]:
    """The layer's norms in the order `kernels.decode_layers` takes them: the layer's, then Gemma 3's q/k norms."""
    attn = layer.self_attn
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if layer.sandwich:
        norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
    return norms + ([attn.q_norm, attn.k_norm] if hasattr(attn, "q_norm") else [])


def decode_step(
    model: GemmaModel, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: DecodeBatch
) -> torch.Tensor:
    """`model(input_ids, position_ids=..., paged=...).last_hidden_state` (1, n, C) for a step of n single-token
    decodes (input_ids, position_ids (1, n)): every layer in one `kernels.decode_layers` call."""
    x = model.embed_tokens(input_ids)[0]  # (n, C)
    cos, sin = zip(*model.rope_tables(position_ids, x.dtype).values())
    x = kernels.decode_layers(_decode_plan(model, batch.layer_group), x, batch.k_pools, batch.v_pools,
                              batch.write_slots, batch.slots, batch.allowed, list(cos), list(sin))
    return model.norm(x[None])


def _decode_plan(model: GemmaModel, layer_group: list[int]) -> Any:
    """Per layer what `decode_layers` takes besides the step's inputs, gathered once per KV layout (set_cpu_matmul
    drops it)."""
    key = tuple(layer_group)
    cached = model.__dict__.get("decode_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    rope_index = {t: i for i, t in enumerate(model.rope_types())}
    plan = kernels.decode_plan()
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        norms = [m.weight for m in _norms(layer)]
        q_norm, k_norm = norms[-2:] if hasattr(attn, "q_norm") else (None, None)
        parts = [*attn.qkv_parts, part_of(attn.o_proj), *layer.mlp.gate_up_parts, part_of(layer.mlp.down_proj)]
        plan.add(norms[: 4 if layer.sandwich else 2], q_norm, k_norm, [p.weight for p in parts],
                 [p.qtype for p in parts], [p.rows for p in parts], [len(attn.qkv_parts), len(layer.mlp.gate_up_parts)],
                 attn.num_heads, attn.num_kv_heads, layer.input_layernorm.eps, attn.scaling, attn.softcap or 0.0,
                 layer_group[i], rope_index[model.config.layer_type(i)])
    model.__dict__["decode_plan"] = (key, plan)
    return plan
