"""`LLM`: offline batched generation on the continuous-batching engine (vLLM's `LLM` API).

    from gemma import LLM, SamplingParams
    llm = LLM("gemma-3-270m", dtype="bfloat16")      # tp_size=2: two ranks, this process and one worker
    for out in llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0)):
        print(out.text)

    llm = LLM("gemma-3-270m", enable_lora=True, max_loras=4)          # LoRA adapters per request (gemma.lora)
    llm.generate(prompts, params, lora_request=LoRARequest("sql", 1, "path/to/adapter"))
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from typing import Any

from tqdm import tqdm

from gemma.engine.config import EngineConfig, LoadConfig
from gemma.engine.llm_engine import LLMEngine
from gemma.engine.outputs import RequestOutput
from gemma.lora import LoRARequest
from gemma.sampling import SamplingParams

Prompt = str | list[int]


class LLM:
    """A model, its tokenizer and an engine; `generate` runs a list of prompts to completion.

    `settings` are the fields of `LoadConfig` (dtype, device, tp_size) and `EngineConfig` (max_num_seqs,
    max_model_len, kv_cache_memory, ...), with their defaults and comments there; an unknown name is an error that
    names it.
    """

    def __init__(self, model: str | os.PathLike, **settings: Any) -> None:
        load = LoadConfig.model_validate(
            {"model": str(model)} | {k: v for k, v in settings.items() if k in LoadConfig.model_fields})
        config = EngineConfig.model_validate({k: v for k, v in settings.items() if k not in LoadConfig.model_fields})
        self.engine = LLMEngine.from_pretrained(load.model, load.dtype, load.device, load.tp_size, config,
                                                quantization=load.quantization)
        self.tokenizer, self.model = self.engine.tokenizer, self.engine.model
        self._counter = 0

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes, if any."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts` (strings, or token-id lists); one SamplingParams or one per prompt; one
        LoRA adapter for all (`lora_request`, with enable_lora) or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                request_id = f"llm-{self._counter}"
                self._counter += 1
                if isinstance(prompt, str):
                    self.engine.add_request(request_id, self.tokenizer.encode(prompt), p, prompt=prompt,
                                            lora_request=lora)
                else:
                    self.engine.add_request(request_id, list(prompt), p, lora_request=lora)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:  # all or nothing: a bad prompt leaves no half-run batch behind
                self.engine.abort_request(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm or None) as bar:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
