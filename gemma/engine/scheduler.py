"""`Scheduler`: iteration-level continuous batching over a paged KV cache.

Every step it picks which sequences run and how many of their tokens to feed:
- running sequences first, in arrival order: a decode feeds 1 token, an unfinished prompt its next chunk;
- then waiting sequences, first come first served, while `max_num_seqs` and the token budget allow and the
  cache has blocks for their first chunk (admission only when blocks are available);
- a prompt longer than what is left of `max_num_batched_tokens` is split into chunks (chunked prefill), so a
  long prompt never stalls the running decodes for more than one step's budget;
- with `max_loras`, the running sequences use at most that many LoRA adapters (a step's adapters must fit the model
  runner's slots): a waiting sequence of another adapter waits while later ones that fit are admitted;
- when a running sequence needs a block and none is free, the most recently arrived running sequence is
  preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed (prompt plus
  what it generated so far) when blocks free up.
Plain Python: no torch, testable with any block manager that has KVCacheManager's methods.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gemma.engine.block_manager import KVCacheManager
from gemma.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: `num_new[i]` tokens of `seqs[i]`, starting at its `num_computed_tokens`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_loras: int | None = None) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            while not self.kv.ensure_slots(seq.seq_id, seq.num_computed_tokens + n):
                victim = self.running.pop()  # the most recent arrival yields its blocks
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                batch.seqs.append(seq)
                batch.num_new.append(n)
                budget -= n
                i += 1
                continue
            break
        if batch.preempted:  # no admissions while running sequences are short of blocks
            return batch
        loras = {s.lora_int_id for s in self.running} - {0}
        skipped: list[Sequence] = []  # waiting for an adapter slot; they keep their place in the queue
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            lora = seq.lora_int_id
            if lora and lora not in loras and self.max_loras is not None and len(loras) >= self.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            seq.num_computed_tokens = self.kv.allocate_prompt(seq.seq_id, seq.all_token_ids, seq.cache_salt)
            n = min(seq.num_uncomputed, budget)
            if not self.kv.ensure_slots(seq.seq_id, seq.num_computed_tokens + n):
                self.kv.free(seq.seq_id)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if lora:
                loras.add(lora)
            if seq.num_cached_tokens is None:  # the first admission's hit, as vLLM reports it
                seq.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return batch

    def step_done(self, batch: ScheduledBatch) -> None:
        """Record that the batch's KV is written (registers full blocks for prefix caching, slides windows)."""
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed_tokens += n
            self.kv.mark_computed(seq.seq_id, seq.all_token_ids, seq.num_computed_tokens)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence (finished or aborted) from the queues and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
