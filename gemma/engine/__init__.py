"""The continuous-batching generation engine.

`Sequence` / block manager / `Scheduler` are plain Python; `ModelRunner` is the only part that knows the
device; `LLMEngine` steps synchronously and `AsyncLLMEngine` runs it in the background for a server
(`AsyncEngineProcess`: the same, with the engine in a child process).
"""

from gemma.engine.async_engine import AsyncLLMEngine
from gemma.engine.engine_process import AsyncEngineProcess
from gemma.engine.llm_engine import EngineConfig, LLMEngine
from gemma.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, merge_outputs

__all__ = ["AsyncEngineProcess", "AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestMetrics",
           "RequestOutput", "merge_outputs"]
