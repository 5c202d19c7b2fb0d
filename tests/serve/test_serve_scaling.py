"""Replicas on a local multi-node Ray cluster: autoscaling under load and back, and a killed TP worker replaced.

The app is serve_config.yaml (tiny model, TP=2 per replica, short autoscaling delays) deployed as `serve deploy`
does. Figures (replica counts over time, time to recovery) are printed; `pytest -s` shows them.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.helpers.loadgen import Load, tally
from tests.helpers.serve_utils import app_config, deploy, running_replicas
from tests.helpers.waiting import wait_for

pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # autoscaling and a killed worker: minutes each (make test-all)

APP = "scale"
AUTOSCALING = {
    "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 11,  # > the 10 s metrics push
}


def completion(url: str, max_tokens: int = 48, timeout: float = 60.0) -> str:
    """One streamed completion; returns its text (raises on any HTTP or stream error)."""
    body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/{APP}/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


def alive_workers() -> list[dict]:
    """The live TP worker actors (named ones: listed by the GCS, no dashboard needed)."""
    import ray

    from deployments.tp_workers import WORKER_PREFIX

    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(WORKER_PREFIX)]


def scale_config(model_dir, model_options: dict) -> dict:
    args = {"model": str(model_dir), "served_model_name": "tiny", "dtype": "float32", "tp_size": 2,
            "kv_cache_memory": "16MiB", "max_model_len": 256}
    return app_config(APP, f"/{APP}", args, {"model": {"max_ongoing_requests": 2, **model_options}})


@pytest.fixture(scope="module")
def scale_app(ray_cluster, tiny_lm_dir):
    deploy(scale_config(tiny_lm_dir, {"autoscaling_config": AUTOSCALING}))
    return ray_cluster.http_url


def test_model_autoscales_up_under_load_and_back_down(scale_app):
    timeline = []
    start = time.monotonic()

    def sample() -> int:
        n = running_replicas(APP, "model")
        timeline.append((round(time.monotonic() - start, 1), n))
        return n

    assert sample() == 1
    load = Load(f"{scale_app}/{APP}", workers=6, kinds=("completion_stream",), max_tokens=48)
    try:
        wait_for(lambda: sample() >= 2, 90, "a second model replica under load")
        ok_at_up = tally(load.snapshot())["ok"]  # then load on both replicas: a request per client served
        wait_for(lambda: tally(load.snapshot())["ok"] >= ok_at_up + load.workers, 60, "requests served by two replicas")
        sample()
    finally:
        outcomes = tally(load.stop())
    up = timeline[-1][0]
    wait_for(lambda: sample() == 1, 90, "scaling back to one replica when idle")
    # the removed replica took its TP worker with it: no leaked actors
    wait_for(lambda: len(alive_workers()) == 1, 30, "the removed replica's TP worker to stop")
    print(f"\nautoscaling timeline (s, running model replicas): {timeline}")
    print(f"load: {dict(outcomes)}; reached 2 replicas by {up} s")
    assert outcomes["ok"] > 0 and set(outcomes) == {"ok"}, [o for o in load.outcomes if o.result != "ok"][:3]


def test_killed_tp_worker_is_replaced_while_the_other_replica_serves(scale_app, tiny_lm_dir):
    import ray

    deploy(scale_config(tiny_lm_dir, {"num_replicas": 2}))  # the same app with a fixed pair of replicas
    wait_for(lambda: running_replicas(APP, "model") == 2, 120, "two model replicas")

    wait_for(lambda: len(alive_workers()) == 2, 60, "a TP worker per replica")
    load = Load(f"{scale_app}/{APP}", workers=4, kinds=("completion_stream",), max_tokens=32)
    wait_for(lambda: tally(load.snapshot())["ok"] >= load.workers, 60, "the load to be served before the kill")
    victim = alive_workers()[0]
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]))
    killed_at = time.monotonic()
    ok_at_kill = tally(load.snapshot())["ok"]

    def recovered() -> bool:
        alive = [a for a in alive_workers() if a["name"] != victim["name"]]
        return len(alive) == 2 and running_replicas(APP, "model") == 2

    wait_for(recovered, 120, "Serve to replace the replica whose TP worker died")
    recovery_s = time.monotonic() - killed_at
    ok_at_recovery = tally(load.snapshot())["ok"]
    wait_for(lambda: tally(load.snapshot())["ok"] > ok_at_recovery, 60, "a request served after the recovery")
    outcomes = tally(load.stop())
    print(f"\nTP worker killed: replica replaced in {recovery_s:.1f} s; requests {dict(outcomes)} "
          f"({outcomes['ok'] - ok_at_kill} ok after the kill)")
    assert outcomes["ok"] - ok_at_kill > 0  # the healthy replica kept serving
    assert outcomes["hung"] == 0 and outcomes["unclear"] == 0  # failures are clean 503s
    assert completion(scale_app)  # and the app as a whole is healthy again
    assert httpx.get(f"{scale_app}/{APP}/health", timeout=30).status_code == 200
