"""`GemmaConfig` against transformers' GemmaConfig: names, defaults, files, presets, validation."""

from __future__ import annotations

import json

import pytest
import transformers
from pydantic import ValidationError

from gemma import GemmaConfig
from gemma.config import PRESETS


def test_every_transformers_field_with_its_default():
    ours, ref = GemmaConfig(), transformers.GemmaConfig()
    fields = set(transformers.GemmaConfig.__annotations__)  # GemmaConfig's own fields, not the base class's
    assert ref.rope_parameters["rope_theta"] == ours.rope_theta == 10000.0  # 5.x nests it; 4.x had it top-level
    # transformers 5 rewrites the legacy "gelu" to the tanh form it always meant; we keep the name, same maths
    assert ref.hidden_act == "gelu_pytorch_tanh" and ours.hidden_act == "gelu"
    for key in sorted(fields - {"rope_parameters", "hidden_act"}):
        assert getattr(ours, key) == getattr(ref, key), key
    for key in ("num_labels", "id2label", "label2id", "problem_type"):
        assert getattr(ours, key) == getattr(ref, key), key
    expected = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                    initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, eos_token_id=1,
                    bos_token_id=2, tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0)
    assert {k: getattr(ours, k) for k in expected} == expected


def test_reads_transformers_config_json_and_keeps_extra_keys(tmp_path):
    ref = transformers.GemmaConfig(hidden_size=64, head_dim=32, num_labels=3, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    ref.save_pretrained(tmp_path)
    cfg = GemmaConfig.from_pretrained(tmp_path)
    assert (cfg.hidden_size, cfg.head_dim, cfg.rope_theta, cfg.num_labels) == (64, 32, 500.0, 3)
    assert cfg.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert cfg.transformers_version == ref.to_dict()["transformers_version"]  # unknown keys are kept
    cfg.save_pretrained(tmp_path / "ours")
    again = transformers.GemmaConfig.from_pretrained(tmp_path / "ours")
    assert again.rope_parameters["rope_theta"] == 500.0 and again.num_labels == 3 and again.head_dim == 32
    assert GemmaConfig.from_pretrained(tmp_path / "ours" / "config.json") == cfg


def test_transformers_4_style_fields(tmp_path):
    data = {"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh",
            "rope_theta": 1234.0, "torch_dtype": "bfloat16", "id2label": {"0": "neg", "1": "pos"}}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = GemmaConfig.from_pretrained(tmp_path)
    assert cfg.rope_theta == 1234.0 and cfg.hidden_activation == "gelu_pytorch_tanh"
    assert cfg.id2label == {0: "neg", 1: "pos"} and cfg.label2id == {"neg": 0, "pos": 1}
    assert cfg.torch_dtype == "bfloat16"


# (model_type, hidden, layers, heads, kv heads, intermediate, head_dim, sliding window) of the released configs
PUBLISHED = {
    "gemma-2b": ("gemma", 2048, 18, 8, 1, 16384, 256, None),
    "gemma-7b": ("gemma", 3072, 28, 16, 16, 24576, 256, None),
    "gemma-2-2b": ("gemma2", 2304, 26, 8, 4, 9216, 256, 4096),
    "gemma-2-9b": ("gemma2", 3584, 42, 16, 8, 14336, 256, 4096),
    "gemma-2-27b": ("gemma2", 4608, 46, 32, 16, 36864, 128, 4096),
    "gemma-3-270m": ("gemma3_text", 640, 18, 4, 1, 2048, 256, 512),
    "gemma-3-1b": ("gemma3_text", 1152, 26, 4, 1, 6912, 256, 512),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_published_shapes(name):
    cfg = GemmaConfig.from_preset(name)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.head_dim, cfg.sliding_window) == PUBLISHED[name]
    if cfg.model_type == "gemma3_text":  # every 6th layer global
        assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"] == list(range(5, cfg.num_hidden_layers, 6))
    with pytest.raises(ValueError, match="unknown preset"):
        GemmaConfig.from_preset("gemma-13b")


@pytest.mark.parametrize(
    "bad,field",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"head_dim": 0}, "head_dim"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
        ({"pad_token_id": 300, "vocab_size": 256}, "pad_token_id"),
        ({"num_labels": 0}, "num_labels"),
        ({"problem_type": "ranking"}, "problem_type"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_parameters"),
    ],
)
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        GemmaConfig(**bad)


def test_assignment_is_validated_and_missing_file_is_clear(tmp_path):
    cfg = GemmaConfig()
    with pytest.raises(ValidationError, match="num_hidden_layers"):
        cfg.num_hidden_layers = -1
    with pytest.raises(FileNotFoundError, match="config.json"):
        GemmaConfig.from_pretrained(tmp_path)
