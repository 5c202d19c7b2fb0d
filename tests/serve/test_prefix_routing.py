"""Prefix-aware routing on the local multi-node Ray cluster: 3 model replicas, 6 long prefixes, 60 requests.

The app is serve_config.yaml (its model deployment routed by deployments.prefix_router) with a tiny model; the same
requests also go through Serve's default router, deployed in the same test. Whether a request landed on a replica
that held its prefix is read from the replicas' own account: its usage's `prompt_tokens_details.cached_tokens`.
Then a replica is killed: its prefixes move to the others, and no request fails.
"""

from __future__ import annotations

import random

import httpx
import pytest

from tests.helpers.serve_utils import app_config, deploy, running_replicas
from tests.helpers.waiting import wait_for

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # two deployments of 3 replicas and a replica replaced: ~2 min

APP = "prefix"
ARGS = {"served_model_name": "tiny", "dtype": "float32", "kv_cache_memory": "16MiB", "max_model_len": 512}
DEFAULT_ROUTER = {"request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
PREFIX_TOKENS = 200  # 12 full blocks of 16: the router's key is the first 8


def prefixes(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(PREFIX_TOKENS)] for _ in range(6)]


def send(url: str, prompt: list[int]) -> int:
    """One completion; returns the prompt tokens the serving replica had cached."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def hit_rate(url: str, heads: list[list[int]], rounds: int, seed: int) -> float:
    """Each prefix `rounds` times with a fresh tail, interleaved; the share of requests served with their prefix."""
    rng = random.Random(seed)
    hits = total = 0
    for _ in range(rounds):
        for head in heads:
            tail = [rng.randrange(10, 200) for _ in range(rng.randint(3, 20))]
            hits += send(url, head + tail) >= PREFIX_TOKENS // 16 * 16
            total += 1
    return hits / total


def deploy_app(tiny_lm_dir, router: dict | None) -> None:
    model = {"num_replicas": 3, "max_ongoing_requests": 8}
    if router is not None:
        model["request_router_config"] = router
    deploy(app_config(APP, "/", {**ARGS, "model": str(tiny_lm_dir)}, {"model": model}))


def model_replicas() -> list[dict]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#model#"
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def test_prefix_router_sends_a_prefix_where_it_is_cached_and_survives_a_killed_replica(ray_cluster, tiny_lm_dir):
    import ray

    from gemma import GemmaTokenizer

    url = ray_cluster.http_url
    heads = prefixes(len(GemmaTokenizer.from_pretrained(tiny_lm_dir)))
    deploy_app(tiny_lm_dir, DEFAULT_ROUTER)
    default = hit_rate(url, heads, rounds=10, seed=1)
    deploy_app(tiny_lm_dir, None)  # serve_config.yaml's own: the prefix router
    ours = hit_rate(url, heads, rounds=10, seed=1)
    print(f"\nrequests served by a replica holding their prefix: prefix router {ours:.0%}, default router {default:.0%}")
    assert ours >= 0.8 and ours > default  # only each prefix's first request misses: 54 of 60

    victim = model_replicas()[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    wait_for(lambda: victim["name"] not in {a["name"] for a in model_replicas()} and running_replicas(APP, "model") == 3,
             120, "Serve to replace the killed model replica")
    # every request succeeds (send asserts); the killed replica's prefixes move, and once the callers' routers know
    # the replacement (it joins their replica sets shortly after it runs) every prefix hits where it now lives
    rng, rounds = random.Random(2), []
    while len(rounds) < 5 and not (rounds and all(c >= PREFIX_TOKENS // 16 * 16 for c in rounds[-1])):
        rounds.append([send(url, head + [rng.randrange(10, 200) for _ in range(3)]) for head in heads])
    print(f"cached tokens per prefix, rounds after the kill: {rounds}")
    assert all(c >= PREFIX_TOKENS // 16 * 16 for c in rounds[-1]), rounds
