"""Paged KV-cache accounting: which physical block holds which sequence's keys and values.

Plain Python (no torch): the model runner owns the tensors; this module only hands out block ids. A pool of
`num_blocks` blocks of `block_size` slots per layer; a sequence's block table maps logical block i (positions
i*bs .. i*bs+bs-1) to a physical block, and position p lives in slot `table[p // bs] * bs + p % bs`.

Layers with the same attention window form a KV group with its own pool and tables (`BlockManager`); a
sliding-window group (a query at q sees keys q - W < k <= q) releases blocks no future query can see.
`KVCacheManager` puts all groups behind one sequence-level API; gemma.engine.kv_budget sizes them.
Prefix caching: a full, computed block is registered under a chained sha256 of its tokens (the KV at a position
depends on every token up to it, in every layer), so a later prompt with the same prefix reuses it; a sequence's
chain starts from a root of its own `salt` (a LoRA adapter's, gemma.lora.LoRARequest.cache_salt: an adapter changes
the KV, so no adapter or base-model sequence reuses another's blocks); unreferenced
cached blocks, of finished sequences and those a sliding window released, wait in an LRU pool until evicted.
A hit of h tokens needs, in a global group, every block before h, and in a sliding group of window W only the
blocks the first uncached query can see (positions h - W + 1 .. h - 1); `KVCacheManager` takes the longest h for
which every group has what it needs (vLLM's hybrid KV-cache manager does the same).

Scheduler protocol per sequence: `allocate_prompt` on (re-)admission (returns the tokens already cached);
each step `ensure_slots(tokens after the step)`, run the model, `mark_computed(tokens, computed)`; `free` on
finish, abort or preemption, and also when `ensure_slots` fails right after admission (returns the hits).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field

from gemma.engine.kv_budget import KVGroupSpec

# The parent digest of a sequence's first block: every chain starts from the same fixed value.
_ROOT_HASH = hashlib.sha256(b"gemma-engine-kv-prefix-root").digest()


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Digest of one full block: sha256(parent digest + token ids as little-endian int64).

    A cryptographic hash, not Python's `hash`: a collision would serve one user's KV to another (vLLM
    advisory GHSA-rm76-4mrf-v9r8: built-in `hash` made collisions constructible). Chaining through the parent makes the
    digest cover the whole prefix, so equal blocks at different positions or after different prefixes differ.
    """
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def chain_root(salt: bytes = b"") -> bytes:
    """The parent digest of a sequence's first block: the fixed root, or one of its own for a salted sequence."""
    return _ROOT_HASH if not salt else hashlib.sha256(_ROOT_HASH + salt).digest()


def prompt_chain(token_ids: list[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """The chained hashes of the full blocks that a hit may cover: those wholly before the last token."""
    chain, parent = [], chain_root(salt)
    for i in range(max(0, len(token_ids) - 1) // block_size):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size])
        chain.append(parent)
    return chain


def _check(ok: bool, msg: str) -> None:
    if not ok:  # not `assert`: invariant checks must not vanish under python -O
        raise AssertionError(msg)


@dataclass
class _SeqState:
    table: list[int] = field(default_factory=list)  # physical block per logical block; -1 = released
    num_computed: int = 0  # positions [0, num_computed) have their KV written
    hashes: list[bytes] = field(default_factory=list)  # hash chain of the full computed blocks
    released: int = 0  # logical blocks [0, released) were released by the sliding window
    root: bytes = _ROOT_HASH  # the parent digest of its first block (`chain_root` of its salt)


class BlockManager:
    """Block pool and block tables of one KV group (layers sharing one attention window).

    Invariants (`check_invariants`): ref counts are never negative and equal the number of tables
    holding the block; a block is in exactly one of {used (ref > 0), free list, evictable pool};
    free-list blocks carry no hash, evictable ones do; num_free_blocks + num_used_blocks == num_blocks.
    """

    def __init__(
        self, num_blocks: int, block_size: int, window: int | None = None, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be >= 1")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.window = window
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._free: deque[int] = deque(range(num_blocks))  # never used, or freed without a hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 with a hash, least recently freed first
        self._seqs: dict[Hashable, _SeqState] = {}
        self.prefix_queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.prefix_hits = 0  # of those, tokens served from the cache

    # ---- pool state ----
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: never used, freed, or cached but unreferenced (evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a sequence, 0..1 (evictable cached blocks count as free)."""
        return self.num_used_blocks / self.num_blocks

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    # ---- sequence API ----
    def needed_blocks(self, hit_blocks: int) -> range:
        """The logical blocks a hit of `hit_blocks` full blocks needs from the cache: all of them in a global group;
        in a windowed one those holding a key the first uncached query (at hit_blocks * block_size) can see."""
        if self.window is None:
            return range(hit_blocks)
        first = max(0, hit_blocks * self.block_size - self.window + 1) // self.block_size
        # at least the last block, even where the window sees none of it (W = 1): a hit is only ever claimed for
        # a prefix some sequence computed
        return range(min(first, hit_blocks - 1) if hit_blocks else 0, hit_blocks)

    def has_blocks(self, chain: list[bytes], hit_blocks: int) -> bool:
        """Whether a hit of `hit_blocks` blocks of the prompt whose block hashes are `chain` could be served."""
        return self.enable_prefix_caching and all(chain[i] in self._by_hash for i in self.needed_blocks(hit_blocks))

    def num_cached_blocks(self, token_ids: list[int], salt: bytes = b"") -> int:
        """The longest hit, in blocks, that `allocate_prompt` would serve now from this group alone; changes nothing."""
        return self.longest_hit(prompt_chain(token_ids, self.block_size, salt))

    def longest_hit(self, chain: list[bytes], top: int | None = None) -> int:
        """The longest hit of at most `top` blocks this group can serve for a prompt whose block hashes are `chain`."""
        top = len(chain) if top is None else min(top, len(chain))
        if not self.enable_prefix_caching:
            return 0
        if self.window is None:  # a prefix: the consecutive cached blocks from the start
            return next((i for i in range(top) if chain[i] not in self._by_hash), top)
        return next((n for n in range(top, 0, -1) if self.has_blocks(chain, n)), 0)

    def allocate_prompt(
        self, seq_id: Hashable, token_ids: list[int], hit_blocks: int | None = None, chain: list[bytes] | None = None,
        salt: bytes = b"",
    ) -> int:
        """Register a sequence being (re-)admitted; `token_ids` are all its tokens so far.

        With prefix caching, reuses the cached blocks a hit of `hit_blocks` full blocks needs (`needed_blocks`;
        default: this group's longest hit, `num_cached_blocks`), never one covering the last token: at least one
        token is left to compute, since its logits are needed. A windowed group's blocks before the needed ones
        start released. Returns the number of tokens whose KV is already cached (a multiple of block_size).
        Allocates no other block. `salt` starts the sequence's hash chain (`chain_root`; `chain` must be of it).
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r} has no tokens")
        if chain is None:  # no caching, no hashing: nothing could hit
            chain = prompt_chain(token_ids, self.block_size, salt) if self.enable_prefix_caching else []
        if hit_blocks is None:
            hit_blocks = self.longest_hit(chain)
        if hit_blocks and not self.has_blocks(chain, hit_blocks):
            raise ValueError(f"sequence {seq_id!r}: a hit of {hit_blocks} blocks is not in the cache")
        needed = self.needed_blocks(hit_blocks)
        table = [-1] * needed.start + [self._by_hash[chain[i]] for i in needed]
        for b in table[needed.start :]:
            if self._ref[b] == 0:
                del self._evictable[b]  # a hit on a free-but-cached block takes it out of the pool
            self._ref[b] += 1
        cached = hit_blocks * self.block_size
        self._seqs[seq_id] = _SeqState(table=table, num_computed=cached, hashes=chain[:hit_blocks],
                                       released=needed.start, root=chain_root(salt))
        if self.enable_prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += cached
        return cached

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Whether `ensure_slots(seq_id, num_tokens)` would succeed (an unknown sequence counts as empty)."""
        return self._missing(self._seqs.get(seq_id), num_tokens) <= self.num_free_blocks

    def ensure_slots(self, seq_id: Hashable, num_tokens: int) -> bool:
        """Back positions [0, num_tokens) with blocks, allocating only the missing ones; all or nothing.

        In a windowed group positions that fell out of the window stay unbacked (see `mark_computed`).
        Returns False, changing nothing, if there are too few free blocks.
        """
        st = self._get(seq_id)
        missing = self._missing(st, num_tokens)
        if missing > self.num_free_blocks:
            return False
        st.table.extend(self._take() for _ in range(missing))
        return True

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end); raises IndexError if one is not backed by a block."""
        st = self._get(seq_id)
        if not 0 <= start <= end:
            raise ValueError(f"bad position range [{start}, {end})")
        bs, table = self.block_size, st.table
        slots: list[int] = []
        p = start
        while p < end:  # a block's positions at a time: this runs for every sequence's keys at every step
            i = p // bs
            b = table[i] if i < len(table) else -1
            if b < 0:
                raise IndexError(f"sequence {seq_id!r}: position {p} is not backed by a KV block")
            stop = min(end, (i + 1) * bs)
            offset = (b - i) * bs  # slot of position q in this block: b * bs + q % bs = offset + q
            slots.extend(range(offset + p, offset + stop))
            p = stop
        return slots

    def block_table(self, seq_id: Hashable) -> list[int]:
        """Physical block id per logical block (a copy); -1 where the sliding window released the block."""
        return list(self._get(seq_id).table)

    def mark_computed(self, seq_id: Hashable, token_ids: list[int], num_computed: int) -> None:
        """Record that KV for positions [0, num_computed) is written (`token_ids`: the sequence's tokens).

        With prefix caching every newly full block is registered under its chained hash (unless an equal
        block is already registered: then this copy stays private and is freed plainly). A windowed group
        releases every block that no future query can see: the next query is at >= num_computed and sees
        keys >= num_computed - window + 1, so blocks ending before that go (table entry -1).
        """
        st = self._get(seq_id)
        bs = self.block_size
        if not st.num_computed <= num_computed <= len(token_ids):
            raise ValueError(
                f"sequence {seq_id!r}: num_computed {num_computed} must be in "
                f"[{st.num_computed}, {len(token_ids)}] (already computed, number of tokens)"
            )
        if math.ceil(num_computed / bs) > len(st.table):
            raise IndexError(f"sequence {seq_id!r}: {num_computed} positions computed, {len(st.table)} blocks held")
        st.num_computed = num_computed
        if self.enable_prefix_caching:
            parent = st.hashes[-1] if st.hashes else st.root
            for i in range(len(st.hashes), num_computed // bs):
                h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
                b = st.table[i]
                if h not in self._by_hash:  # else a hit (already registered) or an equal private copy
                    self._hash[b] = h
                    self._by_hash[h] = b
                st.hashes.append(h)
                parent = h
        if self.window is not None:
            gone = max(0, num_computed - self.window + 1) // bs  # blocks [0, gone) end before the window
            for i in range(st.released, gone):  # gone <= len(table): the table backs [0, num_computed)
                self._release(st.table[i])
                st.table[i] = -1
            st.released = max(st.released, gone)

    def free(self, seq_id: Hashable) -> None:
        """Release every block of the sequence; an unknown sequence is a no-op (abort may race with finish).

        Blocks are released last first, so the tail of a prompt (least likely to be shared) is evicted
        before its head.
        """
        st = self._seqs.pop(seq_id, None)
        if st is not None:
            for b in reversed(st.table):
                if b >= 0:
                    self._release(b)

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests)."""
        refs = [0] * self.num_blocks
        for seq_id, st in self._seqs.items():
            held = st.table[st.released :]
            ok = st.table[: st.released] == [-1] * st.released and all(0 <= b < self.num_blocks for b in held)
            ok &= len(st.table) * self.block_size >= st.num_computed and not (self.window is None and st.released)
            _check(ok, f"seq {seq_id!r}: bad table {st.table} ({st.released} released, {st.num_computed} computed)")
            for b in held:
                refs[b] += 1
        _check(refs == self._ref, f"ref counts {self._ref} != table references {refs}")
        free = set(self._free)
        _check(len(free) == len(self._free), "a block is twice in the free list")
        for b, (ref, h) in enumerate(zip(self._ref, self._hash)):
            places = (ref > 0) + (b in free) + (b in self._evictable)
            _check(places == 1, f"block {b} (ref {ref}) is in {places} of (used, free list, evictable pool)")
            _check(not (b in free and h) and not (b in self._evictable and not h), f"block {b}: hash vs pool")
            _check(h is None or self._by_hash.get(h) == b, f"block {b}'s hash is not registered to it")
        _check(len(self._by_hash) == sum(h is not None for h in self._hash), "hash index and block hashes disagree")

    # ---- internals ----
    def _get(self, seq_id: Hashable) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}: allocate_prompt it first") from None

    def _missing(self, st: _SeqState | None, num_tokens: int) -> int:
        """How many blocks must be allocated so that positions [0, num_tokens) are usable.

        Only the tail: the table covers [0, num_computed), and a windowed group's released blocks all end
        before the oldest key the next query sees (num_computed - window + 1), so none is needed again.
        """
        have = len(st.table) if st is not None else 0
        return max(0, math.ceil(num_tokens / self.block_size) - have)

    def _take(self) -> int:
        """A block with ref 1: a plain free one if any, else evict the least recently freed cached one."""
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash[b]]  # type: ignore[index]
            self._hash[b] = None
        self._ref[b] = 1
        return b

    def _release(self, b: int) -> None:
        if self._ref[b] <= 0:
            raise RuntimeError(f"block {b} released with ref count {self._ref[b]}")
        self._ref[b] -= 1
        if self._ref[b] == 0:
            if self._hash[b] is not None:
                self._evictable[b] = None  # newest at the end: evicted last
            else:
                self._free.append(b)


class KVCacheManager:
    """The `BlockManager`s of all KV groups behind one sequence-level API, used by the scheduler.

    Every sequence method applies to all groups or, when it fails, to none. Group i is `groups[i]`.
    """

    def __init__(self, groups: list[KVGroupSpec], block_size: int, enable_prefix_caching: bool = True) -> None:
        if not groups:
            raise ValueError("at least one KV group is needed")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.groups = [BlockManager(g.num_blocks, block_size, g.window, enable_prefix_caching) for g in groups]
        self.prefix_queries = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.prefix_hits = 0  # of those, tokens served from the cache

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now in every group (the min over groups).

        A sequence needs at most one new block per group per block_size new tokens, so any one sequence can
        grow by num_free_blocks * block_size tokens. Scheduling decisions use `can_allocate`, which is exact.
        """
        return min(g.num_free_blocks for g in self.groups)

    @property
    def usage(self) -> float:
        """The fullest group's usage, 0..1: the group that runs out first limits the batch."""
        return max(g.usage for g in self.groups)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self.groups[0]

    def num_cached_blocks(self, token_ids: list[int], salt: bytes = b"") -> int:
        """The longest hit, in blocks, that every group can serve now: each group has the blocks it needs."""
        if not self.enable_prefix_caching:
            return 0
        return self._longest_hit(prompt_chain(token_ids, self.block_size, salt))

    def _longest_hit(self, chain: list[bytes]) -> int:
        top = len(chain)
        for g in self.groups:  # a global group's hits are prefixes: its longest bounds the search from above
            if g.window is None:
                top = g.longest_hit(chain, top)
        return next((n for n in range(top, 0, -1) if all(g.has_blocks(chain, n) for g in self.groups)), 0)

    def allocate_prompt(self, seq_id: Hashable, token_ids: list[int], salt: bytes = b"") -> int:
        """Register a (re-)admitted sequence in every group; returns its tokens already cached (0 if caching is off).
        `salt` separates its hash chain from other sequences' (see the module doc)."""
        if any(seq_id in g for g in self.groups):
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if not token_ids:
            raise ValueError(f"sequence {seq_id!r} has no tokens")
        chain = prompt_chain(token_ids, self.block_size, salt) if self.enable_prefix_caching else []
        hit = self._longest_hit(chain)
        cached = [g.allocate_prompt(seq_id, token_ids, hit, chain, salt) for g in self.groups][0]
        if self.enable_prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += cached
        return cached

    def can_allocate(self, seq_id: Hashable, num_tokens: int) -> bool:
        return all(g.can_allocate(seq_id, num_tokens) for g in self.groups)

    def ensure_slots(self, seq_id: Hashable, num_tokens: int) -> bool:
        """`BlockManager.ensure_slots` in every group, or (returning False) in none."""
        if seq_id not in self:
            raise KeyError(f"unknown sequence {seq_id!r}: allocate_prompt it first")
        if not self.can_allocate(seq_id, num_tokens):
            return False
        for g in self.groups:  # the pools are independent, so none of these can fail now
            if not g.ensure_slots(seq_id, num_tokens):
                raise RuntimeError("can_allocate and ensure_slots disagree")
        return True

    def mark_computed(self, seq_id: Hashable, token_ids: list[int], num_computed: int) -> None:
        for g in self.groups:
            g.mark_computed(seq_id, token_ids, num_computed)

    def free(self, seq_id: Hashable) -> None:
        """Release the sequence in every group; an unknown sequence is a no-op."""
        for g in self.groups:
            g.free(seq_id)

    def slot_mapping(self, group: int, seq_id: Hashable, start: int, end: int) -> list[int]:
        return self.groups[group].slot_mapping(seq_id, start, end)

    def block_table(self, group: int, seq_id: Hashable) -> list[int]:
        return self.groups[group].block_table(seq_id)

    def check_invariants(self) -> None:
        """Every group's invariants, and the same sequences in every group."""
        for g in self.groups:
            g.check_invariants()
        seqs = [set(g._seqs) for g in self.groups]
        if any(s != seqs[0] for s in seqs):
            raise AssertionError(f"groups hold different sequences: {seqs}")
