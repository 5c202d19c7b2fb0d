"""Tiny Gemma-layout tokenizers for tests, trained in well under a second.

Both builders write files the way real checkpoints ship them, without going through our own
`GemmaTokenizer`, so they can serve as the input for parity tests against transformers:

- `write_trained_tokenizer_json(dir)`: `tokenizer.json` + `tokenizer_config.json` (HF layout).
- `write_sentencepiece_model(dir)`: a lone `tokenizer.model`, as original Gemma checkpoints ship.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Mixed English, code, CJK, emoji (incl. ZWJ sequences) and whitespace runs. Anything missing from
# here (e.g. Cyrillic, most emoji) can only be encoded through byte fallback.
CORPUS: list[str] = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Gemma is a family of lightweight, state-of-the-art open models built from research and technology.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Machine learning models predict the next token given all the previous tokens in the text.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; i++) {\n\tprintf(\"%d\\n\", i * i);\n}\n",
    "import torch\nx = torch.zeros(3, 4)\nprint(x.shape)  # torch.Size([3, 4])\n",
    '{"name": "gemma", "layers": 18, "hidden_size": 640, "vocab": [1, 2, 3]}',
    "東京は日本の首都です。今日はいい天気ですね。私は学生です。",
    "机器学习是人工智能的一个分支。我们今天去公园散步吧。",
    "한국어 문장도 조금 있습니다. 안녕하세요!",
    "Hello 👋 world 🌍! Family: 👨\u200d👩\u200d👧 and a flag 🇫🇷 and a thumbs up 👍🏽.",
    "spaces  between   words    and\ttabs\t\tand\n\nblank lines\n\n\n   indented",
    "Numbers: 3.14159, 2.71828, 1,000,000 and 42 and 2024-01-01 12:34:56.",
    "Punctuation!? (parentheses) [brackets] {braces} <angle> 'quotes' \"double\" -- dashes...",
    "Über café naïve résumé façade jalapeño — typographic “quotes” and ‘single’ ones…",
]

# Varied texts for parity checks. Several use characters absent from CORPUS (byte fallback).
SAMPLE_TEXTS: list[str] = [
    "",
    " ",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "multiple     spaces\tand\t\ttabs\nand\n\n\nnewlines\r\nCRLF",
    "東京は日本の首都です。",
    "机器学习 and English mixed 混合",
    "Emoji 😀🎉 and ZWJ 👨\u200d👩\u200d👧\u200d👦 and skin tone 👋🏿 and flag 🇯🇵",
    "def f(x):\n    return x ** 2  # square\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "text<eos>more<bos>and<pad>x<mask>y<unk>z",
    "Привет, мир! Ελληνικά. עברית. العربية. हिन्दी.",
    "Rare: ∮ E⋅da = Q, n → ∞, ∑ f(i) = ∏ g(i); 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝄞",
    "\u0000control\u0007chars\u001b[0m and \ufeffBOM and \u200bzero-width",
    "Ünïcödé çömbïnïng: e\u0301 a\u0308 n\u0303",
    "1234567890 3.14 -42 1e-9",
    "▁ literal metaspace ▁▁ and <0x41> literal byte-token text",
]

SPECIAL_TOKENS: list[str] = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
BYTE_TOKENS: list[str] = [f"<0x{b:02X}>" for b in range(256)]


def _gemma_layout(tokenizer: Tokenizer) -> Tokenizer:
    """Give a `tokenizers.Tokenizer` Gemma's normalizer, pre-tokenizer and decoder."""
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def write_trained_tokenizer_json(directory: Path, vocab_size: int = 1000, chat_template: str | None = None) -> Path:
    """Train a byte-fallback BPE on CORPUS and write it in HF layout: specials at 0..6, bytes at 7..262.

    The trainer puts the specials first but knows nothing of byte tokens, so the learned vocab is
    re-indexed after the 256 `<0xNN>` tokens, as in a real Gemma vocab.
    """
    trainer_tok = _gemma_layout(Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>")))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 3, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + BYTE_TOKENS + sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = _gemma_layout(
        Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    # transformers 5 takes BOS/EOS from this post-processor and ignores the config's add_bos_token
    # whenever a tokenizer.json exists, so it must be here, as in real Gemma checkpoints.
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )

    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    return directory


def write_sentencepiece_model(directory: Path, vocab_size: int = 600) -> Path:
    """Train a SentencePiece BPE with Gemma's trainer settings; write only `tokenizer.model`."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        control_symbols=["<mask>"],
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        split_digits=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory
