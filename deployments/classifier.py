"""The classifier deployment: a `GemmaForSequenceClassification` behind dynamic batching.

A plain class (Serve options are applied in deployments/app.py). `model` is what `gemma.label_words.load_classifier`
takes: a label-word preset ("gemma-3-270m-sentiment"), a causal LM with `labels` and `template`, or an HF classifier
directory. Each `classify` call is one input; concurrent calls are gathered by Ray Serve's `serve.batch` (up to
`max_batch_size`, waiting at most `batch_wait_timeout_s` for more) into one right-padded forward pass.

A classifier with a prompt template (label-word classifiers) puts each text input into it before tokenizing. Token-id
inputs are the model's input as given, template or not: ids cannot be put into a text template without decoding
them, so a client that sends ids sends the templated prompt's ids (`info()` returns the template).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ray import serve

from deployments.replica_logs import to_replica_log
from gemma import torch_thread
from gemma.label_words import apply_template, classifier_template, load_classifier
from gemma.weights import DTYPES

logger = logging.getLogger(__name__)


class ClassifierDeployment:
    def __init__(
        self, model: str, dtype: str = "float32", device: str = "cpu", max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01, labels: dict[str, str] | None = None, template: str | None = None,
    ) -> None:
        to_replica_log()
        if dtype not in DTYPES:
            raise ValueError(f"classifier dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        # loaded and run on one thread, off the event loop (gemma.torch_thread says why)
        self.model, self.tokenizer = torch_thread.call(
            lambda: load_classifier(model, DTYPES[dtype], device, labels=labels, template=template))
        config = self.model.config
        self.template = classifier_template(config)
        self.id2label = {int(k): v for k, v in config.id2label.items()}
        self.pad = config.pad_token_id if config.pad_token_id is not None else 0
        self.max_len = config.max_position_embeddings
        # serve.batch on the bound method: the batch size and wait come from the constructor, not a decorator.
        self._batched = serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)(
            self._classify_batch
        )
        logger.info("classifier %s ready: %d labels", model, len(self.id2label))

    async def classify(self, item: str | list[int]) -> dict[str, Any]:
        """One input (text, or token ids) -> its label, class probabilities, number of classes and of tokens read."""
        ids = self._ids(item)
        return {**await self._batched(ids), "num_tokens": len(ids)}

    async def info(self) -> dict[str, Any]:
        return {"id2label": self.id2label, "num_labels": len(self.id2label), "template": self.template}

    def _ids(self, item: str | list[int]) -> list[int]:
        if isinstance(item, str):
            if not item.strip():
                raise ValueError("input must not be empty")
            ids = self.tokenizer.encode(apply_template(self.template, item))
        else:
            vocab = self.model.config.vocab_size
            if not item or any(not isinstance(t, int) or not 0 <= t < vocab for t in item):
                raise ValueError(f"input token ids must be a non-empty list of ints in [0, {vocab})")
            ids = list(item)
        if len(ids) > self.max_len:
            raise ValueError(f"input has {len(ids)} tokens; the classifier takes at most {self.max_len}")
        return ids

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids.to(self.model.device), attention_mask=mask.to(self.model.device)).logits
        return torch.softmax(logits.float(), dim=-1).cpu()

    async def _classify_batch(self, batch: list[list[int]]) -> list[dict[str, Any]]:
        width = max(len(ids) for ids in batch)
        # right padding with the pad id: the model reads each row at its last non-pad token
        input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        probs = await torch_thread.run(self._forward, input_ids, mask)
        return [
            {"label": self.id2label[int(p.argmax())], "probs": p.tolist(), "num_classes": len(self.id2label)}
            for p in probs
        ]
