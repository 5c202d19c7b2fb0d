"""`generate`: static-batch, KV-cached decoding for `GemmaForCausalLM` (transformers' `generate` semantics).

One prefill over the (left-padded) prompts, then one new token per row per step. A row stops at an eos
token and is padded with `pad_token_id` afterwards; the loop ends when every row has stopped or after
`max_new_tokens`. For many concurrent requests use the continuous-batching engine instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from gemma.cache import KVCache
from gemma.sampling import filter_top_k_top_p

if TYPE_CHECKING:
    from gemma.model import GemmaForCausalLM


def generate_steps(
    model: GemmaForCausalLM,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float | None = 1.0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
) -> Iterator[torch.LongTensor]:
    """Yield each step's new token per row, (B,), as soon as it exists; see `generate` for the arguments.

    A row that has stopped yields `pad_token_id`; iteration ends when every row has stopped.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    config = model.config
    if eos_token_id is None:
        eos = config.eos_token_ids
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    device = model.device
    input_ids = input_ids.to(device)
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    # positions count real tokens only, so a left-padded row starts at 0 like an unpadded one
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)

    cache = KVCache.from_config(config)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    step_ids, step_pos = input_ids, positions
    for _ in range(max_new_tokens):
        with torch.no_grad():
            out = model(
                input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                past_key_values=cache, use_cache=True, logits_to_keep=1,
            )
        logits = out.logits[:, -1]  # (B, V)
        if do_sample:
            filtered = filter_top_k_top_p(logits.float() / temperature, [top_k or 0] * B, [top_p or 1.0] * B)
            probs = filtered.softmax(-1)
            next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            next_ids = logits.argmax(-1)
        next_ids = torch.where(unfinished, next_ids, torch.full_like(next_ids, pad))
        yield next_ids
        unfinished &= ~torch.isin(next_ids, eos_t)
        if not unfinished.any():
            return
        step_ids = next_ids[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)


def generate(model: GemmaForCausalLM, input_ids: torch.LongTensor, **kwargs: Any) -> torch.LongTensor:
    """Return (B, T + new) token ids: the prompts followed by the generated tokens.

    `input_ids` (B, T) are left-padded when rows differ in length, with `attention_mask` marking real tokens.
    Keywords: attention_mask, max_new_tokens (20), do_sample (False: greedy), temperature, top_k (50),
    top_p (1.0), eos_token_id (default: the config's; several allowed), pad_token_id, seed (reproducible
    sampling). A row stops at its first eos and is padded with pad_token_id after it.
    """
    steps = [ids[:, None] for ids in generate_steps(model, input_ids, **kwargs)]
    return torch.cat([input_ids.to(model.device), *steps], dim=-1)
