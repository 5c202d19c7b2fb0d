"""What the ingress enforces and records around every request: API keys, limits, and one access-log line.

- `Limits` (`AppArgs.limits`): per-request bounds. Each exceeded one is a 4xx whose message names the request
  field, the value and the limit ("n: 20 is more than this server allows (max_n is 16)"): the body size a 413,
  counts and token numbers a 400, the time a 408 (`within_deadline` for handlers; once a stream has begun, an
  in-band error event before `data: [DONE]`), and the generation is aborted.
- `ApiKeys`: optional Bearer keys, from `AppArgs.api_keys` and the environment variable GEMMA_API_KEYS (comma
  separated, read where the ingress runs). Only SHA-256 digests are kept; a key is checked against every digest
  with `hmac.compare_digest`, so the time taken says nothing about which key, or how much of one, matched.
- `Guard` (ASGI middleware, inside `http_util.RequestContext` so it knows the request id), for each HTTP request:
  401 without a valid key (every route but /health, unknown ones included), 413 for a body past
  `max_request_bytes` (from Content-Length, or by counting while it is read: no more than the limit and one
  chunk is ever held), the request's deadline (`deadline(request)`), then one line on the logger `gemma.access`
  (in a Serve replica: its log file, see deployments/replica_logs.py):

      request_id=cmpl-.. method=POST route=/v1/completions status=200 model=tiny prompt_tokens=12
      output_tokens=16 ttft_s=0.031 total_s=0.412 finish_reason=length error=- stream=false

  (also as `record.access`, a dict, for structured handlers). TTFT and total time are measured here, at the
  ingress; `error` is the error type of a failed request, in-band stream errors included, and each is counted
  in `gemma_request_errors_total{type}`. The prompt (text or ids, truncated) is added as `prompt=` only with
  `log_prompts`; keys and headers are never logged. A client that leaves first is logged with status 499.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import schemas as s
from deployments.http_util import error_body, error_response, json_response
from deployments.metrics import Metrics
from deployments.streams import DeadlineExceeded
from gemma.sampling import SamplingParams

access_logger = logging.getLogger("gemma.access")

API_KEYS_ENV = "GEMMA_API_KEYS"
OPEN_PATHS = frozenset({"/health"})  # answered without a key: load balancers and probes have none
MAX_LOGGED_PROMPT = 2000  # characters of a prompt in an access line (with log_prompts)


class Limits(BaseModel):
    """Per-request limits of the HTTP API (`AppArgs.limits`); None means no limit of its own."""

    model_config = ConfigDict(extra="forbid")

    max_request_bytes: int = Field(1 << 20, ge=1)  # request body (413); refused before it is read past this
    max_prompt_tokens: int | None = Field(None, ge=1)  # tokens of one prompt; None: the context length bounds it
    max_tokens: int | None = Field(None, ge=1)  # max_tokens / max_completion_tokens; also the default for requests
    #                                            that give none (None: up to the context length)
    max_n: int = Field(16, ge=1)  # completions per prompt
    max_choices: int = Field(256, ge=1)  # prompts x n of one completions request
    max_stop: int = Field(16, ge=0)  # stop strings per request
    max_messages: int = Field(256, ge=1)  # chat messages per request
    max_classify_inputs: int = Field(256, ge=1)  # inputs of one /v1/classify request
    max_schema_bytes: int = Field(65536, ge=1)  # an output constraint's JSON schema / regex / grammar / choices
    max_schema_depth: int = Field(32, ge=1)  # nesting of a JSON schema (objects and arrays within each other)
    request_timeout_s: float | None = Field(580.0, gt=0)  # from arrival at the ingress; then the generation is
    #                                                        aborted: keep it below Serve's http request_timeout_s

    def check(self, name: str, value: int, param: str, what: str = "") -> None:
        """A 400 naming `param` when `value` is over the limit `name`."""
        limit = getattr(self, name)
        if limit is not None and value > limit:
            raise s.RequestError(
                f"{param}: {value}{what} is more than this server allows ({name} is {limit})", param)

    def check_sampling(self, params: SamplingParams, prompts: int, max_tokens: str) -> SamplingParams:
        """n, prompts x n, stop strings and max_tokens (named `max_tokens` in the request) of a generation."""
        self.check("max_n", params.n, "n")
        self.check("max_choices", prompts * params.n, "n", f" completions ({prompts} prompts x n)")
        self.check("max_stop", len(params.stop), "stop", " stop strings")
        self.check("max_tokens", params.max_tokens or 0, max_tokens)
        return params

    def check_structured(self, params: SamplingParams, param: str) -> None:
        """The size and nesting of the output constraint (compiling it costs time and memory in the engine)."""
        spec = params.structured_outputs
        if spec is None:
            return
        value = getattr(spec, spec.kind)
        text = value if isinstance(value, str) else json.dumps(value)
        self.check("max_schema_bytes", len(text.encode()), param, " bytes")
        self.check("max_schema_depth", _depth(value), param, " levels of nesting")

    def timeout_error(self) -> s.RequestError:
        return s.RequestError(f"the request took longer than this server allows (request_timeout_s is "
                              f"{self.request_timeout_s:g} s) and was aborted", None, 408)


def _depth(value: Any) -> int:
    """How deeply dicts and lists nest in `value` (iterative: the nesting is the client's choice)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack += [(x, depth) for x in (item.values() if isinstance(item, dict) else item)]
    return deepest


class ApiKeys:
    """Bearer keys, kept as digests and compared in constant time; empty means no authentication."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [_digest(k.encode()) for k in {k.strip() for k in keys} if k]

    @classmethod
    def from_config(cls, keys: Iterable[str] = (), environ: dict[str, str] | None = None) -> ApiKeys:
        """`keys` plus the comma-separated GEMMA_API_KEYS of `environ` (default: this process's environment)."""
        env = (os.environ if environ is None else environ).get(API_KEYS_ENV, "")
        return cls([*keys, *env.split(",")])

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self)} keys)"

    def allows(self, authorization: str | None) -> bool:
        scheme, _, key = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given, ok = _digest(key.strip().encode()), False
        for digest in self._digests:  # no early exit: every key is compared
            ok |= hmac.compare_digest(digest, given)
        return ok


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()  # equal lengths: compare_digest's time depends on neither key


@dataclass
class AccessRecord:
    """What a handler reports about its request for the access line (set in `request.state.access`)."""

    model: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    first_token_time: float | None = None  # time.monotonic() when the first generated token reached the ingress
    finish_reasons: list[str] = field(default_factory=list)
    error: str | None = None  # the error type of a failure the status code does not show (in-band, in a stream)
    prompt: Any = None  # only with log_prompts


def access(request: Request) -> AccessRecord:
    """The request's access record (a throwaway one when no Guard runs, as in apps built without it)."""
    state = request.scope.setdefault("state", {})
    return state.setdefault("access", AccessRecord())


def deadline(request: Request) -> float | None:
    """When the request must be done, on the event loop's clock (`loop.time()`); None: no limit."""
    return request.scope.get("state", {}).get("deadline")


async def within_deadline(request: Request, limits: Limits, work: Coroutine[Any, Any, Response]) -> Response:
    """`work` (a handler) within the request's deadline: past it, `work` is cancelled (its cleanup aborts what it
    started) and the client gets a 408. A stream the handler returns keeps to the deadline on its own."""
    end, loop = deadline(request), asyncio.get_running_loop()
    if end is None:
        return await work
    try:
        return await asyncio.wait_for(work, max(end - loop.time(), 0))
    except (asyncio.TimeoutError, DeadlineExceeded) as exc:
        if isinstance(exc, DeadlineExceeded) or loop.time() >= end:
            raise limits.timeout_error() from None
        raise


def error_type(status: int) -> str | None:
    if status < 400:
        return None
    named = {401: "authentication", 403: "authentication", 404: "not_found", 405: "not_found", 408: "timeout",
             413: "too_large", 429: "overloaded", 503: "overloaded"}
    return named.get(status, "internal" if status >= 500 else "validation")


class Guard:
    """ASGI middleware: API keys, body size, the request deadline, the access line and error counts (module doc)."""

    def __init__(
        self, app: ASGIApp, keys: ApiKeys, limits: Limits, metrics: Metrics, log_prompts: bool = False
    ) -> None:
        self.app, self.keys, self.limits, self.metrics, self.log_prompts = app, keys, limits, metrics, log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, record = time.monotonic(), AccessRecord()
        state = scope.setdefault("state", {})
        state["access"] = record
        if self.limits.request_timeout_s is not None:
            state["deadline"] = asyncio.get_running_loop().time() + self.limits.request_timeout_s
        status: int | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            authorization = _header(scope, b"authorization")
            if self.keys and scope.get("path") not in OPEN_PATHS and not self.keys.allows(authorization):
                await _unauthorized(authorization is None)(scope, receive, send_status)
                return
            body_receive = await self._read_body(scope, receive, send_status)
            if body_receive is not None:
                await self.app(scope, body_receive, send_status)
        except asyncio.CancelledError:
            status = status or 499  # the client went away first (nginx's "client closed request")
            raise
        except Exception:
            status = status or 500
            raise
        finally:
            self._log(scope, record, status, started)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """The body read up to the limit and replayed to the app; None after answering 413."""
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return receive
        limit = self.limits.max_request_bytes
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > limit:
            await self._too_large(int(length), scope, receive, send)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                replay = [message]
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._too_large(size, scope, receive, send, "at least ")
                return None
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replayed() -> Message:
            return replay.pop(0) if replay else await receive()

        return replayed

    async def _too_large(self, size: int, scope: Scope, receive: Receive, send: Send, qualifier: str = "") -> None:
        limit = self.limits.max_request_bytes
        message = (f"the request body ({qualifier}{size} bytes) is larger than this server allows "
                   f"(max_request_bytes is {limit})")
        await error_response(413, message)(scope, receive, send)

    def _log(self, scope: Scope, record: AccessRecord, status: int | None, started: float) -> None:
        kind = record.error or error_type(status or 500)
        if kind is not None and status != 499:
            self.metrics.inc("request_errors", type=kind)
        fields = {
            "request_id": scope.get("state", {}).get("request_id", "-"), "method": scope.get("method"),
            "route": scope.get("path", "")[:256], "status": status, "model": record.model,
            "prompt_tokens": record.prompt_tokens, "output_tokens": record.output_tokens,
            "ttft_s": None if record.first_token_time is None else round(record.first_token_time - started, 4),
            "total_s": round(time.monotonic() - started, 4),
            "finish_reason": ",".join(sorted(set(record.finish_reasons))) or None, "error": kind,
            "stream": record.stream,
        }
        if self.log_prompts and record.prompt is not None:
            text = record.prompt if isinstance(record.prompt, str) else json.dumps(record.prompt, ensure_ascii=False)
            fields["prompt"] = text[:MAX_LOGGED_PROMPT] + ("..." if len(text) > MAX_LOGGED_PROMPT else "")
        access_logger.info(" ".join(f"{k}={_logfmt(v)}" for k, v in fields.items()), extra={"access": fields})


_PLAIN = re.compile(r"[\w.,:/+-]+")


def _logfmt(value: Any) -> str:
    """One logfmt value: bare when safe, else a JSON string (quotes, spaces and newlines escaped)."""
    if value is None:
        return "-"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if _PLAIN.fullmatch(text) else json.dumps(text, ensure_ascii=False)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _unauthorized(missing: bool) -> Response:
    """OpenAI's 401: code `invalid_api_key` (its client raises AuthenticationError); the key is never echoed."""
    message = "no API key: send it as 'Authorization: Bearer <key>'" if missing else "invalid API key"
    body = error_body(401, message, kind="AuthenticationError", code="invalid_api_key")
    return json_response(body, 401, headers={"WWW-Authenticate": "Bearer"})
