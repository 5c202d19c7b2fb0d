"""Shared fixtures: tiny random Gemma checkpoints written by transformers (the oracle) in HF layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Tiny shapes covering every attention layout; head_dim * heads != hidden_size in all of them but "mha".
SHAPES: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12),
}
BASE = dict(vocab_size=211, hidden_size=32, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=256)


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every parameter (norms included, which transformers initializes to 0) non-trivial random values.

    Large projections and a small embedding make the layers outweigh the residual stream, so greedy decoding
    of the tied head does not just repeat the last token: generation tests see varied continuations.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.3 if "norm" in name else 0.05 if "embed" in name else 0.4
            p.copy_(torch.randn(p.shape, generator=g) * std)


def write_hf_checkpoint(
    directory: Path, task: str = "causal", seed: int = 0, max_shard_size: str | None = None, **config
) -> Path:
    """Save a random transformers Gemma model (`task` causal | classify | base) with `save_pretrained`."""
    import transformers

    cfg = transformers.GemmaConfig(**{**BASE, **config})
    cls = {
        "causal": transformers.GemmaForCausalLM,
        "classify": transformers.GemmaForSequenceClassification,
        "base": transformers.GemmaModel,
    }[task]
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def load_hf(directory: Path, task: str = "causal"):
    import transformers

    cls = {
        "causal": transformers.GemmaForCausalLM,
        "classify": transformers.GemmaForSequenceClassification,
        "base": transformers.GemmaModel,
    }[task]
    return cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="session", params=sorted(SHAPES))
def causal_checkpoint(request, tmp_path_factory) -> Path:
    """A causal-LM checkpoint per attention layout; the MQA one is sharded to exercise the index."""
    shard = "40KB" if request.param == "mqa" else None
    path = tmp_path_factory.mktemp(f"causal-{request.param}")
    return write_hf_checkpoint(path, "causal", max_shard_size=shard, **SHAPES[request.param])
