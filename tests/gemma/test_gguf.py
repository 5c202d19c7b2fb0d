"""GGUF files written here with `gguf.GGUFWriter` (quantized tensors included) load like their safetensors twins.

The twin holds exactly the values the GGUF dequantizes to, under HF names, with zero-centred norms, plus the
config transformers would use; loading either must give the same model, bit for bit.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import save_file

from tests.helpers.gguf_reader import same_as_gguf_reader
from tests.helpers.gguf_writer import FAMILIES, write_gguf
from gemma import GemmaConfig, GemmaForCausalLM, GemmaTokenizer
from gemma.gguf_file import GGUFError, open_gguf
from tests.helpers.tokenizer_fixtures import SAMPLE_TEXTS, write_sentencepiece_model

# K-quants need rows of 256 values, hence hidden 256 / intermediate 512.
@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return write_sentencepiece_model(tmp_path_factory.mktemp("sp"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_gguf_loads_like_its_safetensors_twin(tmp_path, sp_dir, family):
    path = tmp_path / "model.gguf"
    twin = write_gguf(path, family, sp_dir)
    model = GemmaForCausalLM.from_pretrained(path)

    cfg = model.config
    assert cfg.model_type == {"gemma3": "gemma3_text"}.get(family, family)
    assert (cfg.hidden_size, cfg.head_dim, cfg.num_key_value_heads) == (256, 32, 2)
    if family == "gemma2":
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping, cfg.sliding_window) == (20.0, 10.0, 8)
        assert cfg.layer_types == ["sliding_attention", "full_attention"]
    if family == "gemma3":
        assert cfg.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
        assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.query_pre_attn_scalar) == (1e6, 1e4, 32)

    twin_dir = tmp_path / "twin"
    twin_dir.mkdir()
    cfg.save_pretrained(twin_dir)
    save_file(twin, twin_dir / "model.safetensors", metadata={"format": "pt"})
    other = GemmaForCausalLM.from_pretrained(twin_dir)
    a, b = model.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ids = torch.randint(4, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, other(ids).logits)
    half = GemmaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_gguf_tokenizer_matches_transformers_and_sentencepiece_file(tmp_path, sp_dir):
    import transformers

    path = tmp_path / "model.gguf"
    write_gguf(path, "gemma3", sp_dir)
    ours = GemmaTokenizer.from_pretrained(path)
    from_spm = GemmaTokenizer.from_pretrained(sp_dir)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (2, 1, 0, 3)
    for text in SAMPLE_TEXTS:
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text) == from_spm.encode(text), text
        # (not skip_special_tokens: this vocab has the turn markers as user-defined pieces, which transformers
        # leaves non-special; we keep them special as in real Gemma files, where they are control pieces)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))


def test_unsupported_architecture_and_quant_type_are_clear_errors(tmp_path, sp_dir):
    llama = tmp_path / "llama.gguf"
    write_gguf(llama, "gemma", sp_dir, arch="llama")
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        GemmaForCausalLM.from_pretrained(llama)

    odd = tmp_path / "odd.gguf"
    bytes_per_row = 256 // 32 * gguf.GGML_QUANT_SIZES[Q.Q8_1][1]
    write_gguf(odd, "gemma", sp_dir, extra_tensor=("output.weight", np.zeros((7, bytes_per_row), np.uint8), Q.Q8_1))
    with pytest.raises(GGUFError, match="output.weight has unsupported type Q8_1"):
        list(open_gguf(odd).tensors())

    stray = tmp_path / "stray.gguf"
    write_gguf(stray, "gemma", sp_dir, extra_tensor=("blk.0.ffn_gate_exps.weight", np.zeros((2, 34), np.uint8), Q.Q8_0))
    with pytest.raises(GGUFError, match="unexpected tensor blk.0.ffn_gate_exps.weight"):
        GemmaForCausalLM.from_pretrained(stray)


def test_named_model_resolution_is_a_table_not_a_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        GemmaConfig.from_pretrained(tmp_path / "gemma-3-270m")
    with pytest.raises(FileNotFoundError, match="no GGUF"):
        open_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_header_parser_matches_gguf_reader(tmp_path, sp_dir, family):
    path = tmp_path / "model.gguf"
    write_gguf(path, family, sp_dir)
    same_as_gguf_reader(path)
