"""How many KV blocks each KV group gets: one `KVGroupSpec` per attention window, sized to a byte budget.

Plain Python (no torch). Layers with the same attention window share a group and its block pool (see
gemma.engine.block_manager); `split_kv_budget` divides the KV cache memory among the groups so that no group holds
more than it can ever use and one `max_model_len` sequence always fits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroupSpec:
    """One KV group: the layers sharing an attention window, with their own block pool."""

    window: int | None  # None = global attention
    num_blocks: int


def max_window_blocks(
    window: int, block_size: int, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int | None = None
) -> int:
    """The most blocks a windowed group ever holds under the scheduler's limits.

    A step computing n new tokens of a sequence with c computed backs positions [c - W + 1, c + n): W - 1 + n
    positions span at most ceil((W - 2 + n) / bs) + 1 <= ceil((W - 1) / bs) + 1 + ceil((n - 1) / bs) blocks.
    Decode (n = 1): ceil((W - 1) / bs) + 1. A prefill chunk adds ceil((n - 1) / bs) <= (n - 1) / bs + 1: one
    block for the chunk boundary plus the chunk's own tokens, which over all sequences are at most the step's
    token budget T (max_num_batched_tokens; None = no limit beyond max_num_seqs * max_model_len). So
    total <= S * (ceil((W - 1) / bs) + 2) + ceil(T / bs), and never more than S full-length sequences.
    """
    full = max_num_seqs * math.ceil(max_model_len / block_size)
    step_tokens = max_num_seqs * max_model_len
    if max_num_batched_tokens is not None:
        step_tokens = min(step_tokens, max_num_batched_tokens)
    per_seq = math.ceil((window - 1) / block_size) + 2
    return min(full, max_num_seqs * per_seq + math.ceil(step_tokens / block_size))


def split_kv_budget(
    bytes_per_block_per_layer: int,
    layer_windows: list[int | None],
    budget_bytes: int,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
    *,
    max_num_batched_tokens: int | None = None,
) -> list[KVGroupSpec]:
    """One KVGroupSpec per distinct window of `layer_windows` (in order of first appearance), sized to the budget.

    A block costs bytes_per_block_per_layer times its group's layer count. Every group gets the same number
    of blocks B (a block holds block_size tokens of a sequence in any group), except that a windowed group is
    clamped to `max_window_blocks` (more would never be used) and every group gets at least what one
    max_model_len sequence needs; B is the largest that fits, so the global group takes what the windowed
    ones leave. Pass the scheduler's max_num_batched_tokens: without it the windowed cap is loose.
    Raises ValueError, naming the bytes needed, if one max_model_len sequence does not fit.
    """
    windows: list[int | None] = list(dict.fromkeys(layer_windows))
    cost = [layer_windows.count(w) * bytes_per_block_per_layer for w in windows]
    full = math.ceil(max_model_len / block_size)

    def window_cap(w: int, seqs: int) -> int:
        return max_window_blocks(w, block_size, seqs, max_model_len, max_num_batched_tokens)

    low = [full if w is None else window_cap(w, 1) for w in windows]  # one max_model_len sequence
    cap = [None if w is None else window_cap(w, max_num_seqs) for w in windows]

    def blocks(b: int) -> list[int]:
        return [max(lo, b) if hi is None else min(hi, max(lo, b)) for lo, hi in zip(low, cap)]

    def size(b: int) -> int:
        return sum(c * n for c, n in zip(cost, blocks(b)))

    needed = size(0)
    if budget_bytes < needed:
        raise ValueError(
            f"KV cache budget of {budget_bytes} bytes cannot hold one {max_model_len}-token sequence in every "
            f"KV group: needs at least {needed} bytes ({low} blocks of {block_size} tokens per group)"
        )
    lo_b, hi_b = 0, max(low) + budget_bytes // min(cost) + 1  # size(lo_b) fits; find the largest B that does
    while lo_b < hi_b:
        mid = (lo_b + hi_b + 1) // 2
        lo_b, hi_b = (mid, hi_b) if size(mid) <= budget_bytes else (lo_b, mid - 1)
    sizes = blocks(lo_b)
    if None in windows:  # bytes too few for one more block in every group still buy global blocks
        g = windows.index(None)
        sizes[g] += (budget_bytes - size(lo_b)) // cost[g]
    return [KVGroupSpec(w, n) for w, n in zip(windows, sizes)]
