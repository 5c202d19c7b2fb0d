"""`AsyncEngineProcess`: an `AsyncEngine` whose `LLMEngine` steps in a child process of its own.

    engine = AsyncEngineProcess(functools.partial(LLMEngine.from_pretrained, "gemma-3-270m", "bfloat16"))
    async for out in engine.generate(prompt_token_ids, params, request_id): ...

Why a process: streaming outputs costs the server's process CPU for every token of every request (a Ray Serve
replica spends ~0.5 ms of Python per streamed item on a 2-core EPYC), and in one process that work holds the GIL
the engine's own Python (scheduling, sampling, detokenizing) needs between kernels. On a GPU, where a step is a
few milliseconds, it stretched every step: through Serve at 16 concurrent streams the engine made 45% fewer tokens
than alone (H100, 270M). vLLM moved its engine core out of the API server process for the same reason.

The child builds the engine with `factory()` (spawned: a picklable callable, e.g. a `functools.partial` of
`LLMEngine.from_pretrained`) on its main thread, which then runs every step, so one OpenMP team does all the
compute (gemma.torch_thread says why that matters). Between steps it makes the calls the parent queued
(add / abort) and, after each step, sends that step's outputs and the engine's counters in one message: one
message per step, whatever the number of requests. The parent's reader thread hands them to the event loop, and
its writer thread sends the calls (while the child is mid-step the pipe can fill, and the loop must not wait).
Everything else (per-request queues, coalescing for slow consumers, aborts when a consumer leaves) is
`AsyncEngine`'s, as for the in-process `AsyncLLMEngine`. The child exits when told to, and by itself when the
parent's end of the pipe closes (the parent died), so a killed server leaves no engine behind. A dead child fails
its requests and `check_health`.

Tensor parallelism stays in-process (`AsyncLLMEngine`): ranks 1..N-1 are launched from rank 0's process, which
here would be the child, and a Ray actor launcher needs a Ray worker process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import traceback
from concurrent.futures import Future
from collections.abc import Callable
from typing import Any

from gemma.engine.async_engine import AsyncEngine, EngineStepError, engine_info, engine_stats, rss_bytes
from gemma.engine.llm_engine import LLMEngine
from gemma.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # loading a model (weights, CUDA graphs, a CPU kernel's first build) can take minutes


class EngineProcessError(RuntimeError):
    """The engine's process failed to start or died."""


class AsyncEngineProcess(AsyncEngine):
    """An `AsyncEngine` over an engine in a child process (see the module doc).

    The constructor blocks until the child has built its engine (raising `EngineProcessError` with the child's
    traceback if it could not). The engine's state is read through `info()` and `stats()`.
    """

    def __init__(self, factory: Callable[[], LLMEngine], start_timeout_s: float = START_TIMEOUT_S) -> None:
        super().__init__()
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or OpenMP state
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(target=_child_main, args=(child_conn, factory), name="gemma-engine", daemon=True)
        self._process.start()
        child_conn.close()  # the child holds its end: EOF here means it is gone
        if not self._conn.poll(start_timeout_s):
            self._process.kill()
            raise EngineProcessError(f"the engine process did not start within {start_timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            kind, payload = "error", f"it exited with code {self._process.join(5) or self._process.exitcode}"
        if kind != "ready":
            self._process.join(5)
            raise EngineProcessError(f"the engine process failed to start:\n{payload}")
        self._info, self._stats = payload
        self._outbox: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="gemma-engine-writer", daemon=True)
        self._writer.start()
        self._next_call = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._dead: str | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        logger.info("engine process %d ready", self._process.pid)

    # ---- AsyncEngine ----

    def _start_reader(self) -> None:
        if self._reader is None:
            self._loop = asyncio.get_running_loop()
            self._reader = threading.Thread(target=self._read, name="gemma-engine-reader", daemon=True)
            self._reader.start()

    async def _call(self, name: str, *args: Any) -> Any:
        if self._dead is not None:
            raise EngineProcessError(f"the engine process is gone: {self._dead}")
        self._start_reader()
        call_id, self._next_call = self._next_call, self._next_call + 1
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        self._send(("call", call_id, name, args))
        return await future

    async def _abort_request(self, request_id: str) -> RequestOutput | None:
        if self._dead is not None or self._closed:
            return None
        return await self._call("abort_request", request_id)

    def info(self) -> dict[str, Any]:
        return dict(self._info)

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last message; `rss_bytes` adds this process's memory to the child's."""
        return {**self._stats, "rss_bytes": (self._stats["rss_bytes"] or 0) + (rss_bytes() or 0)}

    def check_health(self) -> None:
        if self._dead is not None or not self._process.is_alive():
            raise RuntimeError(f"the engine process is gone: {self._dead or f'exit code {self._process.exitcode}'}")

    async def shutdown(self) -> None:
        self.close()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (its engine stops its own workers) and wait for it; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._outbox.put(("stop",))
        self._process.join(timeout_s)
        if self._process.is_alive():
            logger.warning("engine process %d did not stop in %.0f s: killing it", self._process.pid, timeout_s)
            self._process.kill()
            self._process.join(5)
        try:
            self._conn.close()
        except OSError:  # at interpreter exit it may be closed already
            pass

    # ---- the pipe ----

    def _send(self, message: tuple) -> None:
        """Queue `message` for the writer thread: the pipe is full while the child is mid-step with calls unread,
        and the event loop must not wait for that step."""
        if self._dead is not None:
            raise EngineProcessError(f"the engine process is gone: {self._dead}")
        self._outbox.put(message)

    def _write(self) -> None:
        """The writer thread: sends queued messages in order until "stop" or a broken pipe."""
        while True:
            message = self._outbox.get()
            try:
                self._conn.send(message)
            except OSError:  # the child is gone: the reader reports it
                return
            except Exception as exc:  # noqa: BLE001 - this message cannot be pickled: fail its call only
                if self._conn.closed:
                    return
                if message[0] == "call":
                    self._to_loop(self._on_message, ("result", message[1], None, exc, self._stats))
                continue
            if message[0] == "stop":
                return

    def _read(self) -> None:
        """The reader thread: each message from the child goes to the event loop, in order."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError) as exc:
                reason = "stopped" if self._closed else f"the engine process died ({exc!r}, exit code {self._process.exitcode})"
                self._to_loop(self._on_dead, reason)
                return
            except Exception as exc:  # noqa: BLE001 - an unreadable message: the stream is unusable
                self._to_loop(self._on_dead, f"unreadable message from the engine process: {exc!r}")
                return
            if not self._to_loop(self._on_message, message):
                return

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            return False

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "outputs":
            _, outputs, self._stats = message
            self._deliver(outputs)
        elif kind == "result":
            _, call_id, result, error, self._stats = message
            future = self._pending.pop(call_id, None)
            if future is not None and not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)
        elif kind == "failed":
            _, request_ids, text, self._stats = message
            self._deliver_error(request_ids, RuntimeError(text))

    def _on_dead(self, reason: str) -> None:
        self._dead = reason
        if not self._closed:
            logger.error("engine process: %s", reason)
        error = EngineProcessError(f"the engine process is gone: {reason}")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        for request_id, stream in list(self._queues.items()):
            stream.put_nowait(EngineStepError(f"request {request_id} failed: {error}"))
        self._queues.clear()


def portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a ValueError or RuntimeError with its text: an exception the pipe cannot
    carry must fail its call, not the engine process."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(f"{type(exc).__name__}: {exc}")


def _grammar_of(message: tuple) -> Any:
    """The output constraint of an add_request call, if it has one."""
    if message[0] != "call" or message[2] != "add_request":
        return None
    params = message[3][2]
    return params.structured_outputs if params is not None else None


def _make_call(conn: Any, engine: LLMEngine, message: tuple) -> None:
    _, call_id, name, args = message
    try:
        result, error = getattr(engine, name)(*args), None
    except Exception as exc:  # noqa: BLE001 - the caller's error (ValueError for a bad request)
        result, error = None, portable(exc)
    conn.send(("result", call_id, result, error, engine_stats(engine)))


def _child_main(conn: Any, factory: Callable[[], LLMEngine]) -> None:
    """The engine process: build, then make queued calls and step until told to stop or orphaned."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine process %(levelname)s %(name)s: %(message)s")
    try:
        engine = factory()
        conn.send(("ready", (engine_info(engine), engine_stats(engine))))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
        return
    compiling: list[tuple[Future, tuple]] = []  # add_request calls waiting for their grammar to compile
    try:
        while True:
            busy = engine.has_unfinished_requests() or compiling
            # wait for calls while idle (waking each second to notice a parent that died without closing)
            while not busy and not conn.poll(1.0):
                if os.getppid() == 1:
                    return
            if not engine.has_unfinished_requests() and compiling:
                conn.poll(0.005)  # only compiles to wait for: do not spin
            while conn.poll(0):
                message = conn.recv()
                if message[0] == "stop":
                    return
                spec = _grammar_of(message)
                if spec is not None and engine.tokenizer is not None and not engine.grammar_compiler().cached(spec):
                    # compiled on the compiler's thread; the call is made once it is (the steps go on meanwhile)
                    compiling.append((engine.grammar_compiler().submit(spec), message))
                    continue
                _make_call(conn, engine, message)
            for item in [c for c in compiling if c[0].done()]:
                compiling.remove(item)
                _make_call(conn, engine, item[1])  # its compile error, if any, is raised again by add_request
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the engine
                logging.getLogger(__name__).exception("engine step failed")
                failed = [seq.request_id for seq in list(engine.scheduler.running)]
                for request_id in failed:
                    engine.abort_request(request_id)
                conn.send(("failed", failed, f"engine step failed: {exc!r}", engine_stats(engine)))
                continue
            conn.send(("outputs", outputs, engine_stats(engine)))
    except (EOFError, OSError, BrokenPipeError):  # the parent is gone
        return
    finally:
        engine.shutdown()
