"""`ModelRunner`: the only part of the engine that knows the device. It owns the paged KV pools and runs a step.

A step's tokens (all scheduled sequences, flattened into one row) go through the model in one forward pass;
attention is where sequences differ, so the model hands each layer's flat q/k/v to a `PagedBatch`, which
writes k/v into the pools at the sequences' slots and attends per sub-batch: all decodes together (one
query each, keys gathered from their blocks and padded to the longest), and each prefill chunk alone (no
query padding at all). Logits are computed only for the tokens that are sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from gemma.engine.block_manager import KVCacheManager
from gemma.engine.scheduler import ScheduledBatch
from gemma.model import GemmaForCausalLM


@dataclass
class SubBatch:
    q_index: torch.Tensor  # (n, Q) flat token indices of the sub-batch's queries
    kv_slots: list[torch.Tensor]  # per KV group: (n, K) cache slots of the keys, padded with slot 0
    masks: list[torch.Tensor]  # per KV group: (n, 1, Q, K) additive masks


class PagedBatch:
    """One step's batch description, handed to the model as `paged` (see gemma.model.PagedAttention)."""

    def __init__(
        self, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], layer_group: list[int],
        write_slots: list[torch.Tensor], subbatches: list[SubBatch],
    ) -> None:
        self.k_pools, self.v_pools, self.layer_group = k_pools, v_pools, layer_group
        self.write_slots, self.subbatches = write_slots, subbatches

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: Any) -> torch.Tensor:
        g = self.layer_group[layer_idx]
        kp, vp = self.k_pools[layer_idx], self.v_pools[layer_idx]  # (slots, Hkv, D)
        kp[self.write_slots[g]] = k[0].transpose(0, 1)  # (T, Hkv, D)
        vp[self.write_slots[g]] = v[0].transpose(0, 1)
        out = torch.empty_like(q)  # (1, H, T, D)
        for sb in self.subbatches:
            qs = q[0][:, sb.q_index].transpose(0, 1)  # (n, H, Q, D)
            ks = kp[sb.kv_slots[g]].transpose(1, 2)  # (n, Hkv, K, D)
            vs = vp[sb.kv_slots[g]].transpose(1, 2)
            o, _ = attend(qs, ks, vs, sb.masks[g])  # (n, H, Q, D)
            out[0][:, sb.q_index.reshape(-1)] = o.transpose(0, 1).reshape(o.shape[1], -1, o.shape[-1])
        return out


class ModelRunner:
    def __init__(self, model: GemmaForCausalLM, kv: KVCacheManager, group_of_layer: list[int],
                 group_windows: list[int | None], group_blocks: list[int], block_size: int) -> None:
        self.model = model
        self.kv = kv
        self.device, self.dtype = model.device, model.dtype
        self.layer_group = group_of_layer
        self.windows = group_windows
        cfg = model.config
        shape = (cfg.num_key_value_heads, cfg.head_dim)
        self.k_pools = [torch.zeros(group_blocks[g] * block_size, *shape, dtype=self.dtype, device=self.device)
                        for g in group_of_layer]
        self.v_pools = [torch.zeros_like(p) for p in self.k_pools]

    @staticmethod
    def kv_bytes_per_block_per_layer(model: GemmaForCausalLM, block_size: int) -> int:
        cfg = model.config
        return 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Run the batch; return logits (S, V) in fp32 for the sampled sequences and their batch indices."""
        ids, positions, sampled = [], [], []
        flat = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed_tokens
            ids += seq.all_token_ids[start : start + n]
            positions += range(start, start + n)
            flat += n
            if start + n == seq.num_tokens:  # this step computes its last known token: sample the next
                sampled.append(i)
        paged = self._describe(batch)
        dev = self.device
        logits_at = torch.tensor([sum(batch.num_new[: i + 1]) - 1 for i in sampled], dtype=torch.long, device=dev)
        out = self.model(
            input_ids=torch.tensor([ids], device=dev), position_ids=torch.tensor([positions], device=dev),
            use_cache=False, logits_to_keep=logits_at, paged=paged,
        )
        return out.logits[0].float(), sampled

    def _describe(self, batch: ScheduledBatch) -> PagedBatch:
        dev, kv = self.device, self.kv
        groups = range(len(self.windows))
        write = [[] for _ in groups]
        offsets, decodes, prefills = [], [], []
        flat = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed_tokens
            for g in groups:
                write[g] += kv.slot_mapping(g, seq.seq_id, start, start + n)
            offsets.append(flat)
            (decodes if n == 1 else prefills).append(i)
            flat += n
        subbatches = []
        if decodes:
            subbatches.append(self._subbatch(batch, decodes, offsets))
        subbatches += [self._subbatch(batch, [i], offsets) for i in prefills]
        write_slots = [torch.tensor(w, dtype=torch.long, device=dev) for w in write]
        return PagedBatch(self.k_pools, self.v_pools, self.layer_group, write_slots, subbatches)

    def _subbatch(self, batch: ScheduledBatch, members: list[int], offsets: list[int]) -> SubBatch:
        """Queries of `members` (all the same count: 1 for decodes, or a single prefill chunk) and their keys."""
        dev = self.device
        q_len = batch.num_new[members[0]]
        q_index = torch.tensor([[offsets[i] + j for j in range(q_len)] for i in members], device=dev)
        kv_slots, masks = [], []
        for g, window in enumerate(self.windows):
            rows, q_pos, k_pos = [], [], []
            for i in members:
                seq, n = batch.seqs[i], batch.num_new[i]
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
                # a windowed group keeps only the keys the first query can still see
                first = 0 if window is None else max(0, start - window + 1)
                rows.append(self.kv.slot_mapping(g, seq.seq_id, first, end))
                q_pos.append(range(start, end))
                k_pos.append(range(first, end))
            width = max(len(r) for r in rows)
            slots = torch.zeros(len(members), width, dtype=torch.long)
            kp = torch.full((len(members), width), -1, dtype=torch.long)  # -1: padding, never attended
            for r, (row, ks) in enumerate(zip(rows, k_pos)):
                slots[r, : len(row)] = torch.tensor(row)
                kp[r, : len(row)] = torch.tensor(ks)
            qp = torch.tensor([list(p) for p in q_pos])  # (n, Q)
            allowed = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])  # (n, Q, K)
            if window is not None:
                allowed &= qp[:, :, None] - kp[:, None, :] < window
            bias = torch.zeros(allowed.shape, dtype=self.dtype).masked_fill_(~allowed, torch.finfo(self.dtype).min)
            kv_slots.append(slots.to(dev))
            masks.append(bias[:, None].to(dev))
        return SubBatch(q_index, kv_slots, masks)
