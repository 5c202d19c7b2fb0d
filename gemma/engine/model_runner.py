"""`ModelRunner`: the only part of the engine that knows the device. It owns the paged KV pools and runs a step.

A step's tokens (all scheduled sequences, flattened into one row) go through the model in one forward pass;
attention is where sequences differ, so the model hands each layer's flat q/k/v to a `PagedBatch`, which
writes k/v into the pools at the sequences' slots and attends per sub-batch: all decodes together (one
query each; the CPU kernel reads their keys from the blocks in place, otherwise they are gathered and padded
to the longest), and the prefill chunks: on a CPU each alone (no query padding at all), on a GPU in groups
padded to the longest chunk (`group_chunks`; there a step costs kernel launches, not arithmetic: a step of 16
prefills of the 270M on an H100 went from 57 to 36 ms). On a GPU a step runs SDPA's flash, memory-efficient and
math kernels only: with cuDNN's allowed (and masked GQA prefills handed to it), steps of shapes not seen before
stalled 1.4-1.9 s on an H100; none did with only those three. Logits are computed only for the tokens that are
sampled, into an fp32 buffer reused from step to step.

The runner decides what the device gets: on a CPU it applies the CPU fast path to the model (gemma.cpu.fastpath:
the kernels per `cpu_matmul`, and a step of single-token decodes as one fused call for all layers, fed by
`PagedBatch.decode_batch`); on a GPU at TP=1 it replays decode steps as recorded CUDA graphs (gemma.engine.
cuda_graphs, unless `enforce_eager`) and asks for a warm-up before the first request (`needs_warm_up`).

With LoRA (`lora` settings; gemma.engine.lora_manager) rank 0 plans each step's adapter slots and every rank loads
them and adds their deltas to the layers' products (gemma.lora). A step with an adapter's row runs the layers' own
forward: the fused CPU decode layer and CUDA-graph replay are for steps of base-model rows only (the graphs
recorded no LoRA products).

Under tensor parallelism every rank has a runner with its own model shard and its own KV pools (its kv
heads). Rank 0 turns the scheduler's batch into a device-independent `StepInput` and broadcasts it; every
rank runs the same forward (the layers' collectives keep them in step); rank 0 samples from the logits.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gemma.cpu import fastpath, kernels
from gemma.engine.batch import KVLayout, PagedBatch, StepInput, SubBatch, additive_bias
from gemma.engine.block_manager import KVCacheManager
from gemma.engine.cuda_graphs import DecodeGraphs
from gemma.engine.lora_manager import LoRAManager, LoRASettings
from gemma.engine.scheduler import ScheduledBatch
from gemma.model import GemmaForCausalLM

logger = logging.getLogger(__name__)

GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class ModelRunner:
    def __init__(
        self, model: GemmaForCausalLM, layout: KVLayout, cpu_matmul: str = "auto", enforce_eager: bool = True,
        max_num_seqs: int = 1, max_model_len: int | None = None, lora: LoRASettings | None = None,
    ) -> None:
        """Rank 0's runner resolves `cpu_matmul` ("auto" per the CPU) and sends the layout and the mode to the other
        ranks, which build theirs with `ModelRunner.follow`. `enforce_eager=False` records CUDA graphs of decode steps
        of up to `max_num_seqs` sequences of `max_model_len` tokens (on a GPU at TP=1)."""
        self.model = model
        self.tp = model.tp
        self.device, self.dtype = model.device, model.dtype
        self.layout = layout
        self.cpu_matmul, added = fastpath.set_cpu_matmul(model, cpu_matmul)
        if self.cpu_matmul != "torch" and self.tp.rank == 0:
            logger.info("engine: cpu_matmul %s (%.0f MB of fp32 weight copies)", self.cpu_matmul, added / 1e6)
        if self.tp.rank == 0:
            self.tp.broadcast_object((layout, self.cpu_matmul, lora))  # a no-op without tensor parallelism
        self.lora = LoRAManager(model, lora) if lora is not None else None
        # a step of single-token decodes runs each layer as one fused CPU kernel call where the model allows it
        self.fused_decode = fastpath.can_fuse_decode(model.model)
        attn = model.model.layers[0].self_attn  # this rank's kv heads
        shape = (attn.num_kv_heads, attn.head_dim)
        # one block beyond the KV manager's: the scratch block that padding rows of a CUDA-graph step write to
        self.k_pools = [
            torch.zeros((layout.num_blocks[g] + 1) * layout.block_size, *shape, dtype=self.dtype, device=self.device)
            for g in layout.group_of_layer
        ]
        self.v_pools = [torch.zeros_like(p) for p in self.k_pools]
        if self.cpu_matmul == "kernel":  # decode attention streams the pools as the products stream the weights
            kernels.huge_pages(self.k_pools + self.v_pools)
        self._logits: torch.Tensor | None = None
        self.graphs: DecodeGraphs | None = None
        # On a GPU a step's cost is mostly kernel launches, so a step's prefill chunks attend together, padded
        # to the longest; on a CPU each attends alone (padding there costs real arithmetic)
        self.group_prefills = self.device.type == "cuda"
        if not enforce_eager and self.device.type == "cuda" and self.tp.size == 1:
            self.use_graphs(max_num_seqs, max_model_len or model.config.max_position_embeddings)

    @classmethod
    def follow(cls, model: GemmaForCausalLM) -> ModelRunner:
        """Ranks 1..N-1: the runner rank 0 describes (its KV layout and CPU matmul mode)."""
        layout, cpu_matmul, lora = model.tp.broadcast_object(None)
        return cls(model, layout, cpu_matmul, lora=lora)

    @property
    def needs_warm_up(self) -> bool:
        """Whether the engine should run each kind of step once before serving: on a GPU, a kernel's first use
        loads (or compiles) its code (see LLMEngine.warm_up)."""
        return self.device.type == "cuda"

    def generator(self, seed: int) -> torch.Generator:
        """A random generator on the model's device (sampling draws where the logits are)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def use_graphs(self, max_num_seqs: int, max_model_len: int, record: bool = True) -> None:
        """Replay decode steps as CUDA graphs (gemma.engine.cuda_graphs); `record=False` runs the same padded
        steps eagerly (how CPU tests check them). Rank 0 only, at TP=1."""
        if self.tp.size > 1:
            raise ValueError("CUDA graphs of the decode step are built for tp_size 1 only")
        self.graphs = DecodeGraphs(self.model, self.k_pools, self.v_pools, self.layout, max_num_seqs, max_model_len,
                                   record)
        if record:
            self.graphs.capture_all()

    @staticmethod
    def kv_bytes_per_block_per_layer(model: GemmaForCausalLM, block_size: int) -> int:
        attn = model.model.layers[0].self_attn
        return 2 * block_size * attn.num_kv_heads * attn.head_dim * model.dtype.itemsize

    def execute(self, batch: ScheduledBatch, kv: KVCacheManager) -> tuple[torch.Tensor, list[int]]:
        """Rank 0: run the batch on every rank; logits (S, V) in fp32 for the sampled sequences, their indices."""
        if self.graphs is not None and self.graphs.fits(batch) and not any(s.lora_request for s in batch.seqs):
            return self.graphs.run(batch, kv), list(range(len(batch.seqs)))
        step, sampled = self.prepare(batch, kv)
        return self.run(self.tp.broadcast_object(step)), sampled

    def prepare(self, batch: ScheduledBatch, kv: KVCacheManager) -> tuple[StepInput, list[int]]:
        ids, positions, logits_at, sampled = [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new)):
            start = seq.num_computed_tokens
            ids += seq.all_token_ids[start : start + n]
            positions += range(start, start + n)
            if start + n == seq.num_tokens:  # this step computes its last known token: sample the next
                sampled.append(i)
                logits_at.append(len(ids) - 1)
        step = StepInput(ids, positions, logits_at)
        self._describe(batch, kv, step)
        if self.lora is not None:
            step.lora = self.lora.step([s.lora_request for s in batch.seqs], batch.num_new)
        return step, sampled

    @torch.no_grad()
    def run(self, step: StepInput) -> torch.Tensor:
        """Every rank: the forward pass of one step; returns the logits (len(logits_at), V) in fp32."""
        dev = self.device
        to_dev = lambda t: t.to(dev, non_blocking=True)  # noqa: E731
        subbatches = []
        for sb in step.subbatches:
            real = to_dev(sb.q_real) if sb.q_real is not None else None
            subbatches.append(replace(sb, q_index=to_dev(sb.q_index), kv_slots=[to_dev(t) for t in sb.kv_slots],
                                      masks=[to_dev(t) for t in sb.masks], q_real=real))
        paged = PagedBatch(self.k_pools, self.v_pools, self.layout.group_of_layer,
                           [to_dev(t) for t in step.write_slots], subbatches)
        input_ids = torch.tensor([step.input_ids], device=dev)
        position_ids = torch.tensor([step.positions], device=dev)
        decode = paged.decode_batch() if self.fused_decode and step.lora is None else None
        if decode is not None:
            h = fastpath.decode_step(self.model.model, input_ids, position_ids, decode)
        else:
            for sb in subbatches:  # the masks' additive form, which the modules' attention takes
                sb.biases = [additive_bias(m, self.dtype) for m in sb.masks]
            if step.lora is not None:
                self.lora.apply(step.lora.slots)
                self.lora.bank.activate(step.lora.row_slots)
            try:
                with self._kernels():
                    h = self.model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                                         paged=paged).last_hidden_state
            finally:
                if step.lora is not None:
                    self.lora.bank.deactivate()
        h = h[0, torch.tensor(step.logits_at, dtype=torch.long, device=dev)]  # (S, C)
        return self.model.compute_logits(h, out=self._logits_buffer(len(step.logits_at)))

    def _kernels(self) -> contextlib.AbstractContextManager:
        """The attention kernels of a step: on a GPU, SDPA's precompiled flash and memory-efficient kernels (math
        as the fallback), never cuDNN's, which builds an execution plan for each new shape (see the module doc)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return sdpa_kernel(GPU_SDPA_BACKENDS)

    def _logits_buffer(self, rows: int) -> torch.Tensor:
        """(rows, V) fp32, reused from step to step: a fresh one is tens of MB of new pages every step (at 32
        sequences and Gemma's 262k vocabulary, ~15 ms of page faults on 2 CPU cores). A step's logits are read
        only within that step."""
        vocab = self.model.config.vocab_size
        if self._logits is None or self._logits.shape[0] < rows:
            self._logits = torch.empty(max(rows, 8), vocab, dtype=torch.float32, device=self.device)
        return self._logits[:rows]

    def serve(self) -> None:
        """Ranks 1..N-1: run every step rank 0 broadcasts, until it broadcasts None."""
        while (step := self.tp.broadcast_object(None)) is not None:
            self.run(step)

    def _describe(self, batch: ScheduledBatch, kv: KVCacheManager, step: StepInput) -> None:
        groups = range(len(self.layout.windows))
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
        if decodes:
            step.subbatches.append(self._subbatch(batch, kv, decodes, offsets))
        groups = group_chunks(batch, prefills) if self.group_prefills else [[i] for i in prefills]
        step.subbatches += [self._subbatch(batch, kv, members, offsets) for members in groups]
        step.write_slots = [torch.tensor(w, dtype=torch.long) for w in write]

    def _subbatch(self, batch: ScheduledBatch, kv: KVCacheManager, members: list[int], offsets: list[int]) -> SubBatch:
        """Queries of `members` (decodes, or prefill chunks) and their keys. A row with fewer queries than the
        longest is padded with token 0's query at the row's last position (so it attends to real keys: no
        all-masked row), whose results are dropped (`q_real`)."""
        counts = [batch.num_new[i] for i in members]
        q_len = max(counts)
        qj, n = np.arange(q_len), np.array(counts)[:, None]  # each row's query index j, and its count
        q_index = torch.from_numpy(np.where(qj < n, np.array([offsets[i] for i in members])[:, None] + qj, 0))
        q_real = None
        if min(counts) < q_len:
            q_real = torch.from_numpy(np.flatnonzero(qj < n))  # r * q_len + j for j < counts[r]
        starts = np.array([batch.seqs[i].num_computed_tokens for i in members])[:, None]
        ends = starts + n
        # each row's query positions, padded with its last one: (n, Q); decodes' masks need none
        qp = torch.from_numpy(np.minimum(starts + qj, ends - 1)) if q_len > 1 else None
        kv_slots, masks = [], []
        for g, window in enumerate(self.layout.windows):
            # a windowed group keeps only the keys the first query can still see
            firsts = np.zeros_like(starts) if window is None else np.maximum(0, starts - window + 1)
            rows = [kv.slot_mapping(g, batch.seqs[i].seq_id, int(f), int(e))
                    for i, f, e in zip(members, firsts[:, 0], ends[:, 0])]
            width = int((ends - firsts).max())
            # padded rows filled from the lists (one tensor from nested lists costs ~1 ms at 32 sequences)
            slots = np.zeros((len(rows), width), dtype=np.int64)
            for r, row in enumerate(rows):
                slots[r, : len(row)] = row
            kj = np.arange(width)
            if q_len == 1:  # decodes: each row's one query is at its last position and sees all of its keys
                allowed = torch.from_numpy(kj < ends - firsts)[:, None]  # (n, 1, K)
            else:
                kp = torch.from_numpy(np.where(kj < ends - firsts, firsts + kj, -1))  # key positions, -1: padding
                allowed = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])  # (n, Q, K)
                if window is not None:
                    allowed &= qp[:, :, None] - kp[:, None, :] < window
            kv_slots.append(torch.from_numpy(slots))
            masks.append(allowed[:, None])  # bool: a quarter of the bytes to broadcast under TP
        return SubBatch(q_index, kv_slots, masks, q_real=q_real)


def group_chunks(batch: ScheduledBatch, members: list[int], max_padding: float = 0.5,
                 max_elements: int = 1 << 23) -> list[list[int]]:
    """Prefill chunks in groups that attend as one padded sub-batch: longest first, a chunk joins the current
    group while the group's padded score matrix (rows x longest chunk x most keys) stays within `max_padding`
    of the real one and under `max_elements`."""
    def size(i: int) -> tuple[int, int]:  # (queries, keys of the global layers)
        return batch.num_new[i], batch.seqs[i].num_computed_tokens + batch.num_new[i]

    groups: list[list[int]] = []
    real = q_max = k_max = 0
    for i in sorted(members, key=size, reverse=True):
        q, k = size(i)
        padded = (len(groups[-1]) + 1) * q_max * max(k_max, k) if groups else 0
        if groups and padded <= (1 + max_padding) * (real + q * k) and padded <= max_elements:
            groups[-1].append(i)
            real, k_max = real + q * k, max(k_max, k)
        else:
            groups.append([i])
            real, q_max, k_max = q * k, q, k
    return groups
