"""The model streams behind one HTTP request, and what a stream may show before it ends.

`ModelStreams` starts one `generate` stream per prompt on a model deployment handle and reads them together,
in the order outputs arrive. `close()` is the one way to end it early: it cancels the handle streams and
aborts the engine requests that did not finish (cancellation alone may not reach a replica).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from gemma.engine.outputs import RequestOutput
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)


class ModelStreams:
    """The model streams of one HTTP request (one per prompt), read together in the order outputs arrive.

    `start()` waits for each stream's first output so that a request the model rejects (it raises before
    yielding) fails before any HTTP response has begun. `close()` cancels what still runs and aborts the
    engine requests that did not finish; it is idempotent.
    """

    def __init__(self, model: Any, prompts: list[list[int]], params: SamplingParams, engine_ids: list[str]) -> None:
        self.model, self.engine_ids = model, engine_ids
        self.finished: set[int] = set()
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
                self._queue.put_nowait((i, out))
            self._queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            self._queue.put_nowait((i, exc))

    async def start(self) -> None:
        waiting = set(self._open)
        while waiting:
            event = await self._queue.get()
            if isinstance(event[1], BaseException):
                raise event[1]
            self._pending.append(event)
            waiting.discard(event[0])

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            i, item = self._pending.pop(0) if self._pending else await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._open.discard(i)
                continue
            if item.finished:
                self.finished.add(i)
            yield i, item

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
