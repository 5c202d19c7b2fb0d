"""`GemmaConfig`: the model's shape and numerics, with transformers' field names and defaults.

One class covers Gemma 1, 2 and 3 (text), told apart by `model_type` ("gemma", "gemma2", "gemma3_text"; a
multimodal "gemma3" file is read through its `text_config`). A key missing from a file takes the default of
transformers' config class for that model type. A config is data: a validated pydantic model that reads and writes the `config.json` of an HF checkpoint.
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
ModelType = Literal["gemma", "gemma2", "gemma3_text"]
LayerType = Literal["sliding_attention", "full_attention"]
ROPE_TYPES = ("default", "linear")  # what released Gemmas use; others are refused, not silently ignored

# transformers' defaults where Gemma2Config / Gemma3TextConfig differ from GemmaConfig (our field defaults).
MODEL_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {},
    "gemma2": dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256,
        sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
        query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    ),
}
# Every how-many-th layer is global when a file gives neither `layer_types` nor `sliding_window_pattern`.
DEFAULT_SLIDING_PATTERN = {"gemma2": 2, "gemma3_text": 6}


class GemmaConfig(BaseModel):
    """Configuration of a Gemma model; field names and defaults are those of transformers' `GemmaConfig`."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, protected_namespaces=())

    model_type: ModelType = "gemma"
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
    use_bidirectional_attention: bool | None = None  # transformers 5: no causal mask (encoder use; Gemma 1)

    # Gemma 2 and 3 (None / unset on Gemma 1).
    query_pre_attn_scalar: PositiveInt | None = None  # scores scaled by its -1/2 power; None = head_dim
    attn_logit_softcapping: PositiveFloat | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: PositiveFloat | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    sliding_window: PositiveInt | None = None  # a sliding layer's query sees the last `sliding_window` keys
    layer_types: list[LayerType] | None = None  # per layer; derived from the model type's pattern if absent
    rope_local_base_freq: PositiveFloat | None = None  # RoPE base of sliding layers (Gemma 3); None = rope_theta
    rope_scaling: dict[str, Any] | None = None  # of the global layers: {"rope_type": "linear", "factor": 8.0}

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
        """Accept what transformers 4.x and 5.x write: `text_config`, `rope_parameters`, `num_labels`, ..."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("model_type") == "gemma3" or "text_config" in data:  # multimodal wrapper: its text half
            data = {**{k: v for k, v in data.items() if k != "text_config"}, **data.get("text_config", {})}
            data["model_type"] = "gemma3_text"
        model_type = data.get("model_type", "gemma")
        for key, value in MODEL_TYPE_DEFAULTS.get(model_type, {}).items():
            data.setdefault(key, value)
        _read_rope_parameters(data)
        pattern = data.pop("sliding_window_pattern", None)
        if data.get("layer_types") is None and model_type in DEFAULT_SLIDING_PATTERN:
            every = pattern or DEFAULT_SLIDING_PATTERN[model_type]
            data["layer_types"] = [
                "full_attention" if (i + 1) % every == 0 else "sliding_attention"
                for i in range(data.get("num_hidden_layers", 28))
            ]
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
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}"
            )
        if self.layer_types and "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding_window must be set when layer_types has sliding_attention layers")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if kind not in ROPE_TYPES or (kind == "linear" and not self.rope_scaling.get("factor", 0) > 0):
                raise ValueError(f"rope_scaling: supported are {ROPE_TYPES} with a positive factor, got {self.rope_scaling}")
        if self.use_bidirectional_attention and self.model_type != "gemma":
            raise ValueError("use_bidirectional_attention is only supported for model_type 'gemma'")
        if sorted(self.id2label) != list(range(len(self.id2label))):
            raise ValueError(f"id2label keys must be 0..num_labels-1, got {sorted(self.id2label)}")
        return self

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def layer_type(self, layer_idx: int) -> LayerType:
        return "full_attention" if self.layer_types is None else self.layer_types[layer_idx]

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of a layer, or None for a global (full-attention) layer."""
        return self.sliding_window if self.layer_type(layer_idx) == "sliding_attention" else None

    def rope_base(self, layer_type: LayerType) -> float:
        if layer_type == "sliding_attention" and self.rope_local_base_freq is not None:
            return self.rope_local_base_freq
        return self.rope_theta

    def rope_factor(self, layer_type: LayerType) -> float:
        """Linear position scaling; it applies to the global layers only (Gemma 3 4B+: factor 8)."""
        if self.rope_scaling is None or (layer_type == "sliding_attention" and self.model_type == "gemma3_text"):
            return 1.0
        return float(self.rope_scaling.get("factor", 1.0))

    @property
    def attention_scale(self) -> float:
        """Multiplier of q.k: Gemma 2/3 use query_pre_attn_scalar ** -0.5, Gemma 1 head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def sandwich_norms(self) -> bool:
        """Gemma 2/3 normalize each block's output too: post-attention and pre/post feed-forward norms."""
        return self.model_type != "gemma"

    @property
    def qk_norm(self) -> bool:
        """Gemma 3 RMS-normalizes each query and key head before RoPE."""
        return self.model_type == "gemma3_text"

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


def _read_rope_parameters(data: dict[str, Any]) -> None:
    """Fold transformers 5's `rope_parameters` into the 4.x fields rope_theta / rope_local_base_freq / rope_scaling."""
    rope = data.pop("rope_parameters", None)
    if rope is None:
        return
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be a dict, got {rope!r}")
    per_type = "full_attention" in rope or "sliding_attention" in rope
    full = rope.get("full_attention", {}) if per_type else rope
    sliding = rope.get("sliding_attention", {}) if per_type else {}
    if "rope_theta" in full:
        data["rope_theta"] = full["rope_theta"]
    if "rope_theta" in sliding:
        data["rope_local_base_freq"] = sliding["rope_theta"]
    if sliding.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters: only 'default' RoPE is supported on sliding layers, got {sliding}")
    kind = full.get("rope_type", "default")
    if kind == "linear":
        data["rope_scaling"] = {"rope_type": "linear", "factor": full.get("factor")}
    elif kind != "default":
        raise ValueError(f"rope_parameters: supported rope types are {ROPE_TYPES}, got {kind!r}")


# Published shapes (the config.json files of the released checkpoints).
PRESETS: dict[str, dict[str, Any]] = {
    "gemma-2b": dict(
        vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
    ),
    "gemma-7b": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
    ),
    "gemma-2-2b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma-2-9b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma-2-27b": dict(
        model_type="gemma2", vocab_size=256000, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
        num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
        sliding_window=4096, max_position_embeddings=8192, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma-3-270m": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    ),
    "gemma-3-1b": dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    ),
}
