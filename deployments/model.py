"""The model deployment: one replica is one tensor-parallel group serving an `AsyncEngine`.

A plain class (Serve options are applied in deployments/app.py). The engine is injected, or built from
`EngineArgs`: at tp_size 1 in a child process of the replica (`engine_process`, gemma.engine.engine_process: the
replica's per-token streaming work then never holds the GIL its steps need); with `tp_size > 1` this replica is
rank 0 and ranks 1..N-1 are Ray actors in its placement group (deployments/tp_workers.py). `generate` streams the
engine's outputs; a caller that goes away (an HTTP client disconnecting cancels the call) aborts its request and
frees its KV blocks.

LoRA adapters (`lora_modules`: name -> PEFT adapter directory) use Serve's model multiplexing: a request names its
adapter as the handle's `multiplexed_model_id`, `generate` reads it (`serve.get_multiplexed_model_id()`) and gets the
adapter from a loader wrapped in `serve.multiplexed(max_num_models_per_replica=max_cpu_loras)`, which loads it into the
engine (`AsyncEngine.add_lora`: checked against the model, a ValueError naming what does not fit) and tells Serve's
routers which adapters this replica holds, so that requests for an adapter go to replicas that hold it. An adapter
that fails to load fails its request only; Serve keeps no failed load, and the replica serves the others. Outside a
Serve replica (tests) the loader runs unwrapped.

`ServingEngineConfig` is the engine's part of every Ray entry point's args (`EngineArgs` here, `AppArgs`,
`BatchArgs`): gemma.engine's `LoadConfig` and `EngineConfig` fields, flat as vLLM's engine arguments are, with the
two serving defaults it names.

Metrics (deployments/metrics.py, tagged with `served_model_name`): token counters and the per-request
histograms are recorded from each output `generate` streams, with the engine's own timestamps. The engine's
state (running / waiting, KV-cache usage, prefix-cache counters) is published by a small task every
`stats_interval_s`, started on the replica's event loop by the first call (Serve's health checks make one soon
after start): it must fall back to 0 when the replica goes idle and count waiting requests that produce no
output, which recording on outputs alone would not, and it costs the same at any load. It runs only where
metrics go somewhere (a Ray process, or an injected `Metrics`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal

from pydantic import model_validator
from ray import serve

from deployments.metrics import EngineGauges, Metrics, RequestRecorder
from deployments.replica_logs import in_serve_replica, to_replica_log
from gemma.engine import (
    AsyncEngine,
    AsyncEngineProcess,
    AsyncLLMEngine,
    EngineConfig,
    LLMEngine,
    LoadConfig,
    RequestOutput,
)
from gemma.lora import LoRARequest
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ServingEngineConfig(EngineConfig, LoadConfig):
    """What one engine of a deployment or batch job loads, and its limits: the fields of gemma.engine's `LoadConfig`
    and `EngineConfig` (documented there), with these serving defaults."""

    # named, not detected: it decides whether a replica reserves GPUs from Ray (one per rank); Ray then shows each
    # GPU actor one device
    device: Literal["cpu", "cuda"] = "cpu"
    # a server's first constrained request (response_format, a forced tool call) should not wait seconds for the
    # grammar library's vocabulary tables
    structured_outputs_at_start: bool = True
    # LoRA adapters served beside the base model: name (what requests send as "model") -> PEFT adapter directory (on
    # every node with a model replica); any entry turns enable_lora on
    lora_modules: dict[str, str] = {}

    @model_validator(mode="after")
    def _adapters_need_lora(self) -> ServingEngineConfig:
        if self.lora_modules:
            self.enable_lora = True
        return self

    def lora_requests(self) -> dict[str, LoRARequest]:
        """The adapters by name, with ids every replica and batch worker agrees on (1.. in name order)."""
        return {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(sorted(self.lora_modules.items()), 1)}

    def engine_config(self) -> EngineConfig:
        return EngineConfig(**self.model_dump(include=set(EngineConfig.model_fields)))


class EngineArgs(ServingEngineConfig):
    """What a model replica loads, the limits of its engine and where the engine steps."""

    # the engine steps in a child process of the replica (gemma.engine.engine_process), so streaming tokens to
    # callers never holds up a step; tensor-parallel replicas keep rank 0 in the replica's own process
    engine_process: bool = True


def load_engine(args: ServingEngineConfig) -> LLMEngine:
    """Load the model and its engine in this process; with `tp_size > 1` this process is rank 0 and ranks 1..N-1 are
    Ray actors in its placement group. Call it on the thread that will step the engine (gemma.torch_thread)."""
    launcher, host = None, "127.0.0.1"
    if args.tp_size > 1:
        import ray

        from deployments.tp_workers import RayActorLauncher

        launcher, host = RayActorLauncher, ray.util.get_node_ip_address()
    kwargs = {"launcher": launcher} if launcher is not None else {}
    return LLMEngine.from_pretrained(
        args.model, args.dtype, _device(args), args.tp_size, args.engine_config(), host=host,
        quantization=args.quantization, **kwargs)


def build_engine(args: EngineArgs) -> AsyncEngine:
    """The replica's engine: in a child process (`engine_process`, tp_size 1), or stepped here (`load_engine`)."""
    if args.engine_process and args.tp_size == 1:
        return AsyncEngineProcess(functools.partial(
            LLMEngine.from_pretrained, args.model, args.dtype, _device(args), 1, args.engine_config(),
            quantization=args.quantization))
    return AsyncLLMEngine.from_engine_factory(functools.partial(load_engine, args))


def _replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica
        return None


def _device(args: ServingEngineConfig) -> str:
    # Ray gives each GPU actor one visible device: every rank's device is cuda:0 in its own process.
    return "cuda:0" if args.device == "cuda" else args.device


class ModelDeployment:
    def __init__(
        self, args: EngineArgs | dict[str, Any] | None = None, engine: AsyncEngine | None = None,
        served_model_name: str | None = None, metrics: Metrics | None = None, stats_interval_s: float = 1.0,
    ) -> None:
        to_replica_log()
        self.args = EngineArgs.model_validate(args or {})
        self.engine = engine if engine is not None else build_engine(self.args)
        self.metrics = metrics if metrics is not None else Metrics(served_model_name or self.args.model)
        self.stats_interval_s = stats_interval_s
        self._stats_task: asyncio.Task | None = None
        self.adapters = self.args.lora_requests()
        self.adapter_loads = 0  # adapters this replica loaded (Serve's multiplexing reloads one it dropped)
        self._load_adapter = self._load_adapter_now
        if self.adapters and in_serve_replica():
            # a plain function: Serve keeps its cache on the wrapped object (a bound method cannot hold it)
            async def load(model_id: str) -> LoRARequest:
                return await self._load_adapter_now(model_id)

            self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.args.max_cpu_loras
                                                   or self.args.max_loras)(load)
        logger.info("model %s ready (tp_size %d, LoRA adapters %s)", self.args.model, self.args.tp_size,
                    sorted(self.adapters) or "none")

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | dict[str, Any] | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (deltas in `outputs[i].new_token_ids` / `new_text`); ValueError if invalid."""
        if not isinstance(params, SamplingParams):
            params = SamplingParams.model_validate(params or {})
        self._publish_stats()
        lora = await self.adapter(serve.get_multiplexed_model_id())
        extra = {"lora_request": lora} if lora is not None else {}
        recorder = RequestRecorder(self.metrics, params.n)
        try:
            # aclosing: a caller that leaves (aclose, cancellation) aborts the request now, not at garbage collection
            async with aclosing(self.engine.generate(list(prompt_token_ids), params, request_id, **extra)) as stream:
                async for out in stream:
                    recorder.output(out)
                    yield out
        except (GeneratorExit, asyncio.CancelledError):
            recorder.left()
            raise

    async def adapter(self, name: str) -> LoRARequest | None:
        """The loaded adapter `name` ("" or the base model's name: None); ValueError naming why it cannot be served."""
        if not name or name == self.args.model:
            return None
        if name not in self.adapters:
            raise ValueError(f"unknown LoRA adapter {name!r}; this model serves {sorted(self.adapters)}")
        return await self._load_adapter(name)

    async def _load_adapter_now(self, name: str) -> LoRARequest:
        request = self.adapters[name]
        await self.engine.add_lora(request)
        self.adapter_loads += 1
        return request

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def model_info(self) -> dict[str, Any]:
        return {"model": self.args.model, **self.engine.info()}

    async def stats(self) -> dict[str, Any]:
        """The engine's counters; `rss_bytes` is the resident memory of this replica and its engine's process;
        `lora_adapter_loads`, the adapters this replica loaded."""
        return {**self.engine.stats(), "lora_adapter_loads": self.adapter_loads, "replica": _replica_id()}

    async def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy and Serve replaces it."""
        self._publish_stats()
        self.engine.check_health()

    def _publish_stats(self) -> None:
        """Start the task that publishes the engine's state (once, on the replica's loop; see the module doc)."""
        if self._stats_task is not None or not self.metrics.live:
            return
        gauges = EngineGauges(self.metrics, self.engine.stats)

        async def publish() -> None:
            while True:
                try:
                    gauges.publish()
                except Exception:  # metrics must never take the replica down
                    logger.exception("publishing engine metrics failed")
                await asyncio.sleep(self.stats_interval_s)

        self._stats_task = asyncio.get_running_loop().create_task(publish(), name="gemma-engine-metrics")

    def shutdown(self) -> None:
        """Stop the metrics task and the tensor-parallel workers; Serve calls `__del__` when it stops the replica."""
        task = getattr(self, "_stats_task", None)
        if task is not None and not task.done():
            try:  # Serve may call this from another thread than the replica's loop
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # that loop is closed, and the task with it
                pass
        self.engine.close()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # best effort at teardown; the placement group removal kills the actors
            logger.exception("shutting down the engine failed")

