"""Ray Serve stand-ins for HTTP-layer tests: `LocalHandle` and small deployments that record what they see.

`LocalHandle(obj)` behaves like a Serve DeploymentHandle over a plain object, without Ray running:
- `await h.method.remote(...)`: the method runs in its own task, as on a replica (started by `.remote()`);
- `h.options(stream=True).method.remote(...)`: an async iterator fed by a producer task, with `cancel()`
  like Serve's DeploymentResponseGenerator. Leaving the iteration without `cancel()` does not stop the
  producer: as through Ray, the caller must cancel or abort explicitly;
- arguments and results cross a pickle round trip, and exceptions arrive as `RayTaskError(<cause type>)`
  (an instance of the original type with `.cause`), as they do through Ray;
- `h.options(multiplexed_model_id=x)`: the call sees `serve.get_multiplexed_model_id() == x`, as on a replica.
"""

from __future__ import annotations

import asyncio
import contextvars
import pickle
import tempfile
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from ray.exceptions import RayTaskError
from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json

from gemma import GemmaConfig, GemmaForCausalLM, GemmaTokenizer
from gemma.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from gemma.sampling import SamplingParams


def _roundtrip(value: Any) -> Any:
    return pickle.loads(pickle.dumps(value))


def _as_ray_error(exc: Exception, method: str) -> Exception:
    tb = "".join(traceback.format_exception(exc))
    return RayTaskError(method, tb, exc).as_instanceof_cause()


class LocalStream:
    """The result of a streaming `.remote()`: async-iterable, cancellable."""

    def __init__(self, agen: AsyncIterator[Any], method: str) -> None:
        self._queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._done = False
        self._task = asyncio.get_running_loop().create_task(self._produce(agen, method))

    async def _produce(self, agen: AsyncIterator[Any], method: str) -> None:
        try:
            async for item in agen:
                self._queue.put_nowait(("item", _roundtrip(item)))
            self._queue.put_nowait(("end", None))
        except Exception as exc:  # noqa: BLE001 - delivered to the consumer
            self._queue.put_nowait(("error", _as_ray_error(exc, method)))

    def __aiter__(self) -> LocalStream:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        kind, value = await self._queue.get()
        if kind != "item":
            self._done = True
            if kind == "error":
                raise value
            raise StopAsyncIteration
        return value

    def cancel(self) -> None:
        self._task.cancel()


class _LocalMethod:
    def __init__(self, obj: Any, name: str, stream: bool, model_id: str = "") -> None:
        self.obj, self.name, self.stream, self.model_id = obj, name, stream, model_id

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        from ray.serve.context import _RequestContext, _serve_request_context

        args, kwargs = _roundtrip((args, kwargs))
        method = getattr(self.obj, self.name)
        # the call's task runs in a copy of this context: Serve's request context, as a replica sets it
        context = contextvars.copy_context()
        context.run(_serve_request_context.set, _RequestContext(multiplexed_model_id=self.model_id))
        if self.stream:
            return context.run(lambda: LocalStream(method(*args, **kwargs), self.name))
        return context.run(lambda: asyncio.get_running_loop().create_task(self._call(method, args, kwargs)))

    async def _call(self, method: Any, args: tuple, kwargs: dict) -> Any:
        try:
            result = method(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - re-raised as Ray would
            raise _as_ray_error(exc, self.name) from None
        return _roundtrip(result)


class LocalHandle:
    def __init__(self, obj: Any, stream: bool = False, model_id: str = "") -> None:
        self._obj, self._stream, self._model_id = obj, stream, model_id

    def options(self, *, stream: bool | None = None, multiplexed_model_id: str | None = None, **_: Any) -> LocalHandle:
        return LocalHandle(self._obj, self._stream if stream is None else stream,
                           self._model_id if multiplexed_model_id is None else multiplexed_model_id)

    def __getattr__(self, name: str) -> _LocalMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _LocalMethod(self._obj, name, self._stream, self._model_id)


# ---- deployments -----------------------------------------------------------------------------------------


def tiny_model_and_tokenizer(seed: int = 0) -> tuple[GemmaForCausalLM, GemmaTokenizer]:
    """A trained ~1.1k-token BPE and a 2-layer random Gemma over it (built in well under a second)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(Path(tmp)))
    config = GemmaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = GemmaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights, small embedding: greedy output varies instead of repeating
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.05 if "embed" in name else 0.4))
    return model, tokenizer


def tiny_engine(model: GemmaForCausalLM, tokenizer: GemmaTokenizer, max_model_len: int = 96) -> AsyncLLMEngine:
    """A fresh engine (its asyncio state belongs to the loop that first uses it) over a shared model."""
    config = EngineConfig(max_num_seqs=16, max_num_batched_tokens=256, block_size=4, kv_cache_memory="4MiB",
                          max_model_len=max_model_len)
    return AsyncLLMEngine(LLMEngine(model, tokenizer, config))


class RecordingModel:
    """A model deployment (the ModelDeployment API) around another, recording generate calls, their
    cancellations and aborts; `healthy = False` fails `check_health`, `fail_with` fails `generate`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.aborted: list[str] = []
        self.healthy = True
        self.fail_with: Exception | None = None

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        self.started.append(request_id)
        if self.fail_with is not None:
            raise self.fail_with
        try:
            async for out in self.inner.generate(prompt_token_ids, params, request_id):
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request_id)
            raise

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await self.inner.abort(request_id)

    async def model_info(self) -> dict[str, Any]:
        return await self.inner.model_info()

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("tensor-parallel worker 1 died")
        await self.inner.check_health()


class GatedModel:
    """A scripted model: each request yields `before_gate` one-token outputs at once, then waits for `gate`
    before the rest (`total` tokens, finish_reason "length"), or raises `fail_at_gate` there. Records starts,
    cancellations and aborts."""

    def __init__(self, before_gate: int = 2, total: int = 4, max_model_len: int = 64, vocab_size: int = 1 << 20) -> None:
        self.before_gate, self.total = before_gate, total
        self.info = {"model": "gated", "max_model_len": max_model_len, "vocab_size": vocab_size, "tp_size": 1}
        self.gate = asyncio.Event()
        self.fail_at_gate: Exception | None = None  # raised instead of waiting
        self.running = 0
        self.max_running = 0
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.aborted: list[str] = []

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        self.started.append(request_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        metrics = RequestMetrics(arrival_time=0.0)
        try:
            for k in range(1, self.total + 1):
                if k == self.before_gate + 1:
                    if self.fail_at_gate is not None:
                        raise self.fail_at_gate
                    await self.gate.wait()
                await asyncio.sleep(0)
                done = k == self.total
                outputs = [
                    CompletionOutput(index=i, text="".join(f"t{j} " for j in range(k)), token_ids=list(range(k)),
                                     finish_reason="length" if done else None, new_token_ids=[k - 1], new_text=f"t{k - 1} ")
                    for i in range(params.n)
                ]
                yield RequestOutput(request_id, None, list(prompt_token_ids), outputs, done, metrics)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(request_id)
            raise
        finally:
            self.running -= 1

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def model_info(self) -> dict[str, Any]:
        return dict(self.info)

    async def check_health(self) -> None:
        return None


class FakeClassifier:
    """The ClassifierDeployment API: "positive" for text of odd length (or odd id sums), else "negative"."""

    labels = ("negative", "positive")

    async def classify(self, item: str | list[int]) -> dict[str, Any]:
        if not item or (isinstance(item, str) and not item.strip()):
            raise ValueError("input must not be empty")
        odd = (len(item) if isinstance(item, str) else sum(item)) % 2
        probs = [0.25, 0.75] if odd else [0.75, 0.25]
        return {"label": self.labels[odd], "probs": probs, "num_classes": 2}

    async def info(self) -> dict[str, Any]:
        return {"id2label": dict(enumerate(self.labels)), "num_labels": 2}


class MetricsRecorder:
    """A `deployments.metrics.Metrics` factory that keeps what is recorded instead of exporting it, and checks
    tags as Ray does (every tag key given, no other). `values(name, **tags)`: the recorded values of a metric
    (by its short name) whose tags include `tags`."""

    def __init__(self) -> None:
        self.kinds: dict[str, str] = {}
        self.records: list[tuple[str, float, dict[str, str]]] = []

    def __call__(self, kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: Any) -> Any:
        assert name.startswith("gemma_") and description and (kind == "histogram") == (boundaries is not None)
        self.kinds[name.removeprefix("gemma_")] = kind
        recorder = self

        class Metric:
            def _record(self, value: float, tags: dict[str, str]) -> None:
                assert set(tags) == set(tag_keys), (name, tags, tag_keys)
                recorder.records.append((name.removeprefix("gemma_"), value, dict(tags)))

            inc = set = observe = lambda self, value, tags: self._record(value, tags)

        return Metric()

    def values(self, name: str, **tags: str) -> list[float]:
        return [v for n, v, t in self.records if n == name and tags.items() <= t.items()]

    def total(self, name: str, **tags: str) -> float:
        return sum(self.values(name, **tags))

    def last(self, name: str, **tags: str) -> float | None:
        values = self.values(name, **tags)
        return values[-1] if values else None
