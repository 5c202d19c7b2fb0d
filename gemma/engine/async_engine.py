"""The engine behind a server: `AsyncEngine`, the interface, and `AsyncLLMEngine`, its in-process implementation.

    async for out in engine.generate(prompt_token_ids, params, request_id):
        ...  # out.outputs[0].new_token_ids / new_text, out.metrics; out.finished on the last one

`AsyncEngine` is what a server uses (deployments/model.py types against it): `generate`, `abort`, `info`, `stats`,
`check_health`, `shutdown`, `close`. It owns the per-request streams; its two implementations own the stepping:
`AsyncLLMEngine` here steps an `LLMEngine` in this process, `gemma.engine.engine_process.AsyncEngineProcess` one
in a child process, for servers whose own per-token work would hold the GIL.

In `AsyncLLMEngine` the steps run back to back on the process's PyTorch thread (gemma.torch_thread; PyTorch
releases the GIL), and the event loop only hands each step's outputs to the requests' queues: streaming them on,
however costly, overlaps the next step instead of delaying it. Adds and aborts are queued for that thread to make
between two steps (the engine's state changes there only). Load the engine on that same thread
(`AsyncLLMEngine.from_engine_factory`, or `torch_thread.call`): CPU kernels run on an OpenMP team per calling
thread, and a second team makes every step ~1.5x slower (gemma.torch_thread's doc has the figures).

A consumer slower than the steps gets one output for the steps it missed (`merge_outputs`: the latest state, the
deltas of all of them), not a backlog of one per token: a server streams as fast as it can pass messages on.

Leaving the `async for` early, cancelling the task, or `await engine.abort(request_id)` aborts the request and
frees its KV blocks. A request that cannot be served raises from `generate` and affects no other request; if a
step itself fails, the requests in it get the error and the loop keeps serving the others.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from gemma import torch_thread
from gemma.engine.llm_engine import LLMEngine
from gemma.engine.outputs import RequestOutput, merge_outputs
from gemma.lora import LoRARequest
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)
BURST_S = 0.25  # the longest the step loop holds the PyTorch thread before letting other work in


class EngineStepError(RuntimeError):
    """The model step that carried this request failed."""


class AsyncEngine(ABC):
    """An engine that steps in the background while its requests stream (see the module doc).

    The per-request streams live here. An implementation makes the engine's calls (`_add_request`,
    `_abort_request`) and hands each step's outputs to `_deliver`, and a failed step's requests to `_deliver_error`.
    """

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}  # the event loop's alone

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | None, request_id: str, prompt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs as tokens are produced; the last one has `finished=True`. `lora_request`:
        the LoRA adapter it runs with (an engine with enable_lora)."""
        if request_id in self._queues:
            raise ValueError(f"request_id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue  # before the add: the step right after it may already have an output
        try:  # raises ValueError (and queues nothing) when the request cannot be served
            await self._add_request(request_id, prompt_token_ids, params, time.monotonic(), prompt, lora_request)
        except BaseException as exc:
            self._queues.pop(request_id, None)
            if isinstance(exc, asyncio.CancelledError):  # the add may still be made: undo it (calls run in order)
                await asyncio.shield(self.abort(request_id))
            raise
        finished = False
        try:
            while True:
                item = await queue.get()
                while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    nxt = queue.get_nowait()  # the consumer fell behind: one output for all the steps it missed
                    if isinstance(nxt, BaseException):
                        yield item  # what was produced, then the error
                        item = nxt
                        break
                    item = merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early, was cancelled, or the step failed
                await asyncio.shield(self.abort(request_id))

    async def abort(self, request_id: str) -> None:
        """Stop the request and free its KV blocks; its stream ends with the final output. Unknown ids are ignored."""
        queue = self._queues.pop(request_id, None)
        out = await self._abort_request(request_id)
        if queue is not None and out is not None:
            queue.put_nowait(out)

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What a server tells its clients: max_model_len, vocab_size, tp_size."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """The engine's counters now (see `engine_stats`)."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise if the engine cannot serve any more (a server replaces the replica then)."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop stepping; requests still in flight get no more outputs."""

    @abstractmethod
    def close(self) -> None:
        """Release what the engine holds (worker processes); it cannot step afterwards. Idempotent."""

    @abstractmethod
    async def _call(self, name: str, *args: Any) -> Any:
        """The `LLMEngine` method `name` called with `args` between two steps; its result, or its exception."""

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """`LLMEngine.add_lora`: load an adapter now; raises ValueError naming what does not fit the model."""
        return await self._call("add_lora", lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call("remove_lora", lora_int_id)

    async def _add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None, arrival_time: float,
        prompt: str | None, lora_request: LoRARequest | None = None,
    ) -> None:
        """`LLMEngine.add_request`, made between two steps; raises its ValueError."""
        args = (lora_request,) if lora_request is not None else ()  # engines without LoRA keep their signature
        await self._call("add_request", request_id, prompt_token_ids, params, arrival_time, prompt, *args)

    @abstractmethod
    async def _abort_request(self, request_id: str) -> RequestOutput | None:
        """`LLMEngine.abort_request`, made between two steps (None when nothing steps any more)."""

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
                if out.finished:
                    del self._queues[out.request_id]

    def _deliver_error(self, request_ids: list[str], exc: Exception) -> None:
        """The failed step's requests get the error; the rest keep going."""
        for request_id in request_ids:
            queue = self._queues.pop(request_id, None)
            if queue is not None:
                queue.put_nowait(EngineStepError(f"request {request_id} failed in an engine step: {exc}"))


class AsyncLLMEngine(AsyncEngine):
    """An `LLMEngine` stepped on this process's PyTorch thread (see the module doc)."""

    def __init__(self, engine: LLMEngine) -> None:
        super().__init__()
        self.engine = engine
        # engine calls (add / abort) for the PyTorch thread to make between two steps, each with its future
        self._commands: deque[tuple[str, Callable[[], Any], asyncio.Future]] = deque()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    @classmethod
    def from_engine_factory(cls, factory: Callable[[], LLMEngine]) -> AsyncLLMEngine:
        """Build the engine on the PyTorch thread that will run its steps (see the module doc)."""
        return cls(torch_thread.call(factory))

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        if not self.is_running:
            self._loop = asyncio.get_running_loop()
            self._stopping = False
            self._loop_task = self._loop.create_task(self._run(), name="gemma-engine-loop")

    async def shutdown(self) -> None:
        """Stop stepping: the steps under way on the PyTorch thread end with their current one."""
        self._stopping = True
        if self._loop_task is not None:
            self._wakeup.set()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - it stopped on an error earlier (check_health reported it)
                logger.exception("the engine loop had failed")
            self._loop_task = None

    def check_health(self) -> None:
        """Raise if a tensor-parallel worker died or the step loop stopped on an error."""
        self.engine.check_health()
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the engine loop stopped: {task.exception()!r}")

    def info(self) -> dict[str, Any]:
        return engine_info(self.engine)

    def stats(self) -> dict[str, Any]:
        return engine_stats(self.engine)

    def close(self) -> None:
        """Stop the tensor-parallel workers (ranks 1..N-1); the engine cannot step afterwards."""
        self.engine.shutdown()

    async def _add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None, arrival_time: float,
        prompt: str | None, lora_request: LoRARequest | None = None,
    ) -> None:
        if params is not None and params.structured_outputs is not None:
            # compiling a grammar takes milliseconds to seconds: done here, off the step loop (cached for add_request)
            await asyncio.to_thread(self.engine.prepare, params)
        await super()._add_request(request_id, prompt_token_ids, params, arrival_time, prompt, lora_request)

    async def _abort_request(self, request_id: str) -> RequestOutput | None:
        if self.is_running:
            return await self._call("abort_request", request_id)
        return self.engine.abort_request(request_id)  # nothing steps: the engine is the caller's alone

    async def _call(self, name: str, *args: Any) -> Any:
        """The engine's method `name` called with `args` on the PyTorch thread between two steps (the engine's
        state changes there only)."""
        future = asyncio.get_running_loop().create_future()
        self._commands.append((name, functools.partial(getattr(self.engine, name), *args), future))
        self.start()
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        burst = None
        try:
            while not self._stopping:
                await self._wakeup.wait()
                self._wakeup.clear()  # a call that comes while the steps run sets it again
                burst = torch_thread.executor().submit(self._steps)
                await asyncio.wrap_future(burst)
        finally:
            self._stopping = True
            if burst is not None and not burst.done():  # cancelled: the thread stops after its current step
                await asyncio.wait([asyncio.wrap_future(burst)])
            while self._commands:  # nothing steps any more: aborts are made here, anything else refused
                name, fn, future = self._commands.popleft()
                if name == "abort_request":
                    _resolve(future, fn(), None)
                else:
                    _resolve(future, None, RuntimeError("the engine was shut down"))

    def _steps(self) -> None:
        """On the PyTorch thread: make the queued calls, then step back to back while there is work.

        The event loop only hands the outputs over (`_deliver`), so streaming them to callers, however costly,
        overlaps the next step instead of delaying it. It returns after `BURST_S` to let other work that waits
        for this thread in.
        """
        loop, engine, end = self._loop, self.engine, time.monotonic() + BURST_S
        while not self._stopping:
            while self._commands:
                _, fn, future = self._commands.popleft()
                try:
                    loop.call_soon_threadsafe(_resolve, future, fn(), None)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    loop.call_soon_threadsafe(_resolve, future, None, exc)
            if not engine.has_unfinished_requests() or time.monotonic() > end:
                if engine.has_unfinished_requests():
                    loop.call_soon_threadsafe(self._wakeup.set)
                return
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not stop the server
                logger.exception("engine step failed")
                failed = self._fail_running()
                loop.call_soon_threadsafe(self._deliver_error, failed, exc)
                continue
            loop.call_soon_threadsafe(self._deliver, outputs)

    def _fail_running(self) -> list[str]:
        """On the PyTorch thread: abort the requests that were in the failed step (their blocks are freed)."""
        failed = [seq.request_id for seq in list(self.engine.scheduler.running)]
        for request_id in failed:
            self.engine.abort_request(request_id)
        return failed


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # its caller was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def engine_info(engine: LLMEngine) -> dict[str, Any]:
    return {"max_model_len": engine.max_model_len, "vocab_size": engine.model.config.vocab_size,
            "tp_size": engine.model.tp.size}


def engine_stats(engine: LLMEngine) -> dict[str, Any]:
    """Requests running and waiting, KV-cache use, prefix-cache counters (cumulative), and the resident memory of
    the process the engine runs in."""
    kv = engine.kv
    return {
        "num_requests_running": engine.num_requests_running,
        "num_requests_waiting": engine.num_requests_waiting,
        "kv_cache_usage": kv.usage,
        "kv_blocks_used": sum(g.num_used_blocks for g in kv.groups),
        "kv_blocks_total": sum(g.num_blocks for g in kv.groups),
        "prefix_cache_queries": kv.prefix_queries,
        "prefix_cache_hits": kv.prefix_hits,
        "rss_bytes": rss_bytes(),
    }


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None
