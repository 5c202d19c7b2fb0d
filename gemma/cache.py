"""`KVCache`: the per-layer key/value cache that `past_key_values` carries between forward calls.

This is the simple contiguous cache of the HF-style API (`model(..., past_key_values=cache, use_cache=True)`
and `generate`): every row of a batch has the same length, padding is expressed by the attention mask.
A sliding-window layer (Gemma 2/3) keeps only its last `window - 1` positions: that is all a later query can
see (it attends to itself and the `window - 1` keys before it). The serving engine uses a paged cache instead.
"""

from __future__ import annotations

import torch

from gemma.config import GemmaConfig


class KVCache:
    """Keys and values of every layer, each (B, H_kv, T, D), appended to along T."""

    def __init__(self, num_layers: int, windows: list[int | None] | None = None) -> None:
        self.windows = windows if windows is not None else [None] * num_layers
        if len(self.windows) != num_layers:
            raise ValueError(f"{len(self.windows)} windows for {num_layers} layers")
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.seen = [0] * num_layers  # positions ever appended, kept or not

    @classmethod
    def from_config(cls, config: GemmaConfig) -> KVCache:
        return cls(config.num_hidden_layers, [config.layer_window(i) for i in range(config.num_hidden_layers)])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions processed so far (including padding positions and any no longer kept)."""
        return self.seen[layer_idx]

    def kept(self, layer_idx: int) -> int:
        """Number of positions stored for the layer: the most recent ones."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's `key`/`value` (B, H_kv, T, D); return the kept past plus this step's keys/values."""
        if self.keys[layer_idx] is not None:
            key = torch.cat([self.keys[layer_idx], key], dim=-2)
            value = torch.cat([self.values[layer_idx], value], dim=-2)
        self.seen[layer_idx] += key.shape[-2] - self.kept(layer_idx)
        window = self.windows[layer_idx]
        start = 0 if window is None else max(0, key.shape[-2] - (window - 1))
        self.keys[layer_idx], self.values[layer_idx] = key[..., start:, :], value[..., start:, :]
        return key, value

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (in that order), e.g. to drop finished rows."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)

    def __len__(self) -> int:
        return len(self.keys)
