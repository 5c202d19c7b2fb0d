"""Gemma in PyTorch: config, tokenizer, models and weights, numerically identical to transformers, and a
continuous-batching engine (`LLM`, `SamplingParams`, `gemma.engine`).

This package never imports Ray or any serving code; it runs on a laptop CPU.
"""

from gemma.config import GemmaConfig
from gemma.label_words import label_word_classifier, load_classifier
from gemma.llm import LLM
from gemma.lora import LoRARequest
from gemma.model import GemmaForCausalLM, GemmaForSequenceClassification, GemmaModel
from gemma.sampling import SamplingParams
from gemma.structured import StructuredOutputsParams
from gemma.tokenizer import GemmaTokenizer

__all__ = [
    "LLM",
    "GemmaConfig",
    "GemmaForCausalLM",
    "GemmaForSequenceClassification",
    "GemmaModel",
    "GemmaTokenizer",
    "LoRARequest",
    "SamplingParams",
    "StructuredOutputsParams",
    "label_word_classifier",
    "load_classifier",
]
