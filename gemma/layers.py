"""The building blocks of a Gemma decoder: RMSNorm, rotary embedding, gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma import cpu_kernels
from gemma.parallel import SINGLE, ColumnParallelLinear, RowParallelLinear, TPGroup


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: computed in fp32, scaled by `(1 + weight)`, cast back at the end.

    The weight is stored zero-centred (a fresh norm is the identity). Gemma multiplies in fp32 *before* the
    cast, where Llama casts first: transformers PR #29402.
    """

    cpu_kernel: bool = False  # the fused CPU kernel (gemma.cpu_kernels), set by gemma.parallel.set_cpu_matmul

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_kernel:
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies of the standard (non-interleaved, "rotate half") RoPE."""
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

    # gate and up's weights as one matrix (theirs are views into it) for one bf16-kernel call, set by set_cpu_matmul
    gate_up_weight: torch.Tensor | None = None

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TPGroup = SINGLE) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, tp)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            gate, up = cpu_kernels.linear_bf16(x, self.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)
