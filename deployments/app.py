"""The Serve application: `build_app(args)` composes the deployments with `.bind()`.

    serve run serve_config.yaml                         # import_path: deployments.app:build_app
    serve run deployments.app:build_app model=gemma-3-270m tp_size=2

This is the only module that applies Serve options (`serve.deployment`, `.options`, `.bind`); the classes in
deployments/ are plain. Options here are defaults: `serve_config.yaml` overrides any of them per deployment
(autoscaling, max_ongoing_requests, max_queued_requests, placement groups, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from ray import serve
from ray.serve import Application

from deployments.classifier import ClassifierDeployment
from deployments.guards import Limits
from deployments.ingress import Ingress
from deployments.model import EngineArgs, ModelDeployment
from deployments.tokenizer import TokenizerDeployment


# Ray Serve's lower-overhead request path (part of Ray's own RAY_SERVE_THROUGHPUT_OPTIMIZED=1, without its experimental
# proxy-less ingress): handles talk gRPC to the replicas they call, and each replica runs our code and its router on
# its main event loop instead of extra threads and loops (every blocking call of ours already runs off the loop, on
# gemma.torch_thread). Read when a Ray process starts, so set it where Ray starts on every node (cluster/, `make
# serve`, the tests' and benchmarks' local clusters) for the proxies; serve_config.yaml's runtime_env also sets it
# for the app's replicas wherever Ray was started without it. Measured on 2 cores (tiny model, time to the first
# streamed token through HTTP, p50): Serve's defaults 46-49 ms, replicas only 33-45 ms, every process 29-34 ms.
#
# The last two make Serve's own periodic work rarer: the controller's control loop every 0.5 s instead of 0.1 s
# (autoscaling decisions follow seconds-long delays anyway) and each replica's export of its request metrics every
# 1 s instead of 0.1 s (Prometheus scrapes every 10-15 s). On a node where the model's threads fill the cores every
# wake-up of these loops preempts one of them and stalls a step. Measured with the real 270M streaming one request
# at a time (2 cores): the controller's CPU went from 4.9% to 1.9% of a core, and the inter-token latency through
# Serve from 42.8 to 36.3 ms (engine alone: ~31 ms).
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


@contextmanager
def serve_env() -> Iterator[None]:
    """SERVE_ENV in os.environ while a local Ray cluster is started (its processes inherit it), then restored: this
    process's own Serve client keeps what it read at import."""
    saved = {k: os.environ.get(k) for k in SERVE_ENV}
    os.environ.update(SERVE_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class AppArgs(BaseModel):
    """Everything `build_app` takes (the `args:` of serve_config.yaml); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    model: str = "gemma-3-270m"  # a named model, an HF directory or a .gguf; never taken from a request
    served_model_name: str | None = None  # the name clients send as "model"; default: `model`
    tokenizer: str | None = None  # where the tokenizer comes from; default: `model`
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    device: Literal["cpu", "cuda"] = "cpu"
    tp_size: int = Field(1, ge=1)  # ranks per model replica (one placement-group bundle, one GPU each)
    max_num_seqs: int = Field(32, ge=1)  # sequences one replica runs at once
    max_model_len: int | None = Field(4096, ge=2)  # prompt + output tokens
    max_num_batched_tokens: int = Field(2048, ge=1)  # tokens per engine step (longer prompts are chunked)
    kv_cache_memory: int | str = "1GiB"  # KV pool per replica
    block_size: int = Field(16, ge=1)
    enable_prefix_caching: bool = True
    seed: int = 0
    cpu_matmul: Literal["auto", "kernel", "fp32", "torch"] = "auto"  # half-precision matmuls on CPUs without native bf16
    enforce_eager: bool = False  # on a GPU at tp_size 1 decode steps replay as CUDA graphs; True turns them off
    engine_process: bool = True  # the engine steps in a child process of the replica (tp_size 1): see gemma.engine.engine_process
    classifier_model: str | None = None  # a GemmaForSequenceClassification HF directory; None: no /v1/classify
    served_classifier_name: str | None = None  # the classifier's name in /v1/models and /v1/classify; default: its path
    classifier_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    classifier_max_batch_size: int = Field(16, ge=1)
    classifier_batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    # Bearer keys required on every route but /health (none: open); GEMMA_API_KEYS in the ingress replicas'
    # environment (comma separated) adds keys without putting them in the Serve config, which the dashboard shows
    api_keys: list[SecretStr] = []
    log_prompts: bool = False  # access-log lines (logger gemma.access) carry the prompt; off: no prompt text in logs
    limits: Limits = Limits()  # per-request limits of the HTTP API (deployments/guards.py)

    def engine_args(self) -> EngineArgs:
        return EngineArgs(**self.model_dump(include=set(EngineArgs.model_fields)))

    def model_bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per TP rank; the replica (rank 0) takes bundle 0."""
        bundle = {"CPU": 1.0, "GPU": 1.0} if self.device == "cuda" else {"CPU": 1.0}
        return [dict(bundle) for _ in range(self.tp_size)]


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The application: ingress -> tokenizer, model (one TP group per replica) and optional classifier."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    gpu = args.device == "cuda"
    # ingress and tokenizer mostly await: they reserve no CPU by default, so the model gets the node's cores
    tokenizer = serve.deployment(TokenizerDeployment, name="tokenizer", ray_actor_options={"num_cpus": 0}).bind(
        args.tokenizer or args.model
    )
    model = serve.deployment(
        ModelDeployment, name="model",
        ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0},
        placement_group_bundles=args.model_bundles(), placement_group_strategy="STRICT_PACK",
        health_check_period_s=5, health_check_timeout_s=30,
    ).bind(args.engine_args(), served_model_name=args.served_model_name or args.model)
    classifier = None
    if args.classifier_model:
        classifier = serve.deployment(
            ClassifierDeployment, name="classifier",
            ray_actor_options={"num_cpus": 1, "num_gpus": 1 if gpu else 0},
        ).bind(
            args.classifier_model, args.classifier_dtype, args.device,
            args.classifier_max_batch_size, args.classifier_batch_wait_timeout_s,
        )
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(
        model, tokenizer, classifier, served_model_name=args.served_model_name or args.model,
        classifier_name=args.served_classifier_name or args.classifier_model, limits=args.limits,
        api_keys=[k.get_secret_value() for k in args.api_keys], log_prompts=args.log_prompts,
    )
