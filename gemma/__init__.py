"""Gemma in PyTorch: config, tokenizer, models and weights, numerically identical to transformers.

This package never imports Ray or any serving code; it runs on a laptop CPU.
"""

from gemma.config import GemmaConfig
from gemma.model import GemmaForCausalLM, GemmaForSequenceClassification, GemmaModel
from gemma.tokenizer import GemmaTokenizer

__all__ = [
    "GemmaConfig",
    "GemmaForCausalLM",
    "GemmaForSequenceClassification",
    "GemmaModel",
    "GemmaTokenizer",
]
