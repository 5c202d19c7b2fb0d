"""Our models against transformers' on the same random checkpoints, fp32 on CPU: logits within 1e-4."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.checkpoints import load_hf, write_hf_checkpoint
from gemma import GemmaForCausalLM, GemmaForSequenceClassification, GemmaModel

ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def pair(causal_checkpoint):
    return GemmaForCausalLM.from_pretrained(causal_checkpoint), load_hf(causal_checkpoint)


def batch(vocab: int = 211, seed: int = 1, shape: tuple[int, int] = (3, 19)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, shape, generator=g)


@torch.no_grad()
def test_logits_hidden_states_and_attentions(pair):
    ours, ref = pair
    ids = batch()
    a = ours(ids, output_hidden_states=True, output_attentions=True)
    b = ref(ids, output_hidden_states=True, output_attentions=True)
    assert a.logits.shape == b.logits.shape
    assert max_diff(a.logits, b.logits) < ATOL
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.num_hidden_layers + 1
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert max_diff(x, y) < ATOL
    assert len(a.attentions) == len(b.attentions) == ours.config.num_hidden_layers
    for x, y in zip(a.attentions, b.attentions):
        assert max_diff(x, y) < 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
@torch.no_grad()
def test_logits_with_padding_mask(pair, side):
    ours, ref = pair
    ids = batch(shape=(3, 17))
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 5, 11]):
        if n_pad:
            cols = slice(0, n_pad) if side == "left" else slice(17 - n_pad, 17)
            mask[row, cols] = 0
            ids[row, cols] = 0
    a = ours(ids, attention_mask=mask).logits
    b = ref(ids, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(a).all()
    assert max_diff(a[real], b[real]) < ATOL  # padding positions carry no meaning in either


@torch.no_grad()
def test_kv_cache_chunks_equal_one_pass(pair):
    ours, ref = pair
    ids = batch(shape=(2, 20))
    full = ref(ids).logits
    first = ours(ids[:, :13], use_cache=True)
    second = ours(ids[:, 13:], past_key_values=first.past_key_values, use_cache=True)
    assert first.past_key_values.get_seq_length() == 20
    assert max_diff(torch.cat([first.logits, second.logits], 1), full) < ATOL


@torch.no_grad()
def test_loss_and_inputs_embeds(pair):
    ours, ref = pair
    ids = batch(shape=(2, 15))
    labels = ids.clone()
    labels[0, :4] = -100
    a, b = ours(ids, labels=labels), ref(ids, labels=labels)
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    embeds = ref.get_input_embeddings()(ids)
    assert max_diff(ours.get_input_embeddings()(ids), embeds) < 1e-6
    assert max_diff(ours(inputs_embeds=embeds).logits, b.logits) < ATOL
    tup = ours(ids, labels=labels, return_dict=False)
    assert torch.equal(tup[0], a.loss) and torch.equal(tup[1], a.logits)


@torch.no_grad()
def test_base_model_from_causal_checkpoint(causal_checkpoint, pair):
    _, ref = pair
    base = GemmaModel.from_pretrained(causal_checkpoint)
    ids = batch(shape=(2, 9))
    assert max_diff(base(ids).last_hidden_state, ref.model(ids).last_hidden_state) < ATOL


@torch.no_grad()
def test_greedy_generate_single_and_left_padded_batch(pair):
    ours, ref = pair
    prompts = [batch(seed=s, shape=(1, n))[0] for s, n in [(3, 7), (4, 12), (5, 3)]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    kwargs = dict(max_new_tokens=32, do_sample=False)
    # an eos the random model will not produce keeps all 32 steps comparable
    a = ours.generate(ids, attention_mask=mask, eos_token_id=[], **kwargs)
    b = ref.generate(ids, attention_mask=mask, eos_token_id=None, pad_token_id=0, min_new_tokens=32, **kwargs)
    assert a.shape == (3, width + 32)
    assert torch.equal(a, b)
    single = ours.generate(prompts[1][None], eos_token_id=[], **kwargs)
    ref_single = ref.generate(prompts[1][None], eos_token_id=None, pad_token_id=0, min_new_tokens=32, **kwargs)
    assert torch.equal(single, ref_single)
    # batched with left padding == one at a time
    assert torch.equal(single[0, len(prompts[1]):], a[1, width:])


@torch.no_grad()
def test_generate_stops_at_eos_per_row(pair):
    ours, ref = pair
    ids = batch(shape=(2, 6))
    free = ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    eos = int(free[0, 8])  # row 0's third new token: pretend it is eos
    out = ours.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert (out[0, 9:] == 0).all()  # padded after its eos


@pytest.mark.parametrize(
    "num_labels,problem_type,label_kind",
    [(3, None, "int"), (1, None, "float"), (4, "multi_label_classification", "multi"), (3, "regression", "float")],
)
@torch.no_grad()
def test_sequence_classification(tmp_path, num_labels, problem_type, label_kind):
    path = write_hf_checkpoint(
        tmp_path, "classify", num_labels=num_labels, problem_type=problem_type,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    ours, ref = GemmaForSequenceClassification.from_pretrained(path), load_hf(path, "classify")
    ids = batch(shape=(4, 11))
    ids[1, 7:] = 0  # right padding
    ids[2, :5] = 0  # left padding
    mask = (ids != 0).long()
    g = torch.Generator().manual_seed(0)
    labels = {
        "int": torch.randint(0, num_labels, (4,), generator=g),
        "float": torch.randn(4, num_labels, generator=g).squeeze(-1) if num_labels == 1 else torch.randn(4, num_labels, generator=g),
        "multi": torch.randint(0, 2, (4, num_labels), generator=g).float(),
    }[label_kind]
    a, b = ours(ids, attention_mask=mask, labels=labels), ref(ids, attention_mask=mask, labels=labels)
    assert a.logits.shape == (4, num_labels)
    assert max_diff(a.logits, b.logits) < ATOL
    assert abs(a.loss.item() - b.loss.item()) < 1e-5
    assert ours.config.id2label == {int(k): v for k, v in ref.config.id2label.items()}


@torch.no_grad()
def test_sampled_generate_is_seeded_and_top_k_1_is_greedy(pair):
    ours, _ = pair
    ids = batch(shape=(2, 5))
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, eos_token_id=[])
    a, b = ours.generate(ids, seed=3, **kwargs), ours.generate(ids, seed=3, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, ours.generate(ids, seed=4, **kwargs))
    greedy = ours.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(ours.generate(ids, seed=5, **{**kwargs, "top_k": 1}), greedy)
