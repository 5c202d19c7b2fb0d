"""Tensor parallelism: a process group and the layers that own their shard and their collective.

At `tp.size == 1` (no process group at all) every layer here is the plain layer it extends: same parameters,
same maths, no communication. At size N (vLLM's / Megatron's scheme):
- `ColumnParallelLinear` holds a slice of the output features (rows of the weight); no communication.
- `RowParallelLinear` holds a slice of the input features (columns); its partial outputs are summed with
  one all-reduce, visible in `forward`.
- `VocabParallelEmbedding` holds a slice of the vocabulary; a token outside the slice looks up zeros, and one
  all-reduce assembles the rows. The tied LM head multiplies by the same slice and all-gathers the logits.
Each layer's `load_shard(full)` cuts its slice out of a checkpoint tensor, so a rank materializes only its own
shard (the checkpoint itself is memory-mapped).

A backend may replace a layer's product (`Linear.matmul`, before its bias and collective) per instance:
gemma.cpu.fastpath does so with its CPU kernels; the sharding and the collectives stay here. A LoRA bank
(gemma.lora) sets a layer's `lora` hook, which adds its adapters' deltas to the product, also before the collective.
"""

from __future__ import annotations

import datetime
import pickle
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn



class TPGroup:
    """A tensor-parallel group (`rank` of `size`) and the collectives the layers use; size 1 needs no group."""

    def __init__(self, rank: int = 0, size: int = 1, pg: Any = None) -> None:
        if size > 1 and pg is None:
            raise ValueError("a tensor-parallel group of size > 1 needs a process group")
        self.rank, self.size, self.pg = rank, size, pg

    @classmethod
    def connect(
        cls, rank: int, size: int, host: str, port: int, backend: str = "gloo", timeout_s: float = 300.0,
        peers_alive: Callable[[], bool] | None = None,
    ) -> TPGroup:
        """Join a group through a TCP rendezvous at host:port (rank 0 hosts it). gloo on CPU, nccl on GPU.

        The group is a standalone process-group object, not torch.distributed's global default group, so
        several engines can live in one process. Rank 0 waits for every rank to check in, and gives up at once
        when `peers_alive()` turns false (a worker that crashed while loading) instead of at the timeout.
        """
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, size, rank == 0, timeout=timeout, wait_for_workers=False)
        store.set(f"joined/{rank}", "1")
        if rank == 0:
            deadline = time.monotonic() + timeout_s
            while not store.check([f"joined/{r}" for r in range(size)]):
                if peers_alive is not None and not peers_alive():
                    raise RuntimeError("a tensor-parallel worker exited before joining the group")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel workers did not join within {timeout_s} s")
                time.sleep(0.05)
        if backend == "nccl":
            pg = dist.ProcessGroupNCCL(store, rank, size)
        elif backend == "gloo":
            pg = dist.ProcessGroupGloo(store, rank, size, timeout)
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        group = cls(rank, size, pg)
        group._store = store  # keep the rendezvous alive as long as the group
        return group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place."""
        if self.size > 1:
            self.pg.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self.pg.allgather([parts], [x]).wait()
        return torch.cat(parts, dim=dim)

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Send a picklable object from `root` to every rank (the engine's per-step batch description)."""
        if self.size == 1:
            return obj
        if self.rank == root:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            size = torch.tensor([payload.numel()], dtype=torch.long)
        else:
            size = torch.zeros(1, dtype=torch.long)
        self.pg.broadcast(size, root).wait()
        if self.rank != root:
            payload = torch.empty(int(size), dtype=torch.uint8)
        self.pg.broadcast(payload, root).wait()
        return obj if self.rank == root else pickle.loads(payload.numpy().tobytes())


SINGLE = TPGroup()


def split(total: int, tp: TPGroup, what: str) -> tuple[int, int]:
    """(start, length) of this rank's even share of `total`; `what` names it in the error."""
    if total % tp.size:
        raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({tp.size})")
    part = total // tp.size
    return tp.rank * part, part


def kv_heads_of_rank(num_kv_heads: int, tp: TPGroup) -> tuple[int, int]:
    """(first kv head, count) held by this rank: an even share, or one replicated head when there are fewer
    kv heads than ranks (Gemma 2B and 3 270M have one), as vLLM does for MQA/GQA."""
    if num_kv_heads >= tp.size:
        return split(num_kv_heads, tp, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor-parallel size {tp.size} must be a multiple of num_key_value_heads ({num_kv_heads})")
    return tp.rank * num_kv_heads // tp.size, 1


def padded_rows(full: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows [start, start + count) of `full`, zero rows past its end (a vocabulary padded for the ranks)."""
    rows = full[start : start + count]
    if rows.shape[0] < count:
        rows = torch.cat([rows, rows.new_zeros(count - rows.shape[0], *rows.shape[1:])])
    return rows


class Linear(nn.Linear):
    """nn.Linear with its product split out: `matmul` is `x W^T` without the bias or any collective, the one
    operation a backend replaces per instance (gemma.cpu.fastpath's kernels). `lora`, where set (gemma.lora), adds
    low-rank adapter deltas to that product (`add_lora`)."""

    lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T; `out` (contiguous, of the result's shape) receives it when given, converted to out's dtype."""
        y = F.linear(x, self.weight)
        return y if out is None else out.copy_(y)

    def add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (this layer's product of x, or a view of it) plus the adapters' deltas, in place; y without a hook."""
        return y if self.lora is None else self.lora(x, y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.add_lora(x, self.matmul(x))
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(Linear):
    """y = x W[rows]^T: this rank's slice `rows` = [start, start + length) of the output features."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = False,
                 rows: tuple[int, int] | None = None) -> None:
        self.start, length = rows if rows is not None else split(out_features, tp, "output features")
        super().__init__(in_features, length, bias=bias)
        self.tp = tp

    def load_shard(self, full: torch.Tensor) -> torch.Tensor:
        return full.narrow(0, self.start, self.out_features)


class RowParallelLinear(Linear):
    """y = all_reduce(x[:, cols] W[:, cols]^T) + b: input features sharded, the bias added once."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup = SINGLE, bias: bool = False) -> None:
        self.start, length = split(in_features, tp, "input features")
        super().__init__(length, out_features, bias=bias)
        self.tp = tp

    def load_shard(self, full: torch.Tensor) -> torch.Tensor:
        return full if full.dim() == 1 else full.narrow(1, self.start, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.add_lora(x, self.matmul(x)))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows [start, start + per_rank) of a vocabulary padded to a multiple of the size."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup = SINGLE,
                 padding_idx: int | None = None) -> None:
        self.vocab_size = num_embeddings
        per_rank = -(-num_embeddings // tp.size)
        self.start = tp.rank * per_rank
        super().__init__(per_rank, embedding_dim, padding_idx=padding_idx if tp.size == 1 else None)
        self.tp = tp

    def load_shard(self, full: torch.Tensor) -> torch.Tensor:
        return padded_rows(full, self.start, self.num_embeddings)

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight, self.padding_idx)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill_(outside[..., None], 0.0))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(input_ids)


class ParallelLMHead(ColumnParallelLinear):
    """Logits over the vocabulary slice, all-gathered to the full vocabulary (padding columns dropped)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup = SINGLE) -> None:
        per_rank = -(-vocab_size // tp.size)
        super().__init__(hidden_size, per_rank * tp.size, tp, rows=(tp.rank * per_rank, per_rank))
        self.vocab_size = vocab_size

    def load_shard(self, full: torch.Tensor) -> torch.Tensor:
        return padded_rows(full, self.start, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(self.matmul(x))[..., : self.vocab_size]
