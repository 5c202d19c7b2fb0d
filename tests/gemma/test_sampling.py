"""`SamplingParams` against vLLM's names/defaults/limits, and `sample`: batched == row by row, seeded draws
independent of the batch, each filter and penalty against its definition, and raw logprobs."""

from __future__ import annotations

import math
import random

import pytest
import torch
from pydantic import ValidationError

import gemma.sampling
from gemma.sampling import SamplingParams, apply_penalties, filter_top_k_top_p, make_generator, sample

VLLM_DEFAULTS = dict(
    n=1, max_tokens=16, min_tokens=0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
    presence_penalty=0.0, frequency_penalty=0.0, stop=[], stop_token_ids=[], ignore_eos=False, seed=None,
    logprobs=None, skip_special_tokens=True, include_stop_str_in_output=False, structured_outputs=None,
)


def run(logits: torch.Tensor, params: list[SamplingParams], prompts=None, outputs=None, stops=None, generators=None):
    """`sample` with empty histories by default and a fresh generator per seeded row (as the engine would)."""
    n = len(params)
    return sample(
        logits, params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        stops if stops is not None else [[] for _ in range(n)],
        generators if generators is not None else [make_generator(p) for p in params],
    )


# ---------------------------------------------------------------------------------------------- SamplingParams


def test_every_field_has_vllms_default():
    assert SamplingParams().model_dump() == VLLM_DEFAULTS
    assert SamplingParams().greedy is False and SamplingParams(temperature=0).greedy is True


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(min_p=-0.01), "min_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=math.inf), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(presence_penalty=-math.inf), "presence_penalty"),
        (dict(frequency_penalty=-2.1), "frequency_penalty"),
        (dict(frequency_penalty=math.nan), "frequency_penalty"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop_token_ids=[3, -1]), "stop_token_ids"),
        (dict(seed=2**64), "seed"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=21), "logprobs"),
        (dict(best_of=2), "best_of"),  # unknown field
    ],
)
def test_out_of_range_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        SamplingParams(**kwargs)


def test_normalization_and_edges_accepted():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=None).stop == [] and SamplingParams(stop=["a", "b"]).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    p = SamplingParams(max_tokens=None, min_tokens=100, top_p=1.0, min_p=1.0, presence_penalty=-2, logprobs=20)
    assert p.max_tokens is None and p.min_tokens == 100
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4
    with pytest.raises(ValidationError):
        SamplingParams().temperature = 0.5  # frozen: params are shared between steps


def test_generator_from_seed():
    assert make_generator(SamplingParams()) is None
    a, b = make_generator(SamplingParams(seed=7)), torch.Generator().manual_seed(7)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ------------------------------------------------------------------------------------------------------ sample


def test_greedy_rows_are_argmax_in_any_dtype():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    greedy = [SamplingParams(temperature=0)] * 6
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = run(logits.to(dtype), greedy)
        assert out.token_ids == logits.to(dtype).float().argmax(-1).tolist()
        assert out.logprobs is None and out.top_logprobs is None


def test_list_lengths_must_match_rows():
    logits, p = torch.randn(2, 5), [SamplingParams()] * 2
    good = dict(params=p, prompt_token_ids=[[], []], output_token_ids=[[], []], stop_ids=[[], []], generators=[None, None])
    for name in good:
        bad = {**good, name: good[name][:1]}
        with pytest.raises(ValueError, match=name):
            sample(logits, **bad)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(5), **good)


# One row per feature; every sampling row is seeded so the whole batch is reproducible row by row.
MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.3, logprobs=2),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.2, top_k=5, seed=2, logprobs=0),
    SamplingParams(temperature=1.0, top_p=0.7, seed=3),
    SamplingParams(temperature=1.5, min_p=0.1, seed=4, logprobs=3),
    SamplingParams(temperature=1.0, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.5, seed=5),
    SamplingParams(temperature=0.7, min_tokens=3, seed=6),
]


def mixed_rows(vocab: int = 64):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(len(MIXED), vocab, generator=g) * 3
    prompts = [torch.randint(vocab, (5,), generator=g).tolist() for _ in MIXED]
    outputs = [torch.randint(vocab, (i % 4,), generator=g).tolist() for i in range(len(MIXED))]
    stops = [[1, 2]] * len(MIXED)
    return [(logits[i], MIXED[i], prompts[i], outputs[i], stops[i]) for i in range(len(MIXED))]


def run_rows(rows):
    logits = torch.stack([r[0] for r in rows])
    return run(logits, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows], [r[4] for r in rows])


def test_batched_equals_row_by_row_whatever_the_batch():
    rows = mixed_rows()
    alone = [run_rows([r]) for r in rows]
    expected = [a.token_ids[0] for a in alone]
    batched = run_rows(rows)
    assert batched.token_ids == expected
    for i, a in enumerate(alone):
        if a.logprobs is not None:
            assert batched.logprobs[i] == pytest.approx(a.logprobs[0], abs=1e-6)
            assert batched.top_logprobs[i] == pytest.approx(a.top_logprobs[0], abs=1e-6)

    # Permuted, with some rows removed and unseeded sampling rows (global RNG) mixed in: seeded rows unchanged.
    rng = random.Random(0)
    vocab = rows[0][0].numel()
    for trial in range(3):
        keep = rng.sample(range(len(rows)), k=len(rows) - trial)
        extra = [(torch.randn(vocab) * 3, SamplingParams(top_p=0.9), [], [], []) for _ in range(trial + 1)]
        order = keep + [-1 - j for j in range(len(extra))]
        rng.shuffle(order)
        batch = [rows[i] if i >= 0 else extra[-1 - i] for i in order]
        tokens = run_rows(batch).token_ids
        for pos, i in enumerate(order):
            if i >= 0:
                assert tokens[pos] == expected[i], (trial, i)


def test_same_seed_same_draws_over_steps_and_different_seeds_differ():
    logits = torch.randn(10, 1000, generator=torch.Generator().manual_seed(2))  # flat-ish: draws vary a lot

    def draws(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        g = make_generator(p)
        return [run(logits[step : step + 1], [p], generators=[g]).token_ids[0] for step in range(10)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = torch.randn(32, 100, generator=torch.Generator().manual_seed(3))
    best = logits.argmax(-1).tolist()
    assert run(logits, [SamplingParams(temperature=2.0, top_k=1)] * 32).token_ids == best
    assert run(logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 32).token_ids == best
    assert run(logits, [SamplingParams(temperature=2.0, top_p=1e-9)] * 32).token_ids == best  # 1 - p == 1 in fp32
    assert run(logits, [SamplingParams(temperature=2.0, top_k=3, top_p=1e-6)] * 32).token_ids == best


def test_top_p_is_the_same_whether_the_nucleus_fits_the_candidates_or_not(monkeypatch):
    g = torch.Generator().manual_seed(4)
    logits = torch.cat([torch.randn(6, 40, generator=g) * 4, torch.randn(6, 40, generator=g) * 0.3])  # peaked, flat
    top_p = [0.3, 0.6, 0.9, 0.99, 1.0, 0.5] * 2
    top_k = [0, 0, 0, 5, 0, 30] * 2

    def reference(row: torch.Tensor, k: int, p: float) -> set[int]:
        """The nucleus by its definition: best tokens, in order, until their renormalized mass reaches p."""
        order = row.argsort(descending=True).tolist()[: k or None]
        probs, kept, mass = row[order].softmax(-1).tolist(), set(), 0.0
        for token, prob in zip(order, probs):
            if mass >= p:
                break
            kept.add(token)
            mass += prob
        return kept

    for candidates in (40, 3):  # every row's nucleus within the candidates / most rows need the full sort
        monkeypatch.setattr(gemma.sampling, "TOP_P_CANDIDATES", candidates)
        kept = filter_top_k_top_p(logits, top_k, top_p) > float("-inf")
        for i in range(len(top_p)):
            assert set(kept[i].nonzero().squeeze(-1).tolist()) == reference(logits[i], top_k[i], top_p[i]), (candidates, i)


def frequencies(logits: torch.Tensor, params: SamplingParams, draws: int = 20_000) -> torch.Tensor:
    torch.manual_seed(0)
    tokens = run(logits.expand(draws, -1), [params] * draws).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=logits.numel()).float() / draws


def test_temperature_frequencies_match_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    for t in (0.7, 1.0, 2.0):
        freq = frequencies(logits, SamplingParams(temperature=t))
        assert (freq - (logits / t).softmax(-1)).abs().max() < 0.015, t  # ~4 sigma at 20k draws


def test_top_k_and_top_p_renormalize_over_the_kept_set():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = logits.softmax(-1)  # [0.55, 0.20, 0.12, 0.07, 0.03]
    nucleus = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # the smallest prefix whose mass reaches 0.8
    freq = frequencies(logits, SamplingParams(top_p=0.8))
    assert (freq - probs * nucleus / (probs * nucleus).sum()).abs().max() < 0.015
    top2 = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    freq = frequencies(logits, SamplingParams(top_k=2))
    assert (freq - probs * top2 / (probs * top2).sum()).abs().max() < 0.015


def test_min_p_never_draws_tokens_below_min_p_times_best():
    logits = torch.tensor([3.0, 2.5, 1.4, 1.0, 0.0])
    temperature, min_p = 1.3, 0.3
    probs = (logits / temperature).softmax(-1)
    banned = probs < min_p * probs.max()
    assert banned.any() and not banned.all()
    freq = frequencies(logits, SamplingParams(temperature=temperature, min_p=min_p))
    assert (freq[banned] == 0).all() and (freq[~banned] > 0).all()
    kept = probs * ~banned
    assert (freq - kept / kept.sum()).abs().max() < 0.015


def test_penalties_change_exactly_the_logits_they_should():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, -0.5, 3.0], [1.0, 2.0, -1.0, 0.5, -0.5, 3.0]])
    before = logits.clone()
    prompts, outputs = [[1, 2], [1, 2]], [[2, 3, 3], [2, 3, 3]]
    params = [SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25), SamplingParams()]
    out = apply_penalties(logits, params, prompts, outputs)
    # repetition on prompt + output {1, 2, 3}: positive / 2, negative * 2; then on output {2: 1, 3: 2}
    # subtract 0.25 * count + 0.5
    expected = [1.0, 2.0 / 2, -1.0 * 2 - 0.25 - 0.5, 0.5 / 2 - 0.5 - 0.5, -0.5, 3.0]
    assert out[0].tolist() == pytest.approx(expected)
    assert torch.equal(out[1], before[1])  # a row without penalties is untouched
    assert torch.equal(logits, before)  # the input is never modified

    # Presence/frequency ignore prompt tokens; repetition alone ignores counts.
    only_pf = apply_penalties(logits[:1], [SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)], [[0, 5]], [[4]])
    assert only_pf[0].tolist() == pytest.approx([1.0, 2.0, -1.0, 0.5, -2.5, 3.0])
    only_rep = apply_penalties(logits[:1], [SamplingParams(repetition_penalty=0.5)], [[0]], [[4, 4]])
    assert only_rep[0].tolist() == pytest.approx([2.0, 2.0, -1.0, 0.5, -0.25, 3.0])
    assert apply_penalties(logits, [SamplingParams()] * 2, prompts, outputs) is logits


def test_greedy_uses_penalized_logits():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert run(logits, [SamplingParams(temperature=0)], outputs=[[0]]).token_ids == [0]
    penalized = SamplingParams(temperature=0, frequency_penalty=2.0)
    assert run(logits, [penalized], outputs=[[0]]).token_ids == [1]


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([10.0, 9.0, 0.0, 0.0]).expand(2000, -1)  # stop ids 0 and 1 dominate
    stops = [[0, 1]] * 2000
    for sampled in (SamplingParams(temperature=0, min_tokens=3), SamplingParams(temperature=1.0, min_tokens=3)):
        params = [sampled] * 2000
        for n_out in range(3):
            tokens = run(logits, params, outputs=[[2] * n_out] * 2000, stops=stops).token_ids
            assert not {0, 1} & set(tokens), n_out
        tokens = run(logits, params, outputs=[[2] * 3] * 2000, stops=stops).token_ids
        assert 0 in tokens  # allowed once min_tokens outputs exist


def test_logprobs_are_raw_with_top_n_best_first():
    logits = (torch.randn(4, 30, generator=torch.Generator().manual_seed(5)) * 2).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.7, logprobs=5, seed=0),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=1.0, logprobs=None, seed=1),
        SamplingParams(temperature=0, presence_penalty=2.0, logprobs=20),
    ]
    out = run(logits, params, outputs=[[0, 1]] * 4)
    raw = logits.float().log_softmax(-1)  # before penalties, temperature and filters
    for i, tok in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(raw[i, tok].item(), abs=1e-6)
        n = params[i].logprobs or 0
        top = out.top_logprobs[i]
        assert len(top) == n
        assert list(top) == (raw[i].topk(n).indices.tolist() if n else [])
        assert list(top.values()) == sorted(top.values(), reverse=True)
        if tok in top:
            assert top[tok] == pytest.approx(out.logprobs[i], abs=1e-6)
    assert out.top_logprobs[2] == {} and out.top_logprobs[1] == {}


def test_sample_leaves_its_input_alone():
    logits = torch.randn(3, 20)
    before = logits.clone()
    run(logits, [SamplingParams(min_tokens=2, repetition_penalty=2.0, top_p=0.5)] * 3, outputs=[[1]] * 3, stops=[[0]] * 3)
    assert torch.equal(logits, before)
