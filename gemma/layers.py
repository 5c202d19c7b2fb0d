"""The building blocks of a Gemma decoder: RMSNorm, rotary embedding, gated MLP, scaled embedding, attention mask."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from gemma.parallel import SINGLE, ColumnParallelLinear, RowParallelLinear, TPGroup, VocabParallelEmbedding


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by `(1 + weight)`, cast back at the end.

    The weight is stored zero-centred (a fresh norm is the identity). Gemma multiplies in fp32 *before* the
    cast, where Llama casts first: transformers PR #29402.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


@functools.lru_cache(maxsize=64)
def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of the standard (non-interleaved, "rotate half") RoPE; one tensor per argument set,
    computed once (every forward asks for it: callers must not modify it)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))


def rope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for `position_ids` (B, T): each (B, T, head_dim), computed in fp32, cast to `dtype`."""
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (B, H, T, D) by the tables (B, T, D); the first and second halves of D form the pairs."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GemmaMLP(nn.Module):
    """Gated MLP: `down(gelu_tanh(gate(x)) * up(x))`; gate/up split by columns, down by rows (one all-reduce).

    Gemma's activation is gelu with the tanh approximation, even where a config says "gelu"
    (see `gemma.config.TANH_GELU_NAMES`).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activate(*self.gate_up(x)))

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """`gelu_tanh(gate) * up` (gemma.cpu.fastpath computes it as one kernel call)."""
        return F.gelu(gate, approximate="tanh") * up

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two input projections (gemma.cpu.fastpath computes them as one product)."""
        return self.gate_proj(x), self.up_proj(x)


class ScaledEmbedding(VocabParallelEmbedding):
    """Token embedding multiplied by `sqrt(hidden_size)` (vocabulary-parallel under TP).

    The normalizer is cast to the weight dtype before the multiply, so in bf16 sqrt(3072)=55.4256 becomes 55.5,
    as in the original implementation (transformers PR #29402).
    """

    _normalizer: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # kept, not made per call: a host-to-device copy cannot be recorded in a CUDA graph
        norm = self._normalizer
        if norm is None or norm.dtype != self.weight.dtype or norm.device != self.weight.device:
            norm = torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype, device=self.weight.device)
            self._normalizer = norm
        return self.lookup(input_ids) * norm


def attention_mask_bias(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: bool = True,
    window: int | None = None,
    key_start: int = 0,
) -> torch.Tensor:
    """Additive mask (B, 1, T, S): 0 where a query may attend, the dtype's minimum elsewhere.

    Queries are the cache slots `past_len .. past_len + q_len - 1`; keys are the slots `key_start .. past_len +
    q_len - 1` (a sliding layer's cache no longer holds the ones before `key_start`). A slot is masked when
    `attention_mask` (B, past_len + q_len) is 0 (padding), if causal when it lies after the query, and with a
    `window` when it lies `window` or more slots before the query. A row with every key masked (a padding
    query) gets uniform weights instead of NaN, as transformers' eager path does.
    """
    kv_len = past_len + q_len
    q_idx = torch.arange(past_len, kv_len, device=device)[:, None]
    k_idx = torch.arange(key_start, kv_len, device=device)[None, :]
    allowed = (k_idx <= q_idx) if causal else torch.ones(q_len, kv_len - key_start, dtype=torch.bool, device=device)
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len - key_start)
    if attention_mask is not None:
        if attention_mask.shape != (batch, kv_len):
            raise ValueError(
                f"attention_mask must have shape (batch, past + new tokens) = {(batch, kv_len)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        allowed = allowed & attention_mask[:, key_start:].bool()[:, None, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)
