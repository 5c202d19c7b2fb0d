"""Waiting in tests for a condition, never for a fixed time.

A fixed sleep is either longer than needed or, on a loaded machine, too short, and then the test fails for no
reason in the code. These poll the condition itself and, past the deadline, fail naming what they waited for.
`stream_ended` is the event for "the engine has sent a request everything it will send", for tests of a
consumer that falls behind.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gemma.engine.async_engine import AsyncEngine
    from gemma.engine.outputs import RequestOutput


def _describe(condition: Callable[[], Any]) -> str:
    try:  # a lambda's source line says what it waits for
        return inspect.getsource(condition).strip()
    except (OSError, TypeError):
        return repr(condition)


async def until(
    condition: Callable[[], Any], timeout_s: float = 10.0, what: str | None = None, interval_s: float = 0.005
) -> Any:
    """Poll `condition` on the event loop until it is truthy (returned); TimeoutError after `timeout_s`.

    The default timeout is generous because the test machine is shared; a passing test waits only as long as
    the condition takes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not (value := condition()):
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what or _describe(condition)}")
        await asyncio.sleep(interval_s)
    return value


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll `condition` from this thread until it is truthy (returned); TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return value


def stream_ended(engine: AsyncEngine, request_id: str) -> asyncio.Event:
    """An event set once `engine` has handed `request_id` its last output or its step error: from then on the
    request's stream holds everything the engine will send it. It spies on `_deliver` / `_deliver_error`,
    through which every `AsyncEngine` hands outputs to its streams."""
    ended = asyncio.Event()
    deliver, deliver_error = engine._deliver, engine._deliver_error

    def spy_deliver(outputs: list[RequestOutput]) -> None:
        deliver(outputs)
        if any(out.request_id == request_id and out.finished for out in outputs):
            ended.set()

    def spy_deliver_error(request_ids: list[str], exc: Exception) -> None:
        deliver_error(request_ids, exc)
        if request_id in request_ids:
            ended.set()

    engine._deliver, engine._deliver_error = spy_deliver, spy_deliver_error
    return ended
