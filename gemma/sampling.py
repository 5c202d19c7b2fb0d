"""`SamplingParams` (vLLM's names and defaults) and `sample`, a batched sampler with per-row parameters.

`sample` turns one step's (N, V) logits into one token per row, each row under its own parameters, in vLLM's
order: a grammar's token mask (structured outputs), min_tokens masking of the row's stop ids, penalties (repetition on prompt + output tokens,
presence/frequency on output tokens), then greedy argmax or temperature -> top-k -> top-p -> min-p -> draw.
Returned logprobs are vLLM's default "raw" ones: log_softmax of the logits as given, before any of that.

Reproducibility contract: a row with a generator draws only from it, with one draw of V uniforms per step
made for that row alone, so a seeded request yields the same tokens whatever else shares its batch and
wherever its row sits. Rows without a generator share one draw from torch's global RNG.
Token ids in `prompt_token_ids`, `output_token_ids` and `stop_ids` must lie in [0, V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from gemma.cpu import kernels as cpu_kernels
from gemma.structured import StructuredOutputsParams, apply_bitmask_

# torch.Generator.manual_seed accepts exactly this range; checking it here makes a bad seed a 4xx, not a crash.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_LOGPROBS = 20  # OpenAI's cap on top alternatives per token


class SamplingParams(BaseModel):
    """How to pick tokens for one request; field names, defaults and limits are vLLM's.

    Invalid values raise `pydantic.ValidationError` (a `ValueError`) whose message names the field; unknown
    fields and NaN/inf are errors. After validation `stop` is always a list and `top_k` is never -1.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    n: PositiveInt = 1  # completions returned per prompt
    max_tokens: PositiveInt | None = 16  # new tokens at most; None = up to the context limit
    min_tokens: NonNegativeInt = 0  # stop ids and stop strings are ignored until this many tokens exist
    temperature: NonNegativeFloat = 1.0  # logits are divided by it before sampling; 0 = greedy
    top_k: int = 0  # keep only the k most likely tokens; 0 (or -1, stored as 0) = all
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0  # keep the smallest set of tokens with this mass
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # drop tokens with prob < min_p * the best prob
    repetition_penalty: PositiveFloat = 1.0  # > 1 discourages prompt and output tokens (HF / CTRL form)
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0  # subtracted once from seen output tokens
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0  # subtracted per occurrence in output
    stop: list[str] = []  # strings that end the output; a str or None is accepted and stored as a list
    stop_token_ids: list[NonNegativeInt] = []  # ids that end the output, besides eos
    ignore_eos: bool = False  # keep generating past eos (benchmarks)
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None  # per-request generator seed
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # top alternatives per token; 0 = chosen only
    skip_special_tokens: bool = True  # drop special tokens when detokenizing
    include_stop_str_in_output: bool = False  # keep the matched stop string in the text
    structured_outputs: StructuredOutputsParams | None = None  # the output must match a schema/regex/choice/grammar

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop cannot contain an empty string")  # it would match everywhere
        return value

    @field_validator("stop_token_ids", mode="before")
    @classmethod
    def _stop_ids_as_list(cls, value: Any) -> Any:
        return [] if value is None else value

    @field_validator("top_k")
    @classmethod
    def _top_k_disabled_is_zero(cls, value: int) -> int:
        if value < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {value}")
        return 0 if value == -1 else value

    @model_validator(mode="after")
    def _min_tokens_within_max(self) -> SamplingParams:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        """Whether tokens are the argmax of the (penalized) logits rather than drawn."""
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The per-request generator `sample` expects: seeded from `params.seed`, or None when it has no seed.

    It must live on the device of the logits; create it once per request and pass it on every step.
    """
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


@dataclass
class SamplerOutput:
    """One step's result for a batch of N rows."""

    token_ids: list[int]  # the chosen token per row
    logprobs: list[float] | None  # the chosen token's raw logprob per row, when any row asked for logprobs
    top_logprobs: list[dict[int, float]] | None  # per row, its top-N {id: logprob} best-first ({} when N is 0/None)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    stop_ids: list[list[int]],
    generators: list[torch.Generator | None],
    token_masks: tuple[list[int], torch.Tensor] | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` (N, V), any float dtype (computed in fp32), under that row's params.

    `stop_ids[i]` are the ids that would end row i (eos unless ignore_eos, plus stop_token_ids); they are
    masked out while the row has fewer than `min_tokens` outputs. `generators[i]` (see `make_generator`)
    makes row i reproducible. Every list must have N entries, else ValueError naming the list.
    `token_masks` = (rows, bitmask): the tokens a grammar allows each of those rows (gemma.structured), applied
    first, in place on those rows of `logits`, after the raw logprobs are taken.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, V), got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    lists = dict(params=params, prompt_token_ids=prompt_token_ids, output_token_ids=output_token_ids,
                 stop_ids=stop_ids, generators=generators)
    for name, value in lists.items():
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but logits has {n} rows")

    want_logprobs = any(p.logprobs is not None for p in params)
    raw_logprobs = logits.float().log_softmax(-1) if want_logprobs else None
    if token_masks is not None:
        apply_bitmask_(logits, *token_masks)

    # Both return their input untouched when no row needs them, so an all-greedy batch without penalties or
    # pending min_tokens is one argmax in the model's dtype (exact: fp32 would not reorder bf16 values).
    x = mask_stop_ids(logits, params, output_token_ids, stop_ids)
    x = apply_penalties(x, params, prompt_token_ids, output_token_ids)
    tokens = _argmax(x)  # the greedy rows' tokens; sampled rows are overwritten below
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=x.device)
        tokens[rows] = _draw(x[rows], [params[i] for i in sampled_rows], [generators[i] for i in sampled_rows])
    token_ids = tokens.tolist()

    if raw_logprobs is None:
        return SamplerOutput(token_ids, None, None)
    chosen = raw_logprobs.gather(-1, tokens[:, None]).squeeze(-1).tolist()
    top_n = [p.logprobs or 0 for p in params]
    top: list[dict[int, float]] = [{} for _ in params]
    if max(top_n) > 0:
        values, ids = raw_logprobs.topk(max(top_n), dim=-1)  # sorted best-first
        values, ids = values.tolist(), ids.tolist()
        top = [dict(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(top_n)]
    return SamplerOutput(token_ids, chosen, top)


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)`; on fp32 CPU logits the one-pass kernel where this process loaded the CPU kernels (the same
    indices, ~10x faster than ATen's reduction over a 262k vocabulary)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and cpu_kernels.loaded():
        return cpu_kernels.argmax(x)
    return x.argmax(-1)


def mask_stop_ids(
    logits: torch.Tensor, params: list[SamplingParams], output_token_ids: list[list[int]], stop_ids: list[list[int]]
) -> torch.Tensor:
    """`logits` with row i's `stop_ids[i]` set to -inf while row i has fewer than `min_tokens` outputs.

    Returns the input itself when no row needs it, else a new fp32 tensor (the input is never modified).
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, (p, out, stops) in enumerate(zip(params, output_token_ids, stop_ids)):
        if stops and len(out) < p.min_tokens:
            rows.extend([i] * len(stops))
            cols.extend(stops)
    if not rows:
        return logits
    logits = logits.to(torch.float32, copy=True)
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return logits


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
) -> torch.Tensor:
    """Logits after each row's repetition, presence and frequency penalties (vLLM's definitions).

    Repetition (HF/CTRL): a token in the row's prompt or output has a positive logit divided by the penalty
    and a negative one multiplied by it. Presence/frequency (OpenAI), over output tokens only:
    logit -= frequency_penalty * count + presence_penalty * (count > 0).
    Returns the input itself when no row has penalties, else a new fp32 tensor (the input is never modified).
    """
    penalized = [p.has_penalties for p in params]
    if not any(penalized):
        return logits
    n, vocab = logits.shape
    device = logits.device
    # Rows without penalties contribute no ids, so their counts stay 0 and the formulas below leave them as is.
    outputs = [out if pen else [] for out, pen in zip(output_token_ids, penalized)]
    counts = _token_counts(outputs, vocab, device)  # (N, V)
    out = logits.float()

    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        prompts = [ids if r != 1.0 else [] for ids, r in zip(prompt_token_ids, rep)]
        seen = (_token_counts(prompts, vocab, device) > 0) | (counts > 0)
        penalty = torch.tensor(rep, dtype=out.dtype, device=device)[:, None]
        out = torch.where(seen, torch.where(out > 0, out / penalty, out * penalty), out)

    freq = torch.tensor([p.frequency_penalty for p in params], dtype=out.dtype, device=device)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], dtype=out.dtype, device=device)[:, None]
    if freq.any() or pres.any():
        out = out - freq * counts - pres * (counts > 0).to(out.dtype)
    return out


def _token_counts(token_ids: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """(N, V) fp32 counts of each id per row, built with one accumulating scatter."""
    counts = torch.zeros(len(token_ids), vocab, device=device)
    flat = [t for ids in token_ids for t in ids]
    if flat:
        rows = torch.repeat_interleave(
            torch.arange(len(token_ids), device=device), torch.tensor([len(ids) for ids in token_ids], device=device)
        )
        cols = torch.tensor(flat, dtype=torch.long, device=device)
        counts.index_put_((rows, cols), torch.ones(len(flat), device=device), accumulate=True)
    return counts


def _draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sampled token per row of (M, V) penalized logits of non-greedy rows: temperature, filters, then a draw."""
    logits = logits.float()
    m, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)[:, None]
    logits = filter_top_k_top_p(logits / temperature, [p.top_k for p in params], [p.top_p for p in params])
    probs = logits.softmax(-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        # min-p is relative to the best token, so applying it after top-k/top-p keeps the same set as before.
        threshold = torch.tensor(min_p, dtype=probs.dtype, device=device)[:, None] * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)

    # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p (unnormalized p is fine). q = -log(U) is Exp(1)
    # and ~4x cheaper than exponential_() on CPU; U in [0, 1) makes q > 0, so p / q is never NaN (U = 0 gives
    # q = inf: that token just loses). Each seeded row takes its V uniforms from its own generator, so its
    # draw depends on nothing else in the batch.
    u = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if len(unseeded) == m:
        u.uniform_()
    elif unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), vocab, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(vocab, generator=g, device=device)
    return (probs / u.log_().neg_()).argmax(-1)


# Top-p first looks for the nucleus among each row's best candidates (a partial top-k is ~20x cheaper than
# sorting a 262k vocabulary on CPU); only a row whose candidates hold less than top_p is sorted in full.
# The choice depends on the row alone, so a row's result still does not depend on the rest of the batch.
TOP_P_CANDIDATES = 1024


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """(M, V) logits with tokens outside each row's top-k, then outside its top-p nucleus, set to -inf.

    The nucleus is the smallest set of best tokens whose probability (after top-k) reaches top_p. top_k 0
    (or >= V) and top_p 1 disable a filter; ties with the k-th logit are kept; the best token always stays.
    Returns the input itself when no row filters.
    """
    vocab = logits.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    use_k, use_p = any(k < vocab for k in ks), any(p < 1.0 for p in top_p)
    if use_k:
        k = torch.tensor(ks, device=logits.device)[:, None]
        kth = logits.topk(max(ks), dim=-1).values.gather(-1, k - 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if use_p:
        p = torch.tensor(top_p, dtype=logits.dtype, device=logits.device)[:, None]
        logits = logits.masked_fill(~_nucleus(logits.softmax(-1), p), float("-inf"))
    return logits


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(M, V) bool: the tokens of each row's top-p nucleus (all of them where top_p is 1)."""
    best, order = probs.topk(min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1)  # (M, C), best-first
    # keep a token while the mass ranked above it is < top_p; that mass is exactly 0 for the best token
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, best.cumsum(-1) - best < top_p)
    short = ((best.sum(-1) < top_p.squeeze(-1)) & (top_p.squeeze(-1) < 1.0)).nonzero().squeeze(-1)  # past C
    if short.numel():
        ranked, full_order = probs[short].sort(dim=-1, descending=True)
        keep[short] = torch.zeros_like(ranked, dtype=torch.bool).scatter_(
            -1, full_order, ranked.cumsum(-1) - ranked < top_p[short]
        )
    return keep | (top_p >= 1.0)
