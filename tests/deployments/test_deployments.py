"""The plain deployment classes without Ray Serve: tokenizer, model (a real tiny engine), classifier batching."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tests.helpers.checkpoints import load_hf
from deployments.classifier import ClassifierDeployment
from deployments.model import EngineArgs, ModelDeployment
from deployments.tokenizer import TokenizerDeployment
from gemma import GemmaForCausalLM, GemmaTokenizer
from gemma.engine.async_engine import EngineStepError
from gemma.engine.engine_process import EngineProcessError, portable
from gemma.sampling import SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tiny_lm_dir):
    return tiny_lm_dir


@pytest.fixture(scope="module")
def classifier_checkpoint(tiny_classifier_dir):
    return tiny_classifier_dir


def test_engine_args_name_the_bad_field():
    with pytest.raises(ValueError, match="tp_size"):
        EngineArgs(tp_size=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineArgs(dtype="float8")
    with pytest.raises(ValueError, match="kv_cache_mem"):
        EngineArgs(kv_cache_mem="1GiB")


def test_model_deployment_streams_what_generate_gives_and_frees_blocks(checkpoint):
    dep = ModelDeployment(EngineArgs(model=str(checkpoint), dtype="float32", kv_cache_memory="4MiB", max_model_len=96))
    model = GemmaForCausalLM.from_pretrained(checkpoint)
    prompt = [2, 17, 29, 301, 44, 5]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=10)[0, len(prompt):].tolist()

    async def main():
        params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        streamed = []
        async for out in dep.generate(prompt, params, "a"):
            streamed += out.outputs[0].new_token_ids
        assert out.finished and out.outputs[0].token_ids == streamed
        # a dict of parameters is accepted too (what a client outside Python would send)
        async for out in dep.generate(prompt, {"max_tokens": 10, "temperature": 0, "ignore_eos": True}, "b"):
            pass
        assert out.outputs[0].token_ids == streamed

        # leaving the stream early aborts the request and returns its blocks
        agen = dep.generate(prompt * 6, SamplingParams(max_tokens=50, ignore_eos=True), "c")
        await agen.__anext__()
        assert (await dep.stats())["kv_blocks_used"] > 0
        await agen.aclose()
        stats = await dep.stats()
        assert stats["kv_blocks_used"] == 0 and stats["num_requests_running"] == 0

        with pytest.raises(ValueError, match="max_model_len"):
            async for _ in dep.generate(prompt, SamplingParams(max_tokens=95), "d"):
                pass
        with pytest.raises(ValueError, match="temperature"):
            async for _ in dep.generate(prompt, {"temperature": -1}, "e"):
                pass
        info = await dep.model_info()
        assert info["max_model_len"] == 96 and info["tp_size"] == 1
        await dep.check_health()
        return streamed

    assert asyncio.run(main()) == expected


def test_a_dead_engine_process_fails_its_requests_and_health_and_stopping_leaves_none(checkpoint):
    dep = ModelDeployment(EngineArgs(model=str(checkpoint), dtype="float32", kv_cache_memory="4MiB", max_model_len=96))
    process = dep.engine._process

    async def main():
        stream = dep.generate([2, 17, 29], SamplingParams(max_tokens=90, ignore_eos=True), "a")
        await stream.__anext__()
        process.kill()  # as the OOM killer would
        with pytest.raises(EngineStepError, match="engine process"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="engine process is gone"):
            await dep.check_health()  # Serve replaces the replica
        with pytest.raises(EngineProcessError):  # a new request fails at once instead of waiting
            async for _ in dep.generate([2, 3], SamplingParams(max_tokens=2), "b"):
                pass

    asyncio.run(main())
    dep.shutdown()

    healthy = ModelDeployment(EngineArgs(model=str(checkpoint), dtype="float32", kv_cache_memory="4MiB"))
    process = healthy.engine._process
    assert process.is_alive()
    healthy.shutdown()  # what Serve's stop of the replica calls (through __del__)
    assert not process.is_alive() and process.exitcode == 0


def test_an_error_the_pipe_cannot_carry_becomes_one_it_can():
    class Unpicklable(ValueError):
        def __reduce__(self):
            raise TypeError("no")

    assert isinstance(portable(KeyError("k")), KeyError)  # picklable: unchanged
    converted = portable(Unpicklable("bad prompt"))
    assert type(converted) is ValueError and "Unpicklable: bad prompt" in str(converted)  # still a 400 upstream
    assert type(portable(type("Odd", (RuntimeError,), {"__reduce__": Unpicklable.__reduce__})("x"))) is RuntimeError


def test_tokenizer_deployment(checkpoint):
    dep = TokenizerDeployment(str(checkpoint))
    tok = GemmaTokenizer.from_pretrained(checkpoint)

    async def main():
        ids = await dep.encode("The quick brown fox")
        assert ids == tok.encode("The quick brown fox") and ids[0] == tok.bos_token_id
        assert await dep.decode(ids) == "The quick brown fox"
        chat = await dep.encode_chat([{"role": "user", "content": "Hello"}])
        assert chat == tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=True)
        with pytest.raises(ValueError, match="empty"):
            await dep.encode_chat([])
        with pytest.raises(ValueError, match="out of range"):
            await dep.decode([len(tok) + 5])
        assert (await dep.info())["vocab_size"] == len(tok)

    asyncio.run(main())


def test_classifier_batches_concurrent_calls_and_matches_transformers(classifier_checkpoint, monkeypatch):
    # serve.batch works outside a replica except for a warning that reads the replica's config
    from ray.serve.batching import _BatchQueue

    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    dep = ClassifierDeployment(str(classifier_checkpoint), max_batch_size=8, batch_wait_timeout_s=0.05)
    texts = ["great movie", "The quick brown fox jumps over the lazy dog.", "meh", "東京は日本の首都です。"]
    tok = GemmaTokenizer.from_pretrained(classifier_checkpoint)
    hf = load_hf(classifier_checkpoint, task="classify")
    batches = []
    original = dep.model.forward

    def counting_forward(*args, **kwargs):
        batches.append(len(kwargs.get("input_ids", args[0] if args else None)))
        return original(*args, **kwargs)

    dep.model.forward = counting_forward

    async def main():
        return await asyncio.gather(*(dep.classify(t) for t in texts), dep.classify(tok.encode("meh")))

    results = asyncio.run(main())
    assert batches == [5]  # the five concurrent calls ran as one forward pass
    for text, res in zip(texts + ["meh"], results):
        with torch.no_grad():
            ref = torch.softmax(hf(torch.tensor([tok.encode(text)])).logits[0], -1)
        assert res["num_classes"] == 3 and len(res["probs"]) == 3
        assert torch.allclose(torch.tensor(res["probs"]), ref, atol=1e-5)
        assert res["label"] == ["negative", "neutral", "positive"][int(ref.argmax())]
    assert results[2] == results[4]  # text and its token ids classify the same

    async def bad():
        with pytest.raises(ValueError, match="empty"):
            await dep.classify("   ")
        with pytest.raises(ValueError, match="token ids"):
            await dep.classify([10**9])
        assert (await dep.info())["id2label"] == {0: "negative", 1: "neutral", 2: "positive"}

    asyncio.run(bad())


def test_classifier_with_a_template_reads_text_through_it_and_ids_verbatim(checkpoint, monkeypatch):
    """A label-word preset (here over the tiny LM): a text input is classified as the LM's next-token probabilities
    of the label words on the templated text; token ids are the model input as given."""
    from ray.serve.batching import _BatchQueue

    from gemma import label_words

    monkeypatch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    labels, template = {"a": "light", "b": "vocab"}, "Text: {text}\nLabel:"  # one token each in the tiny vocab
    preset = label_words.LabelWordPreset(base=str(checkpoint), labels=labels, template=template)
    monkeypatch.setitem(label_words.CLASSIFIER_PRESETS, "tiny-label-words", preset)
    dep = ClassifierDeployment("tiny-label-words", max_batch_size=8, batch_wait_timeout_s=0.05)
    tok = GemmaTokenizer.from_pretrained(checkpoint)
    lm = GemmaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    word_ids = label_words.label_word_ids(tok, labels)
    texts = ["great movie", "The quick brown fox jumps over the lazy dog."]
    templated = [tok.encode(template.replace("{text}", t)) for t in texts]

    async def main():
        return await asyncio.gather(*(dep.classify(t) for t in texts), dep.classify(templated[0]),
                                    dep.classify(tok.encode(texts[0])))

    results = asyncio.run(main())
    for ids, res in zip(templated, results):
        with torch.no_grad():
            ref = torch.softmax(lm(torch.tensor([ids])).logits[0, -1, word_ids], -1)
        torch.testing.assert_close(torch.tensor(res["probs"]), ref, rtol=0, atol=1e-6)
        assert res["label"] == ["a", "b"][int(ref.argmax())] and res["num_tokens"] == len(ids)
    assert results[2] == results[0]  # the templated text's ids classify as the text
    assert results[3]["probs"] != results[0]["probs"]  # bare ids get no template
    assert asyncio.run(dep.info()) == {"id2label": {0: "a", 1: "b"}, "num_labels": 2, "template": template}

    # the same classifier from label words over the LM directory (AppArgs' classifier_labels / classifier_template)
    direct = ClassifierDeployment(str(checkpoint), labels=labels, template=template)
    alone = asyncio.run(direct.classify(texts[0]))  # a batch of one: same math, other matmul blocking
    assert alone["label"] == results[0]["label"] and alone["num_tokens"] == results[0]["num_tokens"]
    torch.testing.assert_close(torch.tensor(alone["probs"]), torch.tensor(results[0]["probs"]), rtol=0, atol=1e-6)


def test_app_args_for_label_words_name_the_bad_field():
    from deployments.app import AppArgs

    assert AppArgs().classifier_model == "gemma-3-270m-sentiment" and AppArgs(classifier_model=None).classifier_model is None
    words = {"sports": " sports", "politics": " politics"}
    with pytest.raises(ValueError, match="classifier_labels and classifier_template go together"):
        AppArgs(classifier_model="gemma-3-270m", classifier_labels=words)
    with pytest.raises(ValueError, match=r"classifier_template\n.*exactly once"):
        AppArgs(classifier_model="gemma-3-270m", classifier_labels=words, classifier_template="Topic:")
    with pytest.raises(ValueError, match=r"classifier_labels\n.*at least two"):
        AppArgs(classifier_model="gemma-3-270m", classifier_labels={"sports": " sports"}, classifier_template="{text}")
    with pytest.raises(ValueError, match="needs classifier_model"):
        AppArgs(classifier_model=None, classifier_labels=words, classifier_template="{text}\nTopic:")
