"""Logprobs in OpenAI's two shapes, each token's text coming from the tokenizer deployment (cached by id).

Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`, top_logprobs holding the top-N and the
chosen token (vLLM's convention); chat: `content[{token, logprob, bytes, top_logprobs[N]}]`.
"""

from __future__ import annotations

from typing import Any

from deployments import schemas as s

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way
MAX_CACHED = 1 << 18  # token texts kept; past it the cache starts over rather than grow


def _lp(value: float | None) -> float:
    return LOGPROB_FLOOR if value is None else max(value, LOGPROB_FLOOR)


class Logprobs:
    """Builds logprobs bodies; `tokenizer` is a handle with `decode_tokens(ids) -> list[str]`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_texts: dict[int, str] = {}

    async def build(
        self, chat: bool, top: int, tokens: list[int], steps: list[dict[int, float]], offset: int
    ) -> tuple[s.CompletionLogprobs | s.ChatLogprobs, int]:
        """The logprobs of `tokens` (their `steps`: top-N and chosen) and the text offset after them."""
        texts = await self._texts({t for step in steps for t in step} | set(tokens))
        if chat:
            content = [
                s.ChatLogprobToken(
                    token=texts[t], logprob=_lp(step.get(t)), bytes=list(texts[t].encode()),
                    top_logprobs=[s.TopLogprob(token=texts[a], logprob=_lp(v), bytes=list(texts[a].encode()))
                                  for a, v in sorted(step.items(), key=lambda kv: -kv[1])[:top]],
                )
                for t, step in zip(tokens, steps)
            ]
            return s.ChatLogprobs(content=content), offset
        out = s.CompletionLogprobs()
        for t, step in zip(tokens, steps):
            out.tokens.append(texts[t])
            out.token_logprobs.append(_lp(step.get(t)))
            # tokens with the same text share a key (byte-fallback pieces all read "\ufffd"): the chosen one wins
            out.top_logprobs.append({texts[a]: _lp(v) for a, v in step.items() if a != t} | {texts[t]: _lp(step.get(t))})
            out.text_offset.append(offset)
            offset += len(texts[t])
        return out, offset

    async def _texts(self, ids: set[int]) -> dict[int, str]:
        """Each token's own text, from the tokenizer's `decode_tokens`; cached (a vocabulary is finite)."""
        missing = sorted(ids - self._token_texts.keys())
        if missing:
            if len(self._token_texts) + len(missing) > MAX_CACHED:
                self._token_texts.clear()
                missing = sorted(ids)
            texts = await self.tokenizer.decode_tokens.remote(missing)
            self._token_texts.update(zip(missing, texts))
        return self._token_texts
