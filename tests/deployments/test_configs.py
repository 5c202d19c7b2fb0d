"""Deployment configs against Ray's own schemas: serve_config.yaml, cluster/rayservice.yaml, cluster/cluster.yaml.

Ray's Serve schema ignores keys it does not know (a misspelled `max_queued_request` is dropped without a word),
so besides validating, these tests check every Serve key against the field names of Ray's schema classes. The
RayService's `serveConfigV2` must equal serve_config.yaml, so the two cannot drift. The cluster launcher's schema
does reject unknown keys; a broken copy proves the check bites.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("ray.serve")

from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    LoggingConfig,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.yaml"
RAYSERVICE = ROOT / "cluster" / "rayservice.yaml"
CLUSTER = ROOT / "cluster" / "cluster.yaml"

DEPLOYMENTS = {"ingress", "model", "tokenizer", "classifier"}  # "classifier" exists while args.classifier_model is set
AUTOSCALING_KEYS = {"min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"}
DEPLOYMENT_KEYS = {
    "autoscaling_config", "max_ongoing_requests", "max_queued_requests", "graceful_shutdown_timeout_s",
    "health_check_period_s", "health_check_timeout_s", "ray_actor_options",
}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return load(SERVE_CONFIG)


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for d in config["applications"][0]["deployments"]}


def unknown_keys(config: dict[str, Any]) -> list[str]:
    """Keys of a Serve config that are not fields of Ray's schema classes (which would silently ignore them)."""

    def extra(where: str, given: dict[str, Any], model: Any) -> list[str]:
        return [f"{where}.{k}" for k in given if k not in model.model_fields]

    bad = extra("", config, ServeDeploySchema)
    bad += extra("http_options", config.get("http_options", {}), HTTPOptionsSchema)
    bad += extra("logging_config", config.get("logging_config") or {}, LoggingConfig)
    for app in config["applications"]:
        bad += extra(f"app {app.get('name')}", app, ServeApplicationSchema)
        for d in app.get("deployments", []):
            where = f"deployment {d.get('name')}"
            bad += extra(where, d, DeploymentSchema)
            bad += extra(f"{where}.autoscaling_config", d.get("autoscaling_config") or {}, AutoscalingConfig)
            bad += extra(f"{where}.ray_actor_options", d.get("ray_actor_options") or {}, RayActorOptionsSchema)
    return bad


# --- serve_config.yaml -------------------------------------------------------------------------------------


def test_serve_config_passes_rays_schema(config):
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    assert app.route_prefix == "/"
    assert set(app.deployment_names) == DEPLOYMENTS
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)


def test_serve_config_uses_only_ray_keys(config):
    assert unknown_keys(config) == []
    # Why the check exists: Ray's schema accepts a misspelled key and drops it.
    broken = copy.deepcopy(config)
    deployments(broken)["model"]["max_queued_request"] = 8
    deployments(broken)["model"]["autoscaling_config"]["max_replica"] = 8
    ServeDeploySchema.model_validate(broken)
    assert unknown_keys(broken) == ["deployment model.max_queued_request", "deployment model.autoscaling_config.max_replica"]


def test_every_deployment_autoscales_and_sheds_load(config):
    for name, d in deployments(config).items():
        assert DEPLOYMENT_KEYS <= d.keys(), name
        auto = d["autoscaling_config"]
        assert AUTOSCALING_KEYS <= auto.keys(), name
        assert 1 <= auto["min_replicas"] <= auto["max_replicas"], name
        assert auto["target_ongoing_requests"] <= d["max_ongoing_requests"], name
        assert d["max_queued_requests"] > 0, f"{name}: a bounded queue is what turns overload into a fast 503"
        assert "num_cpus" in d["ray_actor_options"], name
        AutoscalingConfig.model_validate(auto)  # Ray keeps it a plain dict until deploy time


def test_model_placement_group_matches_tp_size(config):
    args, model = config["applications"][0]["args"], deployments(config)["model"]
    bundles = model["placement_group_bundles"]
    assert len(bundles) == args["tp_size"], "one placement-group bundle per tensor-parallel rank"
    assert model["placement_group_strategy"] == "STRICT_PACK"
    gpu = args["device"] == "cuda"
    assert all(("GPU" in b) == gpu for b in bundles), "GPU bundles exactly when device is cuda"
    # The replica (rank 0) is scheduled in bundle 0, so its actor options must fit there.
    actor = model["ray_actor_options"]
    assert actor["num_cpus"] <= bundles[0].get("CPU", 0)
    assert actor.get("num_gpus", 0) <= bundles[0].get("GPU", 0)
    assert model["max_ongoing_requests"] == args["max_num_seqs"], "admit what one engine batch holds"


def test_model_deployment_routes_by_prefix_with_the_engines_block_size(config):
    """The router keys on the engine's own block hashes: its block_size must be the engine's."""
    import importlib

    from ray.serve.config import RequestRouterConfig
    from ray.serve.request_router import RequestRouter

    from gemma.engine import EngineConfig

    routing = RequestRouterConfig(**deployments(config)["model"]["request_router_config"])
    module, _, name = routing.request_router_class.partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, RequestRouter) and cls.__name__ == "PrefixAwareRouter"
    args = config["applications"][0]["args"]
    assert routing.request_router_kwargs["block_size"] == args.get("block_size", EngineConfig().block_size)
    cls.initialize_state(object.__new__(cls), **routing.request_router_kwargs)  # the kwargs are its parameters


# --- cluster/rayservice.yaml -------------------------------------------------------------------------------


def test_rayservice_carries_serve_config(config):
    service = load(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_v2 = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_v2 == config, "serveConfigV2 must be a copy of serve_config.yaml"
    ServeDeploySchema.model_validate(serve_v2)

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [
        g for g in cluster["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups, "an autoscaling GPU worker group"
    for g in cluster["workerGroupSpecs"]:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]


def test_ray_versions_agree():
    """rayVersion of the RayService, the Dockerfile's base image and the launcher's images name one Ray."""
    version = load(RAYSERVICE)["spec"]["rayClusterConfig"]["rayVersion"]
    images = re.findall(r"rayproject/ray:([0-9.]+)-", (ROOT / "cluster" / "Dockerfile").read_text() + CLUSTER.read_text())
    assert images and set(images) == {version}


# --- cluster/cluster.yaml ----------------------------------------------------------------------------------


def validate_cluster(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before launching: fill in the provider's defaults, then check Ray's JSON schema."""
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_rays_schema():
    config = validate_cluster(load(CLUSTER))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert any("GPU" in t["resources"] for t in workers.values()), "a GPU worker type"
    assert any("GPU" not in t["resources"] for t in workers.values()), "a CPU worker type"
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert any('pip install -e ".[demo,serve]"' in c for c in config["setup_commands"])


@pytest.mark.parametrize("where", ["top level", "node type"])
def test_cluster_schema_rejects_a_misspelled_key(where):
    import jsonschema

    broken = load(CLUSTER)
    if where == "top level":
        broken["idle_timeout_minute"] = broken.pop("idle_timeout_minutes")
    else:
        broken["available_node_types"]["gpu_worker"]["max_worker"] = 2
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validate_cluster(broken)


# --- the app the config points at --------------------------------------------------------------------------


def test_serve_config_builds_the_app(config):
    """`build_app(args)` accepts the config's args and only binds (no model is loaded), and the deployment names
    the config sets options for are the ones the app has (Serve fails the deploy on any other name)."""
    app_module = pytest.importorskip("deployments.app")
    from ray.serve import Application
    from ray.serve._private.build_app import build_app as build_deployments

    args = config["applications"][0]["args"]
    assert app_module.AppArgs.model_validate(args) == app_module.AppArgs()  # "every field, at its default"
    assert set(args) == set(app_module.AppArgs.model_fields)
    assert set(args["limits"]) == set(app_module.Limits.model_fields)
    app = app_module.build_app(args)
    assert isinstance(app, Application)
    names = {d.name for d in build_deployments(app, name="gemma").deployments}
    assert names == DEPLOYMENTS == set(deployments(config))

    without = app_module.build_app(args | {"classifier_model": None})
    assert {d.name for d in build_deployments(without, name="gemma").deployments} == DEPLOYMENTS - {"classifier"}


def test_serve_config_runs_the_preset_classifier_on_two_cores(config):
    """The shipped app classifies with the label-word preset, its classifier replicas can fill their batches, and
    every deployment's first replica fits a 2-core machine (`make serve`), or one would stay PENDING."""
    from gemma.label_words import CLASSIFIER_PRESETS

    args, by_name = config["applications"][0]["args"], deployments(config)
    assert args["classifier_model"] in CLASSIFIER_PRESETS
    assert by_name["classifier"]["max_ongoing_requests"] >= args["classifier_max_batch_size"]
    reserved = 0.0
    for name, d in by_name.items():
        bundles = d.get("placement_group_bundles")  # the replica runs inside its bundles: they are the reservation
        cpus = sum(b.get("CPU", 0) for b in bundles) if bundles else d["ray_actor_options"]["num_cpus"]
        reserved += cpus * d["autoscaling_config"]["min_replicas"]
    assert reserved <= 2


def test_every_place_ray_starts_sets_serves_request_path(config):
    """deployments/serve.env, the one source of SERVE_ENV: in the app's runtime_env (its replicas), and where Ray
    starts (so the proxies use it too): each RayService container, both `ray start` commands of cluster.yaml, and
    `make serve`, which sources the file itself."""
    from deployments.app import SERVE_ENV, SERVE_ENV_FILE

    assert SERVE_ENV and all(k.startswith("RAY_SERVE_") for k in SERVE_ENV)
    assert config["applications"][0]["runtime_env"]["env_vars"] == SERVE_ENV
    service = yaml.safe_load(RAYSERVICE.read_text())
    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert {e["name"]: e["value"] for e in container["env"]} == SERVE_ENV, container["name"]
    cluster = yaml.safe_load(CLUSTER.read_text())
    exports = " ".join(f"{k}={v}" for k, v in SERVE_ENV.items())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in cluster[key] if "ray start" in c]
        assert start and all(f"export {exports};" in c for c in start), key
    serve_target = re.search(r"^serve:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert serve_target and f". ./{SERVE_ENV_FILE.relative_to(ROOT)} " in serve_target.group(1)


def test_serve_env_reads_the_same_in_sh_and_python():
    """`make serve` and cluster/README.md source deployments/serve.env with sh; the app parses it in Python."""
    from deployments.app import SERVE_ENV, SERVE_ENV_FILE

    script = f"set -a; . {SERVE_ENV_FILE}; set +a; env"
    env = {"PATH": os.environ["PATH"]}
    out = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    from_sh = dict(line.split("=", 1) for line in out.splitlines() if line.startswith("RAY_SERVE_"))
    assert from_sh == SERVE_ENV


def test_env_file_errors_name_the_line(tmp_path):
    from deployments.app import read_env_file

    path = tmp_path / "x.env"
    path.write_text("# comment\n\nA=1\nB=two words\n")
    assert read_env_file(path) == {"A": "1", "B": "two words"}
    path.write_text("A=1\nexport B\n")
    with pytest.raises(ValueError, match=r"x.env:2: expected KEY=VALUE"):
        read_env_file(path)


# --- engine settings: declared once (gemma/engine/config.py), composed by every entry point ---------------------


def test_engine_settings_are_declared_once_with_one_set_of_defaults():
    """EngineArgs, AppArgs and BatchArgs take the engine's fields from gemma.engine's LoadConfig and EngineConfig;
    only ServingEngineConfig redeclares two (device and structured_outputs_at_start, with their reasons), and none
    adds another copy."""
    from deployments.app import AppArgs
    from deployments.batch import BatchArgs
    from deployments.model import EngineArgs, ServingEngineConfig
    from gemma.engine import EngineConfig, LoadConfig

    library = {**LoadConfig().model_dump(), **EngineConfig().model_dump()}
    serving_overrides = {"device", "structured_outputs_at_start"}
    for cls in (ServingEngineConfig, EngineArgs, AppArgs, BatchArgs):
        own = set(cls.__dict__.get("__annotations__", {}))
        expected = serving_overrides if cls is ServingEngineConfig else set()
        assert own & set(library) == expected, f"{cls.__name__} redeclares {own & set(library)}"
        assert cls.model_config.get("extra") == "forbid", cls.__name__
    app = AppArgs()
    batch = BatchArgs(input="in.jsonl", output="out.jsonl")
    serving_engine = EngineConfig(structured_outputs_at_start=True)
    for args in (app, app.engine_args(), EngineArgs(), batch):
        assert args.engine_config() == serving_engine, type(args).__name__
        assert {k for k, v in library.items() if getattr(args, k) != v} == serving_overrides, type(args).__name__
    assert (app.dtype, app.device, LoadConfig().dtype, LoadConfig().device) == ("auto", "cpu", "auto", None)
    with pytest.raises(ValueError, match="max_num_seq"):
        AppArgs(max_num_seq=8)
    with pytest.raises(ValueError, match="kv_cache_mem"):
        BatchArgs(input="in.jsonl", output="out.jsonl", kv_cache_mem="1GiB")


def test_batch_cli_defaults_are_batch_args_defaults():
    from deployments.batch import BatchArgs, parse_args

    assert parse_args(["--input", "in.jsonl", "--output", "out.jsonl"]) == BatchArgs(input="in.jsonl", output="out.jsonl")
    args = parse_args(["--input", "in.jsonl", "--output", "out", "--max-num-seqs", "8", "--seed", "3", "--stop", "x"])
    assert args.max_num_seqs == 8 and args.seed == 0 and args.sampling_params == {"seed": 3, "stop": ["x"]}


def test_serve_config_documents_the_engine_defaults(config):
    """serve_config.yaml's args list every engine field at the library's default, serving's own two aside (device,
    structured_outputs_at_start)."""
    from gemma.engine import EngineConfig, LoadConfig

    args = config["applications"][0]["args"]
    engine = EngineConfig(structured_outputs_at_start=True).model_dump()
    assert {k: args[k] for k in EngineConfig.model_fields} == engine
    load = LoadConfig().model_dump()
    assert {k: args[k] for k in load} == load | {"device": "cpu"}
