"""Streaming detokenization for Gemma's byte-fallback BPE."""

from __future__ import annotations

from tokenizers import Tokenizer


class IncrementalDecoder:
    """Streaming detokenizer: the deltas from `step` plus `flush()` concatenate to exactly
    `decode(all_ids, skip_special_tokens)`, and every prefix of that concatenation is a prefix of it.

    Why text is held back: Gemma's decoder (Replace, ByteFallback, Fuse) decodes each maximal run of
    `<0xNN>` byte tokens as one UTF-8 string, and if the run is invalid anywhere, *every* byte of it
    becomes U+FFFD. So no text of a run is final until a non-byte token ends it; elsewhere the decoder
    is concatenative and text is emitted at once. Each step decodes only a small window (vLLM-style:
    a few emitted tokens as left context, then the pending ones), so a token costs O(window), not O(n).
    Ids the full decode drops (out of range, or special with `skip_special_tokens`) are ignored.
    """

    _CONTEXT = 4  # emitted tokens kept as left context, for decoders that treat a sequence's start specially

    def __init__(
        self, backend: Tokenizer, byte_ids: frozenset[int], skipped: frozenset[int], skip_special_tokens: bool
    ) -> None:
        self._backend, self._byte_ids, self._skipped = backend, byte_ids, skipped
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # context tokens, then pending ones
        self._read_offset = 0  # start of the pending tokens in _window

    def step(self, token_id: int) -> str:
        """Feed one id; return the text that became final (often "")."""
        token_id = int(token_id)
        if token_id in self._skipped or self._backend.id_to_token(token_id) is None:
            return ""
        self._window.append(token_id)
        return "" if token_id in self._byte_ids else self._emit()

    def flush(self) -> str:
        """Text still held back (an unfinished byte run) at the end of the sequence."""
        return self._emit()

    def _emit(self) -> str:
        if self._read_offset == len(self._window):
            return ""
        context = self._backend.decode(self._window[: self._read_offset], self._skip_special_tokens)
        text = self._backend.decode(self._window, self._skip_special_tokens)
        if not text.startswith(context):  # never for Gemma's decoder: we only cut where it is concatenative
            text, context = self._backend.decode(self._window[self._read_offset :], self._skip_special_tokens), ""
        self._window = self._window[-self._CONTEXT :]
        self._read_offset = len(self._window)
        return text[len(context) :]
