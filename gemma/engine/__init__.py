"""The continuous-batching generation engine.

`Sequence` / block manager / `Scheduler` are plain Python; `ModelRunner` is the only part that knows the
device; `LLMEngine` steps synchronously. A server uses an `AsyncEngine`: `AsyncLLMEngine` steps an `LLMEngine` in
the background of this process, `AsyncEngineProcess` in a child process. `LoadConfig` and `EngineConfig` are the
settings every loader takes.
"""

from gemma.engine.async_engine import AsyncEngine, AsyncLLMEngine
from gemma.engine.config import EngineConfig, LoadConfig
from gemma.engine.engine_process import AsyncEngineProcess
from gemma.engine.llm_engine import LLMEngine
from gemma.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, merge_outputs

__all__ = ["AsyncEngine", "AsyncEngineProcess", "AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLMEngine",
           "LoadConfig", "RequestMetrics", "RequestOutput", "merge_outputs"]
