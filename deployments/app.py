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
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from ray import serve
from ray.serve import Application

from deployments.classifier import ClassifierDeployment
from deployments.guards import Limits
from deployments.ingress import Ingress
from deployments.model import EngineArgs, ModelDeployment
from deployments.tokenizer import TokenizerDeployment
from gemma.label_words import check_template


SERVE_ENV_FILE = Path(__file__).with_name("serve.env")


def read_env_file(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of `path` (blank lines and # comments skipped): the dotenv subset that sh and make read
    the same way."""
    env = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"{path}:{n}: expected KEY=VALUE, got {line!r}")
        env[key] = value
    return env


# Ray Serve's lower-overhead request path and quieter periodic work: deployments/serve.env says what and why
SERVE_ENV = read_env_file(SERVE_ENV_FILE)


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


class AppArgs(EngineArgs):
    """Everything `build_app` takes (the `args:` of serve_config.yaml); unknown keys are errors.

    The model replicas' settings (model, dtype, device, tp_size, max_num_seqs, kv_cache_memory, ...) are
    `EngineArgs`' fields, declared once in gemma.engine's `LoadConfig` and `EngineConfig`; the model is never taken
    from a request. The fields below are the app's own."""

    served_model_name: str | None = None  # the name clients send as "model"; default: `model`
    tokenizer: str | None = None  # where the tokenizer comes from; default: `model`
    # /v1/classify: a label-word preset (gemma.label_words.CLASSIFIER_PRESETS), a GemmaForSequenceClassification HF
    # directory, or with classifier_labels a causal LM (named, HF directory, .gguf); None: no classifier, no /v1/classify
    classifier_model: str | None = "gemma-3-270m-sentiment"
    # label -> one-token label word (" positive"): a classifier from classifier_model's LM head, no training
    classifier_labels: dict[str, str] | None = None
    classifier_template: str | None = None  # with classifier_labels: the prompt, `{text}` marks where the input goes
    served_classifier_name: str | None = None  # the classifier's name in /v1/models and /v1/classify; default: its path
    classifier_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    classifier_max_batch_size: int = Field(16, ge=1)
    classifier_batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    # Bearer keys required on every route but /health (none: open); GEMMA_API_KEYS in the ingress replicas'
    # environment (comma separated) adds keys without putting them in the Serve config, which the dashboard shows
    api_keys: list[SecretStr] = []
    log_prompts: bool = False  # access-log lines (logger gemma.access) carry the prompt; off: no prompt text in logs
    limits: Limits = Limits()  # per-request limits of the HTTP API (deployments/guards.py)

    @field_validator("classifier_labels")
    @classmethod
    def _two_labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and len(v) < 2:
            raise ValueError(f"needs at least two label words, got {v}")
        return v

    @field_validator("classifier_template")
    @classmethod
    def _one_placeholder(cls, v: str | None) -> str | None:
        if v is not None:
            check_template(v)
        return v

    @model_validator(mode="after")
    def _label_words_need_both(self) -> AppArgs:
        if (self.classifier_labels is None) != (self.classifier_template is None):
            raise ValueError("classifier_labels and classifier_template go together: set both, or neither")
        if self.classifier_labels is not None and self.classifier_model is None:
            raise ValueError("classifier_labels needs classifier_model: the causal LM whose label words they are")
        return self

    def engine_args(self) -> EngineArgs:
        return EngineArgs(**self.model_dump(include=set(EngineArgs.model_fields)))

    def model_bundles(self) -> list[dict[str, float]]:
        """One placement-group bundle per TP rank; the replica (rank 0) takes bundle 0."""
        bundle = {"CPU": 1.0, "GPU": 1.0} if self.device == "cuda" else {"CPU": 1.0}
        return [dict(bundle) for _ in range(self.tp_size)]


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    """The application: ingress -> tokenizer, model (one TP group per replica) and classifier (unless
    classifier_model is None)."""
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
        # on CPU it reserves no core, so the default app fits a 2-core node beside the model's two (Ray then gives
        # it one torch thread); serve_config.yaml raises num_cpus where the nodes are bigger
        classifier = serve.deployment(
            ClassifierDeployment, name="classifier",
            ray_actor_options={"num_cpus": 1 if gpu else 0, "num_gpus": 1 if gpu else 0},
        ).bind(
            args.classifier_model, args.classifier_dtype, args.device,
            args.classifier_max_batch_size, args.classifier_batch_wait_timeout_s,
            labels=args.classifier_labels, template=args.classifier_template,
        )
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", ray_actor_options={"num_cpus": 0})
    return ingress.bind(
        model, tokenizer, classifier, served_model_name=args.served_model_name or args.model,
        classifier_name=args.served_classifier_name or args.classifier_model, limits=args.limits,
        api_keys=[k.get_secret_value() for k in args.api_keys], log_prompts=args.log_prompts,
        lora_modules=args.lora_modules,
    )
