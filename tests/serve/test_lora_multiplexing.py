"""LoRA adapters through Serve's model multiplexing on the local multi-node Ray cluster: 2 model replicas, each
holding at most 2 of 4 adapters (max_cpu_loras: Serve's max_num_models_per_replica).

The app is serve_config.yaml (its model deployment routed by deployments.prefix_router, which applies Serve's
multiplex routing first) with a tiny model and 4 random adapters. Whether a request landed on a replica that held
its adapter is read from the replicas' own account: each counts the adapters it had to load (`stats()`'s
`lora_adapter_loads`); a request routed to a replica without its adapter makes that replica load it.
"""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.lora import write_random_adapter
from tests.helpers.serve_utils import app_config, deploy
from tests.helpers.waiting import wait_for

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # two replicas of an app with 4 adapters: ~1 min

APP = "lora"
NAMES = ["a0", "a1", "a2", "a3"]


def total_loads(handle) -> int:
    """The adapters both replicas have loaded so far (stats calls until each replica has answered one)."""
    seen: dict[str, int] = {}

    def both() -> bool:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats["lora_adapter_loads"]
        return len(seen) == 2

    wait_for(both, 60, "stats from both model replicas", interval_s=0)
    return sum(seen.values())


def send(url: str, model: str, prompt: list[int]) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_warm_requests_go_to_replicas_holding_their_adapter(ray_cluster, tiny_lm_dir, tmp_path):
    from ray import serve

    from gemma import GemmaConfig

    config = GemmaConfig.from_pretrained(tiny_lm_dir)
    modules = {n: str(write_random_adapter(tmp_path / n, config, r=4, seed=i + 1)) for i, n in enumerate(NAMES)}
    args = {"model": str(tiny_lm_dir), "served_model_name": "tiny", "dtype": "float32", "kv_cache_memory": "16MiB",
            "max_model_len": 256, "lora_modules": modules, "max_loras": 1, "max_cpu_loras": 2}
    deploy(app_config(APP, "/", args, {"model": {"num_replicas": 2, "max_ongoing_requests": 8}}))
    url = ray_cluster.http_url
    handle = serve.get_deployment_handle("model", app_name=APP)
    models = httpx.get(f"{url}/v1/models").json()["data"]
    assert {m["id"]: m["parent"] for m in models} == {"tiny": None} | {n: "tiny" for n in NAMES}

    prompt = [11, 12, 13, 14, 15]
    outputs = {}
    before, rounds = total_loads(handle), 0

    def settled() -> bool:  # a round of every adapter that made no replica load one: routing has caught up
        nonlocal before, rounds
        rounds += 1
        for n in NAMES:
            outputs[n] = send(url, n, prompt)["choices"][0]["text"]
        after = total_loads(handle)
        quiet, before = after == before, after
        return quiet

    wait_for(settled, 300, "a round of requests that loads no adapter", interval_s=0)
    assert len(set(outputs.values())) > 1  # the adapters change the output
    start, requests = total_loads(handle), 0
    for _ in range(10):
        for n in NAMES:
            assert send(url, n, prompt)["model"] == n
            requests += 1
    misses = total_loads(handle) - start
    print(f"\nwarm-up rounds {rounds}; warm requests served where their adapter was held: {1 - misses / requests:.0%}")
    assert misses / requests <= 0.1
    r = httpx.post(f"{url}/v1/completions", json={"model": "a9", "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
