"""The HTTP front door: OpenAI-compatible routes over the tokenizer, model and classifier deployments.

`Ingress(model, tokenizer, classifier=None, served_model_name="gemma", classifier_name=None, limits=None,
api_keys=None, log_prompts=False, metrics=None)` takes Serve DeploymentHandles (or anything with their API:
`await h.method.remote(...)`, and `h.options(stream=True).method.remote(...)` async-iterable) and builds its
FastAPI app in `__init__`; Serve gets it from `__serve_build_asgi_app__` (`serve.deployment(serve.ingress()(Ingress))`).
No model logic here: text becomes ids through the tokenizer handle, ids become outputs through the model handle.

Contracts (errors and request ids: deployments/http_util.py; API keys, limits, access log: deployments/guards.py):
- The response `id` is the request id (`X-Request-Id`). Unknown model names are 404s; everything the engine
  would reject (context length, token ids out of the vocabulary) is a 400 naming the field before any stream
  starts, using the model's `model_info()` (fetched once).
- Prompts and `n` run concurrently; choice `index` is `prompt_index * n + i`.
- Limits (`guards.Limits`) are checked before any work they bound; past `request_timeout_s` the generation is
  aborted: a 408, or in a stream an in-band error (code 408) before [DONE].
- Streams are SSE: one event per model output as it arrives (chat opens with a role event per choice), the
  choice's last with its `finish_reason`, a usage event with `stream_options.include_usage`, then
  `data: [DONE]`; with `stream_options.continuous_usage_stats` every event also carries `usage`, the request's
  running totals (the last equals the non-streamed usage); an error after the first event is sent in-band as
  an error event before [DONE]. Text that could be the start of a stop string is held back until it cannot,
  so the deltas add up to the non-streamed text. A client that goes away cancels the model streams and aborts
  their engine requests.
- LoRA adapters (`lora_modules`, name -> path): a request names one as its `model`; its model calls carry it as
  Serve's `multiplexed_model_id` (deployments/model.py), the response echoes it, `/v1/models` lists it with `parent`
  the served model. An unknown name is a 404; an adapter the model deployment cannot load, a 400 saying why.
- Logprobs (deployments/logprobs.py): token strings from the tokenizer handle's `decode_tokens(ids) ->
  list[str]`, cached by id; OpenAI's completions and chat shapes.
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
from deployments.guards import (
    AccessRecord,
    ApiKeys,
    Guard,
    Limits,
    access,
    deadline,
    error_type,
    within_deadline,
)
from deployments.http_util import (
    REPLICA_FAILED,
    EventStream,
    OpenAIApp,
    error_body,
    error_response,
    install,
    json_response,
    replica_failed,
    request_id,
)
from deployments.logprobs import Logprobs
from deployments.metrics import Metrics
from deployments.replica_logs import to_replica_log
from deployments.streams import DeadlineExceeded, ModelStreams, hold_back
from deployments.tool_choice import ToolMode, ToolStream
from gemma.engine.outputs import CompletionOutput, RequestOutput
from gemma.sampling import SamplingParams

logger = logging.getLogger(__name__)

@dataclass
class _Choice:
    """What has been sent of one choice."""

    text: int = 0  # characters
    tokens: int = 0
    offset: int = 0  # text_offset of the next logprob token
    finished: bool = False
    reason: str | None = None
    tools: ToolStream | None = None  # a chat choice of a request that offers tools


@dataclass
class _Job:
    """One completion or chat request on its way through the model."""

    id: str
    model: str  # the served model's name, or a LoRA adapter's
    chat: bool
    prompts: list[list[int]]
    params: SamplingParams
    include_usage: bool = False
    continuous_usage: bool = False  # `usage` on every chunk: running totals
    record: AccessRecord = field(default_factory=AccessRecord)
    created: int = field(default_factory=lambda: int(time.time()))
    cached: dict[int, int] = field(default_factory=dict)  # prompt index -> its tokens served from the prefix cache
    tools: ToolMode | None = None  # chat with tools offered (tool_choice not "none")
    structured_param: str = "structured_outputs"  # the request field an output-constraint error names
    adapter: str | None = None  # the LoRA adapter it runs with

    def usage(self, completion_tokens: int) -> s.UsageInfo:
        prompt = sum(len(p) for p in self.prompts)
        details = s.PromptTokensDetails(cached_tokens=sum(self.cached.values()))
        return s.UsageInfo(prompt_tokens=prompt, completion_tokens=completion_tokens, total_tokens=prompt + completion_tokens,
                           prompt_tokens_details=details)

    def saw(self, index: int, out: RequestOutput) -> None:
        """Note what an engine output says of its prompt (how much of it the prefix cache served)."""
        if out.num_cached_tokens is not None:
            self.cached[index] = out.num_cached_tokens


def _sse(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


# ---- the app ---------------------------------------------------------------------------------------------


class Ingress:
    """OpenAI-compatible routes; see the module docstring. `app` is the FastAPI application."""

    def __init__(
        self, model: Any, tokenizer: Any, classifier: Any = None, served_model_name: str = "gemma",
        classifier_name: str | None = None, limits: Limits | dict[str, Any] | None = None,
        api_keys: list[str] | None = None, log_prompts: bool = False, metrics: Metrics | None = None,
        lora_modules: dict[str, str] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.classifier = model, tokenizer, classifier
        self.lora_modules = dict(lora_modules or {})
        self.served_model_name, self.classifier_name = served_model_name, classifier_name
        self.limits = limits if isinstance(limits, Limits) else Limits.model_validate(limits or {})
        self.keys = ApiKeys.from_config(api_keys or [])  # plus GEMMA_API_KEYS of this replica's environment
        self.log_prompts = log_prompts
        self.metrics = metrics if metrics is not None else Metrics(served_model_name)
        self._model_info: dict[str, Any] | None = None  # fixed for the life of a model deployment
        self.logprobs = Logprobs(tokenizer)
        self._background: set[asyncio.Task] = set()
        self._fastapi = self._build_app()
        to_replica_log()

    @property
    def app(self) -> FastAPI:
        # a property, not an attribute: Serve's ASGI wrapper class defines a read-only `app` of its own
        return self._fastapi

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._fastapi

    def _build_app(self) -> FastAPI:
        app = OpenAIApp(title="Gemma on Ray Serve", summary="OpenAI-compatible completions, chat and classification")
        app.add_middleware(Guard, keys=self.keys, limits=self.limits, metrics=self.metrics,
                           log_prompts=self.log_prompts)
        install(app)  # its RequestContext goes outside the Guard, which logs the request id it gives

        @app.post("/v1/completions", response_model=None)
        async def completions(body: s.CompletionRequest, request: Request) -> Response:
            return await within_deadline(request, self.limits, self.create_completion(body, request))

        @app.post("/v1/chat/completions", response_model=None)
        async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
            return await within_deadline(request, self.limits, self.create_chat_completion(body, request))

        @app.post("/v1/classify", response_model=None)
        async def classify(body: s.ClassifyRequest, request: Request) -> Response:
            return await within_deadline(request, self.limits, self.classify(body, request))

        @app.post("/v1/tokenize", response_model=None)
        async def tokenize(body: s.TokenizeRequest, request: Request) -> Response:
            access(request).model = self.served_model_name
            return await self.tokenize(body)

        @app.post("/v1/detokenize", response_model=None)
        async def detokenize(body: s.DetokenizeRequest, request: Request) -> Response:
            access(request).model = self.served_model_name
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
        record = self._record(request, body.model, body.stream, body.prompt)
        _check_text(body.prompts, "prompt")
        params = self.limits.check_sampling(body.to_sampling_params(), len(body.prompts), "max_tokens")
        self.limits.check_structured(params, body.structured_param)
        prompts = await asyncio.gather(*(
            self.tokenizer.encode.remote(p, add_special_tokens=body.add_special_tokens) if isinstance(p, str)
            else _done(list(p)) for p in body.prompts
        ))
        record.prompt_tokens = sum(map(len, prompts))
        params = await self._check_prompts(prompts, params, "prompt", "max_tokens")
        job = _Job(request_id(request), record.model, False, prompts, params, body.include_usage,
                   body.continuous_usage, record, structured_param=body.structured_param,
                   adapter=self._adapter(body.model))
        return await self._run(job, body.stream, request)

    async def create_chat_completion(self, body: s.ChatCompletionRequest, request: Request) -> Response:
        record = self._record(request, body.model, body.stream, body.chat_messages())
        self.limits.check("max_messages", len(body.messages), "messages", " messages")
        params = self.limits.check_sampling(body.to_sampling_params(), 1, body.max_tokens_param)
        self.limits.check_structured(params, body.structured_param)
        ids = await self.tokenizer.encode_chat.remote(body.chat_messages(), add_generation_prompt=body.add_generation_prompt,
                                                      tools=body.template_tools)
        record.prompt_tokens = len(ids)
        params = await self._check_prompts([ids], params, "messages", body.max_tokens_param)
        job = _Job(request_id(request), record.model, True, [ids], params, body.include_usage,
                   body.continuous_usage, record, tools=ToolMode.of(body), structured_param=body.structured_param,
                   adapter=self._adapter(body.model))
        return await self._run(job, body.stream, request)

    async def classify(self, body: s.ClassifyRequest, request: Request) -> Response:
        if self.classifier is None:
            raise s.RequestError("classification is not enabled on this server (it has no classifier_model)", None, 404)
        self._check_model(body.model, self.classifier_name, adapters=False)
        record = access(request)
        record.model = name = body.model or self.classifier_name or self.served_model_name
        self.limits.check("max_classify_inputs", len(body.inputs), "input", " inputs")
        _check_text(body.inputs, "input")
        results = await asyncio.gather(*(self.classifier.classify.remote(x) for x in body.inputs))
        tokens = sum(r.get("num_tokens", 0 if isinstance(x, str) else len(x)) for x, r in zip(body.inputs, results))
        record.prompt_tokens = tokens
        data = [s.ClassifyData(index=i, label=r["label"], probs=r["probs"], num_classes=r["num_classes"])
                for i, r in enumerate(results)]
        usage = s.UsageInfo(prompt_tokens=tokens, total_tokens=tokens)
        return json_response(s.ClassifyResponse(id=request_id(request), model=name, data=data, usage=usage))

    async def tokenize(self, body: s.TokenizeRequest) -> Response:
        self._check_model(body.model)
        if body.messages is not None:
            self.limits.check("max_messages", len(body.messages), "messages", " messages")
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
        cards += [s.ModelCard(id=name, root=path, parent=self.served_model_name, max_model_len=info["max_model_len"])
                  for name, path in sorted(self.lora_modules.items())]
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

    def _check_model(self, name: str | None, other: str | None = None, adapters: bool = True) -> None:
        if name is not None and name not in (self.served_model_name, other) and not (adapters and name in self.lora_modules):
            raise s.RequestError(f"The model `{name}` does not exist.", "model", 404)

    def _adapter(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model)."""
        return name if name in self.lora_modules else None

    def _record(self, request: Request, model: str | None, stream: bool, prompt: Any) -> AccessRecord:
        """Check the model name, and start the request's access record."""
        self._check_model(model)
        record = access(request)
        record.model, record.stream = self._adapter(model) or self.served_model_name, stream
        record.prompt = prompt if self.log_prompts else None
        return record

    async def _check_prompts(
        self, prompts: list[list[int]], params: SamplingParams, prompt: str, max_tokens: str
    ) -> SamplingParams:
        """What the engine would reject, as 400s naming the field (before any stream starts), and the params with
        `limits.max_tokens` as max_tokens when the request left it to the context length."""
        info = await self.model_info()
        limit, vocab = info["max_model_len"], info["vocab_size"]
        if any(t >= vocab for t in params.stop_token_ids):
            raise s.RequestError(f"stop_token_ids must be in [0, {vocab})", "stop_token_ids")
        for ids in prompts:
            if not ids:
                raise s.RequestError(f"{prompt} is empty", prompt)
            self.limits.check("max_prompt_tokens", len(ids), prompt, " tokens")
            if any(not 0 <= t < vocab for t in ids):
                raise s.RequestError(f"{prompt}: token ids must be in [0, {vocab})", prompt)
            if len(ids) >= limit:
                raise s.RequestError(f"{prompt}: {len(ids)} tokens, but this model's maximum context length is {limit} "
                                     "tokens, prompt and completion together", prompt)
            if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
                raise s.RequestError(
                    f"this model's maximum context length is {limit} tokens, but {prompt} ({len(ids)} tokens) + "
                    f"{max_tokens} ({params.max_tokens}) = {len(ids) + params.max_tokens}: reduce one of them", max_tokens)
        if params.max_tokens is None and self.limits.max_tokens is not None:
            room = limit - max(map(len, prompts))
            params = params.model_copy(update={"max_tokens": min(self.limits.max_tokens, room)})
        return params

    # ---- generation ----

    async def _run(self, job: _Job, stream: bool, request: Request) -> Response:
        state = request.scope.get("state", {})
        suffix = "" if state.get("request_id_generated", True) else f"-{uuid.uuid4().hex[:8]}"  # client ids may repeat
        engine_ids = [f"{job.id}-{i}{suffix}" for i in range(len(job.prompts))]
        gen = ModelStreams(self.model, job.prompts, job.params, engine_ids, deadline(request), job.adapter)
        if not stream:
            try:
                return await self._collect(job, gen)
            except ValueError as exc:
                raise _named(exc, job) from exc
            finally:
                job.record.first_token_time = gen.first_token_time
                self._spawn(gen.close())
        try:
            await gen.start()
        except ValueError as exc:
            self._spawn(gen.close())
            raise _named(exc, job) from exc
        except BaseException:
            self._spawn(gen.close())
            raise
        return EventStream(self._events(job, gen), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _collect(self, job: _Job, gen: ModelStreams) -> Response:
        finals: dict[int, RequestOutput] = {}
        async for i, out in gen.outputs():
            job.saw(i, out)
            if out.finished:
                finals[i] = out
        n, choices, used = job.params.n, [], 0
        for i in sorted(finals):
            for o in finals[i].outputs:
                logprobs, _ = await self._logprobs(job, o.token_ids, o.logprobs, 0)
                choices.append(self._choice(job, i * n + o.index, o, logprobs))
                used += len(o.token_ids)
                job.record.finish_reasons.append(o.finish_reason or "abort")
        job.record.output_tokens = used
        cls = s.ChatCompletionResponse if job.chat else s.CompletionResponse
        return json_response(cls(id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage(used)))

    async def _events(self, job: _Job, gen: ModelStreams) -> AsyncIterator[str]:
        n, stops = job.params.n, job.params.stop
        sent = {i * n + k: _Choice(tools=ToolStream(job.tools) if job.tools else None)
                for i in range(len(job.prompts)) for k in range(n)}
        try:
            if job.chat:  # OpenAI opens each chat choice with the assistant role
                for index in sent:
                    yield self._chunk(job, index, s.DeltaMessage(role="assistant", content=""), None, None, None, sent)
            async for i, out in gen.outputs():
                job.saw(i, out)
                for o in out.outputs:
                    choice = sent[i * n + o.index]
                    if choice.finished:
                        continue
                    text = o.text if o.finished else hold_back(o.text, stops)
                    delta, new_tokens = text[choice.text:], o.token_ids[choice.tokens:]
                    steps = o.logprobs[choice.tokens:] if o.logprobs is not None else None
                    logprobs, choice.offset = await self._logprobs(job, new_tokens, steps, choice.offset)
                    content: Any = s.DeltaMessage(content=delta) if job.chat else delta
                    reason, news = o.finish_reason, bool(delta)
                    if choice.tools is not None:  # calls or content, as the text turns out (deployments/tool_choice.py)
                        tool_delta, made_calls = choice.tools.step(text, o.finished)
                        content, news = tool_delta or s.DeltaMessage(), tool_delta is not None
                        reason = _tool_reason(reason, made_calls)
                    if not news and not (logprobs and new_tokens) and not o.finished:
                        continue
                    choice.text, choice.tokens, choice.finished = max(choice.text, len(text)), len(o.token_ids), o.finished
                    choice.reason = reason
                    yield self._chunk(job, i * n + o.index, content, logprobs, reason if o.finished else None,
                                      o.stop_reason, sent)
            if job.include_usage:
                usage = job.usage(sum(c.tokens for c in sent.values()))
                cls = s.ChatCompletionChunk if job.chat else s.CompletionChunk
                yield _sse(cls(id=job.id, created=job.created, model=job.model, choices=[], usage=usage))
        except Exception as exc:  # noqa: BLE001 - the status line is sent: report in-band, as vLLM does
            status, message = self._stream_error(job, exc)
            job.record.error = error_type(status)
            yield _sse(error_body(status, message))
        finally:
            job.record.output_tokens = sum(c.tokens for c in sent.values())
            job.record.finish_reasons = [c.reason or "abort" for c in sent.values()]
            job.record.first_token_time = gen.first_token_time
            self._spawn(gen.close())
        yield "data: [DONE]\n\n"

    def _stream_error(self, job: _Job, exc: Exception) -> tuple[int, str]:
        """Status and message of an error after the stream began: a timeout, an invalid request, or ours."""
        if isinstance(exc, DeadlineExceeded):
            logger.info("stream %s ran past request_timeout_s; aborted", job.id)
            return 408, self.limits.timeout_error().message
        if replica_failed(exc):
            logger.warning("stream %s failed with its replica: %r", job.id, exc)
            return 503, REPLICA_FAILED
        invalid = isinstance(exc, ValueError)  # a RayTaskError(ValueError) carries the original as `cause`
        logger.log(logging.INFO if invalid else logging.ERROR, "stream %s failed", job.id, exc_info=not invalid)
        cause = getattr(exc, "cause", None)
        if not invalid:
            return 500, "internal server error"
        return 400, str(cause if isinstance(cause, BaseException) else exc)

    def _choice(self, job: _Job, index: int, o: CompletionOutput, logprobs: Any) -> BaseModel:
        if job.chat:
            message, reason = s.AssistantMessage(content=o.text), o.finish_reason
            if job.tools is not None:
                message, made_calls = job.tools.message(o.text)
                reason = _tool_reason(reason, made_calls)
            return s.ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=reason,
                                stop_reason=o.stop_reason)
        return s.CompletionChoice(index=index, text=o.text, logprobs=logprobs, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason)

    def _chunk(
        self, job: _Job, index: int, content: Any, logprobs: Any, reason: str | None, stop_reason: int | str | None,
        sent: dict[int, _Choice],
    ) -> str:
        usage = job.usage(sum(c.tokens for c in sent.values())) if job.continuous_usage else None
        if job.chat:
            choice = s.ChatStreamChoice(index=index, delta=content, logprobs=logprobs, finish_reason=reason)
            return _sse(s.ChatCompletionChunk(id=job.id, created=job.created, model=job.model, choices=[choice],
                                              usage=usage))
        choice = s.CompletionChoice(index=index, text=content, logprobs=logprobs, finish_reason=reason,
                                    stop_reason=stop_reason if reason is not None else None)
        return _sse(s.CompletionChunk(id=job.id, created=job.created, model=job.model, choices=[choice], usage=usage))

    async def _logprobs(
        self, job: _Job, tokens: list[int], steps: list[dict[int, float]] | None, offset: int
    ) -> tuple[s.CompletionLogprobs | s.ChatLogprobs | None, int]:
        if job.params.logprobs is None or steps is None:
            return None, offset
        return await self.logprobs.build(job.chat, job.params.logprobs, tokens, steps, offset)

    def _spawn(self, coro: Coroutine) -> None:
        """Run cleanup in its own task: it must finish even when the request's task is being cancelled."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _tool_reason(reason: str | None, made_calls: bool) -> str | None:
    return "tool_calls" if made_calls and reason == "stop" else reason


def _named(exc: ValueError, job: _Job) -> ValueError:
    """An engine's refusal of the output constraint ("structured_outputs.json: ..."), as a 400 naming the request
    field that carried it (response_format, structured_outputs or tool_choice); other errors as they are."""
    cause = getattr(exc, "cause", None)
    message = str(cause if isinstance(cause, BaseException) else exc)
    if not message.startswith("structured_outputs"):
        return exc
    return s.RequestError(job.structured_param + message.removeprefix("structured_outputs"), job.structured_param)


def _check_text(items: list[Any], param: str) -> None:
    """A text prompt that is empty or only whitespace asks for nothing: a 400, as an empty token list is."""
    if any(isinstance(x, str) and not x.strip() for x in items):
        raise s.RequestError(f"{param} is empty or only whitespace", param)


async def _done(value: Any) -> Any:
    return value
