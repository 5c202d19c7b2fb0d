"""Prefix caching on models with sliding-window layers (Gemma 2 and 3): caching on gives what caching off gives.

Tiny fp32 Gemma 2 / Gemma 3 checkpoints with a window of 5 tokens and blocks of 4, so a prompt of ~25 tokens spans
several windows. Each scenario runs twice, with `enable_prefix_caching` on and off, and compares the greedy tokens
and the logprobs of every request; the block manager's invariants are checked after every step.
"""

from __future__ import annotations

import pytest
import torch

from gemma import GemmaForCausalLM
from gemma.engine import EngineConfig, LLMEngine
from gemma.sampling import SamplingParams
from tests.helpers.checkpoints import FAMILIES, WINDOW, write_hf_checkpoint

BLOCK = 4
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text"])
def model(request, tmp_path_factory) -> GemmaForCausalLM:
    path = write_hf_checkpoint(tmp_path_factory.mktemp(request.param), family=request.param, **FAMILIES[request.param])
    return GemmaForCausalLM.from_pretrained(path)  # fp32


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(10, 200, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PREFIX = tokens(26, 0)  # longer than the window several times over
SCENARIOS = {
    # the second prompt shares 26 tokens (a hit of 24: blocks 0-5; the window's keys 20..23 in block 5)
    "shared prefix longer than the window": [PREFIX + tokens(3, 1), PREFIX + tokens(5, 2)],
    # they diverge at 18: a hit of 16, whose first query (16) sees keys 12..15 of the shared part
    "diverging inside the last window": [PREFIX + tokens(2, 3), PREFIX[:18] + tokens(9, 4)],
    # they diverge before the first full block: nothing to reuse
    "diverging before the window": [PREFIX + tokens(2, 5), PREFIX[:3] + tokens(20, 6)],
    # the same prompt twice: everything but the last token's block
    "the same prompt again": [PREFIX + tokens(4, 7), PREFIX + tokens(4, 7)],
}


def engine(model: GemmaForCausalLM, caching: bool, **limits) -> LLMEngine:
    config = dict(block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory="1MiB")
    return LLMEngine(model, None, EngineConfig(**{**config, **limits}, enable_prefix_caching=caching))


def run_one_after_another(llm: LLMEngine, prompts: list[list[int]]) -> list:
    """Each request runs to the end before the next is added: the next reuses the blocks of a finished one."""
    outs = []
    for i, prompt in enumerate(prompts):
        llm.add_request(str(i), prompt, PARAMS)
        while llm.has_unfinished_requests():
            for out in llm.step():
                llm.kv.check_invariants()
                if out.finished:
                    outs.append(out)
    return outs


def same(got: list, want: list) -> None:
    """Equal greedy tokens, and logprobs of the same tokens within 1e-5: a step that reads cached keys multiplies
    matrices of other shapes than one that computes them (fp32 sums in another order: last-bit differences)."""
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) <= 1e-5 for t in a), (a, b)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_caching_on_equals_caching_off_with_sliding_windows(model, scenario):
    prompts = SCENARIOS[scenario]
    assert all(len(p) > WINDOW for p in prompts)
    on, off = engine(model, True), engine(model, False)
    got, want = run_one_after_another(on, prompts), run_one_after_another(off, prompts)
    same(got, want)
    hit = got[1].num_cached_tokens
    shared = next((i for i, (a, b) in enumerate(zip(*prompts)) if a != b), min(map(len, prompts)))
    assert hit == min(shared, len(prompts[1]) - 1) // BLOCK * BLOCK  # every block the windows need was there
    assert got[0].num_cached_tokens == 0 and all(o.num_cached_tokens == 0 for o in want)
    assert on.kv.prefix_hits == hit and on.kv.prefix_queries > 0
    assert on.kv.usage == 0.0  # cached blocks are evictable, not held
    on.kv.check_invariants()


def test_caching_on_equals_off_under_preemption_and_eviction(model):
    """Many requests sharing prefixes on a pool far too small for them: preemption recomputes from the cache,
    and cached blocks are evicted to make room; outputs equal caching off, and the pool returns to empty."""
    block_bytes = 2 * BLOCK * model.config.num_key_value_heads * model.config.head_dim * 4
    prompts = [PREFIX[: 10 + 3 * (i % 4)] + tokens(4 + i, 10 + i) for i in range(8)]
    limits = dict(kv_cache_memory=block_bytes * model.config.num_hidden_layers * 20, max_model_len=48, max_num_seqs=8)
    outs = {}
    for caching in (True, False):
        llm = engine(model, caching, **limits)
        for i, p in enumerate(prompts):
            llm.add_request(str(i), p, PARAMS)
        done = {}
        while llm.has_unfinished_requests():
            for out in llm.step():
                llm.kv.check_invariants()
                if out.finished:
                    done[out.request_id] = out
        outs[caching] = [done[str(i)] for i in range(len(prompts))]
        assert llm.kv.usage == 0.0
        if caching:
            assert sum(o.metrics.num_preemptions for o in outs[True]) > 0
            assert llm.kv.prefix_hits > 0
    same(outs[True], outs[False])
