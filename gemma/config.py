"""`GemmaConfig`: the model's shape and numerics, with transformers' field names and defaults.

A config is data: a validated pydantic model that reads and writes the `config.json` of an HF checkpoint.
Unknown keys in a file (`architectures`, `transformers_version`, ...) are kept and written back, never fatal.
Invalid values raise `pydantic.ValidationError` (a `ValueError`) whose message names the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, PositiveFloat, PositiveInt, field_validator, model_validator

CONFIG_NAME = "config.json"

# Values of `hidden_act` / `hidden_activation` that Gemma computes as gelu with the tanh approximation.
# The released Gemma 1 configs say "gelu" but were trained with the tanh form; transformers maps it the same
# way (GemmaConfig.__post_init__ in transformers 5, GemmaMLP in 4.38+).
TANH_GELU_NAMES = frozenset({"gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast"})

ProblemType = Literal["regression", "single_label_classification", "multi_label_classification"]


class GemmaConfig(BaseModel):
    """Configuration of a Gemma model; field names and defaults are those of transformers' `GemmaConfig`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    model_type: Literal["gemma"] = "gemma"
    vocab_size: PositiveInt = 256000  # rows of the embedding and of the (tied) LM head
    hidden_size: PositiveInt = 3072  # width of the residual stream
    intermediate_size: PositiveInt = 24576  # width of the gated MLP
    num_hidden_layers: PositiveInt = 28
    num_attention_heads: PositiveInt = 16  # query heads
    num_key_value_heads: PositiveInt = 16  # 1 = multi-query (Gemma 2B), < heads = grouped-query
    head_dim: PositiveInt = 256  # explicit: Gemma 7B has 16 * 256 != 3072, so never hidden // heads
    hidden_act: str = "gelu"  # computed as tanh-approximated gelu, see TANH_GELU_NAMES
    hidden_activation: str | None = None  # transformers 4.x name; wins over hidden_act when set
    max_position_embeddings: PositiveInt = 8192
    initializer_range: PositiveFloat = 0.02  # std of the normal init of random weights
    rms_norm_eps: PositiveFloat = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True  # the LM head is the embedding matrix
    rope_theta: PositiveFloat = 10000.0  # RoPE base
    attention_bias: bool = False  # biases on q/k/v/o projections
    attention_dropout: float = 0.0  # only in training mode
    use_bidirectional_attention: bool | None = None  # transformers 5: no causal mask (encoder use)

    # Sequence classification (transformers' PretrainedConfig fields).
    id2label: dict[int, str] = {0: "LABEL_0", 1: "LABEL_1"}
    label2id: dict[str, int] = {"LABEL_0": 0, "LABEL_1": 1}
    problem_type: ProblemType | None = None

    @field_validator("attention_dropout")
    @classmethod
    def _dropout_range(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError("attention_dropout must be in [0, 1)")
        return v

    @field_validator("hidden_act", "hidden_activation")
    @classmethod
    def _gelu_only(cls, v: str | None) -> str | None:
        if v is not None and v not in TANH_GELU_NAMES:
            raise ValueError(f"Gemma uses tanh-approximated gelu; got {v!r}, expected one of {sorted(TANH_GELU_NAMES)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_hf_dict(cls, data: Any) -> Any:
        """Accept what transformers writes: 5.x `rope_parameters`, `num_labels`, string keys of `id2label`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        rope = data.pop("rope_parameters", None)
        if rope is not None:
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters: only rope_type 'default' is supported by Gemma 1, got {rope}")
            data.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        if data.get("id2label") is not None:
            data["id2label"] = {int(k): v for k, v in data["id2label"].items()}
        num_labels = data.pop("num_labels", None)
        if num_labels is not None:
            if not isinstance(num_labels, int) or num_labels < 1:
                raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
            if len(data.get("id2label") or {}) != num_labels:
                data["id2label"] = {i: f"LABEL_{i}" for i in range(num_labels)}
        if data.get("id2label") is not None and data.get("label2id") is None:
            data["label2id"] = {v: k for k, v in data["id2label"].items()}
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> GemmaConfig:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} ({value}) must be in [0, vocab_size={self.vocab_size})")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")
        return self

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def eos_token_ids(self) -> list[int]:
        """`eos_token_id` as a list (a config may name several end tokens)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    # ---- files ----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> GemmaConfig:
        """Read an HF `config.json` (a checkpoint directory or the file itself); keyword overrides win."""
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        return cls.model_validate({**data, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GemmaConfig:
        """A config with the published shapes of a released model (`PRESETS`), e.g. `gemma-2b`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return cls.model_validate({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The `config.json` contents: our fields plus any extra keys read from a file."""
        data = self.model_dump(mode="json")
        data["id2label"] = {str(k): v for k, v in self.id2label.items()}
        data["num_labels"] = self.num_labels
        return data

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        file = directory / CONFIG_NAME
        file.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return file


# Published shapes (the config.json of google/gemma-2b and google/gemma-7b).
PRESETS: dict[str, dict[str, Any]] = {
    "gemma-2b": dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
    ),
    "gemma-7b": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
    ),
}
