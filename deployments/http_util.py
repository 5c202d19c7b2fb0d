"""HTTP plumbing of the ingress: OpenAI error bodies, request ids, and an SSE response that notices a client
leaving.

- `install(app)` makes every error an OpenAI body `{"error": {message, type, param, code}}`: FastAPI's
  validation errors and any ValueError (ours: `schemas.RequestError` with its status and param; Ray's
  `RayTaskError(ValueError)` from a deployment: its cause's message) are 400s, Starlette's HTTP errors keep
  their status (404 unknown route, 405), a full queue behind us (Serve's BackPressureError) is a 503 with
  Retry-After, so is a replica behind us that died or whose model step failed (`replica_failed`: Serve is
  replacing it, a retry is served), and anything else is a logged 500 whose body names only the request.
- Every response carries `X-Request-Id`: the client's when it is printable ASCII of at most 128 characters,
  else a generated `cmpl-<hex>` / `chatcmpl-<hex>` / `classify-<hex>` / `req-<hex>`; handlers read it with
  `request_id(request)`. In a Serve replica, Serve's HTTP server has already done this (the client's id or a
  uuid) and echoes the header itself: we adopt its id and leave the header to it (see `install`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments import schemas as s
from deployments.replica_logs import in_serve_replica
from gemma.engine.async_engine import EngineStepError

logger = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces: safe to echo and to log
_ID_PREFIX = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl", "/v1/classify": "classify"}


class OpenAIApp(FastAPI):
    """A FastAPI app whose handler for Serve's BackPressureError stays ours.

    A Serve replica registers its own handler for it on the ingress app at startup (a plain-text 503); ours
    answers with the OpenAI error body every other error has, plus Retry-After.
    """

    def add_exception_handler(self, exc_class_or_status_code: Any, handler: Any) -> None:
        if exc_class_or_status_code is BackPressureError and BackPressureError in self.exception_handlers:
            return
        super().add_exception_handler(exc_class_or_status_code, handler)


def install(app: FastAPI, echo_request_id: bool | None = None) -> None:
    """Add the request-id middleware and the OpenAI-body exception handlers to `app`.

    `echo_request_id`: whether our middleware adds the `X-Request-Id` response header; by default only outside
    a Serve replica, because Serve's HTTP servers (proxy or direct ingress) already put the client's id, or a
    uuid they generate, into the request headers and echo it in the response (their RequestIdMiddleware):
    we adopt that id, so the one the client sees is also the one in every Serve log line of the request.
    """
    app.add_middleware(RequestContext, echo=not in_serve_replica() if echo_request_id is None else echo_request_id)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(ValueError, _on_value_error)
    app.add_exception_handler(BackPressureError, _on_backpressure)
    app.add_exception_handler(RayActorError, _on_replica_failed)
    app.add_exception_handler(RayTaskError, _on_replica_failed)


def error_body(
    status: int, message: str, param: str | None = None, kind: str | None = None, code: int | str | None = None
) -> s.ErrorResponse:
    """`type` is vLLM's unless given: the status phrase in CamelCase + "Error" (BadRequestError, NotFoundError,
    ...); `code` is the status unless given."""
    phrase = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    kind = kind or f"{phrase.removesuffix('Error')}Error"
    return s.ErrorResponse(error=s.ErrorDetail(message=message, type=kind, param=param,
                                               code=status if code is None else code))


def error_response(status: int, message: str, param: str | None = None) -> Response:
    return json_response(error_body(status, message, param), status)


def json_response(body: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body.model_dump_json(), status_code=status, media_type="application/json", headers=headers)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """(message, param) for pydantic errors; param is the top-level field."""
    parts, param = [], None
    for err in errors[:3]:
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        param = param or (loc[0] if loc else None)
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object (Content-Type: application/json)")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif err.get("type") == "missing":
            parts.append(f"{where} is required" if where else "a JSON request body is required")
        else:
            parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts), param


async def _on_validation_error(_: Request, exc: RequestValidationError) -> Response:
    message, param = _validation_message(list(exc.errors()))
    return error_response(400, message, param)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail), None)


async def _on_value_error(request: Request, exc: ValueError) -> Response:
    """Invalid requests: ours (RequestError), pydantic's, and ValueErrors raised by a deployment, which Ray
    delivers as a RayTaskError that is also a ValueError and carries the original as `cause`."""
    if isinstance(exc, s.RequestError):
        status, message, param = exc.status, exc.message, exc.param
    elif isinstance(exc, ValidationError):
        status, (message, param) = 400, _validation_message(exc.errors())
    else:
        cause = getattr(exc, "cause", None)
        status, message, param = 400, str(cause if isinstance(cause, BaseException) else exc), None
    logger.info("request %s rejected (%d): %s", request_id(request), status, message)
    return error_response(status, message, param)


REPLICA_FAILED = "the replica serving this request failed and is being replaced; retry"


def replica_failed(exc: BaseException) -> bool:
    """A fault of the replica, not of the request: its actor died or went away (a killed or crashed replica,
    a lost node), or its engine step failed (a tensor-parallel worker died): the request may be retried."""
    if isinstance(exc, RayActorError):
        return True
    cause = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
    return isinstance(cause, (RayActorError, EngineStepError))


async def _on_replica_failed(request: Request, exc: Exception) -> Response:
    """Also picks up a RayTaskError(ValueError) first (its class puts RayTaskError before ValueError)."""
    if not replica_failed(exc):
        if isinstance(exc, ValueError):
            return await _on_value_error(request, exc)
        raise exc  # any other error inside a deployment: ours, a logged 500 (RequestContext)
    logger.warning("request %s failed with its replica: %r", request_id(request), exc)
    response = error_response(503, REPLICA_FAILED)
    response.headers["Retry-After"] = "1"
    return response


async def _on_backpressure(request: Request, exc: BackPressureError) -> Response:
    """A deployment behind us is full (its max_queued_requests): refuse now, tell the client when to retry."""
    logger.warning("request %s refused: %s", request_id(request), exc)
    response = error_response(503, "the server is overloaded (every replica's queue is full); retry later")
    response.headers["Retry-After"] = "1"
    return response


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id") or f"req-{uuid.uuid4().hex}"


class RequestContext:
    """ASGI middleware: gives each HTTP request its id (state.request_id and, with `echo`, the X-Request-Id
    response header) and turns an exception nothing else handled into a 500 OpenAI body, so the server
    keeps serving."""

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app, self.echo = app, echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        generated = not _CLIENT_ID.fullmatch(sent)
        rid = f"{_ID_PREFIX.get(scope.get('path', ''), 'req')}-{uuid.uuid4().hex}" if generated else sent
        scope["state"] = {**scope.get("state", {}), "request_id": rid, "request_id_generated": generated}
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            if message["type"] == "http.response.start" and self.echo:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # too late for an error body; the server closes the connection
                raise
            logger.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            await error_response(500, f"internal server error (request {rid})")(scope, receive, send_with_id)


class EventStream(StreamingResponse):
    """SSE that stops, and closes its event generator (whose cleanup aborts the generation), as soon as the
    client disconnects. Starlette listens for `http.disconnect` only below ASGI 2.4 and otherwise waits for
    a failed write, which may not come while the model is still busy with a long prompt; this always listens."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self.stream_response(send))
        listen = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({stream, listen}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, listen):
                task.cancel()
            await asyncio.wait({stream, listen})
            await self.body_iterator.aclose()  # type: ignore[union-attr]
        if not stream.cancelled() and isinstance(stream.exception(), OSError):
            logger.info("client went away mid-stream: %r", stream.exception())  # a write to a closed connection
        elif not stream.cancelled():
            stream.result()
