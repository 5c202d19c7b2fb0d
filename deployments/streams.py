"""The model streams behind one HTTP request, and what a stream may show before it ends.

`ModelStreams` starts one `generate` stream per prompt on a model deployment handle and reads them together,
in the order outputs arrive. `close()` is the one way to end it early: it cancels the handle streams and
aborts the engine requests that did not finish (cancellation alone may not reach a replica). With a `deadline`
(on the event loop's clock), waiting for an output past it raises `DeadlineExceeded`. With `multiplexed_model_id` (a
LoRA adapter's name) the calls carry it, so Serve routes them to a replica that holds the adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from gemma.engine.outputs import RequestOutput, merge_outputs
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed while it waited for the model."""


class ModelStreams:
    """The model streams of one HTTP request (one per prompt), read together in the order outputs arrive.

    A stream whose newer output is already queued skips to it (`merge_outputs`: one event for what the reader
    missed). `start()` waits for each stream's first output so that a request the model rejects (it raises before
    yielding) fails before any HTTP response has begun. `close()` cancels what still runs and aborts the
    engine requests that did not finish; it is idempotent.
    """

    def __init__(
        self, model: Any, prompts: list[list[int]], params: SamplingParams, engine_ids: list[str],
        deadline: float | None = None, multiplexed_model_id: str | None = None,
    ) -> None:
        if multiplexed_model_id:
            model = model.options(multiplexed_model_id=multiplexed_model_id)
        self.model, self.engine_ids, self.deadline = model, engine_ids, deadline
        self.finished: set[int] = set()
        self.first_token_time: float | None = None  # time.monotonic() when the first token arrived
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()
        self._pending: list[tuple[int, RequestOutput | BaseException | None]] = []
        self._open = set(range(len(prompts)))
        self._streams = [
            model.options(stream=True).generate.remote(ids, params, rid) for ids, rid in zip(prompts, engine_ids)
        ]
        self._tasks = [asyncio.create_task(self._pump(i, st)) for i, st in enumerate(self._streams)]

    async def _pump(self, i: int, stream: Any) -> None:
        try:
            async for out in stream:
                if self.first_token_time is None and any(o.new_token_ids for o in out.outputs):
                    self.first_token_time = time.monotonic()
                self._queue.put_nowait((i, out))
            self._queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put_nowait((i, exc))

    async def start(self) -> None:
        waiting = set(self._open)
        while waiting:
            event = await self._get()
            if isinstance(event[1], BaseException):
                raise event[1]
            self._pending.append(event)
            waiting.discard(event[0])

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            i, item = self._pending.pop(0) if self._pending else await self._get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._open.discard(i)
                continue
            if item.finished:
                self.finished.add(i)
            elif self._newer(i, item):
                continue
            yield i, item

    def _newer(self, i: int, item: RequestOutput) -> bool:
        """Whether a newer output of stream `i` has arrived (then merged into it: this one need not be sent).

        A reader slower than the model (a fast GPU, a busy ingress) sends one event for what it missed instead
        of falling further behind one event per token; the outputs' text and token ids are cumulative.
        """
        while not self._queue.empty():
            self._pending.append(self._queue.get_nowait())
        for k, (j, later) in enumerate(self._pending):
            if j == i and isinstance(later, RequestOutput):
                self._pending[k] = (j, merge_outputs(item, later))
                return True
        return False

    async def _get(self) -> tuple[int, RequestOutput | BaseException | None]:
        if self.deadline is None:
            return await self._queue.get()
        try:
            return await asyncio.wait_for(self._queue.get(), max(self.deadline - asyncio.get_running_loop().time(), 0))
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed") from None

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for stream in self._streams:
            if callable(getattr(stream, "cancel", None)):  # a Serve DeploymentResponseGenerator
                stream.cancel()
        unfinished = [rid for i, rid in enumerate(self.engine_ids) if i not in self.finished]
        if unfinished:
            logger.info("aborting unfinished requests %s", unfinished)
            results = await asyncio.gather(*(self.model.abort.remote(r) for r in unfinished), return_exceptions=True)
            for rid, result in zip(unfinished, results):
                if isinstance(result, BaseException):
                    logger.warning("abort(%s) failed: %r", rid, result)


def hold_back(text: str, stops: list[str]) -> str:
    """`text` without a tail that could be the beginning of a stop string (it may yet be cut off)."""
    keep = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                keep = min(keep, len(text) - k)
                break
    return text[:keep]
