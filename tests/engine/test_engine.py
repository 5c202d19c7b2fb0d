"""The continuous-batching engine against one-at-a-time `generate` (and transformers for Gemma 2/3 windows)."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
import torch
from tests.helpers.checkpoints import FAMILIES, load_hf, write_hf_checkpoint
from tests.helpers.engine_runs import run
from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json
from tests.helpers.waiting import stream_ended, until

from gemma import GemmaForCausalLM, GemmaTokenizer, torch_thread
from gemma.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma.engine.async_engine import EngineStepError
from gemma.sampling import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer, tmp_path_factory):
    path = write_hf_checkpoint(
        tmp_path_factory.mktemp("engine-model"), vocab_size=len(tokenizer),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    return GemmaForCausalLM.from_pretrained(path)


def prompts(n: int, seed: int = 0, shared: int = 11) -> list[list[int]]:
    """Mixed lengths (1 to 40 tokens, several longer than a block); every third shares a prefix."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, 900, (shared,), generator=g).tolist()
    out = []
    for i in range(n):
        length = int(torch.randint(1, 41, (1,), generator=g))
        body = torch.randint(10, 900, (length,), generator=g).tolist()
        out.append(prefix + body if i % 3 == 0 else body)
    return out


def one_at_a_time(model, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, eos_token_id=[])
    return out[0, len(prompt):].tolist()


def invariants(engine: LLMEngine) -> None:
    engine.kv.check_invariants()
    assert 0.0 <= engine.kv.usage <= 1.0


def test_16_concurrent_requests_equal_one_at_a_time(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=48, block_size=4, kv_cache_memory="4MiB",
    ))
    reqs = [(p, SamplingParams(max_tokens=6 + i % 11, **GREEDY)) for i, p in enumerate(prompts(16))]
    outs = run(engine, reqs, invariants)
    for (p, params), out in zip(reqs, outs):
        assert out.token_ids == one_at_a_time(model, p, params.max_tokens)
        assert out.finish_reason == "length"
        assert out.metrics.first_token_time >= out.metrics.arrival_time
    assert engine.kv.prefix_hits > 0  # the shared prefixes were served from the cache
    assert engine.kv.usage == 0.0


def test_preemption_under_a_tiny_kv_budget_gives_identical_outputs(model, tokenizer):
    block_bytes = 2 * 4 * model.config.num_key_value_heads * model.config.head_dim * 4 * model.config.num_hidden_layers
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_cache_memory=24 * block_bytes, max_model_len=80,
    ))
    assert [g.num_blocks for g in engine.kv.groups] == [24]
    reqs = [(p, SamplingParams(max_tokens=20, **GREEDY)) for p in prompts(8, seed=3, shared=3)]
    peak = []
    outs = run(engine, reqs, lambda e: (invariants(e), peak.append(e.kv.groups[0].num_used_blocks)))
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert max(peak) == 24  # the budget was used to the last block, never beyond
    for (p, params), out in zip(reqs, outs):
        assert out.token_ids == one_at_a_time(model, p, 20)


def test_seeded_sampling_ignores_batch_composition(model, tokenizer):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = run(LLMEngine(model, tokenizer), [(prompts(1, seed=9)[0], params)])[0]
    others = [(p, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)) for p in prompts(5, seed=4)]
    crowded = run(LLMEngine(model, tokenizer), [*others[:3], (prompts(1, seed=9)[0], params), *others[3:]])[3]
    assert alone.token_ids == crowded.token_ids
    other_seed = run(LLMEngine(model, tokenizer), [(prompts(1, seed=9)[0], params.model_copy(update={"seed": 1}))])[0]
    assert other_seed.token_ids != alone.token_ids


def test_warm_up_leaves_the_engine_as_it_found_it(model, tokenizer):
    config = EngineConfig(max_num_seqs=8, block_size=4, kv_cache_memory="4MiB")
    greedy = [(p, SamplingParams(max_tokens=8, **GREEDY)) for p in prompts(4, seed=5)]
    unseeded = [(p, SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)) for p in prompts(3, seed=6)]
    cold = run(LLMEngine(model, tokenizer, config), greedy + unseeded)
    engine = LLMEngine(model, tokenizer, config)
    assert engine.warm_up() > 0
    assert not engine.has_unfinished_requests() and engine.kv.usage == 0.0
    assert engine.kv.prefix_queries == engine.kv.prefix_hits == 0
    # nothing cached, the engine's generator untouched: the same requests give the same tokens
    assert [o.token_ids for o in run(engine, greedy + unseeded)] == [o.token_ids for o in cold]
    engine.add_request("busy", prompts(1)[0], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.warm_up()


def test_n_completions_and_logprobs(model, tokenizer):
    params = SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=7, logprobs=2, ignore_eos=True)
    out = run(LLMEngine(model, tokenizer), [(prompts(1)[0], params)])[0]
    assert [o.index for o in out.outputs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == 5
        for token, step in zip(o.token_ids, o.logprobs):
            assert token in step and len(step) in (2, 3) and all(v <= 0 for v in step.values())


def test_stop_token_ids_and_stop_strings_end_exactly(model, tokenizer):
    prompt = prompts(1, seed=5)[0]
    free = run(LLMEngine(model, tokenizer), [(prompt, SamplingParams(max_tokens=30, **GREEDY))])[0]
    stop_id = free.token_ids[6]
    first = free.token_ids.index(stop_id)
    by_id = run(LLMEngine(model, tokenizer), [(prompt, SamplingParams(max_tokens=30, stop_token_ids=[stop_id], **GREEDY))])[0]
    assert by_id.token_ids == free.token_ids[: first + 1] and by_id.finish_reason == "stop"
    assert by_id.outputs[0].stop_reason == stop_id

    text = free.text
    assert len(text) > 12
    stop = text[8:11]
    expected = text[: text.index(stop)]
    by_str = run(LLMEngine(model, tokenizer), [(prompt, SamplingParams(max_tokens=30, stop=[stop, "\x00never"], **GREEDY))])[0]
    assert by_str.text == expected and by_str.finish_reason == "stop" and by_str.outputs[0].stop_reason == stop
    # streamed deltas never show a stop string's start that is later cut: they add up to the final text
    engine = LLMEngine(model, tokenizer)
    engine.add_request("s", prompt, SamplingParams(max_tokens=30, stop=[stop, "\x00never"], **GREEDY))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += [out.outputs[0].new_text for out in engine.step()]
    assert "".join(deltas) == expected
    assert tokenizer.decode(by_str.token_ids).startswith(expected)
    kept = run(LLMEngine(model, tokenizer), [(prompt, SamplingParams(
        max_tokens=30, stop=[stop], include_stop_str_in_output=True, **GREEDY))])[0]
    assert kept.text == expected + stop


def test_abort_and_invalid_requests(model, tokenizer):
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=64, block_size=4))
    for i, p in enumerate(prompts(4, seed=6)):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.kv.usage > 0
    out = engine.abort_request("r1")
    assert out.finished and out.finish_reason == "abort"
    for i in (0, 2, 3):
        engine.abort_request(f"r{i}")
    assert engine.kv.usage == 0.0 and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("long", list(range(10, 80)), SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("long2", [5] * 40, SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request("bad", [5, 10**9], SamplingParams())
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sliding_windows_under_the_paged_cache_match_transformers(tmp_path, family):

    path = write_hf_checkpoint(tmp_path, family=family, **FAMILIES[family])
    ours, ref = GemmaForCausalLM.from_pretrained(path), load_hf(path, family=family)
    engine = LLMEngine(ours, None, EngineConfig(block_size=2, max_num_batched_tokens=7, max_num_seqs=3, kv_cache_memory="1MiB"))
    reqs = [(p, SamplingParams(max_tokens=14, **GREEDY)) for p in ([5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], list(range(30, 47)))]
    outs = run(engine, reqs, invariants)
    for (p, _), out in zip(reqs, outs):
        expected = ref.generate(torch.tensor([p]), max_new_tokens=14, min_new_tokens=14, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
        assert out.token_ids == expected[0, len(p):].tolist()
    # sliding groups held at most their window's blocks
    assert engine.kv.usage == 0.0


def test_async_streaming_equals_non_streaming_and_abort_frees(model, tokenizer):
    prompt_list = prompts(6, seed=8)

    async def main():
        engine = AsyncLLMEngine(LLMEngine(model, tokenizer, EngineConfig(block_size=4)))

        async def collect(i, p):
            tokens, texts, last = [], [], None
            async for out in engine.generate(p, SamplingParams(max_tokens=10, **GREEDY), f"s{i}"):
                tokens += out.outputs[0].new_token_ids
                texts.append(out.outputs[0].new_text)
                last = out
            return tokens, "".join(texts), last

        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompt_list)))

        async def leave_early():
            async for out in engine.generate(prompt_list[0], SamplingParams(max_tokens=50, **GREEDY), "early"):
                if len(out.outputs[0].token_ids) >= 2:
                    break

        await leave_early()
        # a plain `break` leaves the generator to asyncio's finalizer hook, which closes it (and aborts) shortly
        await until(lambda: not engine.engine.has_unfinished_requests(), what="the request left early to be aborted")
        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in engine.generate([10] * 10000, SamplingParams(), "too-long"):
                pass
        usage = engine.engine.kv.usage
        await engine.shutdown()
        return results, usage

    results, usage = asyncio.run(main())
    for p, (tokens, text, last) in zip(prompt_list, results):
        assert tokens == last.token_ids == one_at_a_time(model, p, 10)
        assert text == last.text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert last.finished and last.metrics.first_token_time is not None
    assert usage == 0.0


def test_a_slow_consumer_gets_one_output_for_the_steps_it_missed(model, tokenizer):
    prompt = prompts(1, seed=9)[0]

    async def main(fail_at: int | None):
        llm = LLMEngine(model, tokenizer, EngineConfig(block_size=4))
        step, calls = llm.step, []
        first_read = threading.Event()  # step 2 waits for it: the first output carries step 1's token alone

        def counted_step():
            calls.append(1)
            if len(calls) == 2 and not first_read.wait(10):
                raise TimeoutError("the consumer never read its first output")
            if len(calls) == fail_at:
                raise RuntimeError("boom")
            return step()

        llm.step = counted_step
        engine = AsyncLLMEngine(llm)
        ended = stream_ended(engine, "slow")
        outs, error = [], None
        try:
            async for out in engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY), "slow"):
                outs.append(out)
                if len(outs) == 1:  # fall behind: read on only once the engine has made its last step for us
                    first_read.set()
                    await until(ended.is_set, what="the engine to end the request")
        except EngineStepError as exc:
            error = exc
        await engine.shutdown()
        return outs, error

    outs, error = asyncio.run(main(None))
    expected = one_at_a_time(model, prompt, 8)
    assert error is None and [len(o.outputs[0].new_token_ids) for o in outs] == [1, 7] and outs[-1].finished
    assert outs[0].outputs[0].new_token_ids + outs[1].outputs[0].new_token_ids == outs[1].token_ids == expected
    assert outs[0].outputs[0].new_text + outs[1].outputs[0].new_text == outs[1].text
    # a step fails while the consumer lags: it gets the tokens made before the failure, then the error
    outs, error = asyncio.run(main(4))
    assert [len(o.outputs[0].new_token_ids) for o in outs] == [1, 2] and outs[-1].token_ids == expected[:3]
    assert isinstance(error, EngineStepError) and "boom" in str(error)


def test_async_engine_loads_and_steps_on_one_pytorch_thread(model, tokenizer):
    """A second thread running kernels makes a second OpenMP team and slows every step (gemma.torch_thread):
    the engine is built, and every step runs, on the one PyTorch thread, never on the event loop's."""
    threads = {}

    def factory() -> LLMEngine:
        threads["load"] = threading.get_ident()
        engine = LLMEngine(model, tokenizer, EngineConfig(block_size=4))
        step = engine.step

        def recorded_step():
            threads.setdefault("steps", set()).add(threading.get_ident())
            return step()

        engine.step = recorded_step
        return engine

    async def main():
        engine = AsyncLLMEngine.from_engine_factory(factory)
        async for _ in engine.generate(prompts(1, seed=3)[0], SamplingParams(max_tokens=4, **GREEDY), "t"):
            pass
        await engine.shutdown()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert threads["steps"] == {threads["load"]}
    assert threads["load"] != loop_thread
    assert torch_thread.call(torch_thread.on_thread) and not torch_thread.on_thread()


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_padded_decode_steps_of_the_cuda_graph_path_equal_eager_steps(tmp_path, family, monkeypatch):
    """The decode step a CUDA graph records (gemma.engine.cuda_graphs: batch padded to a bucket, keys over a fixed
    width with slots and masks made from block tables) gives the eager engine's tokens and logprobs: run here
    without recording, with small width buckets so that steps cross several of them and Gemma 2/3's sliding
    windows fall inside a width."""

    from gemma.engine import cuda_graphs

    assert cuda_graphs.batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert cuda_graphs.width_buckets(1000, 16) == [256, 512, 1008]
    monkeypatch.setattr(cuda_graphs, "MIN_WIDTH", 4)
    extra = FAMILIES.get(family, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    model = GemmaForCausalLM.from_pretrained(write_hf_checkpoint(tmp_path, family=family, **extra))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [(list(range(10 + i, 10 + i + n)), params) for i, n in enumerate((2, 5, 9, 14, 30))]

    def engine_run(graphs: bool) -> tuple[list, LLMEngine]:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=3, block_size=4, max_model_len=80,
                                                     max_num_batched_tokens=16, kv_cache_memory="2MiB"))
        if graphs:
            engine.runner.use_graphs(3, engine.max_model_len, record=False)
        return run(engine, reqs, invariants), engine

    eager, _ = engine_run(False)
    padded, engine = engine_run(True)
    used = set(engine.runner.graphs.graphs)
    assert {b for b, _ in used} == {1, 2, 3} and len({w for _, w in used}) >= 3, used
    for a, b in zip(eager, padded):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)
    assert engine.kv.usage == 0.0


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_prefill_chunks_attending_as_one_padded_sub_batch_equal_one_by_one(tmp_path, family):
    """How a GPU runs a step's prefills (`group_prefills`: chunks of different lengths padded to the longest, the
    padding dropped) gives the tokens and logprobs of each chunk attending alone (the CPU's way)."""
    from types import SimpleNamespace

    from gemma.engine.model_runner import group_chunks

    extra = FAMILIES.get(family, dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    model = GemmaForCausalLM.from_pretrained(write_hf_checkpoint(tmp_path, family=family, **extra))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    reqs = [(list(range(10 + i, 10 + i + n)), params) for i, n in enumerate((3, 5, 6, 9, 14, 30, 31))]
    padded_steps = []

    def engine_run(grouped: bool) -> list:
        engine = LLMEngine(model, None, EngineConfig(max_num_seqs=8, block_size=4, max_model_len=80,
                                                     max_num_batched_tokens=48, kv_cache_memory="2MiB"))
        engine.runner.group_prefills = grouped
        describe = engine.runner._describe

        def spy(batch, kv, step):
            describe(batch, kv, step)
            padded_steps.extend(sb for sb in step.subbatches if sb.q_real is not None)

        engine.runner._describe = spy
        return run(engine, reqs, invariants)

    alone = engine_run(False)
    assert not padded_steps
    grouped = engine_run(True)
    assert padded_steps  # some chunks of different lengths did attend together
    for a, b in zip(alone, grouped):
        assert b.token_ids == a.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x)

    def batch(*sizes):  # (new tokens, computed before)
        return SimpleNamespace(num_new=[q for q, _ in sizes],
                               seqs=[SimpleNamespace(num_computed_tokens=c) for _, c in sizes])

    assert group_chunks(batch((128, 0), (128, 0), (128, 0)), [0, 1, 2]) == [[0, 1, 2]]
    # a short chunk does not pad up to a long one; the longest goes first
    assert group_chunks(batch((16, 0), (512, 0), (500, 0)), [0, 1, 2]) == [[1, 2], [0]]
    assert group_chunks(batch((64, 0), (64, 960)), [0, 1]) == [[1], [0]]  # keys count too
    assert group_chunks(batch((1024, 4000), (1024, 4000)), [0, 1]) == [[0], [1]]  # over max_elements


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_steps_equal_eager_steps_on_cuda(model):
    """On a GPU the engine records its decode steps as CUDA graphs at start-up and replays them: the same greedy
    tokens as `enforce_eager=True`, over batches that change size as requests finish."""
    gpu = copy.deepcopy(model).to("cuda")
    reqs = [(p, SamplingParams(max_tokens=4 + 3 * i, **GREEDY)) for i, p in enumerate(prompts(10, seed=5))]

    def engine_run(eager: bool) -> tuple[list, LLMEngine]:
        engine = LLMEngine(gpu, None, EngineConfig(max_num_seqs=6, max_model_len=300, enforce_eager=eager))
        return run(engine, reqs, invariants), engine

    eager, engine = engine_run(True)
    assert engine.runner.graphs is None
    replayed, engine = engine_run(False)
    # recorded at start-up: batch sizes 1, 2, 4, 6 times key widths 256, 304
    assert engine.runner.graphs is not None and len(engine.runner.graphs.graphs) == 4 * 2
    assert [o.token_ids for o in replayed] == [o.token_ids for o in eager]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_prefills_on_cuda_equal_one_at_a_time(model):
    """On a GPU a step's prefill chunks attend as one padded sub-batch, through SDPA's memory-efficient kernel with
    the kv heads expanded: the same greedy tokens as `generate` one prompt at a time on the same GPU."""
    gpu = copy.deepcopy(model).to("cuda")
    reqs = [(p, SamplingParams(max_tokens=8, **GREEDY)) for p in prompts(12, seed=7)]
    engine = LLMEngine(gpu, None, EngineConfig(max_num_seqs=12, max_model_len=300, max_num_batched_tokens=128))
    assert engine.runner.group_prefills
    for (p, _), out in zip(reqs, run(engine, reqs, invariants)):
        assert out.token_ids == one_at_a_time(gpu, p, 8)
