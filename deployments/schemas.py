"""Request and response bodies of the HTTP API: OpenAI's completions, chat and models; vLLM's classify,
tokenize and detokenize; OpenAI's error body.

Requests reject unknown fields (a typo must not be silently ignored). A few OpenAI fields we do not implement
are accepted at their neutral value only (`echo: false`, `logit_bias: {}`, `store: false`, ...)
and are a 400 otherwise, so unchanged OpenAI clients keep working. Accepted and ignored: `user`, `metadata`
(checked against OpenAI's limits), `service_tier`, `stream_options.include_obfuscation`. Accepted as OpenAI
means them: the `developer` role (a system message) and `content: null` on assistant messages (an empty
turn). vLLM's `stream_options.continuous_usage_stats` puts the running usage on every chunk.

Sampling fields are typed loosely here and validated by `gemma.sampling.SamplingParams` (one set of limits):
`to_sampling_params()` turns its `ValidationError` into a `RequestError` whose `param` names the request field.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from gemma.sampling import SamplingParams
from gemma.structured import StructuredOutputsParams
from gemma.tool_calls import call_schema, check_tools, chosen_function


class RequestError(ValueError):
    """A request the server cannot serve: answered with `status` and an OpenAI error body naming `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        """JSON may escape a lone surrogate (`"\\ud800"`), which Python's json decodes into a str no tokenizer
        can encode: refused here, as a 400 naming the field. A loop, not recursion: nesting is attacker-chosen."""
        stack: list[tuple[Any, str]] = [(data, "")]
        while stack:
            value, where = stack.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where or 'a string'} is not valid Unicode (it holds a lone surrogate)") from None
            elif isinstance(value, dict):
                stack += [(k, where) for k in value] + [(v, f"{where}.{k}".strip(".")) for k, v in value.items()]
            elif isinstance(value, list):
                stack += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return data


class Response(BaseModel):
    pass


# ---- shared request parts ------------------------------------------------------------------------------


class StreamOptions(Request):
    include_usage: bool = False  # a last chunk with `usage` and no choices, before [DONE]
    # vLLM extension: every chunk carries `usage` with the request's running totals (with or without
    # include_usage, which alone adds the last, choice-less chunk)
    continuous_usage_stats: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding field; accepted and ignored


# OpenAI's limits on `metadata`
METADATA_MAX_KEYS, METADATA_MAX_KEY_CHARS, METADATA_MAX_VALUE_CHARS = 16, 64, 512


def _neutral(value: Any, neutral: tuple = (None, {}, [], False)) -> Any:
    if value not in neutral:
        raise ValueError("not supported by this server")
    return value


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _prompts(value: Any) -> Any:
    """A str, list[str], list[int] or list[list[int]], none of them empty (one clear error, not a union's four)."""
    if isinstance(value, str) or _token_ids(value) and value:
        items = [value]
    elif isinstance(value, list) and value and (all(isinstance(v, str) for v in value) or all(map(_token_ids, value))):
        items = value
    else:
        raise ValueError("must be a non-empty string, list of strings, list of token ids or list of lists of token ids")
    if any(len(p) == 0 for p in items):
        raise ValueError("must not contain an empty string or an empty list of token ids")
    if any(isinstance(t, int) and t < 0 for p in items if not isinstance(p, str) for t in p):
        raise ValueError("token ids must be >= 0")
    return value


def _as_list(value: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    return [value] if isinstance(value, str) or _token_ids(value) else list(value)


class JsonSchemaFormat(Request):
    """OpenAI's `response_format.json_schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # accepted; the output always matches the schema


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError('json_schema is required with type "json_schema", and only allowed with it')
        return self

    def structured(self) -> StructuredOutputsParams | None:
        if self.type == "json_object" or (self.json_schema is not None and self.json_schema.schema_ is None):
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is not None:
            return StructuredOutputsParams(json=self.json_schema.schema_)
        return None


class SamplingFields(Request):
    """Fields shared by completions and chat; `None` means SamplingParams' default."""

    model: str | None = None  # must be the served model name when given
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension, as are min_p, repetition_penalty and the fields below
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id; accepted, unused
    metadata: dict[str, str] | None = None  # OpenAI's tags for stored completions; checked, unused
    store: bool | None = None  # neutral value only: nothing is stored
    service_tier: str | None = None  # OpenAI's processing tier; accepted, unused (one tier here)
    logit_bias: dict[str, float] | None = None  # neutral value only
    response_format: ResponseFormat | None = None  # text, json_object or json_schema (OpenAI)
    structured_outputs: StructuredOutputsParams | None = None  # vLLM extension: json, regex, choice, grammar

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream=true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        return _neutral(value)

    @field_validator("store")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("storing completions is not supported by this server: send store=false or leave it out")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > METADATA_MAX_KEYS:
            raise ValueError(f"at most {METADATA_MAX_KEYS} keys, got {len(value)}")
        for key, item in value.items():
            if len(key) > METADATA_MAX_KEY_CHARS:
                raise ValueError(f"key {key[:16]!r}... is longer than {METADATA_MAX_KEY_CHARS} characters")
            if len(item) > METADATA_MAX_VALUE_CHARS:
                raise ValueError(f"value of {key!r} is longer than {METADATA_MAX_VALUE_CHARS} characters")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    @property
    def structured_param(self) -> str:
        """The request field that carries the output constraint (errors about it name this field)."""
        return "structured_outputs" if self.structured_outputs is not None else "response_format"

    def structured(self) -> StructuredOutputsParams | None:
        from_format = self.response_format.structured() if self.response_format is not None else None
        if from_format is not None and self.structured_outputs is not None:
            raise RequestError("give one of response_format and structured_outputs, not both", "structured_outputs")
        return self.structured_outputs or from_format

    def _sampling_params(self, extra: dict[str, Any], rename: dict[str, str]) -> SamplingParams:
        fields = set(SamplingParams.model_fields) & set(SamplingFields.model_fields) - {"structured_outputs"}
        values = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        if "structured_outputs" not in extra:
            values["structured_outputs"] = self.structured()
        # max_tokens None is meaningful (up to the context length), not "SamplingParams' default of 16"
        values |= {k: v for k, v in extra.items() if v is not None or k == "max_tokens"}
        try:
            return SamplingParams(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = str(err["loc"][0])
                param = rename.get(field, field)
                raise RequestError(f"{param}: {msg}", param) from exc
            named = [f for f in SamplingParams.model_fields if f in msg]  # a check across fields names them
            field = min(named, key=msg.index) if named else None
            raise RequestError(msg, rename.get(field, field) if field else None) from exc


# ---- completions -----------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default; None: up to the context limit
    logprobs: int | None = None  # top alternatives per token (0 = the chosen token only)
    echo: bool = False  # neutral value only
    best_of: int | None = None  # must equal n when given
    suffix: str | None = None  # neutral value only
    add_special_tokens: bool = True  # vLLM extension: prepend <bos> to text prompts

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        return _prompts(value)

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _neutral(value, (None, False, ""))

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("only best_of == n is supported")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        return _as_list(self.prompt)

    def to_sampling_params(self) -> SamplingParams:
        return self._sampling_params({"max_tokens": self.max_tokens, "logprobs": self.logprobs}, {})


class TextPart(Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(Request):
    name: str
    arguments: str  # a JSON object's text


class ToolCallItem(Request):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(Request):
    """One chat turn, held in the form the chat template takes: OpenAI's `developer` role (its newer name for
    `system`) becomes `system`, and an assistant's `content: null` (a turn with no text, e.g. only tool calls)
    becomes "". `tool` messages carry a tool's result for the call `tool_call_id`."""

    role: Literal["system", "developer", "user", "assistant", "model", "tool"]
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name; passed to the chat template
    tool_calls: list[ToolCallItem] | None = None  # assistant messages: the calls it made
    tool_call_id: str | None = None  # tool messages: the call this is the result of

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, value: str) -> str:
        return "system" if value == "developer" else value

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            if info.data.get("role") in ("assistant", "model"):
                return ""
            raise ValueError("content must not be null (null is allowed on assistant messages only)")
        parts_ok = isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value)
        if not isinstance(value, str) and not parts_ok:
            raise ValueError('content must be a string or a list of {"type": "text", "text": ...} parts')
        return value

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role not in ("assistant", "model"):
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("tool_call_id: required on tool messages")
        return self


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None  # wins over max_tokens; None: up to the context limit
    logprobs: bool = False
    top_logprobs: int | None = None  # alternatives per token, with logprobs=true
    add_generation_prompt: bool = True  # vLLM extension: end the prompt with the model's turn
    tools: list[dict[str, Any]] | None = None  # functions the model may call (gemma/tool_calls.py)
    tool_choice: str | dict[str, Any] | None = None  # none | auto (default with tools) | required | a function
    parallel_tool_calls: bool = True  # False: at most one call per turn

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("requires logprobs=true")
        return value

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        check_tools(value or [])
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if "tools" in info.data:  # else tools failed its own check
            chosen_function(value, check_tools(info.data["tools"] or []))
        return value

    @property
    def functions(self) -> dict[str, dict[str, Any]]:
        return check_tools(self.tools or [])

    @property
    def tool_mode(self) -> str | None:
        """None (no tools offered, or tool_choice "none"), "auto", "required", or the named function's name."""
        if not self.tools or self.tool_choice == "none":
            return None
        return chosen_function(self.tool_choice, self.functions) or self.tool_choice or "auto"

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the tokenizer's `encode_chat` takes them."""
        return [m.model_dump(exclude_none=True) for m in self.messages]

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt offers: none with tool_choice "none" (the model is not to call any)."""
        return self.tools if self.tool_mode is not None else None

    @property
    def structured_param(self) -> str:
        return "tool_choice" if self.tool_mode not in (None, "auto") else super().structured_param

    def to_sampling_params(self) -> SamplingParams:
        top = self.top_logprobs or 0
        extra: dict[str, Any] = {"max_tokens": self.max_completion_tokens or self.max_tokens,
                                 "logprobs": top if self.logprobs else None}
        mode = self.tool_mode
        if mode not in (None, "auto"):  # the call is constrained: its arguments always match the parameters
            if self.structured() is not None:
                raise RequestError("tool_choice forces a tool call: it cannot be combined with response_format or "
                                   "structured_outputs", "tool_choice")
            name = None if mode == "required" else mode
            schema = call_schema(self.functions, name, self.parallel_tool_calls)
            extra["structured_outputs"] = StructuredOutputsParams(json=schema)
        return self._sampling_params(extra, {"max_tokens": self.max_tokens_param, "logprobs": "top_logprobs"})


# ---- classify, tokenize, detokenize ---------------------------------------------------------------------


class ClassifyRequest(Request):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return _prompts(value)

    @property
    def inputs(self) -> list[str | list[int]]:
        return _as_list(self.input)


class TokenizeRequest(Request):
    """Exactly one of `prompt` (text) and `messages` (rendered with the chat template)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, validate_default=True)
    add_special_tokens: bool = True  # for `prompt`; the chat template writes its own <bos>
    add_generation_prompt: bool = True  # for `messages`

    @field_validator("messages")
    @classmethod
    def _exactly_one(cls, value: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        if (value is None) == (info.data.get("prompt") is None):
            raise ValueError("give exactly one of prompt and messages")
        return value


class DetokenizeRequest(Request):
    model: str | None = None
    tokens: list[int]


# ---- responses -----------------------------------------------------------------------------------------


class PromptTokensDetails(Response):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None  # completions and chat (OpenAI's shape)


class CompletionLogprobs(Response):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM extension: the stop token id or string that ended it


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(Response):
    content: list[ChatLogprobToken] | None = None


class ToolCallOut(Response):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] = []


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunction(Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Response):
    """A streamed tool call: the first delta of a call has its id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None  # left out of the JSON when None, as OpenAI's deltas do

    @model_serializer(mode="wrap")
    def _without_absent_calls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatStreamChoice(Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(CompletionResponse):
    """A streamed `text_completion`: the choices carry text deltas."""


class ClassifyData(Response):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassifyResponse(Response):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassifyData]
    usage: UsageInfo


class TokenizeResponse(Response):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Response):
    prompt: str


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "gemma-ray"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model
    max_model_len: int | None = None


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(Response):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(Response):
    error: ErrorDetail
