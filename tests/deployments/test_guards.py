"""API keys, request limits and the access log of the ingress, without Ray (deployments/guards.py): `Ingress`
over `LocalHandle`s to the real engine on a tiny random Gemma, or to the scripted GatedModel, through httpx's
ASGI transport and a raw ASGI driver."""

from __future__ import annotations

import hmac
import json
import logging

import httpx
import openai
import pytest
from tests.helpers.fakes import (
    FakeClassifier,
    GatedModel,
    LocalHandle,
    MetricsRecorder,
    tiny_engine,
)
from tests.helpers.waiting import until

from deployments.app import AppArgs
from deployments.guards import ApiKeys, Limits
from deployments.ingress import Ingress
from deployments.metrics import Metrics
from deployments.model import ModelDeployment
from deployments.tokenizer import TokenizerDeployment

pytestmark = pytest.mark.anyio
KEY = "sk-test-7f3a9c01e5d2"
GREEDY = {"temperature": 0, "ignore_eos": True}
PROMPT = "Zebras juggle quietly"  # a prompt that must not show up in logs
CHAT = [{"role": "user", "content": PROMPT}]


@pytest.fixture
async def make(lm):
    """make(**ingress options) -> (Ingress, httpx client, MetricsRecorder) over the real engine."""
    engines, clients = [], []

    async def build(model=None, **options):
        if model is None:
            engines.append(tiny_engine(*lm, max_model_len=96))
            model = ModelDeployment(engine=engines[-1])
        recorder = MetricsRecorder()
        ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])),
                          LocalHandle(FakeClassifier()), served_model_name="tiny", classifier_name="tiny-classifier",
                          metrics=Metrics("tiny", recorder), **options)
        clients.append(httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://test"))
        return ingress, clients[-1], recorder

    yield build
    for client in clients:
        await client.aclose()
    for engine in engines:
        await engine.shutdown()


def access_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "gemma.access"]


# ---- API keys ----------------------------------------------------------------------------------------------

# one request per route of the app: test_every_route_is_covered keeps this list complete
ROUTES = {
    "/v1/completions": ("POST", {"prompt": "Hi", "max_tokens": 2}),
    "/v1/chat/completions": ("POST", {"messages": CHAT, "max_tokens": 2}),
    "/v1/classify": ("POST", {"input": "abc"}),
    "/v1/tokenize": ("POST", {"prompt": "Hi"}),
    "/v1/detokenize": ("POST", {"tokens": [5, 6]}),
    "/v1/models": ("GET", None),
    "/openapi.json": ("GET", None),
    "/docs": ("GET", None),
    "/docs/oauth2-redirect": ("GET", None),
    "/redoc": ("GET", None),
}


async def call(client: httpx.AsyncClient, path: str, headers: dict | None = None) -> httpx.Response:
    method, body = ROUTES[path]
    return await client.request(method, path, json=body, headers=headers or {})


async def test_every_route_is_covered(make):
    ingress, _, _ = await make()
    assert {r.path for r in ingress.app.routes} == set(ROUTES) | {"/health"}


@pytest.mark.parametrize("path", sorted(ROUTES))
async def test_every_route_but_health_needs_a_valid_key(make, path):
    _, client, metrics = await make(api_keys=[KEY])
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": "Bearer "}, {"Authorization": f"Bearer {KEY}x"}):
        r = await call(client, path, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": "AuthenticationError",
                                      "param": None, "code": "invalid_api_key"}}
        assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-request-id"]
    assert len(metrics.values("request_errors", type="authentication")) == 5
    r = await call(client, path, {"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert (await client.get("/health")).status_code == 200  # probes have no key


async def test_unknown_routes_are_401_too_without_a_key(make):
    _, client, _ = await make(api_keys=[KEY])
    assert (await client.get("/v2/secret")).status_code == 401  # which routes exist is not given away
    assert (await client.get("/v2/secret", headers={"Authorization": f"Bearer {KEY}"})).status_code == 404


async def test_no_keys_means_no_authentication(make, monkeypatch):
    monkeypatch.delenv("GEMMA_API_KEYS", raising=False)
    _, client, _ = await make()
    assert (await call(client, "/v1/models")).status_code == 200


async def test_keys_from_args_and_the_environment(make, monkeypatch):
    monkeypatch.setenv("GEMMA_API_KEYS", " env-key-1, ,env-key-2 ")
    ingress, client, _ = await make(api_keys=["arg-key"])
    assert len(ingress.keys) == 3
    for key, status in (("arg-key", 200), ("env-key-1", 200), ("env-key-2", 200), ("env-key-1,env-key-2", 401),
                        ("", 401), ("other", 401)):
        r = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == status, key


def test_keys_are_compared_in_constant_time_against_every_key(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(["first", "second-key", "third-key-longer"])
    assert keys.allows("Bearer first") and keys.allows("bearer third-key-longer") and not keys.allows("Bearer x")
    assert calls == [(32, 32)] * 9  # every key, every time, on equal-length digests: no early exit, no length leak
    assert "first" not in repr(keys) and "first" not in repr(vars(keys))


async def test_the_openai_client_gets_an_authentication_error(make):
    _, client, _ = await make(api_keys=[KEY])
    wrong = openai.AsyncOpenAI(base_url="http://test/v1", api_key="nope", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        await wrong.models.list()
    assert err.value.code == "invalid_api_key"
    right = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEY, http_client=client, max_retries=0)
    assert [m.id async for m in right.models.list()] == ["tiny", "tiny-classifier"]


async def test_keys_never_reach_the_logs(make, caplog, monkeypatch):
    monkeypatch.setenv("GEMMA_API_KEYS", "env-secret-key")
    caplog.set_level(logging.DEBUG)
    _, client, _ = await make(api_keys=[KEY], log_prompts=True)
    for key in (KEY, "env-secret-key", "wrong-secret-key"):
        headers = {"Authorization": f"Bearer {key}"}
        await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=headers)
        await client.post("/v1/completions", json={"prompt": "Hi", "temperature": -1}, headers=headers)
        await client.get("/nope", headers=headers)
    assert len(access_lines(caplog)) == 9
    logged = caplog.text + "".join(json.dumps(getattr(r, "access", None)) + repr(r.args) for r in caplog.records)
    for secret in (KEY, "env-secret-key", "wrong-secret-key"):
        assert secret not in logged
    args = AppArgs(api_keys=[KEY])
    assert KEY not in repr(args) and KEY not in str(args.model_dump())  # the config's repr and dumps hide it too


# ---- limits ------------------------------------------------------------------------------------------------

LIMITS = [  # (limits, path, body, status, param, what the message names)
    ({"max_prompt_tokens": 5}, "/v1/completions", {"prompt": [1, 2, 3, 4, 5, 6]}, 400, "prompt", "6 tokens"),
    ({"max_prompt_tokens": 5}, "/v1/chat/completions", {"messages": CHAT}, 400, "messages", "tokens"),
    ({"max_tokens": 8}, "/v1/completions", {"prompt": "Hi", "max_tokens": 9}, 400, "max_tokens", "9"),
    ({"max_tokens": 8}, "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 9}, 400,
     "max_completion_tokens", "9"),
    ({"max_n": 2}, "/v1/completions", {"prompt": "Hi", "n": 3}, 400, "n", "3"),
    ({"max_n": 2}, "/v1/chat/completions", {"messages": CHAT, "n": 3}, 400, "n", "3"),
    ({"max_choices": 5}, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, 400, "n", "6 completions"),
    ({"max_stop": 2}, "/v1/completions", {"prompt": "Hi", "stop": ["a", "b", "c"]}, 400, "stop", "3 stop strings"),
    ({"max_stop": 2}, "/v1/chat/completions", {"messages": CHAT, "stop": ["a", "b", "c"]}, 400, "stop", "3 stop"),
    ({"max_messages": 2}, "/v1/chat/completions", {"messages": CHAT * 3}, 400, "messages", "3 messages"),
    ({"max_messages": 2}, "/v1/tokenize", {"messages": CHAT * 3}, 400, "messages", "3 messages"),
    ({"max_classify_inputs": 2}, "/v1/classify", {"input": ["a", "b", "c"]}, 400, "input", "3 inputs"),
    ({"max_request_bytes": 100}, "/v1/completions", {"prompt": "x" * 200}, 413, None, "bytes"),
]


@pytest.mark.parametrize(("limits", "path", "body", "status", "param", "what"), LIMITS,
                         ids=[f"{next(iter(lim))}-{p}" for lim, p, *_ in LIMITS])
async def test_each_limit_is_a_4xx_naming_it_and_the_value(make, limits, path, body, status, param, what):
    ingress, client, metrics = await make(limits=limits)
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    (name, limit), = limits.items()
    assert f"({name} is {limit})" in error["message"] and what in error["message"], error
    assert error["param"] == param and error["code"] == status
    assert len(metrics.values("request_errors", type="too_large" if status == 413 else "validation")) == 1
    assert not ingress.model._obj.engine.engine.has_unfinished_requests()  # refused before any generation


async def test_at_the_limits_requests_are_served_and_max_tokens_is_the_default(make, lm):
    chat = [{"role": "user", "content": "Hi"}]
    size = len(lm[1].apply_chat_template(chat, tokenize=True))
    _, client, _ = await make(limits={"max_n": 2, "max_stop": 2, "max_messages": 1, "max_tokens": 8,
                                      "max_prompt_tokens": size, "max_classify_inputs": 2, "max_choices": 4})
    r = await client.post("/v1/completions", json={"prompt": [list(range(1, size + 1)), [7]], "n": 2,
                                                   "stop": ["a", "b"], "max_tokens": 8, **GREEDY})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4, r.text
    r = await client.post("/v1/chat/completions", json={"messages": chat, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8  # no max_tokens: the limit's
    assert (await client.post("/v1/classify", json={"input": ["a", "b"]})).status_code == 200


async def test_max_tokens_default_stays_within_the_context(make, lm):
    _, client, _ = await make(limits={"max_tokens": 90})  # the context is 96 tokens
    messages = [{"role": "user", "content": "Hello there, how are you today?"}]
    size = len(lm[1].apply_chat_template(messages, tokenize=True))
    r = await client.post("/v1/chat/completions", json={"messages": messages, **GREEDY})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": size, "completion_tokens": 96 - size, "total_tokens": 96,
                               "prompt_tokens_details": {"cached_tokens": 0}}


async def test_a_large_body_is_refused_by_its_content_length_without_reading_it(lm):
    ingress = Ingress(LocalHandle(GatedModel()), LocalHandle(TokenizerDeployment(tokenizer=lm[1])),
                      limits={"max_request_bytes": 1000})
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"x" * 500, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"5000000")],
             "client": ("127.0.0.1", 1), "server": ("test", 80)}
    await ingress.app(scope, receive, send)
    assert sent[0]["status"] == 413 and received == []
    assert b"5000000 bytes" in sent[1]["body"]

    # no Content-Length (chunked): read while counting, refused as soon as it passes the limit
    sent.clear()
    scope["headers"] = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    await ingress.app(scope, receive, send)
    assert sent[0]["status"] == 413 and len(received) == 3  # 1500 bytes read of an endless body, then stop


async def test_a_chunked_body_under_the_limit_is_served(make):
    _, client, _ = await make(limits={"max_request_bytes": 200})

    async def chunks():
        body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
        for i in range(0, len(body), 7):
            yield body[i:i + 7]

    r = await client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text

    async def big():
        yield b'{"prompt": "' + b"x" * 150
        yield b"x" * 150 + b'"}'

    r = await client.post("/v1/completions", content=big(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_request_bytes is 200" in r.json()["error"]["message"]


async def test_past_the_timeout_a_request_is_aborted_with_a_408(lm, caplog):
    model = GatedModel(before_gate=1, total=4)  # one token, then waits for a gate that never opens
    recorder = MetricsRecorder()
    ingress = Ingress(LocalHandle(model), LocalHandle(TokenizerDeployment(tokenizer=lm[1])),
                      limits={"request_timeout_s": 0.3}, metrics=Metrics("gated", recorder))
    caplog.set_level(logging.INFO, logger="gemma.access")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://t") as client:
        r = await client.post("/v1/completions", json={"prompt": [1, 2]})
        assert r.status_code == 408 and r.json()["error"]["type"] == "RequestTimeoutError"
        assert "request_timeout_s is 0.3 s" in r.json()["error"]["message"]
        await until(lambda: model.aborted == model.started)

        # a stream: what was generated, then an in-band 408, then [DONE]; the generation is aborted
        r = await client.post("/v1/completions", json={"prompt": [1, 2], "stream": True})
        assert r.status_code == 200
        events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
        assert json.loads(events[0])["choices"][0]["text"] == "t0 "
        assert json.loads(events[1])["error"]["code"] == 408 and events[2:] == ["[DONE]"]
        await until(lambda: len(model.aborted) == 2)
    assert recorder.values("request_errors", type="timeout") == [1.0, 1.0]
    lines = [r.access for r in access_lines(caplog)]
    assert [(a["status"], a["error"], a["stream"]) for a in lines] == [(408, "timeout", False), (200, "timeout", True)]
    assert lines[1]["output_tokens"] == 1 and lines[1]["finish_reason"] == "abort"


def test_limits_and_app_args_validate():
    assert AppArgs(limits={"max_n": 4}).limits.max_n == 4
    with pytest.raises(ValueError):
        AppArgs(limits={"max_nn": 4})  # unknown keys are errors
    with pytest.raises(ValueError):
        Limits(max_request_bytes=0)


# ---- the access log ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_one_access_line_per_request_with_its_fields_and_no_prompt(make, caplog, stream):
    caplog.set_level(logging.DEBUG)  # every logger: the prompt must be in none of them
    _, client, _ = await make()
    body = {"prompt": PROMPT, "max_tokens": 7, "stream": stream, **GREEDY}
    if stream:
        body["stream_options"] = {"include_usage": True}
    r = await client.post("/v1/completions", json=body, headers={"x-request-id": "access-1"})
    assert r.status_code == 200
    usage = json.loads(r.text.split("\n\n")[-3].removeprefix("data: "))["usage"] if stream else r.json()["usage"]
    [line] = access_lines(caplog)
    fields = line.access
    assert fields["request_id"] == "access-1" and fields["route"] == "/v1/completions" and fields["method"] == "POST"
    assert (fields["status"], fields["model"], fields["stream"], fields["error"]) == (200, "tiny", stream, None)
    assert fields["prompt_tokens"] == usage["prompt_tokens"]
    assert fields["output_tokens"] == usage["completion_tokens"] == 7
    assert fields["finish_reason"] == "length" and 0 < fields["ttft_s"] <= fields["total_s"]
    message = line.getMessage()
    assert message.startswith("request_id=access-1 method=POST route=/v1/completions status=200 model=tiny ")
    assert "output_tokens=7 " in message and "finish_reason=length" in message and "\n" not in message
    assert PROMPT not in caplog.text and "Zebras" not in caplog.text


async def test_log_prompts_puts_the_prompt_in_the_access_line(make, caplog):
    caplog.set_level(logging.INFO, logger="gemma.access")
    _, client, _ = await make(log_prompts=True)
    await client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})
    await client.post("/v1/completions", json={"prompt": "a\nb \"c\"", "max_tokens": 2})
    chat, completion = access_lines(caplog)
    assert PROMPT in chat.getMessage() and chat.access["prompt"] == json.dumps([CHAT[0]], ensure_ascii=False)
    assert 'prompt="a\\nb \\"c\\""' in completion.getMessage()  # quoted: a prompt cannot forge a log line


async def test_failed_requests_are_logged_and_counted_by_type(make, caplog):
    caplog.set_level(logging.INFO, logger="gemma.access")
    _, client, metrics = await make()
    statuses = [
        (await client.post("/v1/completions", json={"prompt": "Hi", "temperature": -1})).status_code,
        (await client.post("/v1/completions", json={"prompt": "Hi", "model": "gpt-4"})).status_code,
        (await client.get("/nope")).status_code,
        (await client.post("/v1/completions", content=b"{oops",
                           headers={"content-type": "application/json"})).status_code,
        (await client.get("/v1/models")).status_code,
    ]
    assert statuses == [400, 404, 404, 400, 200]
    assert [(r.access["status"], r.access["error"]) for r in access_lines(caplog)] == [
        (400, "validation"), (404, "not_found"), (404, "not_found"), (400, "validation"), (200, None)]
    assert metrics.total("request_errors", type="validation", model_name="tiny") == 2
    assert metrics.total("request_errors", type="not_found") == 2
