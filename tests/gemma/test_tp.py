"""Tensor parallelism: TP=2 (two gloo processes) against TP=1 on the same checkpoint.

Rank 0 is this test process, rank 1 a spawned local process; both load only their shard.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.checkpoints import write_hf_checkpoint
from gemma import GemmaForCausalLM
from gemma.engine import EngineConfig, LLMEngine
from gemma.engine.launcher import WorkerSpec, start_tensor_parallel
from gemma.parallel import SINGLE, TPGroup, kv_heads_of_rank, split
from gemma.sampling import SamplingParams

CONFIGS = {
    # vocab 211 is odd: the vocabulary-parallel embedding pads the last rank
    "mqa": dict(family="gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gqa": dict(family="gemma", num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma3-mqa": dict(family="gemma3_text", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                       head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2),
}
PROMPTS = [[5, 17, 33, 9, 120, 7, 44], [80, 3, 19], list(range(40, 66))]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


def engine_config() -> EngineConfig:
    return EngineConfig(block_size=4, max_num_batched_tokens=16, kv_cache_memory="2MiB")


def run(engine: LLMEngine, max_tokens: int = 12) -> list[list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, params)
    return [out.token_ids for out in engine.run_to_completion([str(i) for i in range(len(PROMPTS))]).values()]


def test_tp2_matches_tp1(checkpoint):
    single = GemmaForCausalLM.from_pretrained(checkpoint)
    expected_tokens = run(LLMEngine(single, None, engine_config()))
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        expected_logits = single(ids).logits[0]

    model, workers = start_tensor_parallel(WorkerSpec(str(checkpoint), world_size=2, timeout_s=60))
    engine = LLMEngine(model, None, engine_config(), workers)
    try:
        attn = model.model.layers[0].self_attn
        assert attn.num_heads == 2 and attn.q_proj.weight.shape[0] == 2 * 16  # rank 0 holds half the heads
        assert model.model.embed_tokens.weight.shape[0] == 106  # half of the vocabulary, padded
        # logits of a whole prompt through the paged engine path on both ranks
        engine.add_request("logits", PROMPTS[2], SamplingParams(max_tokens=1))
        step, _ = engine.runner.prepare(engine.scheduler.schedule(), engine.kv)
        step.logits_at = list(range(len(step.input_ids)))  # the first prefill chunk, every position
        logits = engine.runner.run(model.tp.broadcast_object(step))
        assert len(step.input_ids) == 16 and (logits - expected_logits[:16]).abs().max() < 1e-4
        engine.abort_request("logits")
        engine.check_health()
        assert run(engine) == expected_tokens
    finally:
        engine.shutdown()
    assert not workers.alive()


def test_head_partitioning_rules():
    ranks = [TPGroup(r, 4, pg=object()) for r in range(4)]
    assert [kv_heads_of_rank(8, tp) for tp in ranks] == [(0, 2), (2, 2), (4, 2), (6, 2)]
    assert [kv_heads_of_rank(1, tp) for tp in ranks] == [(0, 1)] * 4  # MQA: replicated on every rank
    assert [kv_heads_of_rank(2, tp) for tp in ranks] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert split(16, SINGLE, "heads") == (0, 16)
    with pytest.raises(ValueError, match="num_attention_heads"):
        split(6, ranks[0], "num_attention_heads")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        kv_heads_of_rank(3, ranks[1])


def test_dead_worker_fails_health_check_and_shutdown_does_not_hang(tmp_path):
    path = write_hf_checkpoint(tmp_path, **{k: v for k, v in CONFIGS["gqa"].items() if k != "family"})
    model, workers = start_tensor_parallel(WorkerSpec(str(path), world_size=2, timeout_s=60))
    engine = LLMEngine(model, None, engine_config(), workers)
    engine.check_health()
    workers.procs[0].kill()
    workers.procs[0].wait(10)
    with pytest.raises(RuntimeError, match="worker"):
        engine.check_health()
    engine.shutdown()
    assert not workers.alive()
