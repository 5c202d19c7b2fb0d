"""`Sequence`: one generated continuation of a request, as the scheduler and block manager see it.

Plain Python (no torch), so the scheduler can be tested without a model. A sequence's tokens are its prompt
followed by its output; `num_computed_tokens` of them have their KV written in the cache. The tokens from
there on are what the next step feeds the model: a chunk of the prompt, or the last sampled token.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted (its KV was dropped and will be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # gemma.sampling.SamplingParams; Any keeps this module free of pydantic/torch imports
    index: int = 0  # which of the request's `n` completions
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache at its first admission
    lora_request: Any = None  # gemma.lora.LoRARequest: the adapter it runs with; None: the base model

    @property
    def lora_int_id(self) -> int:
        """Its adapter's id; 0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request is not None else 0

    @property
    def cache_salt(self) -> bytes:
        """What its prefix-cache hash chain starts from (gemma.engine.block_manager): its adapter's."""
        return self.lora_request.cache_salt if self.lora_request is not None else b""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose KV is not in the cache yet: a prompt (chunk) or, in decode, the last sampled token."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason, self.stop_reason = reason, stop_reason
        self.finish_time = time.monotonic()
