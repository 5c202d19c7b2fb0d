"""Structured outputs and tool calling over HTTP, through the unchanged openai client: response_format and
structured_outputs validate (jsonschema), tool calls (required, named, auto, a tool-result turn) come back as
OpenAI shapes, streamed arguments add up to the non-streamed ones, and bad input is a 400 naming the field."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from tests.helpers.fakes import LocalHandle, tiny_engine

from deployments.ingress import Ingress
from deployments.model import ModelDeployment
from deployments.tokenizer import TokenizerDeployment
from gemma.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from gemma.sampling import SamplingParams

pytestmark = pytest.mark.anyio
MAX_MODEL_LEN = 1024  # the tool prompt (instruction + schemas) is long in a tiny vocabulary
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["title", "rating", "tags", "author"],
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["fun", "sad", "long"]}, "maxItems": 2},
        "author": {"type": "object", "additionalProperties": False, "required": ["name"],
                   "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,7}$"}}},
    },
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 12}}}}}
TOOLS = [WEATHER, TIME]
PARAMS = {f["function"]["name"]: f["function"]["parameters"] for f in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def nested(levels: int) -> dict[str, Any]:
    """An object schema with `levels` objects inside each other (2 levels of JSON nesting each)."""
    schema: dict[str, Any] = {"type": "object"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.fixture
async def client(lm):
    model, tokenizer = lm
    engine = tiny_engine(model, tokenizer, MAX_MODEL_LEN)
    ingress = Ingress(LocalHandle(ModelDeployment(engine=engine)), LocalHandle(TokenizerDeployment(tokenizer=tokenizer)),
                      served_model_name="tiny", limits={"max_schema_bytes": 4096, "max_schema_depth": 12})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://test") as http:
        yield openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
    await engine.shutdown()


async def streamed_chat(client: openai.AsyncOpenAI, **kw: Any) -> tuple[dict[int, str], dict[int, list], dict[int, str]]:
    """Per choice: its content, its tool-call deltas, its finish reason."""
    content: dict[int, str] = {}
    calls: dict[int, list] = {}
    reasons: dict[int, str] = {}
    async for chunk in await client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content[c.index] = content.get(c.index, "") + (c.delta.content or "")
            calls.setdefault(c.index, []).extend(c.delta.tool_calls or [])
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return content, calls, reasons


def joined_calls(deltas: list) -> list[dict[str, str]]:
    """OpenAI's client-side assembly of streamed tool calls: by index, name from the first delta, arguments
    concatenated."""
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        call["id"] = call["id"] or (d.id or "")
        call["name"] = call["name"] or (d.function.name or "")
        call["arguments"] += d.function.arguments or ""
    return [calls[i] for i in sorted(calls)]


# ---- structured outputs -----------------------------------------------------------------------------------


async def test_json_schema_response_format_validates_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Review a book."}], response_format=fmt,
              temperature=1.0, n=10, max_completion_tokens=200)
    whole = await client.chat.completions.create(seed=1, **kw)
    texts = [c.message.content for c in whole.choices]
    assert all(c.finish_reason == "stop" for c in whole.choices)
    content, _, reasons = await streamed_chat(client, seed=2, **kw)
    texts += [content[i] for i in sorted(content)]
    assert set(reasons.values()) == {"stop"} and len(texts) == 20
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    # seeded: streaming changes nothing
    again, _, _ = await streamed_chat(client, seed=1, **kw)
    assert [again[i] for i in sorted(again)] == [c.message.content for c in whole.choices]


async def test_json_object_regex_choice_and_grammar_on_completions(client):
    comp = client.completions
    r = await comp.create(model="tiny", prompt="Pick:", max_tokens=20, temperature=1.0, n=6,
                          extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert {c.text for c in r.choices} <= {"left", "right"}
    r = await comp.create(model="tiny", prompt="Code:", max_tokens=20, temperature=1.0, n=6,
                          extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", c.text) for c in r.choices)
    r = await comp.create(model="tiny", prompt="List:", max_tokens=30, temperature=1.0, n=6,
                          extra_body={"structured_outputs": {"grammar": 'root ::= "[" [a-c] ("," [a-c]){0,2} "]"'}})
    assert all(re.fullmatch(r"\[[a-c](,[a-c]){0,2}\]", c.text) for c in r.choices)
    r = await client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                             temperature=0, max_completion_tokens=60)
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": "object"}}, "response_format": {"type": "json_object"}},
     "structured_outputs"),
    ({"structured_outputs": {"choice": ["x" * 5000]}}, "structured_outputs"),  # max_schema_bytes
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested(8)}}},
     "response_format"),  # max_schema_depth (12)
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "nope"}}}}}], "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
])
async def test_bad_constraints_are_400s_naming_the_field(client, body, param):
    http: httpx.AsyncClient = client._client
    r = await http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param or r.json()["error"]["param"].startswith(param), r.json()
    r = await http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2})
    assert r.status_code == 200  # the server is unharmed


# ---- tool calling -------------------------------------------------------------------------------------------


async def test_required_and_named_tool_calls_validate_against_the_parameters(client):
    r = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                             temperature=1.0, n=8, seed=3, max_completion_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    one = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=False, temperature=1.0, n=8, seed=3,
                                               max_completion_tokens=200)
    assert all(len(c.message.tool_calls) == 1 for c in one.choices)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice=named,
                                             temperature=1.0, n=8, seed=4, max_completion_tokens=100)
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and choice.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), PARAMS["get_time"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_streamed_arguments_equal_the_non_streamed_ones(client, tool_choice):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=1.0, n=3, seed=5,
              max_completion_tokens=200)
    whole = await client.chat.completions.create(**kw)
    content, deltas, reasons = await streamed_chat(client, **kw)
    for choice in whole.choices:
        streamed = joined_calls(deltas[choice.index])
        first = deltas[choice.index][0]
        assert first.id and first.type == "function" and first.function.name  # the first delta opens the call
        assert [(c["name"], c["arguments"]) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert all(c["id"].startswith("call_") for c in streamed)
        assert reasons[choice.index] == "tool_calls" and not content[choice.index]


async def test_auto_returns_text_when_the_model_writes_no_call(client):
    r = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                             max_completion_tokens=12)
    (choice,) = r.choices
    assert not choice.message.tool_calls and choice.message.content and choice.finish_reason == "length"
    content, deltas, _ = await streamed_chat(client, model="tiny", messages=ASK, tools=TOOLS, temperature=0,
                                             max_completion_tokens=12)
    assert content[0] == choice.message.content and not deltas[0]


async def test_a_tool_result_turn_renders_the_call_and_the_result(client, lm):
    _, tokenizer = lm
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}]
    r = await client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, temperature=0,
                                             max_completion_tokens=5)
    expected = tokenizer.apply_chat_template(history, tools=TOOLS, tokenize=True)
    assert r.usage.prompt_tokens == len(expected)
    text = tokenizer.decode(expected)
    assert '[get_weather(city="Paris", unit="C")]' in text and "```tool_output\n21 degrees, sunny\n```" in text


# ---- auto: the parser on a scripted model's text -----------------------------------------------------------


class ScriptedModel:
    """A model deployment that writes `text`, a few characters per output."""

    def __init__(self, text: str, chunk: int = 3) -> None:
        self.text, self.chunk = text, chunk

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str):
        ends = list(range(self.chunk, len(self.text), self.chunk)) + [len(self.text)]
        for k, end in enumerate(ends):
            done = end == len(self.text)
            out = CompletionOutput(0, self.text[:end], list(range(k + 1)), "stop" if done else None,
                                   new_token_ids=[k], new_text=self.text[end - self.chunk:end])
            yield RequestOutput(request_id, None, list(prompt_token_ids), [out], done, RequestMetrics(0.0))
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        return None

    async def model_info(self) -> dict[str, Any]:
        return {"max_model_len": 4096, "vocab_size": 1 << 20, "model": "scripted"}

    async def check_health(self) -> None:
        return None


@pytest.mark.parametrize("text, calls", [
    ('[get_weather(city="Paris", unit="C"), get_time(zone=2)]',
     [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": 2})]),
    ('```tool_code\nget_time(zone=-3)\n```', [("get_time", {"zone": -3})]),
    ("It is sunny in Paris.", []),
    ("[not a call]", []),
])
async def test_auto_parses_calls_from_the_text(lm, text, calls):
    _, tokenizer = lm
    ingress = Ingress(LocalHandle(ScriptedModel(text)), LocalHandle(TokenizerDeployment(tokenizer=tokenizer)),
                      served_model_name="tiny")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://test") as http:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=http, max_retries=0)
        r = await client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS)
        content, deltas, reasons = await streamed_chat(client, model="tiny", messages=ASK, tools=TOOLS)
    (choice,) = r.choices
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert got == calls
    assert [(c["name"], json.loads(c["arguments"])) for c in joined_calls(deltas[0])] == calls
    if calls:
        assert choice.finish_reason == reasons[0] == "tool_calls" and choice.message.content is None
        assert not content[0]
    else:
        assert choice.message.content == content[0] == text and reasons[0] == "stop"
