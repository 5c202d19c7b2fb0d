"""Deploying serve_config.yaml, adapted to tiny test models, onto the session's Ray cluster (as `serve deploy` does)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
# small replicas for a 2-core machine: every rank gets one logical CPU (and so one torch thread)
SMALL = {
    "ingress": {"ray_actor_options": {"num_cpus": 0}},
    "tokenizer": {"ray_actor_options": {"num_cpus": 0}},
    "model": {"ray_actor_options": {"num_cpus": 1, "num_gpus": 0}, "health_check_period_s": 1,
              "health_check_timeout_s": 30},
}


def app_config(
    name: str, route_prefix: str, args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """serve_config.yaml's application with `args` overriding its args and per-deployment option overrides."""
    base = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    app = copy.deepcopy(base)
    app.update(name=name, route_prefix=route_prefix)
    # the shipped classifier preset is made from the real 270M: a test opts in with a tiny classifier_model
    app["args"] = {**app["args"], "classifier_model": None, **args}
    overrides = copy.deepcopy(SMALL)
    overrides["model"]["placement_group_bundles"] = [{"CPU": 1}] * app["args"].get("tp_size", 1)
    if app["args"]["classifier_model"]:
        overrides["classifier"] = {"ray_actor_options": {"num_cpus": 1}}
    else:  # Serve refuses options for a deployment the app lacks
        app["deployments"] = [d for d in app["deployments"] if d["name"] != "classifier"]
    for dep_name, options in (deployments or {}).items():
        overrides.setdefault(dep_name, {}).update(options)
    for dep in app["deployments"]:
        dep.update(overrides.get(dep["name"], {}))
        if "num_replicas" in dep:
            dep.pop("autoscaling_config", None)
    return app


def deploy(*apps: dict[str, Any], timeout_s: float = 180.0) -> None:
    """Apply a config of `apps` (replacing whatever runs) and wait until every app is RUNNING."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.parse_obj({"applications": list(apps)})
    serve.context._get_global_client().deploy_apps(config)
    names = {a["name"] for a in apps}

    def running() -> bool:
        status = serve.status().applications
        for n in names:
            if n in status and status[n].status == "DEPLOY_FAILED":
                raise RuntimeError(f"app {n} failed to deploy: {status[n].message}")
        return all(n in status and status[n].status == "RUNNING" for n in names)

    wait_for(running, timeout_s, "apps to be RUNNING")


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)
