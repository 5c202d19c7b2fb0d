"""Driving an `LLMEngine` to completion in tests."""

from __future__ import annotations

from collections.abc import Callable

from gemma.engine import LLMEngine
from gemma.sampling import SamplingParams


def run(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]],
        check: Callable[[LLMEngine], object] | None = None) -> list:
    """Add every request (ids "0", "1", ...), step until all finish (calling `check(engine)` after each step), and
    return their final outputs in request order."""
    for i, (p, params) in enumerate(requests):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check:
            check(engine)
    return [done[str(i)] for i in range(len(requests))]
