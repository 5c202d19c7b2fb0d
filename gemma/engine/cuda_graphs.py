"""`DecodeGraphs`: the engine's decode steps replayed as CUDA graphs.

A decode step on a GPU launches a few hundred small kernels one by one from Python; at Gemma-2b size that launch
work, not the GPU, sets the step time. A CUDA graph records the step's kernels once and replays them with one
launch. A graph fixes every shape and address, so a graph is recorded per (batch size, key width) bucket over
static input buffers:

- the batch is padded to the next batch-size bucket (1, 2, 4, 8, then steps of 8 up to 32 and of 16 above);
  a padding row is token 0 at position 0 in a scratch block: it writes its key there and attends only to it;
- each row attends over a fixed key width (the next power of two from 256, at most `max_model_len` rounded up
  to the block size): its keys' cache slots and the causal / sliding-window mask are computed on the GPU from
  the block tables and positions, inside the graph.

Only steps in which every sequence decodes one token are replayed; prefill steps run eagerly. Every bucket's
graph is recorded when the engine starts (`capture_all`: 54 graphs of gemma-2b in 3.2 s on an H100), and all
share one memory pool. With `record=False` the same padded steps run without recording, which is how CPU tests
check them against the eager path.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left

import torch

from gemma.engine.batch import KVLayout, PagedBatch, SubBatch, additive_bias
from gemma.engine.block_manager import KVCacheManager
from gemma.engine.scheduler import ScheduledBatch
from gemma.model import GemmaForCausalLM

logger = logging.getLogger(__name__)

MIN_WIDTH = 256


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes a graph is recorded for: 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to max_num_seqs."""
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 32 else 16)
    return sizes + [max_num_seqs]


def width_buckets(max_model_len: int, block_size: int) -> list[int]:
    """Key widths: powers of two from 256 below max_model_len, then max_model_len; all whole blocks."""
    top = -(-max_model_len // block_size) * block_size
    widths, w = [], MIN_WIDTH
    while w < top:
        widths.append(-(-w // block_size) * block_size)
        w *= 2
    return sorted(set(widths + [top]))


class DecodeGraphs:
    def __init__(
        self, model: GemmaForCausalLM, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor], layout: KVLayout,
        max_num_seqs: int, max_model_len: int, record: bool = True,
    ) -> None:
        """Graphs of `model`'s decode step over the runner's pools (one per layer, each with one scratch block past
        `layout.num_blocks`), recorded by `capture_all` or, with `record`, at a bucket's first use."""
        self.model, self.k_pools, self.v_pools, self.layout, self.record = model, k_pools, v_pools, layout, record
        self.block_size, self.windows = layout.block_size, layout.windows
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.widths = width_buckets(max_model_len, layout.block_size)
        B, dev = self.batch_sizes[-1], model.device
        self.max_blocks = self.widths[-1] // self.block_size
        # the runner's pools have one block beyond the KV manager's: the scratch block of padding
        self.scratch = list(layout.num_blocks)
        self.ids = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)
        self.tables = [torch.full((B, self.max_blocks), -1, dtype=torch.long, device=dev) for _ in self.windows]
        self.write = [torch.full((B,), s * self.block_size, dtype=torch.long, device=dev) for s in self.scratch]
        self.logits = torch.empty(B, model.config.vocab_size, dtype=torch.float32, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph | None] = {}
        self.pool = torch.cuda.graph_pool_handle() if record else None
        self.side: torch.cuda.Stream | None = None

    @torch.no_grad()
    def capture_all(self) -> None:
        """Record every bucket's graph now (as a server's start-up does), largest first so the pool is sized once."""
        start = time.perf_counter()
        for B in reversed(self.batch_sizes):
            for W in reversed(self.widths):
                if (B, W) not in self.graphs:
                    self.graphs[(B, W)] = self._capture(B, W)
        logger.info("engine: %d CUDA graphs of the decode step recorded in %.1f s (batch sizes %s, key widths %s)",
                    len(self.graphs), time.perf_counter() - start, self.batch_sizes, self.widths)

    def fits(self, batch: ScheduledBatch) -> bool:
        """Whether `batch` is a step of single-token decodes within the largest bucket."""
        return (
            0 < len(batch.seqs) <= self.batch_sizes[-1]
            and all(n == 1 and s.num_computed_tokens + 1 == s.num_tokens for s, n in zip(batch.seqs, batch.num_new))
            and max(s.num_computed_tokens for s in batch.seqs) < self.widths[-1]
        )

    @torch.no_grad()
    def run(self, batch: ScheduledBatch, kv: KVCacheManager) -> torch.Tensor:
        """The step's logits (n, V) in fp32: a view of a static buffer, valid until the next step."""
        n = len(batch.seqs)
        B = self.batch_sizes[bisect_left(self.batch_sizes, n)]
        W = self.widths[bisect_left(self.widths, max(s.num_computed_tokens for s in batch.seqs) + 1)]
        self._fill(batch, kv, B, W // self.block_size)
        key = (B, W)
        if key not in self.graphs:
            self.graphs[key] = self._capture(B, W) if self.record else None
        graph = self.graphs[key]
        if graph is None:
            self._forward(B, W)
        else:
            graph.replay()
        return self.logits[:n]

    def _fill(self, batch: ScheduledBatch, kv: KVCacheManager, B: int, nb: int) -> None:
        """Copy the step into the static inputs; rows n..B-1 become padding."""
        n = len(batch.seqs)
        ids = [s.all_token_ids[s.num_computed_tokens] for s in batch.seqs] + [0] * (B - n)
        pos = [s.num_computed_tokens for s in batch.seqs] + [0] * (B - n)
        self.ids[:B].copy_(torch.tensor(ids), non_blocking=True)
        self.pos[:B].copy_(torch.tensor(pos), non_blocking=True)
        for g in range(len(self.windows)):
            rows, write = [], []
            for s in batch.seqs:
                table = kv.block_table(g, s.seq_id)[:nb]
                rows.append(table + [-1] * (nb - len(table)))
                write.append(kv.slot_mapping(g, s.seq_id, s.num_computed_tokens, s.num_computed_tokens + 1)[0])
            rows += [self._padding_row(g, nb)] * (B - n)
            write += [self.scratch[g] * self.block_size] * (B - n)
            self.tables[g][:B, :nb].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
            self.write[g][:B].copy_(torch.tensor(write, dtype=torch.long), non_blocking=True)

    def _padding_row(self, g: int, nb: int) -> list[int]:
        """A padding row's block table: position 0 in the scratch block, so it attends to one key (no empty softmax)."""
        return [self.scratch[g]] + [-1] * (nb - 1)

    @torch.no_grad()
    def _forward(self, B: int, W: int) -> None:
        """The padded step on the static buffers (what a graph records); logits into `self.logits[:B]`."""
        bs, dev = self.block_size, self.model.device
        pos = self.pos[:B]
        j = torch.arange(W, device=dev)
        slots, masks, biases = [], [], []
        for g, window in enumerate(self.windows):
            blocks = self.tables[g][:B, : W // bs][:, j // bs]  # (B, W): the block of key position j
            valid = blocks >= 0
            slots.append(torch.where(valid, blocks, self.scratch[g]) * bs + j % bs)
            allowed = valid & (j <= pos[:, None])
            if window is not None:
                allowed &= pos[:, None] - j < window
            masks.append(allowed[:, None, None])
            biases.append(additive_bias(masks[-1], self.model.dtype))
        sub = SubBatch(torch.arange(B, device=dev)[:, None], slots, masks, biases)
        paged = PagedBatch(self.k_pools, self.v_pools, self.layout.group_of_layer, [w[:B] for w in self.write], [sub])
        out = self.model.model(input_ids=self.ids[None, :B], position_ids=pos[None], use_cache=False, paged=paged)
        self.model.compute_logits(out.last_hidden_state[0], out=self.logits[:B])

    def _capture(self, B: int, W: int) -> torch.cuda.CUDAGraph:
        """Record the padded step for (B, W). Warm-up and recording run on padding inputs only, so they write
        nothing but the scratch block."""
        start = time.perf_counter()
        saved = [t[:B].clone() for t in (self.ids, self.pos, *self.tables, *self.write)]
        self.ids[:B].zero_()
        self.pos[:B].zero_()
        for g in range(len(self.windows)):
            self.tables[g][:B].copy_(torch.tensor(self._padding_row(g, self.max_blocks)))
            self.write[g][:B].fill_(self.scratch[g] * self.block_size)
        if self.side is None:  # one side stream: the allocator caches a stream's freed blocks for that stream only
            self.side = torch.cuda.Stream(device=self.model.device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the main stream, as torch.cuda.graphs recommends
            for _ in range(1 if self.graphs else 3):  # the first also pays lazy initialization
                self._forward(B, W)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(B, W)
        for dst, src in zip((self.ids, self.pos, *self.tables, *self.write), saved):
            dst[:B].copy_(src)
        logger.debug("engine: recorded the decode step's CUDA graph for batch %d, key width %d (%.0f ms)",
                     B, W, (time.perf_counter() - start) * 1e3)
        return graph
