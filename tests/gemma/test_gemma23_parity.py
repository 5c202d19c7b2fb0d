"""Gemma 2 and Gemma 3 (text) in our one code path against transformers' Gemma2 / Gemma3 classes.

Tiny random checkpoints with small soft-caps (so tanh is far from linear), sliding windows shorter than the
sequences, a RoPE base per layer type and linear RoPE scaling on the global layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.checkpoints import FAMILIES, WINDOW, load_hf, write_hf_checkpoint
from gemma import GemmaConfig, GemmaForCausalLM, GemmaForSequenceClassification
from gemma.cache import KVCache

ATOL = 1e-4
@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp(family), family=family, **FAMILIES[family])


@pytest.fixture(scope="module")
def pair(checkpoint, family):
    return GemmaForCausalLM.from_pretrained(checkpoint), load_hf(checkpoint, family=family)


def ids(shape, seed=1):
    return torch.randint(4, 211, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_config_reads_the_family(pair, family):
    ours, ref = pair
    cfg = ours.config
    assert cfg.model_type == family and cfg.sliding_window == WINDOW
    assert cfg.layer_types == list(ref.config.layer_types)
    if family == "gemma3_text":
        assert (cfg.rope_theta, cfg.rope_local_base_freq, cfg.rope_factor("full_attention")) == (100000.0, 1000.0, 2.0)
        assert cfg.rope_factor("sliding_attention") == 1.0 and cfg.qk_norm


@torch.no_grad()
def test_logits_hidden_states_attentions_beyond_the_window(pair):
    ours, ref = pair
    x = ids((3, 4 * WINDOW + 3))
    a = ours(x, output_hidden_states=True, output_attentions=True)
    b = ref(x, output_hidden_states=True, output_attentions=True)
    assert max_diff(a.logits, b.logits) < ATOL
    if ours.config.final_logit_softcapping:
        assert a.logits.abs().max() <= ours.config.final_logit_softcapping
        assert a.logits.abs().max() > 0.5 * ours.config.final_logit_softcapping  # the cap really bends values
    for x1, y1 in zip(a.hidden_states, b.hidden_states, strict=True):
        assert max_diff(x1, y1) < ATOL
    for i, (p, q) in enumerate(zip(a.attentions, b.attentions, strict=True)):
        assert max_diff(p, q) < 1e-5
        if ours.config.layer_window(i):  # nothing beyond the window gets weight
            T = p.shape[-1]
            far = torch.arange(T)[:, None] - torch.arange(T)[None, :] >= WINDOW
            assert p[..., far].abs().max() == 0


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_padding_mask(pair, side):
    ours, ref = pair
    x = ids((2, 17))
    mask = torch.ones_like(x)
    cols = slice(0, 6) if side == "left" else slice(11, 17)
    mask[1, cols], x[1, cols] = 0, 0
    a, b = ours(x, attention_mask=mask).logits, ref(x, attention_mask=mask).logits
    assert max_diff(a[mask.bool()], b[mask.bool()]) < ATOL


@torch.no_grad()
def test_sliding_cache_keeps_only_the_window(pair):
    ours, ref = pair
    x = ids((2, 23))
    full = ref(x).logits
    cache = KVCache.from_config(ours.config)
    chunks = [ours(x[:, :9], past_key_values=cache, use_cache=True).logits]
    for t in range(9, 23):  # then one token at a time, like decoding
        chunks.append(ours(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert max_diff(torch.cat(chunks, 1), full) < ATOL
    for i in range(ours.config.num_hidden_layers):
        assert cache.kept(i) == (WINDOW - 1 if ours.config.layer_window(i) else 23)
    assert cache.get_seq_length() == 23


@torch.no_grad()
def test_loss(pair):
    ours, ref = pair
    x = ids((2, 13))
    assert abs(ours(x, labels=x).loss.item() - ref(x, labels=x).loss.item()) < 1e-5


@torch.no_grad()
def test_greedy_generate_32_tokens(pair):
    ours, ref = pair
    prompts = [ids((1, n), seed=s)[0] for s, n in [(2, 9), (3, 4)]]
    width = max(len(p) for p in prompts)
    x = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, width - len(p):], mask[i, width - len(p):] = p, 1
    a = ours.generate(x, attention_mask=mask, max_new_tokens=32, eos_token_id=[])
    b = ref.generate(x, attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                     eos_token_id=None, pad_token_id=0)
    assert torch.equal(a, b)
    assert len(set(a[0, width:].tolist())) > 3  # a real continuation, not one token repeated
    single = ours.generate(prompts[0][None], max_new_tokens=32, eos_token_id=[])
    assert torch.equal(single[0, len(prompts[0]):], a[0, width:])


@torch.no_grad()
def test_sequence_classification(family, tmp_path):
    path = write_hf_checkpoint(tmp_path, "classify", family=family, num_labels=3, **FAMILIES[family])
    ours, ref = GemmaForSequenceClassification.from_pretrained(path), load_hf(path, "classify", family)
    x = ids((3, 14))
    x[1, 9:] = 0
    mask = (x != 0).long()
    labels = torch.tensor([0, 2, 1])
    a, b = ours(x, attention_mask=mask, labels=labels), ref(x, attention_mask=mask, labels=labels)
    assert max_diff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < 1e-5


def test_transformers_4_config_files(tmp_path):
    """4.x wrote rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern, not rope_parameters."""
    data = {"model_type": "gemma3_text", "num_hidden_layers": 12, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
            "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "sliding_window": 1024, "sliding_window_pattern": 6}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = GemmaConfig.from_pretrained(tmp_path)
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert cfg.rope_base("sliding_attention") == 1e4 and cfg.rope_base("full_attention") == 1e6
    assert cfg.rope_factor("full_attention") == 8.0 and cfg.rope_factor("sliding_attention") == 1.0
    assert cfg.vocab_size == 262208 and cfg.max_position_embeddings == 131072  # Gemma3TextConfig's defaults
    # the multimodal wrapper: its text half
    wrapped = {"model_type": "gemma3", "text_config": {**data, "hidden_size": 64}, "vision_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(wrapped))
    assert GemmaConfig.from_pretrained(tmp_path).hidden_size == 64
    gemma2 = GemmaConfig(model_type="gemma2", num_hidden_layers=4)
    assert gemma2.layer_types == ["sliding_attention", "full_attention"] * 2
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping, gemma2.sliding_window) == (50.0, 30.0, 4096)


def test_our_saved_config_loads_in_transformers(pair, tmp_path, family):
    import transformers

    ours, ref = pair
    ours.config.save_pretrained(tmp_path)
    back = transformers.AutoConfig.from_pretrained(tmp_path)
    assert back.model_type == family and list(back.layer_types) == ours.config.layer_types
    assert back.rope_parameters == ref.config.rope_parameters


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
        ({"layer_types": ["sliding_attention"] * 4, "sliding_window": None}, "sliding_window must be set"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_parameters"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling"),
        ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ],
)
def test_invalid_family_fields(bad, match):
    with pytest.raises(ValueError, match=match):
        GemmaConfig(model_type="gemma2", num_hidden_layers=4, **bad)
