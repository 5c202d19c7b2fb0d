"""The HTTP front door: OpenAI-compatible routes over the tokenizer, model and classifier deployments.

`Ingress(model, tokenizer, classifier=None, served_model_name="gemma", classifier_name=None)` takes Serve
DeploymentHandles (or anything with their API: `await h.method.remote(...)`, and
`h.options(stream=True).method.remote(...)` async-iterable) and builds its FastAPI app in `__init__`; Serve
gets it from `__serve_build_asgi_app__` (`serve.deployment(serve.ingress()(Ingress))`). No model logic here:
text becomes ids through the tokenizer handle, ids become outputs through the model handle.

Contracts (errors and request ids: deployments/http_util.py):
- The response `id` is the request id (`X-Request-Id`). Unknown model names are 404s; everything the engine
  would reject (context length, token ids out of the vocabulary) is a 400 naming the field before any stream
  starts, using the model's `model_info()` (fetched once).
- Prompts and `n` run concurrently; choice `index` is `prompt_index * n + i`.
- Streams are SSE: one event per model output as it arrives (chat opens with a role event per choice), the
  choice's last with its `finish_reason`, a usage event with `stream_options.include_usage`, then
  `data: [DONE]`; an error after the first event is sent in-band as an error event before [DONE]. Text that
  could be the start of a stop string is held back until it cannot, so the deltas add up to the
  non-streamed text. A client that goes away cancels the model streams and aborts their engine requests.
- Logprobs: token strings from the tokenizer handle's `decode_tokens(ids) -> list[str]` (cached by id).
  Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`, top_logprobs holding the top-N and the
  chosen token (vLLM's convention); chat: `content[{token, logprob, bytes, top_logprobs[N]}]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from deployments import schemas as s
from deployments.http_util import (
    EventStream,
    OpenAIApp,
    error_body,
    error_response,
    install,
    json_response,
    request_id,
)
from deployments.streams import ModelStreams, hold_back
from gemma.engine.outputs import CompletionOutput, RequestOutput
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)

MAX_CHOICES = 256  # prompts x n (or classify inputs) per request: a bound on what one request may queue
LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way


def _lp(value: float | None) -> float:
    return LOGPROB_FLOOR if value is None else max(value, LOGPROB_FLOOR)


@dataclass
class _Choice:
    """What has been sent of one choice."""

    text: int = 0  # characters
    tokens: int = 0
    offset: int = 0  # text_offset of the next logprob token
    finished: bool = False


@dataclass
class _Job:
    """One completion or chat request on its way through the model."""

    id: str
    model: str
    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, completion_tokens: int) -> s.UsageInfo:
        prompt = sum(len(p) for p in self.prompts)
        return s.UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens)


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


# ---- the app ---------------------------------------------------------------------------------------------


class Ingress:
    """OpenAI-compatible routes; see the module docstring. `app` is the FastAPI application."""

    def __init__(
        self, model: Any, tokenizer: Any, classifier: Any = None, served_model_name: str = "gemma",
        classifier_name: str | None = None,
    ) -> None:
        self.model, self.tokenizer, self.classifier = model, tokenizer, classifier
        self.served_model_name, self.classifier_name = served_model_name, classifier_name
        self._model_info: dict[str, Any] | None = None  # fixed for the life of a model deployment
        self._token_texts: dict[int, str] = {}
        self._background: set[asyncio.Task] = set()
        self._fastapi = self._build_app()

    @property
    def app(self) -> FastAPI:
        # a property, not an attribute: Serve's ASGI wrapper class defines a read-only `app` of its own
        return self._fastapi

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._fastapi

    def _build_app(self) -> FastAPI:
        app = OpenAIApp(title="Gemma on Ray Serve", summary="OpenAI-compatible completions, chat and classification")
        install(app)

        @app.post("/v1/completions", response_model=None)
        async def completions(body: s.CompletionRequest, request: Request) -> Response:
            return await self.create_completion(body, request)

        @app.post("/v1/chat/completions", response_model=None)
        async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
            return await self.create_chat_completion(body, request)

        @app.post("/v1/classify", response_model=None)
        async def classify(body: s.ClassifyRequest, request: Request) -> Response:
            return await self.classify(body, request)

        @app.post("/v1/tokenize", response_model=None)
        async def tokenize(body: s.TokenizeRequest) -> Response:
            return await self.tokenize(body)

        @app.post("/v1/detokenize", response_model=None)
        async def detokenize(body: s.DetokenizeRequest) -> Response:
            return await self.detokenize(body)

        @app.get("/v1/models", response_model=None)
        async def models() -> Response:
            return await self.list_models()

        @app.get("/health", response_model=None)
        async def health() -> Response:
            return await self.health()

        return app

    # ---- routes ----

    async def create_completion(self, body: s.CompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = body.to_sampling_params()
        _check_count(len(body.prompts) * params.n, "n")  # before any work for the prompts
        prompts = await asyncio.gather(*(
            self.tokenizer.encode.remote(p, add_special_tokens=body.add_special_tokens) if isinstance(p, str)
            else _done(list(p)) for p in body.prompts
        ))
        await self._check_prompts(prompts, params, "prompt", "max_tokens")
        job = _Job(request_id(request), self.served_model_name, False, prompts, params, body.include_usage)
        return await self._run(job, body.stream, request)

    async def create_chat_completion(self, body: s.ChatCompletionRequest, request: Request) -> Response:
        self._check_model(body.model)
        params = body.to_sampling_params()
        _check_count(params.n, "n")
        ids = await self.tokenizer.encode_chat.remote(body.chat_messages(), add_generation_prompt=body.add_generation_prompt)
        await self._check_prompts([ids], params, "messages", body.max_tokens_param)
        job = _Job(request_id(request), self.served_model_name, True, [ids], params, body.include_usage)
        return await self._run(job, body.stream, request)

    async def classify(self, body: s.ClassifyRequest, request: Request) -> Response:
        if self.classifier is None:
            raise s.RequestError("classification is not enabled on this server (it has no classifier_model)", None, 404)
        self._check_model(body.model, self.classifier_name)
        _check_count(len(body.inputs), "input")
        results = await asyncio.gather(*(self.classifier.classify.remote(x) for x in body.inputs))
        tokens = sum(r.get("num_tokens", 0 if isinstance(x, str) else len(x)) for x, r in zip(body.inputs, results))
        data = [s.ClassifyData(index=i, label=r["label"], probs=r["probs"], num_classes=r["num_classes"])
                for i, r in enumerate(results)]
        usage = s.UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
        name = body.model or self.classifier_name or self.served_model_name
        return json_response(s.ClassifyResponse(id=request_id(request), model=name, data=data, usage=usage))

    async def tokenize(self, body: s.TokenizeRequest) -> Response:
        self._check_model(body.model)
        if body.messages is not None:
            messages = [m.model_dump(exclude_none=True) for m in body.messages]
            ids = await self.tokenizer.encode_chat.remote(messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = await self.tokenizer.encode.remote(body.prompt, add_special_tokens=body.add_special_tokens)
        info = await self.model_info()
        return json_response(s.TokenizeResponse(count=len(ids), max_model_len=info["max_model_len"], tokens=ids))

    async def detokenize(self, body: s.DetokenizeRequest) -> Response:
        self._check_model(body.model)
        text = await self.tokenizer.decode.remote(body.tokens, skip_special_tokens=False)
        return json_response(s.DetokenizeResponse(prompt=text))

    async def list_models(self) -> Response:
        info = await self.model_info()
        cards = [s.ModelCard(id=self.served_model_name, root=info.get("model"), max_model_len=info["max_model_len"])]
        if self.classifier is not None and self.classifier_name not in (None, self.served_model_name):
            cards.append(s.ModelCard(id=self.classifier_name))
        return json_response(s.ModelList(data=cards))

    async def health(self) -> Response:
        try:
            await self.model.check_health.remote()
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            logger.warning("health check failed: %r", exc)
            return error_response(503, f"the model deployment is unhealthy: {exc}")
        return Response(status_code=200)

    async def model_info(self) -> dict[str, Any]:
        if self._model_info is None:
            self._model_info = await self.model.model_info.remote()
        return self._model_info

    # ---- checks ----

    def _check_model(self, name: str | None, other: str | None = None) -> None:
        if name is not None and name not in (self.served_model_name, other):
            raise s.RequestError(f"The model `{name}` does not exist.", "model", 404)

    async def _check_prompts(self, prompts: list[list[int]], params: SamplingParams, prompt: str, max_tokens: str) -> None:
        """What the engine would reject, as 400s naming the field (before any stream starts)."""
        info = await self.model_info()
        limit, vocab = info["max_model_len"], info["vocab_size"]
        if any(t >= vocab for t in params.stop_token_ids):
            raise s.RequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        for ids in prompts:
            if not ids:
                raise s.RequestError(f"{prompt} is empty", prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise s.RequestError(f"{prompt}: token ids must be in [0, {vocab})", prompt)
            if len(ids) >= limit:
                raise s.RequestError(f"{prompt}: {len(ids)} tokens, but this model's maximum context length is {limit} "
                                     "tokens, prompt and completion together", prompt)
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                raise s.RequestError(
                    f"this model's maximum context length is {limit} tokens, but {prompt} ({len(ids)} tokens) + "
                    f"{max_tokens} ({params.max_tokens}) = {len(ids) + params.max_tokens}: reduce one of them", max_tokens)

    # ---- generation ----

    async def _run(self, job: _Job, stream: bool, request: Request) -> Response:
        state = request.scope.get("state", {})
        suffix = "" if state.get("request_id_generated", True) else f"-{uuid.uuid4().hex[:8]}"  # client ids may repeat
        engine_ids = [f"{job.id}-{i}{suffix}" for i in range(len(job.prompts))]
        gen = ModelStreams(self.model, job.prompts, job.params, engine_ids)
        if not stream:
            try:
                return await self._collect(job, gen)
            finally:
                self._spawn(gen.close())
        try:
            await gen.start()
        except BaseException:
            self._spawn(gen.close())
            raise
        return EventStream(self._events(job, gen), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, job: _Job, gen: ModelStreams) -> Response:
        finals: dict[int, RequestOutput] = {}
        async for i, out in gen.outputs():
            if out.finished:
                finals[i] = out
        n, choices, used = job.params.n, [], 0
        for i in sorted(finals):
            for o in finals[i].outputs:
                logprobs, _ = await self._logprobs(job, o.token_ids, o.logprobs, 0)
                choices.append(self._choice(job, i * n + o.index, o, logprobs))
                used += len(o.token_ids)
        cls = s.ChatCompletionResponse if job.chat else s.CompletionResponse
        return json_response(cls(id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage(used)))

    async def _events(self, job: _Job, gen: ModelStreams) -> AsyncIterator[str]:
        n, stops = job.params.n, job.params.stop
        sent = {i * n + k: _Choice() for i in range(len(job.prompts)) for k in range(n)}
        try:
            if job.chat:  # OpenAI opens each chat choice with the assistant role
                for index in sent:
                    yield self._chunk(job, index, s.DeltaMessage(role="assistant", content=""), None, None)
            async for i, out in gen.outputs():
                for o in out.outputs:
                    choice = sent[i * n + o.index]
                    if choice.finished:
                        continue
                    text = o.text if o.finished else hold_back(o.text, stops)
                    delta, new_tokens = text[choice.text:], o.token_ids[choice.tokens:]
                    steps = o.logprobs[choice.tokens:] if o.logprobs is not None else None
                    logprobs, choice.offset = await self._logprobs(job, new_tokens, steps, choice.offset)
                    if not delta and not (logprobs and new_tokens) and not o.finished:
                        continue
                    choice.text, choice.tokens, choice.finished = max(choice.text, len(text)), len(o.token_ids), o.finished
                    content = s.DeltaMessage(content=delta) if job.chat else delta
                    yield self._chunk(job, i * n + o.index, content, logprobs, o if o.finished else None)
            if job.include_usage:
                usage = job.usage(sum(c.tokens for c in sent.values()))
                cls = s.ChatCompletionChunk if job.chat else s.CompletionChunk
                yield _sse(cls(id=job.id, created=job.created, model=job.model, choices=[], usage=usage))
        except Exception as exc:  # the status line is sent: report in-band, as vLLM does
            invalid = isinstance(exc, ValueError)  # a RayTaskError(ValueError) carries the original as `cause`
            logger.log(logging.INFO if invalid else logging.ERROR, "stream %s failed", job.id, exc_info=not invalid)
            cause = getattr(exc, "cause", None)
            message = str(cause if isinstance(cause, BaseException) else exc) if invalid else "internal server error"
            yield _sse(error_body(400 if invalid else 500, message))
        finally:
            self._spawn(gen.close())
        yield "data: [DONE]\n\n"

    def _choice(self, job: _Job, index: int, o: CompletionOutput, logprobs: Any) -> BaseModel:
        if job.chat:
            return s.ChatChoice(index=index, message=s.AssistantMessage(content=o.text), logprobs=logprobs,
                                finish_reason=o.finish_reason, stop_reason=o.stop_reason)
        return s.CompletionChoice(index=index, text=o.text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason)

    def _chunk(self, job: _Job, index: int, content: Any, logprobs: Any, final: CompletionOutput | None) -> str:
        reason = final.finish_reason if final is not None else None
        if job.chat:
            choice = s.ChatStreamChoice(index=index, delta=content, logprobs=logprobs, finish_reason=reason)
            return _sse(s.ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[choice]))
        choice = s.CompletionChoice(index=index, text=content, logprobs=logprobs, finish_reason=reason,
                                    stop_reason=final.stop_reason if final is not None else None)
        return _sse(s.CompletionChunk(id=job.id, created=job.created, model=job.model, choices=[choice]))

    async def _logprobs(
        self, job: _Job, tokens: list[int], steps: list[dict[int, float]] | None, offset: int
    ) -> tuple[s.CompletionLogprobs | s.ChatLogprobs | None, int]:
        """The logprobs of `tokens` (OpenAI's completions or chat shape) and the text offset after them."""
        if job.params.logprobs is None or steps is None:
            return None, offset
        texts = await self._texts({t for step in steps for t in step} | set(tokens))
        if job.chat:
            top = job.params.logprobs
            content = [
                s.ChatLogprobToken(
                    token=texts[t], logprob=_lp(step.get(t)), bytes=list(texts[t].encode()),
                    top_logprobs=[s.TopLogprob(token=texts[a], logprob=_lp(v), bytes=list(texts[a].encode()))
                                  for a, v in sorted(step.items(), key=lambda kv: -kv[1])[:top]],
                )
                for t, step in zip(tokens, steps)
            ]
            return s.ChatLogprobs(content=content), offset
        out = s.CompletionLogprobs()
        for t, step in zip(tokens, steps):
            out.tokens.append(texts[t])
            out.token_logprobs.append(_lp(step.get(t)))
            # tokens with the same text share a key (byte-fallback pieces all read "\ufffd"): the chosen one wins
            out.top_logprobs.append({texts[a]: _lp(v) for a, v in step.items() if a != t} | {texts[t]: _lp(step.get(t))})
            out.text_offset.append(offset)
            offset += len(texts[t])
        return out, offset

    async def _texts(self, ids: set[int]) -> dict[int, str]:
        """Each token's own text, from the tokenizer's `decode_tokens`; cached (a vocabulary is finite)."""
        missing = sorted(ids - self._token_texts.keys())
        if missing:
            if len(self._token_texts) + len(missing) > 1 << 18:  # bounded: start over rather than grow
                self._token_texts.clear()
                missing = sorted(ids)
            texts = await self.tokenizer.decode_tokens.remote(missing)
            self._token_texts.update(zip(missing, texts))
        return self._token_texts

    def _spawn(self, coro: Coroutine) -> None:
        """Run cleanup in its own task: it must finish even when the request's task is being cancelled."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _done(value: Any) -> Any:
    return value


def _check_count(count: int, param: str) -> None:
    if count > MAX_CHOICES:
        raise s.RequestError(f"{param}: at most {MAX_CHOICES} completions (prompts x n) or inputs per request", param)
