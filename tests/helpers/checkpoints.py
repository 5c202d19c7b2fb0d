"""Tiny random Gemma checkpoints written by transformers (the oracle) in HF layout, and the oracle's loader."""

from __future__ import annotations

from pathlib import Path

import torch

# Tiny shapes covering every attention layout; head_dim * heads != hidden_size in all of them but "mha".
SHAPES: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12),
}
BASE = dict(vocab_size=211, hidden_size=32, intermediate_size=72, num_hidden_layers=3, max_position_embeddings=256)


# Gemma 2 / Gemma 3 tiny configs: small soft-caps (tanh far from linear), windows shorter than the test sequences,
# a RoPE base per layer type and linear RoPE scaling on the global layers.
WINDOW = 5
FAMILIES = {
    "gemma2": dict(
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, attn_logit_softcapping=2.0, final_logit_softcapping=1.5,
    ),
    "gemma3_text": dict(
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=20,
        sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    ),
}


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


# transformers' (config, causal LM, sequence classifier, base model) class names per generation
HF_CLASSES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", "GemmaForSequenceClassification", "GemmaModel"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2Model"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "Gemma3TextModel"),
}
TASKS = ("causal", "classify", "base")


def hf_class(family: str, task: str):
    import transformers

    return getattr(transformers, HF_CLASSES[family][1 + TASKS.index(task)])


def write_hf_checkpoint(
    directory: Path,
    task: str = "causal",
    seed: int = 0,
    max_shard_size: str | None = None,
    family: str = "gemma",
    **config,
) -> Path:
    """Save a random transformers model (`family` gemma | gemma2 | gemma3_text; `task` causal | classify | base)."""
    import transformers

    cfg = getattr(transformers, HF_CLASSES[family][0])(**{**BASE, **config})
    cls = hf_class(family, task)
    torch.manual_seed(seed)
    model = cls(cfg)
    randomize_(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def load_hf(directory: Path, task: str = "causal", family: str = "gemma"):
    """The oracle in fp32 with eager attention (the reference path; Gemma 2's soft-capping needs it)."""
    cls = hf_class(family, task)
    return cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
