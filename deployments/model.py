"""The model deployment: one replica is one tensor-parallel group serving an `AsyncEngine`.

A plain class (Serve options are applied in deployments/app.py). The engine is injected, or built from
`EngineArgs`: at tp_size 1 in a child process of the replica (`engine_process`, gemma.engine.engine_process: the
replica's per-token streaming work then never holds the GIL its steps need); with `tp_size > 1` this replica is
rank 0 and ranks 1..N-1 are Ray actors in its placement group (deployments/tp_workers.py). `generate` streams the
engine's outputs; a caller that goes away (an HTTP client disconnecting cancels the call) aborts its request and
frees its KV blocks.

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

from deployments.metrics import EngineGauges, Metrics, RequestRecorder
from deployments.replica_logs import to_replica_log
from gemma.engine import (
    AsyncEngine,
    AsyncEngineProcess,
    AsyncLLMEngine,
    EngineConfig,
    LLMEngine,
    LoadConfig,
    RequestOutput,
)
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ServingEngineConfig(EngineConfig, LoadConfig):
    """What one engine of a deployment or batch job loads, and its limits: the fields of gemma.engine's `LoadConfig`
    and `EngineConfig` (documented there), with these serving defaults."""

    # named, not detected: it decides whether a replica reserves GPUs from Ray (one per rank); Ray then shows each
    # GPU actor one device
    device: Literal["cpu", "cuda"] = "cpu"

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
        logger.info("model %s ready (tp_size %d)", self.args.model, self.args.tp_size)

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | dict[str, Any] | None, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (deltas in `outputs[i].new_token_ids` / `new_text`); ValueError if invalid."""
        if not isinstance(params, SamplingParams):
            params = SamplingParams.model_validate(params or {})
        self._publish_stats()
        recorder = RequestRecorder(self.metrics, params.n)
        try:
            # aclosing: a caller that leaves (aclose, cancellation) aborts the request now, not at garbage collection
            async with aclosing(self.engine.generate(list(prompt_token_ids), params, request_id)) as stream:
                async for out in stream:
                    recorder.output(out)
                    yield out
        except (GeneratorExit, asyncio.CancelledError):
            recorder.left()
            raise

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def model_info(self) -> dict[str, Any]:
        return {"model": self.args.model, **self.engine.info()}

    async def stats(self) -> dict[str, Any]:
        """The engine's counters; `rss_bytes` is the resident memory of this replica and its engine's process."""
        return self.engine.stats()

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

