"""LoRA adapters behind the HTTP layer without Ray: `Ingress` over `LocalHandle`s to a real `ModelDeployment` (tiny
random Gemma on the real engine, adapters in PEFT's file format) and the batch job's adapter column."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.helpers.fakes import FakeClassifier, LocalHandle
from tests.helpers.lora import write_random_adapter
from deployments.ingress import Ingress
from deployments.model import EngineArgs, ModelDeployment
from deployments.tokenizer import TokenizerDeployment
from gemma import LoRARequest
from gemma.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from gemma.sampling import SamplingParams

pytestmark = pytest.mark.anyio
PROMPT = [5, 17, 33, 9, 120, 7, 44]
BODY = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def adapter_dirs(lm, tmp_path_factory):
    model, _ = lm
    root = tmp_path_factory.mktemp("adapters")
    good = {
        "sql": write_random_adapter(root / "sql", model.config, r=4, targets=("q_proj", "v_proj"), seed=1),
        "chat": write_random_adapter(root / "chat", model.config, r=8, targets=("gate_proj", "down_proj"), seed=2),
    }
    broken = write_random_adapter(root / "broken", model.config, r=4, seed=3, use_dora=True)
    return good, broken


def engine_config() -> EngineConfig:
    return EngineConfig(max_num_seqs=8, max_num_batched_tokens=256, block_size=4, kv_cache_memory="4MiB",
                        max_model_len=96, enable_lora=True, max_loras=2)


@pytest.fixture
async def http(lm, adapter_dirs):
    model, tokenizer = lm
    good, broken = adapter_dirs
    modules = {name: str(path) for name, path in good.items()} | {"broken": str(broken)}
    engine = AsyncLLMEngine(LLMEngine(model, tokenizer, engine_config()))
    deployment = ModelDeployment({"lora_modules": modules, "max_loras": 2}, engine=engine)
    ingress = Ingress(LocalHandle(deployment), LocalHandle(TokenizerDeployment(tokenizer=tokenizer)),
                      LocalHandle(FakeClassifier()), served_model_name="tiny", classifier_name="tiny-classifier",
                      lora_modules=modules)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=ingress.app), base_url="http://test") as client:
        yield client, deployment
    await engine.shutdown()


def expected_tokens(lm, lora: LoRARequest | None) -> list[int]:
    model, tokenizer = lm
    engine = LLMEngine(model, tokenizer, engine_config())
    engine.add_request("x", PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), lora_request=lora)
    return engine.run_to_completion(["x"])["x"].outputs[0].token_ids


async def test_requests_name_adapters_as_models(http, lm, adapter_dirs):
    client, deployment = http
    good, _ = adapter_dirs
    args = deployment.args.lora_requests()
    texts = {}
    for name in ("tiny", "sql", "chat"):
        r = await client.post("/v1/completions", json=BODY | {"model": name})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name
        texts[name] = r.json()["choices"][0]["text"]
    tokenizer = lm[1]
    for name in ("sql", "chat"):
        assert texts[name] == tokenizer.decode(expected_tokens(lm, args[name]))
    assert texts["tiny"] == tokenizer.decode(expected_tokens(lm, None))
    assert len(set(texts.values())) == 3  # each adapter changes the continuation
    chat = await client.post("/v1/chat/completions", json={"model": "sql", "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "sql"
    stream = await client.post("/v1/completions", json=BODY | {"model": "chat", "stream": True})
    chunks = [json.loads(b[6:]) for b in stream.text.split("\n\n") if b.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in chunks) == texts["chat"] and chunks[0]["model"] == "chat"


async def test_models_lists_adapters_with_their_parent(http, adapter_dirs):
    client, _ = http
    cards = {c["id"]: c for c in (await client.get("/v1/models")).json()["data"]}
    assert cards["sql"]["parent"] == cards["chat"]["parent"] == "tiny" and cards["tiny"]["parent"] is None
    assert cards["sql"]["root"] == str(adapter_dirs[0]["sql"])


async def test_unknown_adapter_is_404_and_a_broken_one_400_while_others_serve(http):
    client, _ = http
    r = await client.post("/v1/completions", json=BODY | {"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "nope" in r.json()["error"]["message"]
    r = await client.post("/v1/completions", json=BODY | {"model": "broken"})
    assert r.status_code == 400, r.text
    assert "DoRA" in r.json()["error"]["message"] and r.json()["error"]["type"] == "BadRequestError"
    r = await client.post("/v1/completions", json=BODY | {"model": "sql"})
    assert r.status_code == 200  # the replica serves the others
    r = await client.post("/v1/classify", json={"model": "sql", "input": ["x"]})
    assert r.status_code == 404  # an adapter is not a classifier


def test_lora_modules_turn_lora_on_with_stable_ids():
    args = EngineArgs(lora_modules={"b": "/b", "a": "/a"})
    assert args.enable_lora and args.engine_config().enable_lora
    assert args.lora_requests() == {"a": LoRARequest("a", 1, "/a"), "b": LoRARequest("b", 2, "/b")}


def test_batch_rows_run_with_the_adapter_in_their_lora_column(tiny_lm_dir, tmp_path):
    """GenerateStage (no Ray: called on a pandas batch) against the engine run directly; and `--lora NAME=PATH`."""
    import pandas as pd

    from deployments.batch import parse_args
    from deployments.batch_stages import GenerateStage
    from gemma import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig.from_pretrained(tiny_lm_dir)
    sql = write_random_adapter(tmp_path / "sql", config, r=4, seed=1)
    other = write_random_adapter(tmp_path / "other", config, r=2, targets=("o_proj",), seed=5)
    args = parse_args(["--input", "in.jsonl", "--output", "out.jsonl", "--model", str(tiny_lm_dir), "--lora",
                       f"sql={sql}", "--dtype", "float32", "--kv-cache-memory", "8MiB", "--max-model-len", "96",
                       "--max-loras", "2"])
    assert args.lora_modules == {"sql": str(sql)} and args.enable_lora
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True).model_dump_json()
    cells = [None, "sql", str(other), "nope", "sql"]
    batch = pd.DataFrame({"__ids": [PROMPT] * 5, "__params": [params] * 5, "lora": cells, "error": [None] * 5})
    stage = GenerateStage(args.model_dump(include=set(EngineArgs.model_fields) - {"engine_process"}))
    out = stage(batch)
    assert "neither an adapter" in out["error"][3] and [e is None for e in out["error"]] == [True] * 3 + [False, True]
    engine = LLMEngine(GemmaForCausalLM.from_pretrained(tiny_lm_dir), None, engine_config())
    expected = []
    for i, lora in enumerate([None, LoRARequest("sql", 1, str(sql)), LoRARequest("o", 9, str(other))]):
        engine.add_request(str(i), PROMPT, SamplingParams.model_validate_json(params), lora_request=lora)
        expected.append(engine.run_to_completion([str(i)])[str(i)].outputs[0].token_ids)
    got = list(out["__completion_ids"])
    assert got[:3] == expected and got[4] == expected[1] and len({tuple(t) for t in expected}) == 3
