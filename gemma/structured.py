"""Structured outputs: `StructuredOutputsParams` (vLLM's names) and the grammars that hold a request to them.

    SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))

One of `json` (a JSON schema, dict or text), `regex`, `choice` (one of the strings), `grammar` (GBNF or Lark) or
`json_object` (any JSON object). The engine compiles it once per distinct spec (`GrammarCompiler`, cached), gives
each sequence its own matcher, and before sampling masks every token the grammar does not allow at that point
(EOS only where the grammar may end), on the constrained rows only (`apply_bitmask_`). docs/structured.md.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

KINDS = ("json", "regex", "choice", "grammar", "json_object")


with warnings.catch_warnings():  # vLLM's field name `json` shadows BaseModel's deprecated json(): intended
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class StructuredOutputsParams(BaseModel):
        """What a request's output must match: exactly one of the five kinds (vLLM's field names).

        Checked here for shape only; whether a schema, regex or grammar compiles is checked when the engine takes
        the request (`LLMEngine.add_request` raises a ValueError naming `structured_outputs.<kind>`).
        """

        model_config = ConfigDict(extra="forbid", frozen=True)

        json: dict[str, Any] | str | None = None  # a JSON schema (as a dict or as JSON text)
        regex: str | None = None  # the whole output matches this regular expression
        choice: list[str] | None = None  # the output is exactly one of these strings
        grammar: str | None = None  # a GBNF (`root ::= ...`) or Lark (`start: ...`) grammar
        json_object: bool | None = None  # any JSON object (OpenAI's response_format {"type": "json_object"})
        disable_any_whitespace: bool = False  # JSON without whitespace between tokens (compact)

        @field_validator("json", mode="before")
        @classmethod
        def _schema(cls, value: Any) -> Any:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"not valid JSON: {exc}") from None
            if value is not None and not isinstance(value, dict | bool):
                raise ValueError("must be a JSON schema: an object (or true)")
            return {} if value is True else value

        @field_validator("choice")
        @classmethod
        def _choices(cls, value: list[str] | None) -> list[str] | None:
            if value is not None and (not value or any(not c for c in value)):
                raise ValueError("must be a non-empty list of non-empty strings")
            return value

        @model_validator(mode="after")
        def _exactly_one(self) -> StructuredOutputsParams:
            given = [k for k in KINDS if getattr(self, k) not in (None, False)]
            if len(given) != 1:
                raise ValueError(f"give exactly one of {', '.join(KINDS)}; got {', '.join(given) or 'none'}")
            return self

        @property
        def kind(self) -> str:
            return next(k for k in KINDS if getattr(self, k) not in (None, False))

        @property
        def key(self) -> tuple[str, str, bool]:
            """What identifies the compiled grammar: equal keys share one compilation."""
            kind = self.kind
            value = getattr(self, kind)
            text = json.dumps(value, sort_keys=True) if kind in ("json", "choice") else str(value)
            return kind, text, self.disable_any_whitespace


# ---- compiling and matching (llguidance) ---------------------------------------------------------------------
#
# llguidance (vLLM's "guidance" backend) was chosen over xgrammar and outlines-core by measurement on the 262k
# Gemma 3 vocabulary (benchmarks/grammar_backends.py, docs/structured.md): a typical schema compiles in ~1 ms
# (xgrammar ~65 ms, outlines-core ~30 s), its masks cost ~0.3 ms per row, it enforces maxLength together with
# pattern (xgrammar drops maxLength there, so its outputs failed jsonschema), and it has no dependencies.

# JSON is generated with fixed separators: unbounded whitespace lets a model emit blanks until max_tokens.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
JSON_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def grammar_text(spec: StructuredOutputsParams) -> str:
    """llguidance's grammar for `spec`; ValueError naming `structured_outputs.<kind>` when it cannot be built."""
    import llguidance as llg

    kind = spec.kind
    layout = JSON_COMPACT if spec.disable_any_whitespace else JSON_LAYOUT
    try:
        if kind == "json":
            return llg.LLMatcher.grammar_from_json_schema(spec.json, overrides=layout)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=layout)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return llg.grammar_from("choice", json.dumps(spec.choice))
        return llg.grammar_from("grammar", spec.grammar)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"structured_outputs.{kind}: {exc}") from None


def check_grammar(spec: StructuredOutputsParams) -> None:
    """Whether `spec` compiles, without a tokenizer (a job checks its default this way before it starts);
    ValueError naming `structured_outputs.<kind>`."""
    import llguidance as llg

    error = llg.LLMatcher.validate_grammar(grammar_text(spec))
    if error:
        raise ValueError(f"structured_outputs.{spec.kind}: {error}")


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer; thread-safe, with an LRU cache of compiled grammars.

    The tokenizer's preprocessing (seconds for a 262k vocabulary) starts at construction on the compiler's own
    thread, so an engine does not wait for it; `compile` (blocking) and `submit` (a Future) wait for it once.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256) -> None:
        import llguidance as llg

        self._llg = llg
        self.vocab_size, self.cache_size = vocab_size, cache_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compiler")
        self._tokenizer = self._pool.submit(llg.LLTokenizer, tokenizer_json, n_vocab=vocab_size,
                                            eos_token=list(eos_token_ids))
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: Any = None

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """A compiled grammar (an llguidance matcher in its start state; `matcher` copies it); ValueError naming
        `structured_outputs.<kind>` when the schema, regex or grammar is invalid or uses what is unsupported."""
        key = spec.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        text = grammar_text(spec)
        compiled = self._llg.LLMatcher(self._tokenizer.result(), text, log_level=0)
        if compiled.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {compiled.get_error()}")
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, spec: StructuredOutputsParams) -> bool:
        with self._lock:
            return spec.key in self._cache

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """`compile(spec)` on the compiler's thread."""
        return self._pool.submit(self.compile, spec)

    def matcher(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher for one sequence."""
        return self.compile(spec).deep_copy()

    def fill_bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """(len(matchers), ceil(V / 32)) int32: bit t of row i is set when matchers[i] allows token t next."""
        import llguidance.torch as llt

        bitmask = llt.allocate_token_bitmask(len(matchers), self.vocab_size)
        if len(matchers) == 1:
            llt.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            if self._executor is None:
                self._executor = self._llg.LLExecutor(num_threads=min(4, os.cpu_count() or 1))
            llt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        return bitmask

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def apply_bitmask_(logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
    """Set `logits[rows[i], t]` to -inf (in place) wherever bit t of `bitmask[i]` is 0."""
    vocab = logits.shape[-1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")[:, :vocab]  # 1 byte per token
    banned = torch.from_numpy(bits).view(torch.bool).logical_not_().to(logits.device)
    if rows == list(range(logits.shape[0])):
        logits.masked_fill_(banned, float("-inf"))
    else:
        for i, row in enumerate(rows):
            logits[row].masked_fill_(banned[i], float("-inf"))
