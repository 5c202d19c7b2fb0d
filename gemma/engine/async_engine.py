"""`AsyncLLMEngine`: the engine behind a server. A background task runs `step()` while requests stream.

    async for out in engine.generate(prompt_token_ids, params, request_id):
        ...  # out.outputs[0].new_token_ids / new_text, out.metrics; out.finished on the last one

Each step runs on the process's PyTorch thread (gemma.torch_thread; PyTorch releases the GIL), so the event
loop keeps accepting requests and streaming tokens while the model computes. Load the engine on that same thread
(`AsyncLLMEngine.from_engine_factory`, or `torch_thread.call`): CPU kernels run on an OpenMP team per calling
thread, and a second team makes every step ~1.5x slower (gemma.torch_thread's doc has the figures).

Leaving the `async for` early, cancelling the task, or `await engine.abort(request_id)` aborts the request and
frees its KV blocks. A request that cannot be served raises from `generate` and affects no other request; if a
step itself fails, the requests in it get the error and the loop keeps serving the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from gemma import torch_thread
from gemma.engine.llm_engine import LLMEngine
from gemma.engine.outputs import RequestOutput
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The model step that carried this request failed."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # engine state is touched between steps only

    @classmethod
    def from_engine_factory(cls, factory: Callable[[], LLMEngine]) -> AsyncLLMEngine:
        """Build the engine on the PyTorch thread that will run its steps (see the module doc)."""
        return cls(torch_thread.call(factory))

    @property
    def is_running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    def start(self) -> None:
        if not self.is_running:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="gemma-engine-loop")

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None

    def check_health(self) -> None:
        """Raise if a tensor-parallel worker died or the step loop stopped on an error."""
        self.engine.check_health()
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the engine loop stopped: {task.exception()!r}")

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams | None, request_id: str, prompt: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs as tokens are produced; the last one has `finished=True`."""
        self.start()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        async with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.engine.add_request(request_id, prompt_token_ids, params, prompt=prompt)  # raises when invalid
            self._queues[request_id] = queue
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the consumer left early, was cancelled, or the step failed
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        async with self._lock:
            queue = self._queues.pop(request_id, None)
            out = self.engine.abort_request(request_id)
        if queue is not None and out is not None:
            queue.put_nowait(out)

    async def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished_requests():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            async with self._lock:
                try:
                    outputs = await torch_thread.run(self.engine.step)
                except Exception as exc:  # noqa: BLE001 - a failed step must not stop the server
                    logger.exception("engine step failed")
                    self._fail_running(exc)
                    continue
            for out in outputs:
                queue = self._queues.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._queues[out.request_id]
            await asyncio.sleep(0)  # let consumers and new requests in between steps

    def _fail_running(self, exc: Exception) -> None:
        """Fail the requests that were in the failed step; their blocks are freed, the rest keep going."""
        for seq in list(self.engine.scheduler.running):
            request_id = seq.request_id
            self.engine.abort_request(request_id)
            queue = self._queues.pop(request_id, None)
            if queue is not None:
                error = EngineStepError(f"request {request_id} failed in an engine step: {exc}")
                queue.put_nowait(error)
