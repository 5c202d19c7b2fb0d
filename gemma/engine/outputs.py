"""What the engines return: vLLM's `RequestOutput` / `CompletionOutput` shapes, plus streaming deltas."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass
class CompletionOutput:
    index: int  # which of the request's n completions
    text: str  # everything generated so far (stop strings removed unless asked for)
    token_ids: list[int]  # everything generated so far (an eos / stop token id included, as vLLM does)
    finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string
    logprobs: list[dict[int, float]] | None = None  # per generated token: top-N and the chosen token
    new_token_ids: list[int] = field(default_factory=list)  # added by the step that produced this output
    new_text: str = ""  # text added by that step (may lag a token behind while a character is incomplete)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Monotonic timestamps (time.monotonic) of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None  # when the latest token was sampled (the newest of the n sequences')
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def e2e_latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    num_cached_tokens: int | None = None  # prompt tokens served from the prefix cache (vLLM's name); None: not yet

    # the first completion's fields, for the common n=1 case
    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output in place of two consecutive ones of the same request: `later`'s state with both steps' deltas.

    Every other field is cumulative, so a consumer that falls behind the engine loses nothing by receiving
    this instead of the pair; the streams coalesce that way rather than queueing one message per token.
    """
    before = {o.index: o for o in earlier.outputs}
    outputs = []
    for o in later.outputs:
        e = before.get(o.index)
        if e is not None:
            o = replace(o, new_token_ids=e.new_token_ids + o.new_token_ids, new_text=e.new_text + o.new_text)
        outputs.append(o)
    return replace(later, outputs=outputs)
