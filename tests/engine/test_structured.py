"""Structured outputs in the engine: every sample validates (jsonschema, re), other rows are untouched, and the
grammar survives preemption, n > 1, seeds, logprobs, streaming and the engine process."""

from __future__ import annotations

import asyncio
import functools
import json
import re

import jsonschema
import pytest
import torch
from tests.helpers.checkpoints import write_hf_checkpoint
from tests.helpers.engine_runs import run
from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json

from gemma import GemmaForCausalLM, GemmaTokenizer, StructuredOutputsParams
from gemma.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma.engine.engine_process import AsyncEngineProcess
from gemma.sampling import SamplingParams

SCHEMAS = {
    "nested": {
        "type": "object", "additionalProperties": False, "required": ["id", "kind", "owner"],
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "owner": {"type": "object", "additionalProperties": False, "required": ["name", "admin"],
                      "properties": {"name": {"type": "string", "maxLength": 8}, "admin": {"type": "boolean"}}},
        },
    },
    "arrays": {
        "type": "object", "additionalProperties": False, "required": ["tags", "scores"],
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                       "minItems": 1, "maxItems": 4},
            "note": {"type": "string", "maxLength": 6},
        },
    },
    "patterns": {
        "type": "object", "additionalProperties": False, "required": ["code", "email"],
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,4}$"},
            "email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$", "maxLength": 16},
        },
    },
}
SAMPLED = dict(temperature=1.0, max_tokens=160)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GemmaTokenizer.from_pretrained(write_trained_tokenizer_json(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("structured-model")
    tokenizer.save_pretrained(path)
    return write_hf_checkpoint(path, vocab_size=len(tokenizer), num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16)


@pytest.fixture(scope="module")
def model(model_dir):
    return GemmaForCausalLM.from_pretrained(model_dir)


def prompt(tokenizer, text: str = "Give me the record as JSON:") -> list[int]:
    return tokenizer.encode(text)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_sample_at_temperature_1_validates(model, tokenizer, name):
    schema = SCHEMAS[name]
    params = SamplingParams(n=12, seed=7, structured_outputs=StructuredOutputsParams(json=schema), **SAMPLED)
    outs = run(LLMEngine(model, tokenizer), [(prompt(tokenizer), params), (prompt(tokenizer, "Another:"), params)])
    samples = [o for out in outs for o in out.outputs]
    assert len(samples) == 24
    for o in samples:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), schema)
    assert len({o.text for o in samples}) > 12  # sampled, not one forced string


def test_regex_choice_grammar_and_json_object(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    specs = {
        "regex": StructuredOutputsParams(regex=r"[a-z]{3,6}-[0-9]{2}( ok)?"),
        "choice": StructuredOutputsParams(choice=["red", "green", "blue sky"]),
        "gbnf": StructuredOutputsParams(grammar='root ::= "(" item ("," item){0,3} ")"\nitem ::= [0-9] | "x"'),
        "lark": StructuredOutputsParams(grammar='start: "say " WORD "!"\nWORD: /[a-z]{1,5}/'),
        "json_object": StructuredOutputsParams(json_object=True),
    }
    checks = {
        "regex": lambda t: re.fullmatch(r"[a-z]{3,6}-[0-9]{2}( ok)?", t),
        "choice": lambda t: t in ("red", "green", "blue sky"),
        "gbnf": lambda t: re.fullmatch(r"\([0-9x](,[0-9x]){0,3}\)", t),
        "lark": lambda t: re.fullmatch(r"say [a-z]{1,5}!", t),
        "json_object": lambda t: isinstance(json.loads(t), dict),
    }
    reqs = [(prompt(tokenizer), SamplingParams(n=8, seed=i, structured_outputs=spec, **SAMPLED))
            for i, spec in enumerate(specs.values())]
    for kind, out in zip(specs, run(engine, reqs)):
        finished = [o for o in out.outputs if o.finish_reason == "stop"]
        for o in finished:
            assert checks[kind](o.text), (kind, o.text)
        # any JSON object has unbounded strings, which a random model may not close within max_tokens
        assert len(finished) == 8 or kind == "json_object" and finished, kind


def test_constrained_rows_leave_the_others_untouched(model, tokenizer):
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [(prompt(tokenizer, t), greedy) for t in ("The fox", "It was the best", "import torch")]
    alone = run(LLMEngine(model, tokenizer), plain)
    constrained = (prompt(tokenizer), SamplingParams(structured_outputs=StructuredOutputsParams(
        json=SCHEMAS["nested"]), seed=3, **SAMPLED))
    mixed = run(LLMEngine(model, tokenizer), [plain[0], constrained, plain[1], constrained, plain[2]])
    assert [o.outputs[0].token_ids for o in alone] == [mixed[i].outputs[0].token_ids for i in (0, 2, 4)]
    jsonschema.validate(json.loads(mixed[1].outputs[0].text), SCHEMAS["nested"])
    # seeded: the same draws wherever the row sits
    assert mixed[1].outputs[0].token_ids == mixed[3].outputs[0].token_ids


def test_preempted_and_recomputed_requests_still_validate(model, tokenizer):
    cfg = model.config
    block_bytes = 2 * 4 * cfg.num_key_value_heads * cfg.head_dim * 4 * cfg.num_hidden_layers
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=64, block_size=4, kv_cache_memory=25 * block_bytes, max_model_len=100,
    ))
    schema = SCHEMAS["arrays"]
    reqs = [(prompt(tokenizer, f"Record {i}:"), SamplingParams(
        seed=i, structured_outputs=StructuredOutputsParams(json=schema), temperature=1.0, max_tokens=90))
        for i in range(8)]
    outs = run(engine, reqs)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    for out in outs:
        jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_max_tokens_mid_object_ends_with_length_and_logprobs_are_raw(model, tokenizer):
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3,
                            structured_outputs=StructuredOutputsParams(json=SCHEMAS["nested"]))
    (out,) = run(LLMEngine(model, tokenizer), [(prompt(tokenizer), params)])
    o = out.outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5 and o.text.startswith("{")
    # vLLM's default logprobs are the model's, before the grammar's mask: the top alternatives include tokens
    # the grammar did not allow
    unconstrained = run(LLMEngine(model, tokenizer), [(prompt(tokenizer), SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=3))])[0].outputs[0]
    assert o.logprobs[0].keys() - {o.token_ids[0]} <= unconstrained.logprobs[0].keys()
    assert {t: v for t, v in unconstrained.logprobs[0].items() if t in o.logprobs[0]} == pytest.approx(
        {t: v for t, v in o.logprobs[0].items() if t in unconstrained.logprobs[0]})


def test_invalid_specs_raise_at_submission_naming_the_field(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    bad = {
        "structured_outputs.json": StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nope"}}}),
        "structured_outputs.regex": StructuredOutputsParams(regex="(unclosed"),
        "structured_outputs.grammar": StructuredOutputsParams(grammar="root ::= missing_rule"),
    }
    for field, spec in bad.items():
        with pytest.raises(ValueError, match=re.escape(field)):
            engine.add_request(field, prompt(tokenizer), SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="json"):
        StructuredOutputsParams(json="{not json")


def test_compiled_grammars_are_cached_by_spec(model, tokenizer):
    engine = LLMEngine(model, tokenizer)
    spec = StructuredOutputsParams(json=SCHEMAS["nested"])
    engine.prepare(SamplingParams(structured_outputs=spec))
    same = StructuredOutputsParams(json=json.dumps(SCHEMAS["nested"]))  # the same schema, as text
    assert engine.grammars.cached(same)
    assert engine.grammars.compile(same) is engine.grammars.compile(spec)


def test_streamed_equals_non_streamed_in_both_async_engines(model, model_dir, tokenizer):
    schema = SCHEMAS["patterns"]
    params = SamplingParams(seed=11, structured_outputs=StructuredOutputsParams(json=schema), **SAMPLED)
    (expected,) = run(LLMEngine(model, tokenizer), [(prompt(tokenizer), params)])

    async def stream(engine) -> tuple[str, str]:
        deltas, last = [], None
        async for out in engine.generate(prompt(tokenizer), params, "s"):
            deltas.append(out.outputs[0].new_text)
            last = out
        with pytest.raises(ValueError, match="structured_outputs.regex"):
            async for _ in engine.generate(prompt(tokenizer), SamplingParams(
                    structured_outputs=StructuredOutputsParams(regex="[")), "bad"):
                pass
        await engine.shutdown()
        return "".join(deltas), last.outputs[0].text

    in_process = asyncio.run(stream(AsyncLLMEngine(LLMEngine(model, tokenizer))))
    factory = functools.partial(LLMEngine.from_pretrained, str(model_dir), "float32", "cpu")
    process = AsyncEngineProcess(factory)
    try:
        in_child = asyncio.run(stream(process))
    finally:
        process.close()
    assert in_process == in_child == (expected.outputs[0].text, expected.outputs[0].text)
    jsonschema.validate(json.loads(expected.outputs[0].text), schema)


def test_the_bitmask_bans_exactly_the_disallowed_tokens():
    from gemma.structured import apply_bitmask_

    vocab = 70
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[0, [0, 5, 31, 32, 69]] = True
    allowed[1, 40:] = True
    words = torch.zeros(2, 3, dtype=torch.int64)
    for r, t in allowed.nonzero().tolist():
        words[r, t // 32] |= 1 << (t % 32)
    bitmask = words.to(torch.int32)  # wraps bit 31 to the sign bit, as llguidance's int32 words hold it
    logits = torch.randn(4, vocab)
    out = logits.clone()
    apply_bitmask_(out, [1, 3], bitmask)
    assert torch.equal(out[[0, 2]], logits[[0, 2]])
    for i, row in enumerate([1, 3]):
        assert torch.equal(out[row][allowed[i]], logits[row][allowed[i]])
        assert torch.isinf(out[row][~allowed[i]]).all()


def test_stop_strings_and_n_apply_under_a_grammar(model, tokenizer):
    regex = r"[a-z]{3} [a-z]{3}"
    params = SamplingParams(n=4, seed=5, stop=[" "], structured_outputs=StructuredOutputsParams(regex=regex),
                            temperature=1.0, max_tokens=20)
    (out,) = run(LLMEngine(model, tokenizer), [(prompt(tokenizer), params)])
    assert len(out.outputs) == 4
    for o in out.outputs:
        assert re.fullmatch("[a-z]{3}", o.text) and o.finish_reason == "stop" and o.stop_reason == " "
