"""Block manager: allocation, prefix caching, sliding-window release, multi-group atomicity, budget split."""

from __future__ import annotations

import math
import random

import pytest

from gemma.engine.block_manager import BlockManager, KVCacheManager, hash_block, prompt_chain
from gemma.engine.kv_budget import KVGroupSpec, max_window_blocks, split_kv_budget


def run_prefill(m: BlockManager | KVCacheManager, seq_id: int, tokens: list[int]) -> int:
    """Admit a sequence and compute its whole prompt in one step; returns the cached tokens."""
    cached = m.allocate_prompt(seq_id, tokens)
    assert m.ensure_slots(seq_id, len(tokens))
    m.mark_computed(seq_id, tokens, len(tokens))
    m.check_invariants()
    return cached


def held(m: BlockManager, seq_id: int) -> int:
    return sum(b >= 0 for b in m.block_table(seq_id))


# ---- allocation ----


def test_allocate_free_and_ref_counts():
    m = BlockManager(8, 4, enable_prefix_caching=False)
    assert m.allocate_prompt(1, list(range(10))) == 0
    assert m.num_used_blocks == 0  # allocate_prompt allocates nothing without hits
    assert m.ensure_slots(1, 10)
    assert m.block_table(1) == [0, 1, 2]
    assert m.ensure_slots(1, 12)  # still inside block 2
    assert m.block_table(1) == [0, 1, 2]
    assert m.ensure_slots(1, 13)
    assert (m.num_used_blocks, m.num_free_blocks, m.usage) == (4, 4, 0.5)
    m.check_invariants()
    m.free(1)
    m.free(1)  # unknown sequence: no-op
    m.free("never-seen")
    assert (m.num_used_blocks, m.num_free_blocks, m.usage) == (0, 8, 0.0)
    m.check_invariants()
    with pytest.raises(ValueError, match="already allocated"):
        m.allocate_prompt(2, [1])
        m.allocate_prompt(2, [1])
    with pytest.raises(KeyError, match="unknown sequence 7"):
        m.ensure_slots(7, 3)


def test_ensure_slots_is_all_or_nothing():
    m = BlockManager(4, 4)
    m.allocate_prompt(1, list(range(12)))
    assert m.ensure_slots(1, 12)  # 3 blocks
    m.allocate_prompt(2, list(range(100, 108)))
    assert not m.can_allocate(2, 8)
    assert not m.ensure_slots(2, 8)  # needs 2, 1 free: nothing changes
    assert m.block_table(2) == [] and m.num_free_blocks == 1
    m.check_invariants()
    assert m.can_allocate(2, 4) and m.ensure_slots(2, 4)
    assert m.num_free_blocks == 0
    assert not m.ensure_slots(1, 13)
    assert m.block_table(1) == [0, 1, 2]
    assert m.can_allocate("new", 0)  # an unknown sequence counts as empty


def test_slot_mapping():
    m = BlockManager(6, 4)
    m.allocate_prompt(1, [1])
    m.allocate_prompt(2, [1])
    m.ensure_slots(1, 4)  # block 0
    m.ensure_slots(2, 4)  # block 1
    m.ensure_slots(1, 9)  # blocks 2, 3
    assert m.block_table(1) == [0, 2, 3]
    assert m.slot_mapping(1, 0, 9) == [0, 1, 2, 3, 8, 9, 10, 11, 12]
    assert m.slot_mapping(1, 3, 5) == [3, 8]
    assert m.slot_mapping(2, 1, 3) == [5, 6]
    assert m.slot_mapping(1, 4, 4) == []
    with pytest.raises(IndexError, match=r"sequence 1: position 12"):
        m.slot_mapping(1, 8, 13)


@pytest.mark.parametrize("corrupt", ["ref", "double_free", "hash_in_free_list", "lost_block"])
def test_check_invariants_catches_corruption(corrupt):
    m = BlockManager(6, 2)
    run_prefill(m, 1, [1, 2, 3])
    m.free(1)  # block 0 evictable (hashed), block 1 in the free list
    run_prefill(m, 2, [4, 5, 6])
    if corrupt == "ref":
        m._ref[m.block_table(2)[0]] += 1
    elif corrupt == "double_free":
        m._free.append(m._free[0])
    elif corrupt == "hash_in_free_list":
        m._hash[m._free[0]] = b"x" * 32
    else:
        m._free.pop()
    with pytest.raises(AssertionError):
        m.check_invariants()


def test_mark_computed_rejects_unbacked_or_shrinking_positions():
    m = BlockManager(6, 2)
    m.allocate_prompt(1, [1, 2, 3])
    m.ensure_slots(1, 2)
    with pytest.raises(IndexError, match="3 positions computed"):
        m.mark_computed(1, [1, 2, 3], 3)
    m.mark_computed(1, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="num_computed 1"):
        m.mark_computed(1, [1, 2, 3], 1)


# ---- prefix caching ----


def test_prefix_hits_between_two_sequences():
    m = BlockManager(16, 4)
    a = list(range(10))  # blocks [0..3], [4..7] full; [8, 9] partial
    assert run_prefill(m, 1, a) == 0
    assert (m.prefix_queries, m.prefix_hits) == (10, 0)
    b = a[:8] + [99, 98, 97]
    assert m.allocate_prompt(2, b) == 8  # both full blocks, counted in tokens
    assert (m.prefix_queries, m.prefix_hits) == (21, 8)
    assert m.block_table(2) == m.block_table(1)[:2]
    assert m._ref[m.block_table(1)[0]] == 2
    assert m.ensure_slots(2, len(b))
    assert m.block_table(2)[2] != m.block_table(1)[2]  # the partial block is private
    m.mark_computed(2, b, len(b))
    m.check_invariants()
    # The last token is never served from the cache: 8 tokens may reuse only the first block.
    assert m.allocate_prompt(3, a[:8]) == 4
    assert m.allocate_prompt(4, a[:9]) == 8
    # A partially filled block is never registered: a's third block holds only 2 tokens.
    assert m.num_cached_blocks(a + [10, 11, 12]) == 2
    m.check_invariants()


def test_full_block_registered_once_computed():
    m = BlockManager(16, 4)
    a = list(range(6))
    run_prefill(m, 1, a)
    a.append(6)  # decoded tokens fill the second block
    a.append(7)
    for n in (7, 8):
        assert m.ensure_slots(1, n)
        m.mark_computed(1, a, n)
    assert m.num_cached_blocks(a + [8]) == 2
    assert m.num_cached_blocks(a) == 1  # would cover the last token


def test_duplicate_blocks_computed_concurrently():
    m = BlockManager(16, 4)
    a = list(range(9))
    m.allocate_prompt(1, a)
    m.allocate_prompt(2, a)  # admitted together: no hits yet
    for s in (1, 2):
        assert m.ensure_slots(s, 9)
    for s in (1, 2):
        m.mark_computed(s, a, 9)  # seq 2's equal blocks stay private
    m.check_invariants()
    m.free(1)
    m.free(2)
    m.check_invariants()
    assert m.num_free_blocks == 16 and len(m._evictable) == 2
    assert m.allocate_prompt(3, a) == 8


def test_hits_on_freed_but_cached_blocks():
    m = BlockManager(8, 4)
    a = list(range(10))
    run_prefill(m, 1, a)
    old = m.block_table(1)
    m.free(1)
    assert m.num_free_blocks == 8  # cached blocks are still allocatable
    assert m.allocate_prompt(2, a[:8] + [55]) == 8
    assert m.block_table(2) == old[:2]
    assert m.num_free_blocks == 6  # the hits left the evictable pool
    m.check_invariants()


def test_lru_eviction_and_evicted_hash_no_longer_hits():
    m = BlockManager(6, 2)
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]  # two full blocks and one partial each
    run_prefill(m, 1, a)
    run_prefill(m, 2, b)
    ta, tb = m.block_table(1), m.block_table(2)
    m.free(1)  # a freed first: its blocks are the least recently freed
    m.free(2)
    assert m.num_free_blocks == 6 and len(m._evictable) == 4
    m.allocate_prompt(3, [0] * 7)
    assert m.ensure_slots(3, 3)  # the two plain free blocks (the partial ones) go first
    assert sorted(m.block_table(3)) == sorted([ta[2], tb[2]])
    assert m.num_cached_blocks(a) == 2 and m.num_cached_blocks(b) == 2
    assert m.ensure_slots(3, 5)  # evicts a's tail block: freed tail first, so the head survives longest
    assert m.block_table(3)[2] == ta[1]
    assert m.num_cached_blocks(a) == 1 and m.num_cached_blocks(b) == 2
    assert m.ensure_slots(3, 7)
    assert m.block_table(3)[3] == ta[0]
    assert m.num_cached_blocks(a) == 0 and m.num_cached_blocks(b) == 2
    m.check_invariants()
    # A hit makes the block most recent again only once it is freed again.
    assert m.allocate_prompt(4, b) == 4
    m.free(4)
    m.free(3)
    m.check_invariants()


def test_diverging_in_the_middle_of_a_block_shares_only_full_blocks_before_it():
    m = BlockManager(16, 4)
    a = list(range(12))
    run_prefill(m, 1, a)
    b = a[:6] + [100, 101, 102, 103, 104, 105]  # differs from position 6, inside block 1
    assert m.allocate_prompt(2, b) == 4
    assert m.block_table(2) == m.block_table(1)[:1]
    # same tokens at a different position (different parent) do not hit
    assert m.num_cached_blocks([9, 9, 9, 9] + a[4:8] + [0]) == 0


def test_same_block_after_a_different_prefix_is_a_different_block():
    m = BlockManager(16, 2)
    run_prefill(m, 1, [5, 6, 9])  # registers [5, 6] as a first block
    run_prefill(m, 2, [1, 2, 5, 6, 9])  # registers [5, 6] after [1, 2]: its own block, its own KV
    m.free(1)
    m.free(2)
    assert m.allocate_prompt(3, [1, 2, 5, 6, 7]) == 4
    assert m.allocate_prompt(4, [5, 6, 7]) == 2
    assert m.block_table(3)[1] not in m.block_table(4)
    m.check_invariants()


def test_hash_is_sha256_chain():
    h0 = hash_block(b"p" * 32, [1, 2, 3])
    assert len(h0) == 32 and h0 != hash_block(b"q" * 32, [1, 2, 3]) and h0 != hash_block(b"p" * 32, [1, 2, 4])


def test_caching_disabled():
    m = BlockManager(8, 4, enable_prefix_caching=False)
    run_prefill(m, 1, list(range(10)))
    assert m.allocate_prompt(2, list(range(10))) == 0
    assert (m.prefix_queries, m.prefix_hits) == (0, 0)


# ---- sliding window ----


def test_window_releases_blocks_exactly_when_they_leave_the_window():
    w, bs = 5, 4
    m = BlockManager(16, bs, window=w)
    tokens = [7]
    m.allocate_prompt(1, tokens)
    for c in range(1, 40):
        assert m.ensure_slots(1, c)
        m.mark_computed(1, tokens, c)
        tokens.append(c)
        # the next query is at c and sees keys c-4 .. c: block i (positions 4i .. 4i+3) can go iff 4i+3 < c-4
        table = m.block_table(1)
        for i, b in enumerate(table):
            assert (b < 0) == (4 * i + 3 < c - w + 1), (c, table)
        m.slot_mapping(1, max(0, c - w + 1), c)  # every visible key is still backed
        m.check_invariants()
    # the precise boundaries: block 0 stays through c = 7 (query 7 sees key 3), goes at c = 8
    m2 = BlockManager(16, bs, window=w)
    m2.allocate_prompt(1, list(range(20)))
    for c, table0 in [(4, 0), (7, 0), (8, -1)]:
        assert m2.ensure_slots(1, c)
        m2.mark_computed(1, list(range(20)), c)
        assert m2.block_table(1)[0] == table0, c
    assert m2.block_table(1)[1] >= 0  # block 1 (positions 4..7) stays until c = 12
    for c in (11, 12):
        m2.ensure_slots(1, c)
        m2.mark_computed(1, list(range(20)), c)
    assert m2.block_table(1)[:2] == [-1, -1]
    with pytest.raises(IndexError, match="position 7"):
        m2.slot_mapping(1, 7, 9)


def test_window_needs_only_visible_blocks():
    m = BlockManager(4, 4, window=5)
    toks = list(range(40))
    m.allocate_prompt(1, toks)
    assert not m.can_allocate(1, 20)  # a 20-token first chunk writes 5 blocks
    assert m.ensure_slots(1, 16)
    m.mark_computed(1, toks, 16)  # next query at 16 sees 12..16: blocks 0-2 released
    assert m.block_table(1) == [-1, -1, -1, 3]
    assert m.num_free_blocks == 3
    assert m.ensure_slots(1, 28)  # blocks 4..6 are new; block 3 is still there
    assert held(m, 1) == 4
    m.check_invariants()


@pytest.mark.parametrize("w,bs", [(5, 4), (4, 4), (1, 4), (37, 16), (512, 16), (17, 1)])
def test_long_sequence_holds_at_most_the_cap(w, bs):
    m = BlockManager(10_000, bs, window=w)
    tokens = list(range(1100))
    m.allocate_prompt(1, tokens[:100])
    c, peak = 0, 0
    rng = random.Random(w)
    while c < 1000:
        n = rng.randint(1, 40) if c < 100 else 1  # a chunked prompt, then decode
        assert m.ensure_slots(1, c + n)
        now = held(m, 1)
        assert now <= math.ceil((w - 2 + n) / bs) + 1  # the span [c - w + 1, c + n)
        if n == 1:
            assert now <= math.ceil((w - 1) / bs) + 1
            peak = max(peak, now)
        c += n
        m.mark_computed(1, tokens, c)
    assert peak == math.ceil((w - 1) / bs) + 1  # the decode bound is reached
    assert len(m.block_table(1)) >= 1000 // bs


@pytest.mark.parametrize("seed", range(4))
def test_window_cap_suffices_for_a_full_scheduler(seed):
    """A windowed pool of exactly max_window_blocks never runs short under the scheduler's limits."""
    rng = random.Random(seed)
    w, bs, seqs, max_len, budget = rng.choice([5, 9, 33]), rng.choice([2, 4, 16]), 6, 200, rng.choice([8, 24, 64])
    cap = max_window_blocks(w, bs, seqs, max_len, budget)
    m = BlockManager(cap, bs, window=w)
    running: dict[int, int] = {}
    lens: dict[int, int] = {}
    next_id = 0
    for _ in range(400):
        while len(running) < seqs:
            running[next_id], lens[next_id] = 0, rng.randint(1, max_len)
            m.allocate_prompt(next_id, [0])
            next_id += 1
        left = budget
        step = []
        for s in rng.sample(list(running), len(running)):
            n = min(lens[s] - running[s], rng.randint(1, left)) if left else 0
            if n:
                assert m.ensure_slots(s, running[s] + n), (cap, m.num_free_blocks)
                step.append((s, n))
                left -= n
        for s, n in step:
            running[s] += n
            m.mark_computed(s, [0] * running[s], running[s])
            if running[s] == lens[s]:
                m.free(s)
                del running[s]
        m.check_invariants()
    assert cap < seqs * math.ceil(max_len / bs)  # the window saved memory


# ---- several groups ----


def test_kv_cache_manager_is_atomic_across_groups():
    kv = KVCacheManager([KVGroupSpec(None, 8), KVGroupSpec(4, 2)], 4, enable_prefix_caching=False)
    assert not any(g.enable_prefix_caching for g in kv.groups)
    assert run_prefill(kv, 1, list(range(4))) == 0
    assert kv.allocate_prompt(2, list(range(9))) == 0
    before = (kv.groups[0].num_free_blocks, kv.block_table(0, 2), kv.block_table(1, 2))
    assert not kv.can_allocate(2, 9)  # global has room, the windowed group (1 free block) has not
    assert not kv.ensure_slots(2, 9)
    assert (kv.groups[0].num_free_blocks, kv.block_table(0, 2), kv.block_table(1, 2)) == before
    kv.check_invariants()
    assert kv.ensure_slots(2, 4)
    assert kv.num_free_blocks == 0 and kv.usage == 1.0
    assert kv.slot_mapping(0, 2, 0, 2) == [4, 5] and kv.slot_mapping(1, 2, 0, 2) == [4, 5]
    kv.free(1)
    kv.free(2)
    kv.free(3)
    assert kv.num_free_blocks == 2 and kv.usage == 0.0
    kv.check_invariants()


def test_kv_cache_manager_prefix_caching_with_global_groups():
    kv = KVCacheManager([KVGroupSpec(None, 8), KVGroupSpec(None, 3)], 4)
    assert kv.enable_prefix_caching
    a = list(range(12))
    run_prefill(kv, 1, a)  # 3 full blocks registered in each group; group 1 is now full
    kv.free(1)
    q = a + [99]
    assert kv.groups[0].num_cached_blocks(q) == kv.groups[1].num_cached_blocks(q) == 3
    kv.groups[1].allocate_prompt("x", [50])
    kv.groups[1].ensure_slots("x", 4)  # evicts a's tail block in group 1 only
    kv.groups[1].free("x")
    assert kv.groups[0].num_cached_blocks(q) == 3 and kv.groups[1].num_cached_blocks(q) == 2
    assert kv.allocate_prompt(2, q) == 8  # only the prefix every group holds
    assert (kv.prefix_queries, kv.prefix_hits) == (25, 8)
    assert len(kv.block_table(0, 2)) == len(kv.block_table(1, 2)) == 2
    kv.check_invariants()
    with pytest.raises(ValueError, match="already allocated"):
        kv.allocate_prompt(2, a)


def test_windowed_group_hit_needs_only_the_blocks_the_window_sees():
    """A hit of h tokens: the global group reuses blocks [0, h/bs), the windowed group only the blocks holding
    keys h - W + 1 .. h - 1; the blocks before those start released, and everything returns to the pool."""
    bs, w = 4, 5
    kv = KVCacheManager([KVGroupSpec(None, 16), KVGroupSpec(w, 16)], bs)
    prompt = list(range(100, 121))  # 21 tokens: a hit may cover the 5 blocks before the last token
    assert run_prefill(kv, 1, prompt) == 0
    kv.free(1)  # its blocks (those the window released during the prefill too) stay cached, evictable
    assert kv.usage == 0.0 and kv.num_free_blocks == 16
    assert kv.allocate_prompt(2, prompt) == 20
    glob, win = kv.block_table(0, 2), kv.block_table(1, 2)
    assert len(glob) == 5 and -1 not in glob
    assert win[:4] == [-1] * 4 and win[4] >= 0  # the query at 20 sees keys 16..19: block 4 only
    assert kv.groups[1].needed_blocks(5) == range(4, 5) and kv.groups[0].needed_blocks(5) == range(5)
    kv.slot_mapping(1, 2, 16, 20)  # backed
    with pytest.raises(IndexError):
        kv.slot_mapping(1, 2, 15, 16)
    assert kv.ensure_slots(2, 21)
    kv.mark_computed(2, prompt + [7], 21)
    kv.check_invariants()
    kv.free(2)
    kv.check_invariants()
    assert kv.usage == 0.0


def test_windowed_group_missing_window_block_shortens_the_hit():
    """When the windowed group lost a block the longest hit needs, the hit is the longest one whose window blocks
    are all there (not necessarily a prefix of the global group's)."""
    bs, w = 4, 5
    kv = KVCacheManager([KVGroupSpec(None, 16), KVGroupSpec(w, 16)], bs)
    prompt = list(range(100, 121))
    run_prefill(kv, 1, prompt)
    kv.free(1)
    win = kv.groups[1]
    chain = prompt_chain(prompt, bs)
    evicted = win._by_hash[chain[4]]  # the block a 20-token hit needs in the windowed group
    win._evictable.move_to_end(evicted, last=False)  # the least recently used: the next one taken
    win.allocate_prompt("x", [1])
    assert win.ensure_slots("x", bs * 12)  # the 11 never-used blocks, then the least recently used cached one
    assert chain[4] not in win._by_hash
    # h = 20 needs block 4 (gone); h = 16 needs block 3 (keys 12..15): cached
    assert kv.num_cached_blocks(prompt) == 4
    win.free("x")
    assert kv.allocate_prompt(2, prompt) == 16
    assert kv.block_table(1, 2) == [-1, -1, -1, kv.block_table(1, 2)[3]] and kv.block_table(1, 2)[3] >= 0
    kv.check_invariants()


def test_prefix_caching_off_caches_nothing_in_any_group():
    kv = KVCacheManager([KVGroupSpec(None, 16), KVGroupSpec(5, 16)], 4, enable_prefix_caching=False)
    prompt = list(range(21))
    run_prefill(kv, 1, prompt)
    kv.free(1)
    assert kv.allocate_prompt(2, prompt) == 0 and (kv.prefix_queries, kv.prefix_hits) == (0, 0)


# ---- budget split ----


def test_max_window_blocks():
    # decode-only bound plus a boundary block per sequence plus the step's tokens
    assert max_window_blocks(5, 4, 3, 1000, 8) == 3 * (1 + 2) + 2
    assert max_window_blocks(512, 16, 4, 1024, 256) == 4 * (32 + 2) + 16
    assert max_window_blocks(512, 16, 1, 100, None) == 7  # never more than full-length sequences


def test_split_kv_budget_caps_windowed_groups():
    windows = [512, 512, 512, 512, 512, None]  # Gemma 3's 5 local : 1 global
    args = dict(bytes_per_block_per_layer=100, layer_windows=windows, block_size=16, max_num_seqs=4,
                max_model_len=1024, max_num_batched_tokens=256)
    cap = max_window_blocks(512, 16, 4, 1024, 256)  # 152
    big = split_kv_budget(budget_bytes=10_000_000, **args)
    assert big[0] == KVGroupSpec(512, cap)
    assert big[1].window is None and big[1].num_blocks == (10_000_000 - cap * 500) // 100
    assert big[1].num_blocks > cap
    # a small budget: both get the same number of blocks (below the cap)
    small = split_kv_budget(budget_bytes=600 * 120, **args)
    assert [s.num_blocks for s in small] == [120, 120]
    # the minimum: one 1024-token sequence: 64 global blocks, min(64, 34 + 16) windowed blocks
    need = 64 * 100 + 50 * 500
    with pytest.raises(ValueError, match=f"needs at least {need} bytes"):
        split_kv_budget(budget_bytes=need - 1, **args)
    assert [s.num_blocks for s in split_kv_budget(budget_bytes=need, **args)] == [50, 64]
    # above the minimum the windowed group is held at its floor until the global group catches up
    assert [s.num_blocks for s in split_kv_budget(budget_bytes=need + 100, **args)] == [50, 65]


def test_split_kv_budget_global_only_and_window_only():
    (g,) = split_kv_budget(64, [None] * 4, 64 * 4 * 100, 16, 8, 256)
    assert g == KVGroupSpec(None, 100)
    with pytest.raises(ValueError, match="needs at least 4096 bytes"):
        split_kv_budget(64, [None] * 4, 4095, 16, 8, 256)
    (w,) = split_kv_budget(10, [8, 8], 10**9, 4, 2, 64, max_num_batched_tokens=16)
    assert w == KVGroupSpec(8, max_window_blocks(8, 4, 2, 64, 16))


# ---- randomized stress ----


def _stress(kv: KVCacheManager, rng: random.Random, steps: int, prefixes: list[list[int]]) -> None:
    """Random admit / extend / preempt / abort; checks invariants and that every visible key slot holds the KV
    of exactly the right prefix (a fake KV store keyed by slot), so hits and block reuse are content-correct."""
    bs = kv.block_size
    store: list[dict[int, tuple[int, ...]]] = [{} for _ in kv.groups]
    seqs: dict[int, list[int]] = {}  # running: tokens
    computed: dict[int, int] = {}
    waiting: list[tuple[int, list[int]]] = []
    next_id = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.3 or not seqs:
            if waiting and rng.random() < 0.5:
                sid, toks = waiting.pop(rng.randrange(len(waiting)))
            else:
                sid, next_id = next_id, next_id + 1
                toks = rng.choice(prefixes)[: rng.randint(0, 20)] + [rng.randrange(3) for _ in range(rng.randint(1, 8))]
            c = kv.allocate_prompt(sid, toks)
            assert c % bs == 0 and c < len(toks)
            n = rng.randint(1, len(toks) - c)
            if kv.ensure_slots(sid, c + n):
                seqs[sid], computed[sid] = toks, c
                steps_n = [(sid, n)]
            else:
                kv.free(sid)
                waiting.append((sid, toks))
                steps_n = []
        elif op < 0.85:
            steps_n = []
            for sid in rng.sample(list(seqs), min(len(seqs), 3)):
                toks, c = seqs[sid], computed[sid]
                n = rng.randint(1, len(toks) - c)
                if kv.ensure_slots(sid, c + n):
                    steps_n.append((sid, n))
                elif rng.random() < 0.7:  # preempt: recompute later from all tokens so far
                    kv.free(sid)
                    waiting.append((sid, seqs.pop(sid)))
                    del computed[sid]
        else:
            sid = rng.choice(list(seqs) + [10_000])  # abort, sometimes of an unknown sequence
            kv.free(sid)
            seqs.pop(sid, None)
            computed.pop(sid, None)
            steps_n = []
        for sid, n in steps_n:  # "run the model": write KV for the new positions, then mark them
            toks, c = seqs[sid], computed[sid]
            for g, m in enumerate(kv.groups):
                for p, slot in zip(range(c, c + n), kv.slot_mapping(g, sid, c, c + n)):
                    store[g][slot] = tuple(toks[: p + 1])
            computed[sid] = c + n
            if c + n == len(toks):
                toks.append(rng.randrange(3))  # sampled token
            kv.mark_computed(sid, toks, c + n)
            if len(toks) > 40:
                kv.free(sid)
                del seqs[sid], computed[sid]
        for sid, toks in seqs.items():  # every key the next query can see holds the right KV
            c = computed[sid]
            for g, m in enumerate(kv.groups):
                first = 0 if m.window is None else max(0, c - m.window + 1)
                for p, slot in zip(range(first, c), kv.slot_mapping(g, sid, first, c)):
                    assert store[g][slot] == tuple(toks[: p + 1])
        kv.check_invariants()
    for sid in list(seqs):
        kv.free(sid)
    kv.check_invariants()
    assert kv.num_free_blocks == min(m.num_blocks for m in kv.groups) and kv.usage == 0.0
    assert all(m.num_used_blocks == 0 for m in kv.groups)


@pytest.mark.parametrize("seed", range(4))
def test_stress_prefix_caching(seed):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3) for _ in range(20)] for _ in range(3)]
    kv = KVCacheManager([KVGroupSpec(None, 48)], rng.choice([1, 2, 4]))
    _stress(kv, rng, 400, prefixes)
    assert kv.prefix_hits > 0 and kv.prefix_queries > kv.prefix_hits


@pytest.mark.parametrize("seed", range(4))
def test_stress_sliding_and_global_groups(seed):
    rng = random.Random(100 + seed)
    prefixes = [[rng.randrange(3) for _ in range(20)]]
    kv = KVCacheManager([KVGroupSpec(None, 30), KVGroupSpec(5, 12), KVGroupSpec(9, 14)], rng.choice([2, 4]))
    _stress(kv, rng, 400, prefixes)
    assert kv.prefix_hits > 0  # the windowed groups served hits too: every group holds what a hit needs
