"""Client-side load for the Serve tests: threads sending a mix of request kinds back to back over HTTP, with every
outcome classified, so a test can count what completed, what failed with a clear error and what hung."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls watch from an old oak tree".split()
# completion, chat, classify, streamed or not, and a stream the client leaves after its first event
KINDS = ("completion", "completion_stream", "chat", "chat_stream", "classify", "abort_stream")


@dataclass
class Outcome:
    kind: str
    result: str  # ok | aborted (left on purpose) | error (a 4xx/5xx with an OpenAI error body, or one in-band)
    #              | unclear (any other failure: no body, a cut connection) | hung (past the client's timeout)
    status: int | None = None
    seconds: float = 0.0
    message: str = ""


def _error(kind: str, status: int | None, body: str, start: float) -> Outcome:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return Outcome(kind, "unclear", status, time.monotonic() - start, body[:200])
    return Outcome(kind, "error" if message else "unclear", status, time.monotonic() - start, message[:200])


def send(client: httpx.Client, kind: str, model: str = "tiny", classifier: str | None = None,
         max_tokens: int = 16, rng: random.Random | None = None) -> Outcome:
    """One request of `kind` through `client` (its base_url and timeout set); never raises."""
    rng = rng or random.Random()
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 24)))
    start = time.monotonic()
    sampling = {"max_tokens": max_tokens, "temperature": rng.choice([0.0, 0.8]), "seed": rng.randrange(1000)}
    try:
        if kind == "classify":
            r = client.post("/v1/classify", json={"model": classifier, "input": [text]})
            ok = r.status_code == 200 and len(r.json()["data"]) == 1
            return Outcome(kind, "ok", 200, time.monotonic() - start) if ok else _error(kind, r.status_code, r.text, start)
        chat = kind.startswith("chat")
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": model, **sampling}
        body.update({"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text})
        if not kind.endswith("stream"):
            r = client.post(path, json=body)
            if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length"):
                return Outcome(kind, "ok", 200, time.monotonic() - start)
            return _error(kind, r.status_code, r.text, start)
        with client.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                return _error(kind, r.status_code, r.read().decode(errors="replace"), start)
            finished = done = False
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if kind == "abort_stream":
                    return Outcome(kind, "aborted", 200, time.monotonic() - start)
                if line == "data: [DONE]":
                    done = True
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return _error(kind, event["error"].get("code"), line[6:], start)
                finished |= any(c.get("finish_reason") for c in event["choices"])
            if done and finished:
                return Outcome(kind, "ok", 200, time.monotonic() - start)
            return Outcome(kind, "unclear", 200, time.monotonic() - start, "stream ended without [DONE] or finish")
    except httpx.TimeoutException as exc:
        return Outcome(kind, "hung", None, time.monotonic() - start, repr(exc))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(kind, "unclear", None, time.monotonic() - start, repr(exc)[:200])


@dataclass
class Load:
    """`workers` threads, each sending requests of a random kind from `kinds` back to back until `stop()`."""

    url: str
    workers: int = 4
    kinds: tuple[str, ...] = KINDS
    classifier: str | None = None
    max_tokens: int = 16
    timeout_s: float = 60.0
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                out = send(client, rng.choice(self.kinds), classifier=self.classifier, max_tokens=self.max_tokens,
                           rng=rng)
                with self._lock:
                    self.outcomes.append(out)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def stop(self) -> list[Outcome]:
        """Stop and join: every request ends within its timeout, so no thread may still be running."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s + 30)
        assert not any(t.is_alive() for t in self._threads), "a request hung past its client timeout"
        return self.snapshot()


def tally(outcomes: list[Outcome]) -> Counter:
    return Counter(o.result for o in outcomes)
