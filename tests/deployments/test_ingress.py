"""The HTTP layer without Ray: `Ingress` over `LocalHandle`s to the real model and tokenizer deployments (a
tiny random Gemma on the real engine) and scripted fakes; requests through httpx's ASGI transport, the
openai client, and a raw ASGI driver where a client must disconnect mid-stream."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httpx
import openai
import pytest
from tests.helpers.fakes import (
    FakeClassifier,
    GatedModel,
    LocalHandle,
    RecordingModel,
    tiny_engine,
)
from tests.helpers.waiting import until
from fastapi import FastAPI, Request

from deployments.http_util import in_serve_replica, install, request_id
from deployments.ingress import Ingress
from deployments.model import ModelDeployment
from deployments.streams import ModelStreams, hold_back
from deployments.tokenizer import TokenizerDeployment
from gemma import GemmaTokenizer
from gemma.engine import AsyncLLMEngine
from gemma.sampling import SamplingParams

pytestmark = pytest.mark.anyio
GREEDY = {"temperature": 0, "ignore_eos": True}
MAX_MODEL_LEN = 96


@dataclass
class Server:
    ingress: Ingress
    http: httpx.AsyncClient
    model: RecordingModel
    tokenizer: GemmaTokenizer
    engine: AsyncLLMEngine

    async def post(self, path: str, body: dict, **kw) -> httpx.Response:
        return await self.http.post(path, json=body, **kw)


def client_for(ingress: Ingress) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://test")


@pytest.fixture
async def server(lm):
    model, tokenizer = lm
    engine = tiny_engine(model, tokenizer, MAX_MODEL_LEN)  # a fresh one: its asyncio state is per event loop
    recording = RecordingModel(ModelDeployment(engine=engine))
    ingress = Ingress(LocalHandle(recording), LocalHandle(TokenizerDeployment(tokenizer=tokenizer)),
                      LocalHandle(FakeClassifier()), served_model_name="tiny", classifier_name="tiny-classifier")
    async with client_for(ingress) as http:
        yield Server(ingress, http, recording, tokenizer, engine)
    await engine.shutdown()


def sse(response: httpx.Response) -> list:
    """The events of an SSE body: parsed JSON, and the final "[DONE]"."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.text.split("\n\n")
    assert blocks[-1] == "" and all(b.startswith("data: ") for b in blocks[:-1])
    events = [b.removeprefix("data: ") for b in blocks[:-1]]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]] + ["[DONE]"]


def streamed_texts(events: list, chat: bool = False) -> dict[int, str]:
    texts: dict[int, str] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            piece = (c["delta"].get("content") or "") if chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


def finish_reasons(events: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for e in events[:-1]:
        for c in e["choices"]:
            out.setdefault(c["index"], []).append(c["finish_reason"])
    return out


# ---- completions ---------------------------------------------------------------------------------------


async def test_completion_matches_the_engine_and_counts_usage(server):
    r = await server.post("/v1/completions", {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 9, **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["id"] == r.headers["x-request-id"] and body["id"].startswith("cmpl-")
    ids = server.tokenizer.encode("The quick brown fox")
    async for out in server.engine.generate(ids, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True), "reference"):
        pass
    [choice] = body["choices"]
    assert choice == {"index": 0, "text": out.text, "logprobs": None, "finish_reason": "length", "stop_reason": None}
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 9, "total_tokens": len(ids) + 9,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_list_prompts_token_ids_and_n_give_indexed_choices(server):
    one = {}
    for prompt in ("Hello world", "Gemma is"):
        r = await server.post("/v1/completions", {"prompt": prompt, "max_tokens": 5, **GREEDY})
        one[prompt] = r.json()["choices"][0]["text"]
    r = await server.post("/v1/completions", {"prompt": ["Hello world", "Gemma is"], "n": 2, "max_tokens": 5, **GREEDY})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == [one["Hello world"]] * 2 + [one["Gemma is"]] * 2
    assert body["usage"]["completion_tokens"] == 20
    ids = [server.tokenizer.encode(p) for p in ("Hello world", "Gemma is")]
    r = await server.post("/v1/completions", {"prompt": ids, "max_tokens": 5, **GREEDY})
    assert [c["text"] for c in r.json()["choices"]] == [one["Hello world"], one["Gemma is"]]
    r = await server.post("/v1/completions", {"prompt": ids[1], "max_tokens": 5, **GREEDY})
    assert r.json()["choices"][0]["text"] == one["Gemma is"]


async def test_sampled_n_completions_differ_and_a_seed_repeats_them(server):
    body = {"prompt": "Hello", "n": 3, "max_tokens": 8, "temperature": 1.0, "seed": 3, "ignore_eos": True}
    first = (await server.post("/v1/completions", body)).json()["choices"]
    again = (await server.post("/v1/completions", body)).json()["choices"]
    assert first == again and len({c["text"] for c in first}) > 1


@pytest.mark.parametrize("n", [1, 2])
async def test_streamed_completion_adds_up_to_the_non_streamed_one(server, n):
    base = {"prompt": ["The quick brown fox", "def f(x):"], "n": n, "max_tokens": 12, **GREEDY}
    whole = (await server.post("/v1/completions", base)).json()
    events = sse(await server.post("/v1/completions", {**base, "stream": True, "stream_options": {"include_usage": True}}))
    assert {(e["object"], e["id"][:5]) for e in events[:-1]} == {("text_completion", "cmpl-")}
    assert len({e["id"] for e in events[:-1]}) == 1
    assert streamed_texts(events) == {c["index"]: c["text"] for c in whole["choices"]}
    for reasons in finish_reasons(events).values():
        assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert len(events) - 2 > 2 * n  # one event per engine output, not one per choice
    usage = events[-2]
    assert usage["choices"] == [] and tokens(usage["usage"]) == tokens(whole["usage"])


async def test_streamed_text_never_shows_a_stop_string_prefix(server):
    free = (await server.post("/v1/completions", {"prompt": "Hello world", "max_tokens": 16, **GREEDY})).json()
    text = free["choices"][0]["text"]
    stop = text[4:9]  # spans several tokens: the engine only knows it matched once all of them are out
    body = {"prompt": "Hello world", "max_tokens": 16, "stop": stop, **GREEDY}
    whole = (await server.post("/v1/completions", body)).json()["choices"][0]
    assert whole["finish_reason"] == "stop" and whole["stop_reason"] == stop and whole["text"] == text[:4]
    events = sse(await server.post("/v1/completions", {**body, "stream": True}))
    assert streamed_texts(events) == {0: text[:4]}


async def test_completion_logprobs_shape(server):
    r = await server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 6, "logprobs": 2, **GREEDY})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"])
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 3 and top[token] == value  # 2 best + the chosen one, keyed by text
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(6)]
    # greedy: the chosen token is the best alternative
    assert all(top[t] == max(top.values()) for t, top in zip(lp["tokens"], lp["top_logprobs"]))
    events = sse(await server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 6, "logprobs": 2, "stream": True, **GREEDY}))
    streamed = [t for e in events[:-1] for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["tokens"]]
    offsets = [o for e in events[:-1] for c in e["choices"] if c["logprobs"] for o in c["logprobs"]["text_offset"]]
    assert streamed == lp["tokens"] and offsets == lp["text_offset"]


# ---- chat ------------------------------------------------------------------------------------------------


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]


async def test_chat_completion_and_its_stream(server):
    body = {"model": "tiny", "messages": CHAT, "max_completion_tokens": 7, **GREEDY}
    r = await server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    [choice] = whole["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    prompt = server.tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert whole["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 7, "total_tokens": len(prompt) + 7,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    events = sse(await server.post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert streamed_texts(events, chat=True) == {0: choice["message"]["content"]}
    assert finish_reasons(events)[0][-1] == "length" and tokens(events[-2]["usage"]) == tokens(whole["usage"])


async def test_without_max_tokens_chat_and_null_max_tokens_run_to_the_context_length(server):
    r = await server.post("/v1/chat/completions", {"messages": CHAT, **GREEDY})
    usage = r.json()["usage"]
    assert usage["total_tokens"] == MAX_MODEL_LEN and r.json()["choices"][0]["finish_reason"] == "length"
    r = await server.post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": None, **GREEDY})
    assert r.json()["usage"]["completion_tokens"] == MAX_MODEL_LEN - 3
    r = await server.post("/v1/completions", {"prompt": [1, 2, 3], **GREEDY})
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's default for completions


async def test_chat_logprobs_shape(server):
    body = {"messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 3, **GREEDY}
    choice = (await server.post("/v1/chat/completions", body)).json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert [t["logprob"] for t in entry["top_logprobs"]] == sorted((t["logprob"] for t in entry["top_logprobs"]), reverse=True)
    plain = (await server.post("/v1/chat/completions", {**body, "top_logprobs": None})).json()["choices"][0]
    assert all(e["top_logprobs"] == [] for e in plain["logprobs"]["content"])


# ---- what real clients send: accepted fields ------------------------------------------------------------


def openai_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=server.http, max_retries=0)


async def test_developer_role_is_a_system_message(server):
    client = openai_client(server)
    developer = [{"role": "developer", "content": "Be brief."}, *CHAT[1:]]
    for messages in (CHAT, developer):  # both through /v1/tokenize: the prompt ids themselves
        r = await server.post("/v1/tokenize", {"messages": messages})
        assert r.status_code == 200, r.text
    ids = (await server.post("/v1/tokenize", {"messages": developer})).json()["tokens"]
    assert ids == server.tokenizer.apply_chat_template(CHAT, tokenize=True)
    as_system = await client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=5,
                                                     temperature=0, extra_body={"ignore_eos": True})
    as_developer = await client.chat.completions.create(model="tiny", messages=developer, max_completion_tokens=5,
                                                        temperature=0, extra_body={"ignore_eos": True})
    assert tokens(as_developer.usage.model_dump()) == tokens(as_system.usage.model_dump()) and as_developer.usage.prompt_tokens == len(ids)
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


async def test_assistant_content_null_in_history_is_an_empty_turn(server):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None},
               {"role": "user", "content": "Still there?"}]
    chat = await openai_client(server).chat.completions.create(model="tiny", messages=history, max_completion_tokens=3)
    empty = [history[0], {"role": "assistant", "content": ""}, history[2]]
    assert chat.usage.prompt_tokens == len(server.tokenizer.apply_chat_template(empty, tokenize=True))
    r = await server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "messages.0.content" in r.json()["error"]["message"]


async def test_user_metadata_store_false_and_service_tier_are_accepted_and_change_nothing(server):
    client = openai_client(server)
    extra = {"user": "u-1", "metadata": {"team": "search", "k" * 64: "v" * 512}, "store": False, "service_tier": "auto"}
    chat = dict(model="tiny", messages=CHAT, max_completion_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    plain = await client.chat.completions.create(**chat)
    tagged = await client.chat.completions.create(**chat, **extra)
    assert tagged.choices[0].message.content == plain.choices[0].message.content
    assert tokens(tagged.usage.model_dump()) == tokens(plain.usage.model_dump())
    completion = dict(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
    plain = await client.completions.create(**completion, extra_body={"ignore_eos": True})
    tagged = await client.completions.create(**completion, extra_body={"ignore_eos": True, **extra})
    assert tagged.choices[0].text == plain.choices[0].text
    assert tokens(tagged.usage.model_dump()) == tokens(plain.usage.model_dump())
    r = await server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "store": None, "metadata": None})
    assert r.status_code == 200, r.text


async def test_continuous_usage_stats_put_running_usage_on_every_chunk(server):
    client = openai_client(server)
    chat = dict(model="tiny", messages=CHAT, max_completion_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = await client.chat.completions.create(**chat)
    stream = await client.chat.completions.create(
        **chat, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, logprobs=True)
    chunks = [chunk async for chunk in stream]
    assert all(ch.usage is not None for ch in chunks)
    used = [ch.usage.completion_tokens for ch in chunks]
    # each chunk's logprobs list its new tokens: the usage counts exactly those streamed so far
    streamed = [len(ch.choices[0].logprobs.content) if ch.choices and ch.choices[0].logprobs else 0 for ch in chunks]
    assert used == [sum(streamed[: k + 1]) for k in range(len(chunks))] and used[0] == 0 and used[-1] == 8
    assert {ch.usage.prompt_tokens for ch in chunks} == {whole.usage.prompt_tokens}
    assert all(ch.usage.total_tokens == ch.usage.prompt_tokens + ch.usage.completion_tokens for ch in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage == chunks[-2].usage
    assert tokens(chunks[-1].usage.model_dump()) == tokens(whole.usage.model_dump())

    # completions with several prompts and n: the request's running totals, without include_usage too
    base = {"prompt": ["The quick brown fox", "def f(x):"], "n": 2, "max_tokens": 6, **GREEDY}
    usage = (await server.post("/v1/completions", base)).json()["usage"]
    events = sse(await server.post("/v1/completions", {**base, "stream": True, "logprobs": 0,
                                                       "stream_options": {"continuous_usage_stats": True}}))
    running = [e["usage"]["completion_tokens"] for e in events[:-1]]
    assert all(e["choices"] for e in events[:-1])  # no usage-only chunk without include_usage
    streamed = [len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-1]]
    assert running == [sum(streamed[: k + 1]) for k in range(len(streamed))]
    assert tokens(events[-2]["usage"]) == tokens(usage)
    plain = sse(await server.post("/v1/completions", {**base, "stream": True}))
    assert all(e["usage"] is None for e in plain[:-1])


async def test_refused_fields_are_openai_errors_naming_them(server):
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=CHAT, store=True)
    assert err.value.param == "store" and "storing" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=CHAT, metadata={f"k{i}": "v" for i in range(17)})
    assert err.value.param == "metadata" and "16 keys" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=CHAT, extra_body={"frobnicate": 1})
    assert err.value.param == "frobnicate" and "frobnicate" in err.value.message


# ---- the other routes ------------------------------------------------------------------------------------


async def test_tokenize_detokenize_models_health_classify(server):
    r = await server.post("/v1/tokenize", {"prompt": "Hello world"})
    ids = server.tokenizer.encode("Hello world")
    assert r.json() == {"count": len(ids), "max_model_len": MAX_MODEL_LEN, "tokens": ids}
    r = await server.post("/v1/tokenize", {"messages": CHAT, "add_generation_prompt": False})
    assert r.json()["tokens"] == server.tokenizer.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=True)
    r = await server.post("/v1/detokenize", {"model": "tiny", "tokens": ids})
    assert r.json() == {"prompt": server.tokenizer.decode(ids)}

    models = (await server.http.get("/v1/models")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny", "tiny-classifier"]
    assert models["data"][0]["max_model_len"] == MAX_MODEL_LEN

    assert (await server.http.get("/health")).status_code == 200
    server.model.healthy = False
    r = await server.http.get("/health")
    assert r.status_code == 503 and "worker 1 died" in r.json()["error"]["message"]

    r = await server.post("/v1/classify", {"model": "tiny-classifier", "input": ["odd", "even"]})
    body = r.json()
    assert body["object"] == "list" and body["id"].startswith("classify-") and body["model"] == "tiny-classifier"
    assert [(d["index"], d["label"], d["num_classes"]) for d in body["data"]] == [(0, "positive", 2), (1, "negative", 2)]
    body = (await server.post("/v1/classify", {"input": [[3, 4], [1, 1]]})).json()
    assert [d["label"] for d in body["data"]] == ["positive", "negative"] and body["usage"]["prompt_tokens"] == 4
    assert (await server.post("/v1/classify", {"input": "abc"})).json()["data"][0]["probs"] == [0.25, 0.75]


async def test_request_ids(server):
    r = await server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "my-id-1"})
    assert r.headers["x-request-id"] == "my-id-1" and r.json()["id"] == "my-id-1"
    assert server.model.started[-1].startswith("my-id-1-0-")  # engine ids stay unique when clients reuse theirs
    r = await server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, headers={"X-Request-Id": "my-id-1"})
    assert r.status_code == 200
    for response in (await server.http.get("/nope"), await server.post("/v1/completions", {}),
                     await server.http.get("/v1/models"), await server.http.get("/health")):
        assert response.headers["x-request-id"]
    r = await server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1}, headers={"X-Request-Id": "bad id"})
    assert r.headers["x-request-id"].startswith("chatcmpl-")  # unusable ids are replaced


# ---- errors ----------------------------------------------------------------------------------------------

LONG = [5] * MAX_MODEL_LEN
ERRORS = [
    ("/v1/completions", {"prompt": "Hi", "foo": 1}, 400, "foo"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "top_k": -2}, 400, "top_k"),
    ("/v1/completions", {"prompt": "Hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "n": 300}, 400, "n"),
    ("/v1/completions", {"prompt": ["Hi"] * 100, "n": 3}, 400, "n"),
    ("/v1/classify", {"input": ["x"] * 300}, 400, "input"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"1": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"continuous_usage_stats": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "Hi", "stream": True, "stream_options": {"usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "Hi", "store": True}, 400, "store"),
    ("/v1/chat/completions", {"messages": CHAT, "store": True}, 400, "store"),
    ("/v1/completions", {"prompt": "Hi", "metadata": {f"k{i}": "v" for i in range(17)}}, 400, "metadata"),
    ("/v1/chat/completions", {"messages": CHAT, "metadata": {"k" * 65: "v"}}, 400, "metadata"),
    ("/v1/chat/completions", {"messages": CHAT, "metadata": {"k": "v" * 513}}, 400, "metadata"),
    ("/v1/chat/completions", {"messages": CHAT, "metadata": {"k": 1}}, 400, "metadata"),
    ("/v1/chat/completions", {"messages": CHAT, "service_tier": 3}, 400, "service_tier"),
    ("/v1/chat/completions", {"messages": CHAT, "foo": 1}, 400, "foo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}, *CHAT[1:]]}, 400, "messages"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN - 2}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 95}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "min_tokens": 5, "max_tokens": 2}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400, None),  # tokenizer's ValueError
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model"),
    ("/v1/tokenize", {"prompt": "a", "messages": CHAT}, 400, "messages"),
    ("/v1/tokenize", {}, 400, "messages"),
    ("/v1/detokenize", {"tokens": [10**6]}, 400, None),
    ("/v1/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("/v1/classify", {"input": ""}, 400, "input"),
    ("/v1/classify", {"input": ["ok", " "]}, 400, "input"),  # whitespace only
    ("/v1/classify", {"input": "x", "model": "tiny-other"}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERRORS, ids=[f"{p}-{s}-{m}" for p, _, s, m in ERRORS])
async def test_errors_are_openai_bodies_naming_the_field(server, path, body, status, param):
    r = await server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == status
    assert error["type"] == {400: "BadRequestError", 404: "NotFoundError"}[status]
    assert r.headers["x-request-id"]
    assert not server.engine.engine.has_unfinished_requests()


@pytest.mark.parametrize(("content", "expect"), [
    (b'{"prompt": "Hi",', "malformed JSON"), (b"[1, 2]", "JSON object"), (b"", "required"),
])
async def test_malformed_bodies(server, content, expect):
    r = await server.http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400 and expect in r.json()["error"]["message"]


async def test_unknown_route_and_method(server):
    r = await server.http.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = await server.http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405


async def test_model_errors_400_when_invalid_500_otherwise_and_the_server_keeps_serving(server):
    server.model.fail_with = ValueError("request_id 'x' is already in use")  # reaches us as RayTaskError(ValueError)
    for stream in (False, True):
        r = await server.post("/v1/completions", {"prompt": "Hi", "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["message"] == "request_id 'x' is already in use"
    server.model.fail_with = RuntimeError("CUDA error: device-side assert")
    r = await server.post("/v1/completions", {"prompt": "Hi"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert "CUDA" not in r.json()["error"]["message"]  # internals stay in the log
    server.model.fail_with = None
    assert (await server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize(("error", "status"), [(ValueError("bad stop"), 400), (RuntimeError("boom"), 500)])
async def test_a_failure_mid_stream_is_an_error_event_then_done(lm, error, status):
    model = GatedModel(before_gate=1, total=3)
    model.fail_at_gate = error
    ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    async with client_for(ingress) as http:
        events = sse(await http.post("/v1/completions", json={"prompt": [1, 2], "stream": True}))
    assert events[0]["choices"][0]["text"] == "t0 " and len(events) == 3
    assert events[1]["error"]["code"] == status and events[1]["error"]["message"] == ("bad stop" if status == 400 else "internal server error")
    assert (await ingress.model.model_info.remote())["model"] == "gated"  # the server is fine


async def test_classify_without_a_classifier(lm):
    ingress = Ingress(LocalHandle(GatedModel()), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    async with client_for(ingress) as http:
        r = await http.post("/v1/classify", json={"input": "hello"})
    assert r.status_code == 404 and "classifier" in r.json()["error"]["message"]


# ---- streaming behaviour: timing, concurrency, disconnects ------------------------------------------------


class AsgiCall:
    """One raw ASGI request that records what the app sends. The client leaves on `leave()`: the server then
    reports `http.disconnect` to `receive()`, or (`silent=True`) only fails the next write, as some do."""

    def __init__(self, app, path: str, body: dict, silent: bool = False) -> None:
        self.app, self.sent, self.silent, self.gone = app, [], silent, asyncio.Event()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1234), "server": ("test", 80),
        }
        self._inbox = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    def leave(self) -> None:
        self.gone.set()

    async def receive(self):
        if self._inbox:
            return self._inbox.pop(0)
        await self.gone.wait()
        if self.silent:
            await asyncio.Event().wait()  # never tells
        return {"type": "http.disconnect"}

    async def send(self, message):
        if self.gone.is_set():
            raise OSError("connection reset by peer")
        self.sent.append(message)

    @property
    def data_events(self) -> list[str]:
        text = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body").decode()
        return [b for b in text.split("\n\n") if b]

    async def run(self):
        await self.app(self.scope, self.receive, self.send)


@pytest.mark.parametrize("silent", [False, True], ids=["disconnect-message", "failed-write"])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_client_that_disconnects_cancels_and_aborts_the_generation(lm, path, silent):
    model = GatedModel(before_gate=2, total=10)
    ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    body = {"prompt": [[5, 6], [7]]} if path == "/v1/completions" else {"messages": CHAT}
    call = AsgiCall(ingress.app, path, {**body, "stream": True, "max_tokens": 10}, silent)
    task = asyncio.create_task(call.run())
    await until(lambda: len(call.data_events) >= 2)
    call.leave()
    if silent:
        model.gate.set()  # the next write fails
    await asyncio.wait_for(task, 10)
    await until(lambda: sorted(model.aborted) == sorted(model.started))
    assert len(model.started) == len(body.get("prompt", [1])) and "data: [DONE]" not in call.data_events
    if not silent:  # the generation was stopped where it stood, not run to its end
        await until(lambda: sorted(model.cancelled) == sorted(model.started))
        assert not model.gate.is_set()


async def test_a_disconnect_frees_the_engine(server):
    call = AsgiCall(server.ingress.app, "/v1/completions", {"prompt": "Hi", "max_tokens": 80, "stream": True, **GREEDY})
    task = asyncio.create_task(call.run())
    await until(lambda: len(call.data_events) >= 1)
    call.leave()
    await asyncio.wait_for(task, 10)
    await until(lambda: server.model.aborted == server.model.started)
    await until(lambda: not server.engine.engine.has_unfinished_requests())
    assert server.engine.engine.kv.usage == 0.0


async def test_each_output_is_sent_as_it_arrives(lm):
    model = GatedModel(before_gate=1, total=3)
    ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    call = AsgiCall(ingress.app, "/v1/completions", {"prompt": [1, 2], "stream": True})
    task = asyncio.create_task(call.run())
    await until(lambda: len(call.data_events) >= 1)  # the first token is out while the model still waits
    assert json.loads(call.data_events[0].removeprefix("data: "))["choices"][0]["text"] == "t0 "
    model.gate.set()
    await asyncio.wait_for(task, 10)
    # the two outputs after the gate may arrive together and then go out as one event (test below)
    texts = [json.loads(e.removeprefix("data: "))["choices"][0]["text"] for e in call.data_events[:-1]]
    assert call.data_events[-1] == "data: [DONE]" and "".join(texts) == "t0 t1 t2 " and len(texts) in (2, 3)


async def test_outputs_that_queue_up_behind_a_slow_reader_go_out_as_one():
    model = GatedModel(before_gate=5, total=5)  # five outputs back to back
    streams = ModelStreams(LocalHandle(model), [[1, 2]], SamplingParams(max_tokens=5), ["r"])
    await streams.start()
    # the reader is busy elsewhere while the model goes on to its end: every output waits in the streams' queue
    await until(lambda: all(task.done() for task in streams._tasks), what="the model stream to end unread")
    outs = [out async for _, out in streams.outputs()]
    await streams.close()
    assert len(outs) == 1 and outs[-1].finished and outs[-1].text == "t0 t1 t2 t3 t4 "
    assert [t for out in outs for t in out.outputs[0].new_token_ids] == [0, 1, 2, 3, 4]  # deltas still add up
    assert "".join(out.outputs[0].new_text for out in outs) == outs[-1].text


async def test_prompts_and_n_run_concurrently(lm):
    model = GatedModel(before_gate=1, total=2)
    ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    async with client_for(ingress) as http:
        request = asyncio.create_task(http.post("/v1/completions", json={"prompt": [[1], [2], [3]], "n": 2}))
        await until(lambda: model.max_running == 3)  # all three prompts started before any could finish
        model.gate.set()
        r = await request
    assert [c["index"] for c in r.json()["choices"]] == list(range(6))
    assert all(c["text"] == "t0 t1 " for c in r.json()["choices"])


# ---- the openai client, unchanged -------------------------------------------------------------------------


async def test_the_openai_client_works_unchanged(server):
    client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", http_client=server.http, max_retries=0)
    c = await client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5
    stream = await client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True})
    assert "".join([chunk.choices[0].text async for chunk in stream]) == c.choices[0].text

    chat = await client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=4, temperature=0,
                                                logprobs=True, top_logprobs=2, user="u1", seed=1)
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].logprobs.content) == 4
    stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=4, temperature=0,
                                                  logprobs=True, top_logprobs=2, user="u1", seed=1, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.total_tokens == chat.usage.total_tokens

    assert [m.id async for m in client.models.list()] == ["tiny", "tiny-classifier"]
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="gpt-4", prompt="Hello")
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="tiny", messages=CHAT, temperature=-1)
    assert err.value.param == "temperature"


async def test_serve_ingress_hook_builds_the_app(lm):
    """What `serve.ingress()(Ingress)` does on a replica: construct, then call `__serve_build_asgi_app__`."""
    from ray import serve

    wrapper = serve.ingress()(Ingress)
    replica = wrapper.__new__(wrapper)
    await replica.__init__(LocalHandle(GatedModel()), LocalHandle(TokenizerDeployment(tokenizer=lm[1])))
    app = replica.__serve_build_asgi_app__()
    replica._set_asgi_app(app)
    assert replica.app is app is replica._fastapi
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=replica.app), base_url="http://t") as http:
        assert (await http.get("/v1/models")).json()["data"][0]["id"] == "gemma"


def test_hold_back_keeps_a_possible_stop_string_start():
    assert hold_back("Hello wor", ["world"]) == "Hello "
    assert hold_back("Hello w", ["xyz", "wa"]) == "Hello "
    assert hold_back("Hello", ["world"]) == "Hello" and hold_back("abc", []) == "abc"
    assert hold_back("aab", ["abc", "b!"]) == "a"  # the longest possible start wins


async def test_in_a_serve_replica_the_request_id_header_is_left_to_serve():
    """Serve's HTTP server puts the id in the request headers and echoes it; a second header would be wrong."""
    app = FastAPI()
    install(app, echo_request_id=False)

    @app.get("/id")
    async def show(request: Request) -> dict:
        return {"id": request_id(request)}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        r = await http.get("/id", headers={"x-request-id": "set-by-serve"})
    assert r.json() == {"id": "set-by-serve"} and "x-request-id" not in r.headers
    assert not in_serve_replica()


async def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(server):
    """A prompt sent again is served from the prefix cache: usage.prompt_tokens_details.cached_tokens says how much,
    the same figure streamed (with include_usage and continuous usage) as not, and the text is unchanged."""
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 3)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 5, **GREEDY}
    first = (await server.post("/v1/completions", body)).json()
    second = (await server.post("/v1/completions", body)).json()
    n = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (n - 1) // 4 * 4 and cached > 0  # every full block before the last token (block_size 4)
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    events = sse(await server.post("/v1/completions", {**body, "stream": True, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}))
    assert events[-2]["usage"] == second["usage"]
    assert all(e["usage"]["prompt_tokens_details"]["cached_tokens"] == cached for e in events[:-1])
    chat = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3, **GREEDY}
    await server.post("/v1/chat/completions", chat)
    again = (await server.post("/v1/chat/completions", chat)).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def tokens(usage: dict) -> dict:
    """A usage body without its prefix-cache details: those depend on what ran before (a repeated prompt hits)."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}
