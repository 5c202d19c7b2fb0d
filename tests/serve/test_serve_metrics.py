"""Metrics, API keys and limits through Serve on the session's Ray cluster: after a few requests, every node's
Prometheus endpoint (Ray's metrics export) has our metrics with the counts the requests produced, next to Ray
Serve's own. The app is serve_config.yaml with a tiny model, its key in the replicas' environment."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import httpx
import pytest
from tests.helpers.serve_utils import app_config, deploy
from tests.helpers.waiting import wait_for

pytest.importorskip("ray")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

APP = "metrics"
KEY = "sk-serve-test-41d2"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARGS = {"served_model_name": "tiny", "dtype": "float32", "kv_cache_memory": "16MiB", "max_model_len": 256,
        "limits": {"max_request_bytes": 4096, "max_n": 2}}
GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = list(range(100, 140))  # 40 token ids, two full KV blocks: the 2nd and 3rd request hit the prefix cache


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_lm_dir):
    app = app_config(APP, "/", {**ARGS, "model": str(tiny_lm_dir)})
    app["runtime_env"] = {"env_vars": {"GEMMA_API_KEYS": KEY}}  # read by the ingress replica
    deploy(app)
    return ray_cluster.http_url


def scrape() -> list:
    """Every sample of every alive node's metrics-export endpoint (each node's agent serves its own processes)."""
    import ray

    samples = []
    for node in ray.nodes():
        if node["Alive"]:
            address = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            text = urllib.request.urlopen(address, timeout=10).read().decode()
            samples += [s for family in prometheus_parser.text_string_to_metric_families(text) for s in family.samples]
    return samples


def total(samples: list, name: str, **labels: str) -> float:
    """The sum over processes (and label values not given) of one metric of our app."""
    want = {"application": APP, **labels}
    return sum(s.value for s in samples if s.name == name and want.items() <= s.labels.items())


def test_our_metrics_and_serves_are_exported_with_the_counts_of_the_requests(url):
    usages = []
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        for k in (5, 6, 7):
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": k,
                                                     **GREEDY})
            assert r.status_code == 200, r.text
            usages.append(r.json()["usage"])
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
                "stream_options": {"include_usage": True}, **GREEDY}
        events = [e for e in client.post("/v1/chat/completions", json=body).text.split("\n\n") if e]
        usages.append(json.loads(events[-2].removeprefix("data: "))["usage"])
        assert events[-1] == "data: [DONE]"
        errors = {
            "validation": client.post("/v1/completions", json={"prompt": "x", "temperature": -1}).status_code,
            "not_found": client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"}).status_code,
            "too_large": client.post("/v1/completions", json={"prompt": "x" * 5000}).status_code,
            "authentication": client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code,
        }
    assert errors == {"validation": 400, "not_found": 404, "too_large": 413, "authentication": 401}
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 5 + 6 + 7 + 4

    prompt_tokens = sum(u["prompt_tokens"] for u in usages)

    def exported():
        # each process exports on its own schedule, and the engine's state is published every second: wait for
        # the last value of each source (requests' counters, engine state, ingress errors, Serve's proxy)
        samples = scrape()
        done = (total(samples, "ray_gemma_generation_tokens_total") == generated
                and total(samples, "ray_gemma_time_to_first_token_seconds_count") == 4
                and total(samples, "ray_gemma_e2e_request_latency_seconds_count") == 4
                and total(samples, "ray_gemma_prefix_cache_queries_total") == prompt_tokens
                and total(samples, "ray_gemma_num_requests_running") == 0
                and total(samples, "ray_gemma_request_errors_total") == 4
                and total(samples, "ray_serve_num_http_requests_total") >= 8)
        return samples if done else None

    samples = wait_for(exported, 90, "the metrics to be exported", interval_s=2)
    ours = [s for s in samples if s.name.startswith("ray_gemma_") and s.labels.get("application") == APP]
    assert {s.labels["model_name"] for s in ours} == {"tiny"}
    assert total(samples, "ray_gemma_prompt_tokens_total", model_name="tiny") == prompt_tokens
    assert total(samples, "ray_gemma_request_success_total", finished_reason="length") == 4
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(samples, f"ray_gemma_{name}_count") == 4, name
        assert total(samples, f"ray_gemma_{name}_bucket", le="+Inf") == 4, name
    # one interval per token after each request's first (n=1, one token per step)
    assert total(samples, "ray_gemma_inter_token_latency_seconds_count") == generated - 4
    assert 0 < total(samples, "ray_gemma_time_to_first_token_seconds_sum")
    for kind in ("validation", "not_found", "too_large", "authentication"):
        assert total(samples, "ray_gemma_request_errors_total", type=kind) == 1, kind
    assert total(samples, "ray_gemma_num_requests_waiting") == 0
    assert total(samples, "ray_gemma_kv_cache_usage_perc") == 0  # idle again: every block freed
    queries = total(samples, "ray_gemma_prefix_cache_queries_total")
    hits = total(samples, "ray_gemma_prefix_cache_hits_total")
    assert queries == prompt_tokens and hits == 2 * 32  # the same prompt came thrice
    deployments = {s.labels.get("deployment") for s in ours}
    assert deployments == {"model", "ingress"}  # recorded where they happen, tagged by Serve with the replica
    serves = {(s.name, s.labels.get("deployment")) for s in samples if s.name.startswith("ray_serve_")}
    assert {d for n, d in serves if n == "ray_serve_deployment_request_counter_total"} >= {
        "ingress", "model", "tokenizer"}, sorted(serves)  # Serve's own metrics are still there


def test_keys_and_limits_through_serve(url):
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200  # no key needed
        r = client.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers=AUTH).status_code == 200
        r = client.post("/v1/completions", json={"prompt": "Hi", "n": 3}, headers=AUTH)
        assert r.status_code == 400 and "max_n is 2" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: counted while it is read
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = client.post("/v1/completions", content=chunks(), headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413 and "max_request_bytes is 4096" in r.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH)
        assert ok.status_code == 200


def test_access_lines_land_in_the_ingress_replicas_log_without_prompt_or_key(url):
    import ray

    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Purple elephants whisper", "max_tokens": 3, **GREEDY},
                   headers={**AUTH, "x-request-id": "access-line-1"}, timeout=60)
    assert r.status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"

    def line() -> str | None:
        for path in logs.glob(f"replica_{APP}_ingress_*.log"):
            for text in path.read_text().splitlines():
                if "request_id=access-line-1 " in text:
                    return text
        return None

    found = wait_for(line, 30, "the access line in the replica's log")
    assert "route=/v1/completions status=200 model=tiny prompt_tokens=" in found, found
    assert "output_tokens=3 " in found and "finish_reason=length" in found
    everything = "".join(p.read_text() for p in logs.glob(f"replica_{APP}_*.log"))
    assert "Purple elephants" not in everything and KEY not in everything
