"""One engine step's batch description, shared by the model runner and the CUDA-graph decode step.

`StepInput` is what rank 0 broadcasts to the other ranks (device-independent, picklable); `PagedBatch` is what a
rank hands the model as `paged` (gemma.model.PagedAttention): it writes each layer's keys and values into the paged
pools and attends sub-batch by sub-batch. `KVLayout` says how the pools are laid out, the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from gemma.cpu.fastpath import DecodeBatch


@dataclass
class SubBatch:
    q_index: torch.Tensor  # (n, Q) flat token indices of the sub-batch's queries (padding rows repeat index 0)
    kv_slots: list[torch.Tensor]  # per KV group: (n, K) cache slots of the keys, padded with slot 0
    masks: list[torch.Tensor]  # per KV group: (n, 1, Q, K) bool, True where a query may attend
    biases: list[torch.Tensor] = field(default_factory=list)  # the masks' additive form (filled on the device)
    # rows of different query counts are padded to the longest: which of the n*Q results are real (None: all)
    q_real: torch.Tensor | None = None


@dataclass(frozen=True)
class KVLayout:
    """How the paged KV cache is laid out, identical on every rank: which group each layer's blocks come
    from, each group's window and block count, and the block size."""

    group_of_layer: list[int]
    windows: list[int | None]
    num_blocks: list[int]
    block_size: int


@dataclass
class StepInput:
    """One step, device-independent and picklable (rank 0 broadcasts it to the other ranks)."""

    input_ids: list[int]
    positions: list[int]
    logits_at: list[int]  # flat indices of the tokens to compute logits for
    write_slots: list[torch.Tensor] = field(default_factory=list)  # per group: (T,) slots of the new tokens
    subbatches: list[SubBatch] = field(default_factory=list)
    lora: Any = None  # gemma.engine.lora_manager.LoRAStep: the step's adapters; None: every row is the base model


class PagedBatch:
    """One step's batch description, handed to the model as `paged` (see gemma.model.PagedAttention)."""

    def __init__(
        self, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], layer_group: list[int],
        write_slots: list[torch.Tensor], subbatches: list[SubBatch],
    ) -> None:
        self.k_pools, self.v_pools, self.layer_group = k_pools, v_pools, layer_group
        self.write_slots, self.subbatches = write_slots, subbatches
        # every token a single decode query, token i row i (decodes come first, in order): per group, what the
        # fused decode layers read
        sb = subbatches[0] if len(subbatches) == 1 else None
        decode_only = sb is not None and sb.q_index.shape == (len(write_slots[0]), 1)
        self._decode = DecodeBatch(
            k_pools, v_pools, layer_group, write_slots, sb.kv_slots,
            [m[:, 0, 0].contiguous() for m in sb.masks]) if decode_only else None

    def decode_batch(self) -> DecodeBatch | None:
        """Where every token of the step is its own sequence's single decode query (token i is row i): the pools and
        this step's slots, for the fused CPU decode layers (gemma.cpu.fastpath.decode_step); else None."""
        return self._decode

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Any) -> torch.Tensor:
        g = self.layer_group[layer_idx]
        kp, vp = self.k_pools[layer_idx], self.v_pools[layer_idx]  # (slots, Hkv, D)
        kp[self.write_slots[g]] = k[0].transpose(0, 1)  # (T, Hkv, D)
        vp[self.write_slots[g]] = v[0].transpose(0, 1)
        out = torch.empty_like(q)  # (1, H, T, D)
        for sb in self.subbatches:
            qs = q[0][:, sb.q_index].transpose(0, 1)  # (n, H, Q, D)
            o = attend(qs, kp, vp, sb.kv_slots[g], sb.masks[g], sb.biases[g])  # (n, H, Q, D)
            o = o.transpose(0, 1).reshape(o.shape[1], -1, o.shape[-1])  # (H, n*Q, D)
            dest = sb.q_index.reshape(-1)
            if sb.q_real is not None:
                o, dest = o[:, sb.q_real], dest[sb.q_real]
            out[0][:, dest] = o
        return out


def additive_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a bool mask that the attention maths takes: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
