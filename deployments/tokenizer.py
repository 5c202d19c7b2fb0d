"""The tokenizer deployment: text and chat messages to token ids and back, on CPU, scaled on its own.

A plain class (Serve options are applied in deployments/app.py). The model deployment detokenizes its own
stream incrementally; this deployment serves prompts, `/v1/tokenize` and `/v1/detokenize`.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.replica_logs import to_replica_log
from gemma.tokenizer import GemmaTokenizer

logger = logging.getLogger(__name__)


class TokenizerDeployment:
    def __init__(self, model: str = "gemma-3-270m", tokenizer: GemmaTokenizer | None = None) -> None:
        to_replica_log()
        self.tokenizer = tokenizer if tokenizer is not None else GemmaTokenizer.from_pretrained(model)
        logger.info("tokenizer for %s ready (%d tokens)", model, len(self.tokenizer))

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    async def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template rendered and encoded (the template writes `<bos>` itself); ValueError if invalid.
        `tools` (OpenAI's form) are offered in the prompt (gemma/tool_calls.py)."""
        if not messages:
            raise ValueError("messages must not be empty")
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, chat_template=chat_template,
            tools=tools,
        )

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    async def decode_tokens(self, token_ids: list[int]) -> list[str]:
        """Each id's own text (special tokens kept), for logprobs."""
        return [self.tokenizer.decode([t]) for t in token_ids]

    async def info(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
