"""The engine's settings, declared once: `LoadConfig` (what to load, and where) and `EngineConfig` (the limits and
behaviour of one engine).

Every loader composes these two: `LLM`, `LLMEngine.from_pretrained`, the model deployment's and batch job's args
(deployments/), and `python -m gemma`. A field's comment here is its documentation everywhere; a loader that wants
another default for a field redeclares only that field and says why.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]
CpuMatmul = Literal["auto", "kernel", "fp32", "torch"]
Quantization = Literal["auto", "gguf"] | None


class LoadConfig(BaseModel):
    """What a loader loads and where: the model, its dtype, the device and the tensor-parallel ranks."""

    model_config = ConfigDict(extra="forbid")

    model: str = "gemma-3-270m"  # a named model (gemma.registry), an HF checkpoint directory or a .gguf file
    # "auto" (vLLM's default): the checkpoint's dtype (config.json's; bfloat16 for a .gguf, gemma.weights.
    # checkpoint_dtype); float32 computes as the reference implementations do (the parity tests' setting), bfloat16
    # halves the bytes every decode step reads
    dtype: DType = "auto"
    device: str | None = None  # "cpu", "cuda", "cuda:1", ...; None: cuda when available, else cpu
    tp_size: int = Field(1, ge=1)  # tensor-parallel ranks: this process is rank 0, ranks 1..N-1 are started for it
    # vLLM's name: "gguf" keeps a .gguf's quantized blocks and computes on them with the CPU kernels (gemma.cpu.quant;
    # CPU, tp_size 1: ~0.45x the weight memory, and a decode step reads that many bytes); None dequantizes every
    # tensor to `dtype`; "auto" (the default): "gguf" for a .gguf on the CPU at tp_size 1, else None
    quantization: Quantization = "auto"


class EngineConfig(BaseModel):
    """Limits of one engine (one model replica) and how it runs."""

    model_config = ConfigDict(extra="forbid")

    # sequences running at once (the decode batch): sized for a CPU replica; on a GPU raise it as far as the KV
    # pool allows
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)  # tokens per step; longer prompts are prefilled in chunks
    max_model_len: int | None = Field(None, ge=2)  # prompt + output tokens; None: the model's positions, <= 8192
    block_size: int = Field(16, ge=1)  # tokens per KV block
    kv_cache_memory: int | str = "1GiB"  # KV pool budget (per rank with TP): bytes, or "512MiB", "2GB", ...
    enable_prefix_caching: bool = True  # reuse the KV of identical prompt prefixes (sliding-window layers too)
    seed: int = 0  # of the generator behind sampling without a per-request seed
    # the matmul of half-precision weights on the CPU (gemma.cpu.fastpath): "kernel" (our bf16 kernels, built at first
    # use, below a row count measured per weight shape on CPUs with native bf16 and PyTorch's above it), "fp32" (fp32
    # weight copies for batches, +2x their bytes), "torch", or "auto" (kernel for bf16 weights where it builds, else
    # fp32 where the CPU lacks bf16, else torch)
    cpu_matmul: CpuMatmul = "auto"
    # vLLM's name: True runs every step eagerly; False replays decode steps as CUDA graphs on a GPU at TP=1
    enforce_eager: bool = False
    # structured outputs (gemma.structured): the grammar library's tables of the vocabulary take seconds for Gemma's
    # 262k tokens. True builds them at start, on a thread of their own, so a server's first constrained request does
    # not wait; False builds them at the first such request
    structured_outputs_at_start: bool = False
    # LoRA adapters per request (gemma.lora, vLLM's names): requests may name a PEFT adapter (`lora_request`), and one
    # step mixes adapters and the base model. Steps with an adapter's rows run without CUDA graphs or the fused CPU
    # decode layer
    enable_lora: bool = False
    max_loras: int = Field(1, ge=1)  # adapters on the device at once (slots): the running requests use at most these
    max_lora_rank: int = Field(16, ge=1)  # adapters of a higher rank are refused
    max_cpu_loras: int | None = Field(None, ge=1)  # adapters kept loaded in host memory (LRU), >= max_loras; None: max_loras

    @model_validator(mode="after")
    def _cpu_loras_hold_the_slots(self) -> EngineConfig:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self
