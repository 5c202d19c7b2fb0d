"""Gemma's tokenizer on the `tokenizers` library: encode, decode, chat template, streaming detokenizer.

Contract: for a checkpoint's `tokenizer.json` (+ `tokenizer_config.json`), ids, batch padding and
truncation, `decode` and `get_special_tokens_mask` are identical to transformers' `GemmaTokenizer`
(`tests/test_tokenizer.py` holds us to it). A SentencePiece `tokenizer.model` is converted on load into
the same BPE that transformers builds from it. BOS/EOS are added here in Python rather than by the
backend's post-processor, so `add_bos_token` / `add_eos_token` are plain attributes and a shared
backend is never mutated per call.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from gemma.chat_template import DEFAULT_CHAT_TEMPLATE, compile_template
from gemma.detokenizer import IncrementalDecoder
from gemma.registry import resolve_checkpoint
from gemma.vocab import load_gguf_vocab, load_sentencepiece

__all__ = ["DEFAULT_CHAT_TEMPLATE", "BatchEncoding", "GemmaTokenizer", "IncrementalDecoder"]

# The order transformers lists named special tokens in (`SPECIAL_TOKENS_ATTRIBUTES`).
NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token")
# transformers writes int(1e30) as "no limit"; anything this large means unbounded.
_NO_MAX_LENGTH = int(1e20)
# `decoders.ByteFallback` turns exactly these token strings into raw bytes.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

class BatchEncoding(dict):
    """`{"input_ids", "attention_mask"}` with attribute access, like transformers' BatchEncoding."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _token_id_property(attr: str) -> property:
    """`<attr>_id`: the id of the named special token, looked up by string; None if absent."""

    def get(self: GemmaTokenizer) -> int | None:
        token = getattr(self, attr)
        return None if token is None else self._tokenizer.token_to_id(token)

    return property(get)


class GemmaTokenizer:
    """Gemma's tokenizer: a `tokenizers.Tokenizer` plus BOS/EOS, padding, special tokens and chat template.

    Named special tokens are looked up in the vocab by string (Gemma: pad 0, eos 1, bos 2, unk 3).
    `extra_special_tokens` (default: every special added token without a name) completes
    `all_special_ids`, as the config's `extra_special_tokens` does in transformers. Padding or
    truncation baked into `tokenizer` is switched off: this class does both itself. All methods are
    safe to call concurrently (the backend is only read).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        chat_template: str | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int | None = None,
        bos_token: str = "<bos>",
        eos_token: str = "<eos>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        mask_token: str | None = "<mask>",
        extra_special_tokens: list[str] | None = None,
    ) -> None:
        if {padding_side, truncation_side} - {"left", "right"}:
            raise ValueError(f"padding/truncation side must be 'left' or 'right': {padding_side}, {truncation_side}")
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tokenizer = tokenizer
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template, self.padding_side, self.truncation_side = chat_template, padding_side, truncation_side
        self.model_max_length = model_max_length if model_max_length and model_max_length < _NO_MAX_LENGTH else None
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token, self.mask_token = pad_token, mask_token
        added = tokenizer.get_added_tokens_decoder()
        if extra_special_tokens is None:
            named = {bos_token, eos_token, unk_token, pad_token, mask_token}
            extra_special_tokens = [t.content for _, t in sorted(added.items()) if t.special and t.content not in named]
        self.extra_special_tokens = list(extra_special_tokens)
        # What the backend's decode drops with skip_special_tokens=True.
        self._decode_skipped = frozenset(i for i, t in added.items() if t.special)
        byte_tokens = (f"<0x{b:02{case}}>" for b in range(256) for case in "Xx")
        self._byte_ids = frozenset(i for t in byte_tokens if (i := tokenizer.token_to_id(t)) is not None)

    # ---- loading and saving -------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> GemmaTokenizer:
        """Load a checkpoint directory (tokenizer.json preferred, else tokenizer.model), one such file, a GGUF
        file (its vocabulary, special tokens and chat template), or a named model such as "gemma-3-270m".

        A directory's `tokenizer_config.json` and `chat_template.jinja` supply the keyword arguments of
        `__init__`; `overrides` win over both. When tokenizer.json has a post-processor, it decides
        whether BOS/EOS are added, as in transformers 5, which then ignores the config's
        `add_bos_token`/`add_eos_token`. A file path is read alone, without any config.
        """
        path = resolve_checkpoint(path)
        config: dict[str, Any] = {}
        if path.is_dir():
            config = _read_config(path)
            path = next((path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()), path)
        if path.suffix == ".json" and path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
            config.update(_bos_eos_from_post_processor(tokenizer, config))
        elif path.suffix == ".model" and path.is_file():
            tokenizer = load_sentencepiece(path)
        elif path.suffix == ".gguf" and path.is_file():
            tokenizer, settings = load_gguf_vocab(path)
            config.update(settings)
        else:
            raise FileNotFoundError(f"no tokenizer.json, tokenizer.model or .gguf file at {path}")
        return cls(tokenizer, **{**config, **overrides})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json (its post-processor adds BOS/EOS per the flags) and tokenizer_config.json.

        Both our `from_pretrained` and transformers' `AutoTokenizer` load the result and encode as we do.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer.from_str(self._tokenizer.to_str())  # a copy: the live backend may be in use
        # transformers 5 takes BOS/EOS from this post-processor and ignores the config's flags.
        prefix, suffix = self._specials(True)

        def part(seq: str, type_id: int) -> str:
            bos, eos = [f"{self.bos_token}:{type_id}"] * len(prefix), [f"{self.eos_token}:{type_id}"] * len(suffix)
            return " ".join([*bos, f"${seq}:{type_id}", *eos])

        specials = [(self.bos_token, i) for i in prefix] + [(self.eos_token, i) for i in suffix]
        tok.post_processor = processors.TemplateProcessing(
            single=part("A", 0), pair=f"{part('A', 0)} {part('B', 1)}", special_tokens=specials
        )
        tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            **{name: getattr(self, name) for name in NAMED_SPECIALS if getattr(self, name) is not None},
            "extra_special_tokens": self.extra_special_tokens,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": False,
            # The effective template, so the saved checkpoint renders chats the same anywhere.
            "chat_template": self.chat_template or DEFAULT_CHAT_TEMPLATE,
        }
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- vocabulary and special tokens --------------------------------------------------------

    bos_token_id = _token_id_property("bos_token")
    eos_token_id = _token_id_property("eos_token")
    unk_token_id = _token_id_property("unk_token")
    pad_token_id = _token_id_property("pad_token")
    mask_token_id = _token_id_property("mask_token")

    @property
    def start_of_turn_token_id(self) -> int | None:
        return self._tokenizer.token_to_id("<start_of_turn>")

    @property
    def end_of_turn_token_id(self) -> int | None:
        """Where an instruction-tuned Gemma ends its reply; None when the vocab has no turn markers."""
        return self._tokenizer.token_to_id("<end_of_turn>")
    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' meaning)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Unknown tokens map to `unk_token_id`, as in transformers."""
        if isinstance(tokens, str):
            token_id = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | list[int], skip_special_tokens: bool = False
    ) -> str | None | list[str | None]:
        """Out-of-range ids give None."""
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens (bos, eos, unk, pad, mask), then `extra_special_tokens`: transformers' order."""
        named = [getattr(self, name) for name in NAMED_SPECIALS]
        return list(dict.fromkeys(t for t in named + self.extra_special_tokens if t is not None))

    @property
    def all_special_ids(self) -> list[int]:
        ids = (self._tokenizer.token_to_id(t) for t in self.all_special_tokens)
        return [i for i in ids if i is not None]

    # ---- encoding -----------------------------------------------------------------------------

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    def _specials(self, add_special_tokens: bool) -> tuple[list[int], list[int]]:
        """The ids to put before and after the text."""
        prefix = [self._special_id(self.bos_token)] if add_special_tokens and self.add_bos_token else []
        suffix = [self._special_id(self.eos_token)] if add_special_tokens and self.add_eos_token else []
        return prefix, suffix

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`, with `<bos>` first when `add_bos_token` (and `<eos>` last when `add_eos_token`).

        Special tokens written in the text (e.g. "<start_of_turn>") become their single id.
        """
        prefix, suffix = self._specials(add_special_tokens)
        return prefix + self._tokenizer.encode(text, add_special_tokens=False).ids + suffix

    def __call__(
        self,
        text: str | list[str],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """`input_ids` and `attention_mask`, with transformers' semantics for these arguments.

        `padding`: False/"do_not_pad", True/"longest" (to the longest in the batch) or "max_length".
        `truncation`: None means "truncate iff only `max_length` is given" (transformers' legacy rule).
        Truncation keeps BOS/EOS and cuts the text at `truncation_side`; when `max_length` leaves no
        room beyond the special tokens, nothing is cut (what transformers returns). Without
        `max_length`, "max_length" padding and truncation use `model_max_length`, or are off.
        `return_tensors="pt"` gives int64 tensors of shape (batch, length); a single string is batch 1.
        """
        if padding is True:
            padding = "longest"
        elif padding is False or padding is None:
            padding = "do_not_pad"
        if padding not in ("do_not_pad", "longest", "max_length"):
            raise ValueError(f"padding must be a bool, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation is None:
            truncation = max_length is not None and padding == "do_not_pad"
        if max_length is None:
            max_length = self.model_max_length
        if max_length is None and padding == "max_length":
            padding = "do_not_pad"
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        prefix, suffix = self._specials(add_special_tokens)
        encode_batch = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)  # fast: no offsets
        bodies = [e.ids for e in encode_batch(texts, add_special_tokens=False)]
        budget = None if not truncation or max_length is None else max_length - len(prefix) - len(suffix)
        if budget is not None and budget >= 0:  # when BOS/EOS alone overflow, transformers cuts nothing either
            right = self.truncation_side == "right"
            bodies = [b if len(b) <= budget else b[:budget] if right else b[len(b) - budget :] for b in bodies]
        ids = [prefix + b + suffix for b in bodies]
        masks = [[1] * len(x) for x in ids]
        if padding != "do_not_pad" and ids:
            target = max_length if padding == "max_length" else max(map(len, ids))
            pad_id = self._special_id(self.pad_token)
            for i, (x, m) in enumerate(zip(ids, masks)):
                n = max(0, target - len(x))
                left = side == "left"
                ids[i] = [pad_id] * n + x if left else x + [pad_id] * n
                masks[i] = [0] * n + m if left else m + [0] * n
        if return_tensors is None:
            single = isinstance(text, str)
            return BatchEncoding(input_ids=ids[0] if single else ids, attention_mask=masks[0] if single else masks)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if len({len(x) for x in ids}) > 1:
            raise ValueError("sequences have different lengths: pass padding=True (and/or truncation) for tensors")
        import torch  # only this path needs torch

        return BatchEncoding(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(masks, dtype=torch.long)
        )

    def get_special_tokens_mask(self, ids: list[int], already_has_special_tokens: bool = False) -> list[int]:
        """1 marks a special token.

        `already_has_special_tokens=True`: `ids` is a formatted sequence; 1 wherever the id is in
        `all_special_ids`. False: `ids` has no BOS/EOS yet; the mask is for the sequence `encode` would
        build around it (BOS/EOS per the flags), with special tokens inside the text marked 0 -- what
        transformers returns with `return_special_tokens_mask=True` (its v5 method itself raises here).
        """
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if int(i) in special else 0 for i in ids]
        prefix, suffix = self._specials(True)
        return [1] * len(prefix) + [0] * len(ids) + [1] * len(suffix)

    # ---- decoding -----------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """The backend's decode, which is all transformers does for Gemma (its cleanup is off for BPE).

        `ids`: an int, a list of ints or a 1-D tensor. Out-of-range ids are silently dropped.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        ids = [[int(i) for i in s] for s in sequences]
        return self._tokenizer.decode_batch(ids, skip_special_tokens=skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming detokenizer for one sequence; see `IncrementalDecoder`."""
        skipped = self._decode_skipped if skip_special_tokens else frozenset()
        return IncrementalDecoder(self._tokenizer, self._byte_ids, skipped, skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` with `chat_template`, else the checkpoint's, else `DEFAULT_CHAT_TEMPLATE`.

        Messages are `{"role", "content"}` dicts; content is a string or a list of
        `{"type": "text", "text": ...}` parts. The template sees what transformers passes it
        (`messages`, `add_generation_prompt`, the named special tokens, `tools`/`documents` = None unless
        given) and may call `raise_exception(msg)`, which raises ValueError. With `tokenize=True` the
        ids come without an extra BOS: the template writes `<bos>` itself.

        Tools (`tools=[...]` in OpenAI's form, `tool` messages, assistant `tool_calls`) are rendered by the
        checkpoint's template when it handles tools, else by `DEFAULT_CHAT_TEMPLATE` (gemma/tool_calls.py).
        A tool call's `arguments` may be OpenAI's JSON text: templates get it as a dict, as in vLLM.
        """
        source = chat_template or self.chat_template or DEFAULT_CHAT_TEMPLATE
        if _uses_tools(messages, template_kwargs.get("tools")) and "tool" not in source:
            source = DEFAULT_CHAT_TEMPLATE  # the checkpoint's template knows no tools: ours renders them
        template = compile_template(source)
        context = {name: getattr(self, name) for name in NAMED_SPECIALS} | {"tools": None, "documents": None}
        context |= template_kwargs
        messages = [_arguments_as_dicts(m, i) for i, m in enumerate(messages)]
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
        return self.encode(text, add_special_tokens=False) if tokenize else text


def _uses_tools(messages: list[dict[str, Any]], tools: Any) -> bool:
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


def _arguments_as_dicts(message: dict[str, Any], index: int) -> dict[str, Any]:
    """The message with each tool call's JSON-text `arguments` parsed (ValueError naming the message if it is not
    a JSON object)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for j, call in enumerate(calls):
        fn = dict(call.get("function") or {})
        if isinstance(fn.get("arguments"), str):
            try:
                fn["arguments"] = json.loads(fn["arguments"])
            except json.JSONDecodeError as exc:
                raise ValueError(f"messages[{index}].tool_calls[{j}].function.arguments is not JSON: {exc}") from None
        if not isinstance(fn.get("arguments", {}), dict):
            raise ValueError(f"messages[{index}].tool_calls[{j}].function.arguments must be a JSON object")
        parsed.append({**call, "function": fn})
    return {**message, "tool_calls": parsed}


def _token_content(value: Any) -> Any:
    """Config special tokens are strings or serialized AddedTokens (`{"content": ...}`)."""
    return value["content"] if isinstance(value, dict) and "content" in value else value


def _read_config(directory: Path) -> dict[str, Any]:
    """The `GemmaTokenizer.__init__` keywords found in a checkpoint's tokenizer_config.json."""
    file = directory / "tokenizer_config.json"
    raw = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    keys = {"add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length", *NAMED_SPECIALS}
    config = {k: _token_content(v) for k, v in raw.items() if k in keys}
    # transformers 5: a dict holds named model-specific tokens (listed first), a list plain extras;
    # "additional_special_tokens" is the older name of the list.
    extra = raw.get("extra_special_tokens")
    named_extra = list(extra.values()) if isinstance(extra, dict) else []
    listed = extra if isinstance(extra, list) else raw.get("additional_special_tokens")
    if named_extra or isinstance(listed, list):
        config["extra_special_tokens"] = [_token_content(t) for t in named_extra + (listed or [])]
    template = raw.get("chat_template")
    if isinstance(template, list):  # older multi-template form: [{"name": ..., "template": ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if (directory / "chat_template.jinja").is_file():  # transformers 5 saves it here, and prefers it
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        config["chat_template"] = template
    return config


def _bos_eos_from_post_processor(tokenizer: Tokenizer, config: dict[str, Any]) -> dict[str, bool]:
    """add_bos/add_eos as the tokenizer.json post-processor has them; {} when there is none."""
    if tokenizer.post_processor is None:
        return {}
    added = tokenizer.encode("", add_special_tokens=True).ids
    bos = tokenizer.token_to_id(config.get("bos_token", "<bos>"))
    eos = tokenizer.token_to_id(config.get("eos_token", "<eos>"))
    add_bos = added[:1] == [bos]
    add_eos = added[add_bos:][-1:] == [eos]
    if len(added) != add_bos + add_eos:
        raise ValueError(f"tokenizer.json's post-processor adds {added}; only BOS first and/or EOS last are supported")
    return {"add_bos_token": add_bos, "add_eos_token": add_eos}
