"""`KVCache`: the per-layer key/value cache that `past_key_values` carries between forward calls.

This is the simple contiguous cache of the HF-style API (`model(..., past_key_values=cache, use_cache=True)`
and `generate`): every row of a batch has the same length, padding is expressed by the attention mask.
The serving engine uses a paged cache instead (`gemma.engine`).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, each (B, H_kv, T, D), appended to along T."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of cached positions (including padding positions)."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[-2]

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's `key`/`value` (B, H_kv, T, D) and return the whole cached sequence of the layer."""
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the batch rows `index` (in that order), e.g. to drop finished rows."""
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k.index_select(0, index), v.index_select(0, index)

    def __len__(self) -> int:
        return len(self.keys)
