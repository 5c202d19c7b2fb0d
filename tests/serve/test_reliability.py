"""Reliability of the whole Serve application over real HTTP on the session's Ray cluster: a schemathesis fuzz of
every operation of the app's own OpenAPI schema, a corpus of hostile inputs, a mixed soak, and chaos (a model
replica, a TP worker, the tokenizer replica and the classifier replica killed under load).

The app is serve_config.yaml with a tiny model (TP=2, so a replica has a TP worker to kill) and the classifier.
Figures are printed (`pytest -s` shows them); docs/reliability.md records a run. The fast tier (`make test`) runs a
small fuzz and the corpus; the full-size fuzz, the soak, chaos and drain are marked slow (`make test-all`). Longer
runs, by hand: `FUZZ_EXAMPLES=500 SOAK_SECONDS=600 pytest -s tests/serve/test_reliability.py`.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

import httpx
import pytest
from tests.helpers.loadgen import KINDS, Load, send, tally
from tests.helpers.serve_utils import app_config, deploy, running_replicas
from tests.helpers.waiting import wait_for

pytest.importorskip("ray")

APP = "rel"
MAX_TOKENS = 16  # the app's limits.max_tokens: fuzzed generations stay short
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))  # per operation and mode (positive, negative)
SMALL_FUZZ_EXAMPLES = 8  # the fast tier's fuzz: every operation still gets positive and negative cases
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "36"))
SOAK_ROUNDS = 3


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_lm_dir, tiny_classifier_dir):
    args = {"model": str(tiny_lm_dir), "served_model_name": "tiny", "dtype": "float32", "tp_size": 2,
            "kv_cache_memory": "16MiB", "max_model_len": 256, "classifier_model": str(tiny_classifier_dir),
            "served_classifier_name": "sentiment", "limits": {"max_tokens": MAX_TOKENS, "request_timeout_s": 60}}
    deploy(app_config(APP, "/", args, {"model": {"num_replicas": 1}, "tokenizer": {"num_replicas": 1},
                                       "ingress": {"num_replicas": 1}}))
    return ray_cluster.http_url


def model_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("model", app_name=APP).stats.remote().result()


def healthy(url: str) -> bool:
    """/health answers 200 and a completion, a chat and a classification each succeed."""
    with httpx.Client(base_url=url, timeout=60) as client:
        if client.get("/health").status_code != 200:
            return False
        return all(send(client, k, classifier="sentiment", max_tokens=4).result == "ok"
                   for k in ("completion", "chat_stream", "classify"))


# ---- fuzz ----

@pytest.mark.parametrize("examples", [
    pytest.param(SMALL_FUZZ_EXAMPLES, id="small"), pytest.param(FUZZ_EXAMPLES, id="full", marks=pytest.mark.slow),
])
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_fuzz_every_operation_of_the_openapi_schema_gets_no_5xx(url, mode, examples):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    table: dict[str, Counter] = {}
    session = __import__("requests").Session()
    for result in schema.get_all_operations():
        op = result.ok()
        codes: Counter = Counter()
        table[op.label] = codes

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        def fuzz(case) -> None:
            r = case.call(base_url=url, session=session, timeout=60)
            codes[r.status_code] += 1
            assert r.status_code < 500, f"{op.label} -> {r.status_code}: {r.text[:300]}\nbody: {case.body!r}"[:2000]

        if mode == "negative" and not (op.body or op.query or op.path_parameters or op.headers):
            continue  # nothing in a GET without parameters can be made invalid
        fuzz()
    print(f"\nfuzz ({mode}, up to {FUZZ_EXAMPLES} cases per operation):")
    for label, codes in table.items():
        print(f"  {label:28s} {sum(codes.values()):4d} cases  {dict(sorted(codes.items()))}")
    assert sum(sum(c.values()) for c in table.values()) > 0
    assert healthy(url)


# ---- bad input corpus ----

def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


CORPUS = {
    "invalid UTF-8": ("/v1/completions", b'{"model": "tiny", "prompt": "caf\xc3\x28 \xff\xfe"}'),
    "invalid UTF-8 in chat": ("/v1/chat/completions",
                              b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    "escaped lone surrogate": ("/v1/completions", b'{"model": "tiny", "prompt": "a \\ud800 b"}'),
    "model as a file path": ("/v1/completions", b'{"model": "/etc/passwd", "prompt": "x"}'),
    "classifier as a file path": ("/v1/classify", b'{"model": "../../tiny", "input": "x"}'),
    "huge max_tokens": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 400 + b"}"),
    "huge n": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 100000000000000000000}'),
    "huge seed": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "seed": 1' + b"0" * 40 + b"}"),
    "huge float": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_k": 1e308}'),
    "huge logprobs": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "logprobs": 1e300}'),
    "overflowing float": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "top_p": 1e400}'),
    "NaN": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}'),
    "Infinity": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "presence_penalty": -Infinity}'),
    "NaN logit_bias": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "logit_bias": {"5": NaN}}'),
    "deeply nested JSON": ("/v1/completions", _nested(100_000)),
    "nested arrays as prompt": ("/v1/completions", _nested(50)),
    "10 MB body": ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"a" * 10_000_000 + b'"}'),
    "empty prompt": ("/v1/completions", b'{"model": "tiny", "prompt": ""}'),
    "whitespace prompt": ("/v1/completions", b'{"model": "tiny", "prompt": " \\n\\t  "}'),
    "empty prompt in a list": ("/v1/completions", b'{"model": "tiny", "prompt": ["hello", ""]}'),
    "empty token list": ("/v1/completions", b'{"model": "tiny", "prompt": []}'),
    "empty messages": ("/v1/chat/completions", b'{"model": "tiny", "messages": []}'),
    "unknown role": ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}'),
    "message without content": ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user"}]}'),
    "token id out of range": ("/v1/completions", b'{"model": "tiny", "prompt": [1000000000]}'),
    "negative token id": ("/v1/completions", b'{"model": "tiny", "prompt": [-1]}'),
    "token id beyond int64": ("/v1/completions", b'{"model": "tiny", "prompt": [1' + b"0" * 30 + b"]}"),
    "detokenize out of range": ("/v1/detokenize", b'{"model": "tiny", "tokens": [1000000000]}'),
    "detokenize negative": ("/v1/detokenize", b'{"model": "tiny", "tokens": [-5]}'),
    "classify empty input": ("/v1/classify", b'{"model": "sentiment", "input": ""}'),
    "classify whitespace input": ("/v1/classify", b'{"model": "sentiment", "input": ["   "]}'),
    "classify token out of range": ("/v1/classify", b'{"model": "sentiment", "input": [[1000000000]]}'),
    "stop token out of range": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop_token_ids": [99999999]}'),
    "a JSON array body": ("/v1/completions", b'[1, 2, 3]'),
    "a JSON string body": ("/v1/completions", b'"prompt"'),
    "null body": ("/v1/completions", b"null"),
    "empty body": ("/v1/completions", b""),
    "truncated JSON": ("/v1/completions", b'{"model": "tiny", "prompt": "x'),
    "duplicate keys, last wins invalid": ("/v1/completions", b'{"model": "tiny", "prompt": "x", "n": 1, "n": -3}'),
    "tokenize 10 MB": ("/v1/tokenize", b'{"model": "tiny", "prompt": "' + b"b" * 10_000_000 + b'"}'),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_input_corpus_gets_4xx_with_an_error_body(url, name):
    path, raw = CORPUS[name]
    r = httpx.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    error = r.json()["error"]
    assert error["message"] and error["code"] == r.status_code, error


def test_server_is_healthy_after_the_corpus(url):
    assert healthy(url)
    wait_for(lambda: model_stats()["kv_blocks_used"] == 0, 30, "no KV blocks in use")


# ---- soak ----

@pytest.mark.slow
def test_soak_mixed_load_completes_or_fails_clearly_and_returns_every_block(url):
    """SOAK_ROUNDS rounds of mixed load; after each, the engine is idle with no KV block in use; the model
    replica's memory does not grow from round to round."""
    rounds, rss = [], []
    for i in range(SOAK_ROUNDS):
        load = Load(url, workers=6, classifier="sentiment", max_tokens=MAX_TOKENS, timeout_s=60, seed=i)
        time.sleep(SOAK_SECONDS / SOAK_ROUNDS)
        outcomes = load.stop()
        wait_for(lambda: (st := model_stats())["kv_blocks_used"] == 0 and st["num_requests_running"] == 0
                 and st["num_requests_waiting"] == 0, 30, "the engine to be idle with no KV block in use")
        rounds.append(outcomes)
        rss.append(model_stats()["rss_bytes"])
    every = [o for r in rounds for o in r]
    by_kind = {k: tally([o for o in every if o.kind == k]) for k in KINDS}
    print(f"\nsoak: {SOAK_ROUNDS} rounds of {SOAK_SECONDS / SOAK_ROUNDS:.0f} s, 6 clients: {len(every)} requests, "
          f"{dict(tally(every))}")
    for kind, counts in by_kind.items():
        print(f"  {kind:18s} {dict(counts)}")
    print(f"  model replica RSS after each round (MB): {[round(b / 1e6) for b in rss]}")
    results = tally(every)
    assert results["hung"] == 0 and results["unclear"] == 0, [o for o in every if o.result in ("hung", "unclear")][:3]
    assert results["error"] == 0, [o for o in every if o.result == "error"][:3]  # nothing here is invalid
    assert all(by_kind[k]["ok" if k != "abort_stream" else "aborted"] > 0 for k in KINDS)
    # the first round warms allocator pools and caches; later rounds must not add to them
    assert rss[-1] <= rss[1] * 1.05 + 16e6, rss


# ---- chaos ----

def _replica_actors(deployment: str) -> list[dict]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def _tp_workers() -> list[dict]:
    import ray

    from deployments.tp_workers import WORKER_PREFIX

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(WORKER_PREFIX)]


TARGETS = {  # what is killed: (how to list its actors, the deployment that must be running again, request kinds)
    "model replica": (lambda: _replica_actors("model"), "model", ("completion", "completion_stream", "chat")),
    "TP worker": (_tp_workers, "model", ("completion", "completion_stream", "chat_stream")),
    "tokenizer replica": (lambda: _replica_actors("tokenizer"), "tokenizer", ("completion", "chat", "chat_stream")),
    "classifier replica": (lambda: _replica_actors("classifier"), "classifier", ("classify",)),
}


@pytest.mark.slow
@pytest.mark.parametrize("target", list(TARGETS))
def test_chaos_kill_under_load_recovers_and_nothing_hangs(url, target):
    import ray

    actors, deployment, kinds = TARGETS[target]
    wait_for(lambda: healthy(url), 120, "a healthy app before the kill")
    before = actors()
    assert len(before) == 1, before
    load = Load(url, workers=4, kinds=kinds, classifier="sentiment", max_tokens=MAX_TOKENS, timeout_s=60,
                seed=list(TARGETS).index(target))
    wait_for(lambda: tally(load.snapshot())["ok"] >= load.workers, 60, "the load to be served before the kill")
    victim = before[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    ok_before = tally(load.snapshot())["ok"]

    def recovered() -> bool:
        now = [a for a in actors() if a["name"] != victim["name"]]
        return len(now) == 1 and running_replicas(APP, deployment) == 1 and healthy(url)

    wait_for(recovered, 180, f"Serve to replace the killed {target}", interval_s=0.5)
    recovery_s = time.monotonic() - killed_at
    ok_at_recovery = tally(load.snapshot())["ok"]
    wait_for(lambda: tally(load.snapshot())["ok"] > ok_at_recovery, 60, "a request served after the recovery")
    outcomes = load.stop()
    results = tally(outcomes)
    failures = Counter((o.status, o.message[:80]) for o in outcomes if o.result != "ok")
    print(f"\nchaos, {target} killed under load (4 clients, {'/'.join(kinds)}): recovered in {recovery_s:.1f} s; "
          f"{dict(results)}; ok after the kill {results['ok'] - ok_before}; failures: {dict(failures)}")
    assert results["hung"] == 0
    assert results["ok"] - ok_before > 0  # served again after the kill
    assert healthy(url)


# ---- graceful drain ----

DRAIN_TOKENS = 1600  # long enough to outlast a redeploy (new replicas start their engine processes first)


def _streams(url: str, n: int, started: list, results: list) -> list:
    """`n` long greedy streams in threads; each appends (finish time, text events, finish reason, usage, error)."""
    import threading

    def one(i: int) -> None:
        body = {"model": "tiny", "prompt": f"stream {i} of the drain test", "max_tokens": DRAIN_TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        events, reason, usage, error = 0, None, None, None
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]["message"]
                        continue
                    if event["choices"]:
                        if events == 0:
                            started.append(time.monotonic())
                        events += 1
                        reason = event["choices"][0]["finish_reason"] or reason
                    usage = event.get("usage") or usage
        except httpx.HTTPError as exc:
            error = repr(exc)
        results.append((time.monotonic(), events, reason, usage, error))

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.slow
@pytest.mark.parametrize("change", ["redeploy", "downscale"])
def test_redeploy_and_downscale_drain_open_streams_to_completion(ray_cluster, tiny_lm_dir, change):
    """Open streams outlive a `serve deploy` of a new config (new engine and limits: every model and ingress
    replica replaced) or a downscale of the model from 2 replicas to 1: each ends with all its tokens."""
    import threading

    from ray import serve

    args = {"model": str(tiny_lm_dir), "served_model_name": "tiny", "dtype": "float32", "kv_cache_memory": "16MiB",
            "max_model_len": DRAIN_TOKENS + 64, "max_num_seqs": 8}
    replicas = 2 if change == "downscale" else 1
    old = app_config(APP, "/", args, {"model": {"num_replicas": replicas}, "ingress": {"num_replicas": 1}})
    deploy(old)
    if change == "redeploy":
        new = app_config(APP, "/", {**args, "max_num_seqs": 9, "limits": {"max_n": 8}},
                         {"model": {"num_replicas": 1}, "ingress": {"num_replicas": 1}})
    else:
        new = app_config(APP, "/", args, {"model": {"num_replicas": 1}, "ingress": {"num_replicas": 1}})
    old_replicas = {a["name"] for a in _replica_actors("model") + _replica_actors("ingress")}
    url = ray_cluster.http_url
    started, results = [], []
    n = 2 * replicas + 2
    threads = _streams(url, n, started, results)
    wait_for(lambda: len(started) == n, 60, "every stream's first tokens")
    changed_at = time.monotonic()
    deployer = threading.Thread(target=deploy, args=(new,), kwargs={"timeout_s": 300}, daemon=True)
    deployer.start()
    gone_at: dict[str, float] = {}
    draining: list[float] = []  # times a replica was STOPPING while every stream was still open

    def old_gone() -> bool:
        states = serve.status().applications[APP].deployments  # empty while a redeploy builds the new app
        if len(results) < n and any(states[d].replica_states.get("STOPPING", 0) for d in states):
            draining.append(time.monotonic())
        alive = {a["name"] for a in _replica_actors("model") + _replica_actors("ingress")}
        for name in old_replicas - alive - set(gone_at):
            gone_at[name] = time.monotonic()
        # a redeploy replaces every old replica; a downscale stops one of the two model replicas
        left = len(old_replicas & alive) if change == "redeploy" else len(old_replicas & alive) - 2
        return len(results) == n and left == 0

    wait_for(old_gone, 300, "the streams to end and the old replicas to stop", interval_s=0.1)
    deployer.join(timeout=300)
    for t in threads:
        t.join(timeout=10)
    last_end = max(r[0] for r in results)
    print(f"\ndrain ({change}): {n} streams of {DRAIN_TOKENS} tokens open at the change; they ended "
          f"{min(r[0] for r in results) - changed_at:.1f}-{last_end - changed_at:.1f} s after it; replicas stopped "
          f"{sorted(round(t - changed_at, 1) for t in gone_at.values())} s after it; replicas seen draining "
          f"{draining[0] - changed_at:.1f}-{draining[-1] - changed_at:.1f} s after it" if draining else "")
    for end, events, reason, usage, error in results:
        assert error is None, error
        assert reason == "length" and usage["completion_tokens"] == DRAIN_TOKENS, (reason, usage)
        assert end > changed_at
    assert draining, "no replica was draining while the streams were open: the test proved nothing"
    if change == "redeploy":
        assert set(gone_at) == old_replicas  # every old model and ingress replica was replaced
    else:
        assert len(gone_at) == 1
    # the stopping replicas waited for their streams (a cut stream fails above) and then went
    assert all(t >= min(r[0] for r in results) - 0.5 for t in gone_at.values())
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                      timeout=60).status_code == 200
