"""GemmaTokenizer against transformers' GemmaTokenizer on tiny trained vocabularies."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gemma.tokenizer import DEFAULT_CHAT_TEMPLATE, GemmaTokenizer
from gemma.vocab import build_gemma_bpe
from tests.helpers.tokenizer_fixtures import SAMPLE_TEXTS, write_sentencepiece_model, write_trained_tokenizer_json

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return write_trained_tokenizer_json(tmp_path_factory.mktemp("gemma_tok") / "hf")


@pytest.fixture(scope="session")
def ref(hf_dir):
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


@pytest.fixture(scope="session")
def tok(hf_dir):
    return GemmaTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="session")
def spm_dir(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    return write_sentencepiece_model(tmp_path_factory.mktemp("gemma_spm") / "spm")


def _random_ids(rng: random.Random, tok: GemmaTokenizer, n: int) -> list[int]:
    """Mostly byte tokens (ids 7..262) to build long, often invalid, UTF-8 runs; plus specials,
    ordinary tokens and a few out-of-range ids."""
    pools = [range(7, 263), range(0, 7), range(263, len(tok)), range(len(tok), len(tok) + 3)]
    return [rng.choice(rng.choices(pools, weights=[6, 2, 3, 0.3])[0]) for _ in range(n)]


# ---- loading, vocab, special tokens ---------------------------------------------------------------


def test_loads_as_gemma_with_gemma_special_ids(tok, ref):
    assert type(ref).__name__ in ("GemmaTokenizer", "GemmaTokenizerFast")
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    assert tok.end_of_turn_token_id == 6 and tok.start_of_turn_token_id == 5
    for name in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id", "vocab_size", "all_special_ids"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert len(tok) == len(ref)
    tokens = ["<bos>", "▁", "<0x41>", "not-a-token", "<end_of_turn>"]
    assert tok.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert tok.convert_tokens_to_ids("<eos>") == 1
    ids = [0, 2, 5, 100, 300, len(tok) - 1]
    assert tok.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    skipped = tok.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert skipped == ref.convert_ids_to_tokens(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(2) == "<bos>"


def test_from_pretrained_file_path_and_overrides(hf_dir, tok):
    from_file = GemmaTokenizer.from_pretrained(hf_dir / "tokenizer.json", add_eos_token=True)
    assert from_file.encode("hi") == tok.encode("hi") + [1]
    with pytest.raises(FileNotFoundError):
        GemmaTokenizer.from_pretrained(hf_dir / "missing")


# ---- encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("add_special_tokens", [True, False])
@pytest.mark.parametrize("text", SAMPLE_TEXTS, ids=range(len(SAMPLE_TEXTS)))
def test_encode_matches_transformers(tok, ref, text, add_special_tokens):
    kwargs = {"add_special_tokens": add_special_tokens}
    assert tok.encode(text, **kwargs) == ref.encode(text, **kwargs)
    assert tok(text, **kwargs) == dict(ref(text, **kwargs))


def test_samples_exercise_byte_fallback_and_special_tokens(tok):
    ids = [i for text in SAMPLE_TEXTS for i in tok.encode(text, add_special_tokens=False)]
    assert sum(7 <= i < 263 for i in ids) > 50  # byte-fallback tokens
    assert {0, 1, 2, 3, 4, 5, 6} <= set(ids)  # special tokens written in the text


def test_add_eos_token(hf_dir):
    ours = GemmaTokenizer.from_pretrained(hf_dir, add_eos_token=True)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    # transformers 5 ignores the config's add_bos_token when tokenizer.json exists, so its add_bos_token
    # reads False even though BOS is added; setting add_eos_token alone would then drop BOS. Set both.
    ref.add_bos_token, ref.add_eos_token = True, True
    for text in SAMPLE_TEXTS:
        assert ours.encode(text) == ref.encode(text)
        assert ours.encode(text)[-1] == 1
    ours.add_bos_token = False
    assert ours.encode("hi") == ours.encode("hi", add_special_tokens=False) + [1]


BATCH = ["Hello world", "", "東京は日本の首都です。 and 😀", "<start_of_turn>user\nhi<end_of_turn>", "a  b\tc"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"padding": True},
        {"padding": "longest"},
        {"padding": "max_length", "max_length": 12},
        {"padding": "max_length", "max_length": 6, "truncation": True},
        {"padding": True, "max_length": 5, "truncation": True},
        {"max_length": 4},  # max_length alone turns truncation on
        {"max_length": 3, "truncation": True, "add_special_tokens": False},
        {"max_length": 1, "truncation": True},  # only room for BOS
        {"padding": "max_length"},  # no max_length anywhere: no padding
        {"truncation": True},  # no max_length anywhere: no truncation
    ],
)
def test_batch_encoding_matches_transformers(tok, ref, kwargs, side):
    ours = tok(BATCH, padding_side=side, **kwargs)
    theirs = ref(BATCH, padding_side=side, **kwargs)
    assert ours["input_ids"] == theirs["input_ids"]
    assert ours.attention_mask == theirs["attention_mask"]


def test_single_text_padding_and_argument_errors(tok, ref):
    for kwargs in ({"padding": "max_length", "max_length": 9}, {"padding": True}, {"max_length": 2}):
        assert tok("Hello world", **kwargs) == dict(ref("Hello world", **kwargs))
    with pytest.raises(ValueError, match="padding"):
        tok(BATCH, padding="sideways")
    with pytest.raises(ValueError, match="padding_side"):
        tok(BATCH, padding=True, padding_side="up")


def test_truncation_below_special_token_count_keeps_everything(hf_dir):
    ours = GemmaTokenizer.from_pretrained(hf_dir, add_eos_token=True)
    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ref.add_bos_token, ref.add_eos_token = True, True
    for max_length in (1, 2, 3):
        assert ours("hi there", max_length=max_length) == dict(ref("hi there", max_length=max_length))


def test_truncation_side_left(hf_dir, tok):
    left = GemmaTokenizer.from_pretrained(hf_dir, truncation_side="left")
    body = tok.encode("The quick brown fox jumps", add_special_tokens=False)
    assert left("The quick brown fox jumps", max_length=3)["input_ids"] == [2] + body[-2:]


def test_return_tensors_pt(tok, ref):
    ours = tok(BATCH, padding=True, return_tensors="pt")
    theirs = ref(BATCH, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == torch.long and torch.equal(ours[key], theirs[key])
    single = tok("hello", return_tensors="pt").input_ids
    assert single.shape == (1, len(tok.encode("hello")))
    with pytest.raises(ValueError):
        tok(BATCH, return_tensors="pt")


# ---- decoding -----------------------------------------------------------------------------------


def test_decode_matches_transformers(tok, ref):
    rng = random.Random(0)
    sequences = [tok.encode(t) for t in SAMPLE_TEXTS] + [_random_ids(rng, tok, 40) for _ in range(50)]
    for ids in sequences:
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    batch = sequences[:5]
    assert tok.batch_decode(batch, skip_special_tokens=True) == ref.batch_decode(batch, skip_special_tokens=True)
    assert tok.decode(torch.tensor(sequences[2])) == ref.decode(sequences[2])
    assert tok.decode(2) == "<bos>"


def test_decode_round_trips_text(tok):
    for text in SAMPLE_TEXTS:
        if "▁" in text:  # a literal "▁" decodes to " ": Gemma's decoder cannot tell them apart
            assert tok.decode(tok.encode(text)) == "<bos>" + text.replace("▁", " ")
            continue
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == "<bos>" + text


def test_special_tokens_mask_matches_transformers(tok, ref):
    for text in SAMPLE_TEXTS:
        body = tok.encode(text, add_special_tokens=False)
        assert tok.get_special_tokens_mask(body) == ref(text, return_special_tokens_mask=True)["special_tokens_mask"]
        ids = tok.encode(text)
        assert tok.get_special_tokens_mask(ids, already_has_special_tokens=True) == ref.get_special_tokens_mask(
            ids, already_has_special_tokens=True
        )


# ---- save_pretrained ----------------------------------------------------------------------------


@pytest.mark.parametrize("add_eos_token", [False, True])
def test_save_pretrained_round_trip(hf_dir, tmp_path, add_eos_token):
    original = GemmaTokenizer.from_pretrained(hf_dir, add_eos_token=add_eos_token, padding_side="right")
    original.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["add_eos_token"] is add_eos_token
    assert config["padding_side"] == "right" and config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    ours = GemmaTokenizer.from_pretrained(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ref).__name__ in ("GemmaTokenizer", "GemmaTokenizerFast")
    assert (ours.add_bos_token, ours.add_eos_token, ours.padding_side) == (True, add_eos_token, "right")
    for text in SAMPLE_TEXTS:
        assert original.encode(text) == ours.encode(text) == ref.encode(text)
    assert ours(BATCH, padding=True) == dict(ref(BATCH, padding=True))
    assert ours.all_special_ids == ref.all_special_ids
    chat = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(chat) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# ---- chat template ------------------------------------------------------------------------------

CHATS = {
    "user": [{"role": "user", "content": "Hello!"}],
    "multi_turn_assistant": [
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n"},
    ],
    "model_role": [
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "model", "content": "No."},
    ],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey."},
        {"role": "user", "content": "東京 😀"},
    ],
    "text_parts": [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Done."}]},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_matches_transformers(tok, ref, name, add_generation_prompt):
    messages = CHATS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(
        messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == ref.encode(theirs, add_special_tokens=False) and ids.count(2) == 1 and ids[0] == 2


def test_chat_template_format_is_pinned(tok):
    assert tok.apply_chat_template(CHATS["system"][:2]) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(CHATS["multi_turn_assistant"], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "assistant", "content": "a"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "unknown role 'robot'"),
        ([{"role": "system", "content": "s"}], "followed by a user"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed first"),
        ([{"role": "user", "content": [{"type": "image"}]}], "only text"),
    ],
)
def test_chat_template_errors(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_checkpoint_chat_template_is_used(hf_dir, tmp_path):
    custom = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    directory = write_trained_tokenizer_json(tmp_path / "custom", chat_template=custom)
    ours = GemmaTokenizer.from_pretrained(directory)
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "<bos>[user]x"


# ---- SentencePiece tokenizer.model --------------------------------------------------------------


def test_sentencepiece_model_matches_transformers(spm_dir, tmp_path):
    import sentencepiece as spm

    ours = GemmaTokenizer.from_pretrained(spm_dir)
    # Only tokenizer.model: AutoTokenizer cannot tell the class, so ask for Gemma's directly. It builds
    # the BPE from the proto but adds no BOS on this path (no add_bos_token reaches it).
    ref = transformers.GemmaTokenizer.from_pretrained(str(spm_dir))
    processor = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    assert (ours.pad_token_id, ours.eos_token_id, ours.bos_token_id, ours.unk_token_id) == (0, 1, 2, 3)
    assert len(ours) == len(ref) == processor.get_piece_size()
    for text in SAMPLE_TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.encode(text) == [2] + ids
        assert ours.decode(ids) == ref.decode(ids)
        # SentencePiece itself agrees except where the text spells a control token ("<eos>"), which
        # transformers (and we) match as one special id while SentencePiece spells it out.
        if not any(t in text for t in ("<eos>", "<bos>", "<pad>", "<mask>", "<unk>")):
            assert ids == processor.encode(text)
    # Turn markers are special for us (as GemmaConverter marks them), plain added tokens there.
    assert ours.decode(ours.encode("<start_of_turn>x<end_of_turn>"), skip_special_tokens=True) == "x"

    ours.save_pretrained(tmp_path)
    reloaded = GemmaTokenizer.from_pretrained(tmp_path)
    ref_saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in SAMPLE_TEXTS:
        assert reloaded.encode(text) == ours.encode(text) == ref_saved.encode(text)


def _spm_proto(spm_dir):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((spm_dir / "tokenizer.model").read_bytes())
    return proto


def test_build_gemma_bpe_from_gguf_style_arrays(spm_dir):
    """The GGUF loader's path: vocab arrays, whitespace-run pieces spelled with real spaces."""
    pieces = _spm_proto(spm_dir).pieces
    spelled = [p.piece.replace("▁", " ") if not p.piece.strip("▁") else p.piece for p in pieces]
    assert "  " in spelled  # the trainer learned whitespace runs, so the respelling is exercised
    reference = GemmaTokenizer.from_pretrained(spm_dir)
    for rank_merges_by in ("position", "score"):  # the same for a SentencePiece-trained vocab
        scores, types = [p.score for p in pieces], [p.type for p in pieces]
        backend = build_gemma_bpe(spelled, scores, types, rank_merges_by=rank_merges_by)
        rebuilt = GemmaTokenizer(backend)
        for text in SAMPLE_TEXTS:
            assert rebuilt.encode(text) == reference.encode(text)
    with pytest.raises(ValueError, match="differ in length"):
        build_gemma_bpe(["a"], [], [1])


def test_non_gemma_sentencepiece_model_is_refused(spm_dir, tmp_path):
    proto = _spm_proto(spm_dir)
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ValueError, match="add_dummy_prefix"):
        GemmaTokenizer.from_pretrained(tmp_path)


def test_sentencepiece_missing_extra_message(spm_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_sentencepiece(name, *args, **kwargs):
        if name.startswith("sentencepiece"):
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sentencepiece)
    with pytest.raises(ImportError, match=r"pip install 'gemma-ray\[sentencepiece\]'"):
        GemmaTokenizer.from_pretrained(spm_dir)


# ---- incremental detokenizer --------------------------------------------------------------------


def _stream(tok: GemmaTokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = tok.incremental_decoder(skip_special_tokens=skip)
    return [decoder.step(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("skip", [False, True])
def test_incremental_decoder_equals_full_decode(tok, skip):
    rng = random.Random(1)
    sequences = [tok.encode(t) for t in SAMPLE_TEXTS] + [_random_ids(rng, tok, rng.randint(1, 60)) for _ in range(300)]
    sequences += [tok.encode("".join(SAMPLE_TEXTS))]
    for ids in sequences:
        deltas = _stream(tok, ids, skip)
        full = tok.decode(ids, skip_special_tokens=skip)
        assert "".join(deltas) == full
        emitted = ""
        for delta in deltas:  # every intermediate text is final: a prefix of the full decode
            emitted += delta
            assert full.startswith(emitted)


def test_incremental_decoder_holds_split_utf8_characters(tok):
    for char in ("€", "😀", "𝄞"):  # 3- and 4-byte characters absent from the vocab
        byte_ids = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode()]
        assert tok.encode(char, add_special_tokens=False) == byte_ids
        decoder = tok.incremental_decoder()
        # Nothing of the run is final until a non-byte token ends it: a later invalid byte would turn
        # the whole run into U+FFFD in the full decode.
        assert [decoder.step(i) for i in byte_ids] == [""] * len(byte_ids)
        assert decoder.step(tok.convert_tokens_to_ids("a")) == char + "a"
        assert decoder.flush() == ""
        decoder = tok.incremental_decoder()
        assert [decoder.step(i) for i in byte_ids] + [decoder.flush()] == [""] * len(byte_ids) + [char]
    # A run spoiled by a stray byte decodes to one U+FFFD per byte, streamed or not.
    spoiled = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode() + b"\xff"]
    assert "".join(_stream(tok, spoiled, False)) == tok.decode(spoiled) == "\ufffd" * 4


def test_incremental_decoder_streams_ordinary_tokens_immediately(tok):
    ids = tok.encode("The quick brown fox", add_special_tokens=False)
    decoder = tok.incremental_decoder()
    deltas = [decoder.step(i) for i in ids]
    assert all(deltas) and "".join(deltas) == "The quick brown fox"
    decoder = tok.incremental_decoder(skip_special_tokens=True)
    assert decoder.step(tok.bos_token_id) == "" and decoder.step(ids[0]) == tok.decode(ids[:1])
