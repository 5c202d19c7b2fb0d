"""Metrics without Ray: what the model deployment records from the real engine (a tiny random Gemma), through a
recording factory; and that the metric definitions are valid Prometheus names that work outside a replica.
The export through Ray is tests/test_serve_metrics.py."""

from __future__ import annotations

import asyncio
import logging
import re
import warnings

import pytest
from tests.helpers.fakes import MetricsRecorder, tiny_engine
from tests.helpers.waiting import stream_ended, until

from deployments import metrics as metrics_module
from deployments.metrics import DEFINITIONS, PREFIX, Metrics
from deployments.model import ModelDeployment
from gemma.sampling import SamplingParams

pytestmark = pytest.mark.anyio
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture
async def deployment(lm):
    recorder = MetricsRecorder()
    model = ModelDeployment(engine=tiny_engine(*lm), metrics=Metrics("tiny", recorder), stats_interval_s=0.01)
    model.recorder = recorder
    yield model
    model.shutdown()
    await model.engine.shutdown()


async def run(model: ModelDeployment, prompt: list[int], params: SamplingParams, rid: str) -> list:
    return [out async for out in model.generate(prompt, params, rid)]


async def test_tokens_latencies_and_outcomes_match_what_the_engine_produced(deployment):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    params = [SamplingParams(max_tokens=k, n=n, **GREEDY) for k, n in ((6, 1), (9, 1), (5, 2))]
    runs = await asyncio.gather(*(run(deployment, p, sp, f"r{i}") for i, (p, sp) in enumerate(zip(prompts, params))))
    r = deployment.recorder
    finals = [outs[-1] for outs in runs]
    generated = sum(len(o.token_ids) for f in finals for o in f.outputs)
    assert generated == 6 + 9 + 2 * 5
    assert r.total("generation_tokens", model_name="tiny") == generated
    assert r.total("prompt_tokens") == sum(map(len, prompts))
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert len(r.values(name)) == 3, name
    # one inter-token interval per step after the first (n=2 sample in the same step), also where the stream
    # coalesced steps into one output
    assert len(r.values("inter_token_latency_seconds")) == 5 + 8 + 4
    assert all(v >= 0 for v in r.values("inter_token_latency_seconds"))
    ttft, e2e = sorted(r.values("time_to_first_token_seconds")), sorted(r.values("e2e_request_latency_seconds"))
    assert all(0 <= a <= b for a, b in zip(ttft, e2e))
    assert r.values("request_success", finished_reason="length") == [1.0] * 4  # per completion, as vLLM counts
    assert not r.values("request_success", finished_reason="abort")
    assert r.kinds["time_to_first_token_seconds"] == "histogram" and r.kinds["generation_tokens"] == "counter"


async def test_a_consumer_that_falls_behind_still_gets_one_interval_per_step(deployment):
    ended = stream_ended(deployment.engine, "slow")

    async def slow(prompt: list[int]) -> list:
        outs = []
        async for out in deployment.generate(prompt, SamplingParams(max_tokens=7, **GREEDY), "slow"):
            outs.append(out)
            if len(outs) == 1:  # read on only once the engine has made every step: the stream coalesces them
                await until(ended.is_set, what="the engine to finish the request")
        return outs

    outs = await slow([5, 6, 7])
    r = deployment.recorder
    assert len(outs) < 7 and outs[-1].finished  # it did fall behind
    itl = r.values("inter_token_latency_seconds")
    assert len(itl) == 6 and len(r.values("time_to_first_token_seconds")) == 1 and all(v >= 0 for v in itl)
    m = outs[-1].metrics  # the intervals, each a mean over the steps an output carried, add up to the whole
    assert sum(itl) == pytest.approx(m.last_token_time - m.first_token_time)
    assert r.total("generation_tokens") == 7


async def test_a_caller_that_leaves_counts_as_abort_once(deployment):
    stream = deployment.generate([1, 2, 3], SamplingParams(max_tokens=50, n=2, **GREEDY), "leaver")
    await stream.__anext__()
    await stream.aclose()
    r = deployment.recorder
    assert r.values("request_success", finished_reason="abort") == [1.0, 1.0]
    assert not deployment.engine.engine.has_unfinished_requests()

    # aborted from outside while a caller reads: the engine's final output says "abort", counted once
    async def read():
        return await run(deployment, [4, 5], SamplingParams(max_tokens=50, **GREEDY), "aborted")

    task = asyncio.create_task(read())
    await until(lambda: deployment.engine.engine.has_unfinished_requests())
    await deployment.abort("aborted")
    outs = await task
    assert outs[-1].finish_reason == "abort"
    assert len(r.values("request_success", finished_reason="abort")) == 3
    assert not r.values("request_success", finished_reason="length")


async def test_invalid_requests_record_nothing(deployment):
    with pytest.raises(ValueError):
        await run(deployment, [10**6], SamplingParams(max_tokens=2), "bad")
    assert not [n for n, _, _ in deployment.recorder.records if n not in DEFINITIONS or DEFINITIONS[n][0] != "gauge"]


async def test_engine_state_is_published_while_busy_and_back_to_zero_when_idle(deployment):
    r = deployment.recorder
    await deployment.check_health()  # the first call starts the publishing task
    await until(lambda: r.last("num_requests_running") == 0 and r.last("kv_cache_usage_perc") == 0.0)
    prompt = list(range(20, 36))  # four full KV blocks of 4: cached for the next request with this prefix
    task = asyncio.create_task(run(deployment, prompt, SamplingParams(max_tokens=80, **GREEDY), "long"))
    await until(lambda: r.last("num_requests_running") == 1 and r.last("kv_cache_usage_perc") > 0)
    await task
    await until(lambda: r.last("num_requests_running") == 0 and r.last("kv_cache_usage_perc") == 0.0)
    assert r.last("num_requests_waiting") == 0
    await run(deployment, prompt + [40], SamplingParams(max_tokens=2, **GREEDY), "again")
    await until(lambda: r.total("prefix_cache_hits") >= 16)
    kv = deployment.engine.engine.kv
    assert r.total("prefix_cache_queries") == kv.prefix_queries and r.total("prefix_cache_hits") == kv.prefix_hits
    deployment.shutdown()
    await until(deployment._stats_task.done)
    assert deployment._stats_task.cancelled()


async def test_no_publishing_task_where_metrics_go_nowhere(lm, monkeypatch):
    monkeypatch.setattr(metrics_module, "_ray_running", lambda: False)  # as without Ray (another test may start it)
    model = ModelDeployment(engine=tiny_engine(*lm), served_model_name="tiny")
    assert not model.metrics.live  # the plain class records into Ray's metrics, which go nowhere here
    await run(model, [1, 2, 3], SamplingParams(max_tokens=3, **GREEDY), "plain")
    await model.check_health()
    assert model._stats_task is None
    await model.engine.shutdown()


def test_metric_names_are_valid_and_work_outside_a_replica():
    valid = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")  # Prometheus' names, without the ':' Ray deprecates
    for name, (kind, _, keys, buckets) in DEFINITIONS.items():
        assert valid.fullmatch(PREFIX + name) and kind in ("counter", "gauge", "histogram")
        assert (kind == "histogram") == (buckets is not None) and (buckets or []) == sorted(buckets or [])
        assert not name.endswith("_total")  # Ray's export adds it to counters
    metrics = Metrics("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray warns about invalid or ':' names
        for name, (kind, _, keys, _) in DEFINITIONS.items():
            tags = {k: "x" for k in keys}
            {"counter": metrics.inc, "gauge": metrics.set, "histogram": metrics.observe}[kind](name, 1.0, **tags)


def test_a_metric_that_cannot_be_created_is_dropped(caplog):
    def broken(*_):
        raise RuntimeError("no metrics here")

    metrics = Metrics("tiny", broken)
    with caplog.at_level(logging.ERROR, logger="deployments.metrics"):
        for _ in range(3):
            metrics.inc("prompt_tokens", 5)
    assert sum("gemma_prompt_tokens" in r.getMessage() for r in caplog.records) == 1
