"""LoRA adapters against PEFT (the oracle): tiny random Gemma 1/2/3 with random non-zero A and B, several target sets,
ranks and scalings; mixed batches, slot swapping, the prefix cache, and adapters that do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import FAMILIES, SHAPES, write_hf_checkpoint
from tests.helpers.lora import load_peft, write_peft_adapter
from tests.helpers.tokenizer_fixtures import write_trained_tokenizer_json
from gemma import LLM, GemmaForCausalLM, LoRARequest
from gemma.engine import EngineConfig, LLMEngine
from gemma.lora import LoRAError, load_adapter
from gemma.sampling import SamplingParams

pytest.importorskip("peft")

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (family, adapter settings): every family, several target sets, ranks, scalings and a layer subset
CASES = {
    "gemma-qv-r4": ("gemma", dict(r=4, alpha=8.0, targets=("q_proj", "v_proj"))),
    "gemma-all-r8-rslora": ("gemma", dict(r=8, alpha=16.0, targets=ALL, use_rslora=True)),
    "gemma2-mlp-r2": ("gemma2", dict(r=2, alpha=4.0, targets=("gate_proj", "up_proj", "down_proj"))),
    "gemma3-all-r16": ("gemma3_text", dict(r=16, alpha=8.0, targets=ALL)),
    "gemma3-ko-layers": ("gemma3_text", dict(r=4, alpha=4.0, targets=("k_proj", "o_proj"), layers=[1, 3])),
}
PROMPT = [5, 17, 33, 9, 120, 7, 44, 3, 8, 91, 10, 11, 12, 13]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {f: write_hf_checkpoint(tmp_path_factory.mktemp(f), family=f, **FAMILIES.get(f, SHAPES["gqa"]))
            for f in ("gemma", "gemma2", "gemma3_text")}


@pytest.fixture(scope="module")
def adapters(checkpoints, tmp_path_factory):
    return {name: write_peft_adapter(checkpoints[family], tmp_path_factory.mktemp(name), family=family, seed=i + 1,
                                     **settings)
            for i, (name, (family, settings)) in enumerate(CASES.items())}


def lora_engine(checkpoint, **settings) -> LLMEngine:
    config = dict(enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4, kv_cache_memory="2MiB", max_model_len=64,
                  max_num_batched_tokens=64) | settings
    return LLMEngine(GemmaForCausalLM.from_pretrained(checkpoint), None, EngineConfig(**config))


def prompt_logits(engine: LLMEngine, prompt: list[int], lora: LoRARequest | None) -> torch.Tensor:
    """The engine's fp32 logits at every position of `prompt` (one prefill step through the paged path)."""
    engine.add_request("logits", prompt, SamplingParams(max_tokens=1), lora_request=lora)
    step, _ = engine.runner.prepare(engine.scheduler.schedule(), engine.kv)
    step.logits_at = list(range(len(step.input_ids)))
    logits = engine.runner.run(step).clone()
    engine.abort_request("logits")
    return logits


def generate(engine: LLMEngine, jobs: dict[str, tuple[list[int], LoRARequest | None]]) -> dict[str, list[int]]:
    for rid, (prompt, lora) in jobs.items():
        engine.add_request(rid, prompt, GREEDY, lora_request=lora)
    return {rid: out.outputs[0].token_ids for rid, out in engine.run_to_completion(list(jobs)).items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_match_peft(case, checkpoints, adapters):
    family, _ = CASES[case]
    peft = load_peft(checkpoints[family], adapters[case], family)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        expected = peft(ids).logits[0]
        base = peft.get_base_model()
        with peft.disable_adapter():
            base_logits = base(ids).logits[0]
        expected_tokens = peft.generate(ids, max_new_tokens=8, do_sample=False)[0, len(PROMPT):].tolist()
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter changes the model: the check can fail
    engine = lora_engine(checkpoints[family])
    lora = LoRARequest(case, 1, str(adapters[case]))
    assert (prompt_logits(engine, PROMPT, lora) - expected).abs().max() < 1e-4
    assert (prompt_logits(engine, PROMPT, None) - base_logits).abs().max() < 1e-4  # the base model is untouched
    assert generate(engine, {"a": (PROMPT, lora)})["a"] == expected_tokens


def test_mixed_batch_equals_each_run_apart(checkpoints, adapters, tmp_path):
    ckpt = checkpoints["gemma3_text"]
    a = LoRARequest("all", 1, str(adapters["gemma3-all-r16"]))
    b = LoRARequest("ko", 2, str(adapters["gemma3-ko-layers"]))
    jobs = {"base": (PROMPT, None), "a": (PROMPT[:9], a), "b": (PROMPT[3:], b), "a2": (PROMPT[::-1], a)}
    apart = {}
    for rid, job in jobs.items():
        apart |= generate(lora_engine(ckpt), {rid: job})
    engine = lora_engine(ckpt)
    together = generate(engine, jobs)
    assert together == apart
    assert len({tuple(t) for t in apart.values()}) == 4  # the adapters make different continuations
    # through LLM, one lora_request per prompt (its tokenizer only decodes here)
    shutil.copytree(ckpt, tmp_path / "lm")
    write_trained_tokenizer_json(tmp_path / "lm")
    llm = LLM(tmp_path / "lm", enable_lora=True, max_loras=2, block_size=4, kv_cache_memory="2MiB", max_model_len=64)
    outs = llm.generate([PROMPT, PROMPT[:9], PROMPT[3:]], GREEDY, use_tqdm=False, lora_request=[None, a, b])
    assert [o.outputs[0].token_ids for o in outs] == [apart["base"], apart["a"], apart["b"]]


def test_lru_swapping_with_one_slot_keeps_outputs_right(checkpoints, adapters):
    ckpt = checkpoints["gemma"]
    loras = [LoRARequest("qv", 1, str(adapters["gemma-qv-r4"])), LoRARequest("all", 2, str(adapters["gemma-all-r8-rslora"]))]
    jobs = {f"r{i}": ([7 + i, *PROMPT[i:]], loras[i % 2] if i % 3 else None) for i in range(6)}
    apart = {}
    for rid, job in jobs.items():
        apart |= generate(lora_engine(ckpt, max_loras=1, max_cpu_loras=1), {rid: job})
    engine = lora_engine(ckpt, max_loras=1, max_cpu_loras=1)
    assert generate(engine, jobs) == apart
    manager = engine.runner.lora
    assert manager.num_loads > 2  # one slot and one host entry for two adapters: they were swapped in and out
    assert len(manager.cache) == 1 and sum(r is not None for r in manager.slots) == 1


def test_prefix_cache_is_per_adapter(checkpoints, adapters):
    engine = lora_engine(checkpoints["gemma"], enable_prefix_caching=True)
    lora = LoRARequest("qv", 1, str(adapters["gemma-qv-r4"]))
    params = SamplingParams(max_tokens=1)
    cached = {}
    for rid, adapter in [("first", lora), ("base", None), ("again", lora), ("base2", None)]:
        engine.add_request(rid, PROMPT, params, lora_request=adapter)
        cached[rid] = engine.run_to_completion([rid])[rid].num_cached_tokens
    assert cached == {"first": 0, "base": 0, "again": 12, "base2": 12}


def test_misfit_adapters_are_refused_naming_why(checkpoints, adapters, tmp_path):
    config = GemmaForCausalLM.from_pretrained(checkpoints["gemma"]).config
    good = adapters["gemma-qv-r4"]

    def variant(name: str, cfg_update: dict | None = None, tensors=None) -> str:
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((good / "adapter_config.json").read_text()) | (cfg_update or {})
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        weights = load_file(good / "adapter_model.safetensors")
        save_file(tensors(weights) if tensors else weights, d / "adapter_model.safetensors")
        return str(d)

    cases = {
        variant("dora", {"use_dora": True}): "DoRA",
        variant("bias", {"bias": "all"}): "bias",
        variant("lm-head", {"target_modules": ["q_proj", "lm_head"]}): "lm_head",
        variant("embed", tensors=lambda w: w | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 211)}):
            "not supported",
        variant("shape", tensors=lambda w: {k: v[:, :-1].contiguous() if "lora_A" in k else v for k, v in w.items()}): "has shape",
        variant("layer", tensors=lambda w: {k.replace("layers.0.", "layers.9."): v for k, v in w.items()}): "layer 9",
        variant("magnitude", tensors=lambda w: w | {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                                                   torch.ones(32)}): "DoRA",
        str(tmp_path / "missing"): "not a directory",
    }
    for path, message in cases.items():
        with pytest.raises(LoRAError, match=message):
            load_adapter(path, config, 16)
    with pytest.raises(LoRAError, match=r"rank 4 is above max_lora_rank \(2\)"):
        load_adapter(good, config, 2)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(LoRAError, match="only safetensors"):
        load_adapter(pickled, config, 16)
    # through the engine: a ValueError from add_request, and nothing queued
    engine = lora_engine(checkpoints["gemma"])
    with pytest.raises(ValueError, match="DoRA"):
        engine.add_request("x", PROMPT, GREEDY, lora_request=LoRARequest("dora", 3, next(iter(cases))))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="another id"):
        engine.add_lora(LoRARequest("qv", 1, str(good)))
        engine.add_lora(LoRARequest("other", 1, str(adapters["gemma-all-r8-rslora"])))
    plain = LLMEngine(GemmaForCausalLM.from_pretrained(checkpoints["gemma"]), None, EngineConfig(kv_cache_memory="2MiB", max_model_len=64))
    with pytest.raises(ValueError, match="enable_lora"):
        plain.add_request("x", PROMPT, GREEDY, lora_request=LoRARequest("qv", 1, str(good)))
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig(enable_lora=True, max_loras=4, max_cpu_loras=2)


def test_tp2_equals_tp1_with_adapters(checkpoints, adapters):
    """Rank 1 is a local process: A and B are cut as the column / row-parallel layers are (the kv heads of this
    Gemma 3 are replicated over the ranks), the row-parallel deltas summed by the layers' all-reduce."""
    from gemma.engine.launcher import WorkerSpec, start_tensor_parallel

    ckpt = checkpoints["gemma3_text"]
    a = LoRARequest("all", 1, str(adapters["gemma3-all-r16"]))
    b = LoRARequest("ko", 2, str(adapters["gemma3-ko-layers"]))
    jobs = {"a": (PROMPT, a), "base": (PROMPT[2:], None), "b": (PROMPT[:11], b)}
    single = lora_engine(ckpt)
    expected_logits = prompt_logits(single, PROMPT, a)
    expected = generate(single, jobs)
    model, workers = start_tensor_parallel(WorkerSpec(str(ckpt), world_size=2, timeout_s=60))
    config = EngineConfig(enable_lora=True, max_loras=2, block_size=4, kv_cache_memory="2MiB", max_model_len=64,
                          max_num_batched_tokens=64)
    engine = LLMEngine(model, None, config, workers)
    try:
        assert model.model.layers[0].self_attn.q_proj.lora.bank is engine.runner.lora.bank
        engine.add_request("logits", PROMPT, SamplingParams(max_tokens=1), lora_request=a)
        step, _ = engine.runner.prepare(engine.scheduler.schedule(), engine.kv)
        step.logits_at = list(range(len(step.input_ids)))
        logits = engine.runner.run(model.tp.broadcast_object(step))
        assert (logits - expected_logits).abs().max() < 1e-4
        engine.abort_request("logits")
        assert generate(engine, jobs) == expected
    finally:
        engine.shutdown()


def test_bf16_cpu_kernels_apply_the_adapter(checkpoints, adapters, monkeypatch):
    """The CPU fast path (joined q/k/v and gate/up products, the fused decode layer for base-only steps) gives the
    adapter's outputs as PyTorch's own bf16 path does."""
    from gemma.cpu import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels do not build here")
    monkeypatch.setenv("GEMMA_CPU_TORCH_ROWS", str(2**62))  # our kernel at every row count: no calibration
    ckpt = checkpoints["gemma3_text"]
    a = LoRARequest("all", 1, str(adapters["gemma3-all-r16"]))
    runs, engines = {}, {}
    for mode in ("kernel", "torch"):
        model = GemmaForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16)
        config = EngineConfig(enable_lora=True, block_size=4, kv_cache_memory="2MiB", max_model_len=64, cpu_matmul=mode)
        engines[mode] = engine = LLMEngine(model, None, config)
        runs[mode] = (prompt_logits(engine, PROMPT, a), prompt_logits(engine, PROMPT, None))
    kernel = engines["kernel"]
    assert kernel.runner.fused_decode and kernel.model.model.layers[0].self_attn.qkv_parts is not None
    # decodes of a base row and an adapter's row: the step with the adapter's row leaves the fused layer
    assert generate(kernel, {"a": (PROMPT, a)}) != generate(kernel, {"base": (PROMPT, None)})
    (lk, bk), (lt, bt) = runs["kernel"], runs["torch"]
    assert (lk - bk).abs().max() > 0.1  # the adapter shows in bf16 too
    assert (lk - lt).abs().max() < 0.05 * lt.abs().max()
