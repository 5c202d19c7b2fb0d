"""Sequence classifiers made from a causal LM without training: the score head holds label words' LM-head rows.

A causal LM that reads a prompt template with the input in place of `{text}` scores each label by the logit of its
label word as the next token (" positive" / " negative" after "Sentiment:"). `label_word_classifier` turns that
into a `GemmaForSequenceClassification` whose `score` rows are the LM head's rows of those words, on the LM's own
decoder (shared, not copied). Contract: on the same templated token ids, the classifier's logits are the causal
LM's next-token logits at the label-word ids.

The template travels in the classifier's config (`classifier_template`, an extra config.json key written by
`save_pretrained`), so a saved classifier directory is complete; `load_classifier` reads presets
(`CLASSIFIER_PRESETS`), label words over any causal LM, or such a directory. To make your own:

    lm = GemmaForCausalLM.from_pretrained("gemma-3-270m")
    tok = GemmaTokenizer.from_pretrained("gemma-3-270m")
    clf = label_word_classifier(lm, tok, {"sports": " sports", "politics": " politics"}, "{text}\\nTopic:")
    clf(torch.tensor([tok.encode(apply_template(clf.config, "The match ended 2-1."))])).logits
"""

from __future__ import annotations

import os

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from gemma.config import GemmaConfig
from gemma.model import GemmaForCausalLM, GemmaForSequenceClassification
from gemma.tokenizer import GemmaTokenizer

TEXT = "{text}"  # the one placeholder of a template; every other brace is literal text
TEMPLATE_KEY = "classifier_template"  # config.json key that carries the template with the classifier
LABEL_WORDS_KEY = "label_words"  # config.json key recording label -> word (informational)


def check_template(template: str) -> None:
    if template.count(TEXT) != 1:
        raise ValueError(f"template must contain {TEXT} exactly once, got {template!r}")


class LabelWordPreset(BaseModel):
    """A classifier as data: which causal LM, which label words, which prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str  # the causal LM: a named model ("gemma-3-270m"), an HF directory or a .gguf
    labels: dict[str, str]  # label name -> label word, one token of the LM's tokenizer (mind the leading space)
    template: str  # the prompt around each text input; `{text}` marks where the input goes

    @field_validator("labels")
    @classmethod
    def _two_labels(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) < 2:
            raise ValueError(f"labels needs at least two label words, got {v}")
        return v

    @field_validator("template")
    @classmethod
    def _one_placeholder(cls, v: str) -> str:
        check_template(v)
        return v


# The template is few-shot: one negative and one positive example before the input. Measured 2026-12-05 on a
# 2-core Intel Xeon, fp32, with the 16 reviews of tests/gemma/test_label_words.py (8 positive, 8 negative;
# `pytest tests/gemma/test_label_words.py -m slow`): this template 16/16 right; zero-shot templates lean to
# " positive" on this model: "Review: {text}\nSentiment:" 11/16, "{text}\nThe sentiment of this text is" 10/16,
# "Review: {text}\nIs this review positive or negative?\nAnswer:" 14/16.
CLASSIFIER_PRESETS: dict[str, LabelWordPreset] = {
    "gemma-3-270m-sentiment": LabelWordPreset(
        base="gemma-3-270m",
        labels={"negative": " negative", "positive": " positive"},
        template=(
            "Review: A dull, badly acted mess.\nSentiment: negative\n\n"
            "Review: A wonderful film, I enjoyed every minute.\nSentiment: positive\n\n"
            "Review: {text}\nSentiment:"
        ),
    ),
}


def classifier_template(config: GemmaConfig) -> str | None:
    """The prompt template a classifier's inputs go through, or None (the text is the model input)."""
    return getattr(config, TEMPLATE_KEY, None)


def apply_template(template: str | GemmaConfig | None, text: str) -> str:
    """`text` in its template (a template string, or a classifier's config that carries one)."""
    if isinstance(template, GemmaConfig):
        template = classifier_template(template)
    return text if template is None else template.replace(TEXT, text)


def label_word_ids(tokenizer: GemmaTokenizer, labels: dict[str, str]) -> list[int]:
    """The token id of each label word, in `labels` order; a word that is not exactly one token is an error."""
    ids = []
    for label, word in labels.items():
        tokens = tokenizer.encode(word, add_special_tokens=False)
        if len(tokens) != 1:
            raise ValueError(
                f"label word {word!r} (label {label!r}) is {len(tokens)} tokens {tokens}; a label word must be one "
                "token (try it with or without a leading space)"
            )
        ids.append(tokens[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words must be distinct tokens, got {dict(zip(labels, ids))}")
    return ids


def label_word_classifier(
    lm: GemmaForCausalLM, tokenizer: GemmaTokenizer, labels: dict[str, str], template: str
) -> GemmaForSequenceClassification:
    """A classifier over `lm`'s decoder (shared: training or freeing one affects the other) whose `score` rows are
    the LM head's rows of the label words; labels are numbered in `labels` order. The template and label words go
    into its config (`classifier_template`, `label_words`)."""
    check_template(template)
    if lm.tp.size != 1:
        raise ValueError("label_word_classifier needs the whole LM head: load the LM without tensor parallelism")
    if lm.config.final_logit_softcapping:
        # Gemma 2 caps the LM's logits (cap * tanh(x / cap)); a linear score head cannot, and its logits would
        # then differ from the LM's. Refused rather than silently unequal.
        raise ValueError(
            f"final_logit_softcapping={lm.config.final_logit_softcapping}: label-word classifiers need an LM "
            "without final logit soft-capping (Gemma 1 or 3)"
        )
    ids = label_word_ids(tokenizer, labels)
    data = lm.config.to_dict()
    data.pop("architectures", None)  # the LM's own class name does not describe the classifier
    names = list(labels)
    data.update(
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, num_labels=len(names),
        problem_type="single_label_classification", **{TEMPLATE_KEY: template, LABEL_WORDS_KEY: dict(labels)},
    )
    if data.get("pad_token_id") is None:
        data["pad_token_id"] = tokenizer.pad_token_id  # batches find each row's last token by it
    config = GemmaConfig.model_validate(data)
    with torch.device("meta"):  # no weights allocated: the decoder is the LM's, the head is set below
        clf = GemmaForSequenceClassification(config, lm.tp)
    clf.model = lm.model
    weight = lm.lm_head.weight
    clf.score.weight = nn.Parameter(weight.detach()[torch.tensor(ids, device=weight.device)].clone(),
                                    requires_grad=weight.requires_grad)
    return clf.train(lm.training)


def from_preset(
    preset: str | LabelWordPreset, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> tuple[GemmaForSequenceClassification, GemmaTokenizer]:
    """Load a preset's base LM and tokenizer and make its classifier (a name in CLASSIFIER_PRESETS, or a preset)."""
    if isinstance(preset, str):
        if preset not in CLASSIFIER_PRESETS:
            raise ValueError(f"unknown classifier preset {preset!r}; known: {sorted(CLASSIFIER_PRESETS)}")
        preset = CLASSIFIER_PRESETS[preset]
    tokenizer = GemmaTokenizer.from_pretrained(preset.base)
    lm = GemmaForCausalLM.from_pretrained(preset.base, dtype=dtype, device=device)
    return label_word_classifier(lm, tokenizer, preset.labels, preset.template).eval(), tokenizer


def load_classifier(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    labels: dict[str, str] | None = None,
    template: str | None = None,
) -> tuple[GemmaForSequenceClassification, GemmaTokenizer]:
    """A classifier and its tokenizer, in eval mode, from one of:
    - a preset name (CLASSIFIER_PRESETS), e.g. "gemma-3-270m-sentiment";
    - `labels` and `template` given: label words over the causal LM `name_or_path` (named model, HF dir, .gguf);
    - an HF GemmaForSequenceClassification directory (its config may carry a template)."""
    if (labels is None) != (template is None):
        raise ValueError("labels and template go together: give both (label words over a causal LM) or neither")
    if labels is not None:
        return from_preset(LabelWordPreset(base=str(name_or_path), labels=labels, template=template), dtype, device)
    if str(name_or_path) in CLASSIFIER_PRESETS:
        return from_preset(str(name_or_path), dtype, device)
    model = GemmaForSequenceClassification.from_pretrained(name_or_path, dtype=dtype, device=device)
    template = classifier_template(model.config)
    if template is not None:
        check_template(template)
    return model, GemmaTokenizer.from_pretrained(name_or_path)
