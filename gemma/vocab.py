"""Gemma's vocabulary as a `tokenizers` BPE, rebuilt from SentencePiece-style arrays.

Two sources carry Gemma's vocabulary without a `tokenizer.json`: the original checkpoints' SentencePiece
`tokenizer.model` and GGUF files (`tokenizer.ggml.tokens` / `scores` / `token_type`). Both become the same
BPE that transformers builds from them: byte fallback, spaces as "▁", merges recovered from the vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

# SentencePiece `ModelProto.SentencePiece.Type`, also used by GGUF's `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# User-defined pieces are plain added tokens, except the turn markers: transformers' GemmaConverter
# marks these two special so `skip_special_tokens` drops them.
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
_SPM_EXTRA = "pip install 'gemma-ray[sentencepiece]'"


def build_gemma_bpe(
    pieces: list[str],
    scores: list[float],
    types: list[int],
    *,
    merges: list[tuple[str, str]] | None = None,
    rank_merges_by: str = "position",
) -> Tokenizer:
    """A `tokenizers` BPE in Gemma's layout from SentencePiece-style vocab arrays (tokenizer.model or GGUF).

    `types` uses the SentencePiece enum (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
    Without `merges`, they are rebuilt from the vocab: every split of a normal or user-defined piece into
    two such pieces, ranked by the merged piece's position in the vocab (`rank_merges_by="position"`,
    what transformers does for Gemma: its scores do not follow its merge order) or by descending score
    (`"score"`). Splits of one piece rank shorter-left first, as transformers' `generate_merges` does.
    Control and unknown pieces become special added tokens; user-defined ones plain added tokens,
    except Gemma's turn markers, which are special.
    """
    if not len(pieces) == len(scores) == len(types):
        raise ValueError(f"pieces, scores and types differ in length: {len(pieces)}, {len(scores)}, {len(types)}")
    if rank_merges_by not in ("position", "score"):
        raise ValueError(f"rank_merges_by must be 'position' or 'score', got {rank_merges_by!r}")
    # GGUF files store whitespace-run pieces with real spaces; our normalizer looks them up as "▁".
    pieces = ["▁" * len(p) if p and not p.strip(" ") and "▁" * len(p) not in pieces else p for p in pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError("duplicate pieces in the vocabulary")
    if merges is None:
        mergeable = {p for p, t in zip(pieces, types) if t in (NORMAL, USER_DEFINED)}
        ranked = []
        for piece in mergeable:
            rank = vocab[piece] if rank_merges_by == "position" else -scores[vocab[piece]]
            for cut in range(1, len(piece)):
                if piece[:cut] in mergeable and piece[cut:] in mergeable:
                    ranked.append((rank, vocab[piece], cut, piece[:cut], piece[cut:]))
        merges = [(left, right) for *_, left, right in sorted(ranked)]
    unk = next((p for p, t in zip(pieces, types) if t == UNKNOWN), "<unk>")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # A no-op after the normalizer (no spaces are left); kept because it is what Gemma's tokenizer.json has.
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens(
        [
            AddedToken(p, normalized=False, special=t in (UNKNOWN, CONTROL) or p in TURN_TOKENS)
            for p, t in zip(pieces, types)
            if t in (UNKNOWN, CONTROL, USER_DEFINED)
        ]
    )
    return tok


def load_sentencepiece(path: Path) -> Tokenizer:
    """The BPE of an original checkpoint's SentencePiece `tokenizer.model` (needs the sentencepiece extra)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:
        raise ImportError(f"Reading a SentencePiece tokenizer.model needs the optional extra: {_SPM_EXTRA}") from e
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    # Our pipeline hard-codes Gemma's settings; refuse a model that SentencePiece would tokenize otherwise.
    expected = {
        "model_type": (spec.model_type, sentencepiece_model_pb2.TrainerSpec.BPE),
        "byte_fallback": (spec.byte_fallback, True),
        "add_dummy_prefix": (norm.add_dummy_prefix, False),
        "remove_extra_whitespaces": (norm.remove_extra_whitespaces, False),
        "escape_whitespaces": (norm.escape_whitespaces, True),
        "precompiled_charsmap (identity normalization)": (bool(norm.precompiled_charsmap), False),
    }
    problems = [f"{name}={got!r} (Gemma: {want!r})" for name, (got, want) in expected.items() if got != want]
    if problems:
        raise ValueError(f"{path} is not a Gemma-style SentencePiece model: " + ", ".join(problems))
    pieces = proto.pieces
    return build_gemma_bpe([p.piece for p in pieces], [p.score for p in pieces], [int(p.type) for p in pieces])


def load_gguf_vocab(path: Path) -> tuple[Tokenizer, dict]:
    """The BPE of a GGUF file's vocabulary, and the tokenizer settings the file records.

    The settings are `GemmaTokenizer.__init__` keywords: special tokens by the file's ids, add_bos_token /
    add_eos_token, and the chat template when the file has one.
    """
    from gemma.gguf_file import open_gguf

    fields = open_gguf(path).vocab()
    tokens = fields["tokens"]
    tokenizer = build_gemma_bpe(tokens, fields["scores"], fields["types"])
    settings: dict = {"add_bos_token": bool(fields["add_bos_token"]), "add_eos_token": bool(fields["add_eos_token"])}
    for name in ("bos", "eos", "unk", "pad"):
        if fields[f"{name}_token_id"] is not None:
            settings[f"{name}_token"] = tokens[fields[f"{name}_token_id"]]
    if fields["chat_template"]:
        settings["chat_template"] = fields["chat_template"]
    return tokenizer, settings
