"""The engine's settings (gemma.engine.config) as every library entry point takes them, and the async engines'
one interface."""

from __future__ import annotations

import inspect

import pytest
import torch
from pydantic import ValidationError

from gemma import LLM
from gemma.engine import AsyncEngine, AsyncEngineProcess, AsyncLLMEngine, EngineConfig, LoadConfig
from gemma.sampling import SamplingParams


def test_llm_takes_the_config_fields_and_names_a_bad_one_before_loading(tiny_lm_dir):
    # the path does not exist: the settings are checked first, so the error is about the setting
    with pytest.raises(ValidationError, match="max_num_seq\n"):
        LLM("/nonexistent/model", max_num_seq=4)
    with pytest.raises(ValidationError, match="dtype"):
        LLM("/nonexistent/model", dtype="float8")
    with LLM(tiny_lm_dir, max_num_seqs=3, max_model_len=40, kv_cache_memory="2MiB", block_size=4) as llm:
        assert llm.engine.config == EngineConfig(max_num_seqs=3, max_model_len=40, kv_cache_memory="2MiB", block_size=4)
        assert llm.engine.max_model_len == 40 and llm.model.dtype == torch.float32  # LoadConfig's default
        outs = llm.generate([[2, 5, 7]] * 4, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [3] * 4


def test_library_defaults():
    """The defaults every loader starts from (serving changes device only: tests/deployments)."""
    assert LoadConfig() == LoadConfig(model="gemma-3-270m", dtype="auto", device=None, tp_size=1)
    config = EngineConfig()
    assert (config.max_num_seqs, config.max_model_len, config.kv_cache_memory) == (32, None, "1GiB")
    with pytest.raises(ValidationError, match="tp_size"):
        LoadConfig(tp_size=0)
    with pytest.raises(ValidationError, match="cpu_matmul"):
        EngineConfig(cpu_matmul="fast")


def test_the_in_process_and_child_process_engines_are_siblings_behind_one_interface():
    assert issubclass(AsyncLLMEngine, AsyncEngine) and issubclass(AsyncEngineProcess, AsyncEngine)
    assert not issubclass(AsyncEngineProcess, AsyncLLMEngine) and not issubclass(AsyncLLMEngine, AsyncEngineProcess)
    assert not inspect.isabstract(AsyncLLMEngine) and not inspect.isabstract(AsyncEngineProcess)
    public = {name for name in AsyncEngine.__abstractmethods__ if not name.startswith("_")}
    assert public == {"info", "stats", "check_health", "shutdown", "close"}
    # the base keeps no engine: only the in-process implementation has one
    assert "engine" not in inspect.signature(AsyncEngine.__init__).parameters

    class Partial(AsyncEngine):
        def info(self) -> dict:
            return {}

    with pytest.raises(TypeError, match="abstract"):
        Partial()
