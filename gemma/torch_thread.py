"""One thread for all of a process's PyTorch compute, for servers whose event loop must stay free.

PyTorch's CPU kernels run on an OpenMP team that belongs to the calling thread. A second thread that runs them
makes a second team, and from then on libgomp sees more threads than cores and stops spin-waiting between
parallel regions: every one of a decode step's hundreds of small ops then pays a futex wake-up. Measured on the
270M in bf16, 2 cores: 53-58 ms per decode step with the model loaded and stepped on one thread, 82-105 ms with
loading on the main thread and steps on another (and main-thread steps stay slow after that too).

So a server loads its model with `call(...)` and runs every forward with `run(...)` (awaitable), both on this
one thread; the event loop never runs a kernel itself.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def executor() -> ThreadPoolExecutor:
    """The process's PyTorch thread (a one-thread pool, started on first use)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gemma-torch")
        return _executor


def on_thread() -> bool:
    """Whether the caller is the PyTorch thread."""
    return threading.current_thread().name.startswith("gemma-torch")


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn(*args, **kwargs)` on the PyTorch thread and wait for it (for constructors: loading a model)."""
    if on_thread():
        return fn(*args, **kwargs)
    return executor().submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], *args: Any) -> T:
    """Await `fn(*args)` run on the PyTorch thread; the event loop serves others meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)
