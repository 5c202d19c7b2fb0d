"""Checkpoint loading and saving: layouts, dtypes, strictness, and round trips through transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import SHAPES, load_hf, write_hf_checkpoint
from gemma import GemmaForCausalLM, GemmaForSequenceClassification
from gemma.weights import CheckpointError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("ckpt"), **SHAPES["gqa"])


def ids(shape=(2, 11)):
    return torch.randint(4, 211, shape, generator=torch.Generator().manual_seed(7))


def rewrite(src, dst, edit) -> None:
    """Copy a single-file checkpoint to `dst` with `edit(state)` applied to its tensors."""
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})


@torch.no_grad()
@pytest.mark.parametrize("shard", [None, "30KB"])
def test_save_pretrained_loads_in_transformers(checkpoint, tmp_path, shard):
    ours = GemmaForCausalLM.from_pretrained(checkpoint)
    ours.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert "lm_head.weight" not in index["weight_map"]  # tied: stored once
    ref = load_hf(tmp_path)
    x = ids()
    assert torch.equal(ours(x).logits, GemmaForCausalLM.from_pretrained(tmp_path)(x).logits)
    assert (ours(x).logits - ref(x).logits).abs().max() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(checkpoint, dtype):
    half = GemmaForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    ref = load_hf(checkpoint)
    x = ids()
    ref_half = type(ref).from_pretrained(checkpoint, dtype=dtype).eval()
    # same rounding as transformers in half precision, not just close to fp32
    assert (half(x).logits.float() - ref_half(x).logits.float()).abs().max() < 2e-2
    assert (half(x).logits.float() - ref(x).logits).abs().max() < 0.1


@torch.no_grad()
def test_untied_head(tmp_path):
    path = write_hf_checkpoint(tmp_path, tie_word_embeddings=False, **SHAPES["mha"])
    ours, ref = GemmaForCausalLM.from_pretrained(path), load_hf(path)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    assert (ours(ids()).logits - ref(ids()).logits).abs().max() < 1e-4


def test_missing_unexpected_and_misshaped_tensors_are_named(checkpoint, tmp_path):
    rewrite(checkpoint, tmp_path / "missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        GemmaForCausalLM.from_pretrained(tmp_path / "missing")

    rewrite(checkpoint, tmp_path / "extra", lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\.weight"):
        GemmaForCausalLM.from_pretrained(tmp_path / "extra")

    def shrink(s):
        s["model.norm.weight"] = s["model.norm.weight"][:-1]

    rewrite(checkpoint, tmp_path / "shape", shrink)
    with pytest.raises(CheckpointError, match=r"misshaped tensors: model\.norm\.weight: checkpoint \(31,\)"):
        GemmaForCausalLM.from_pretrained(tmp_path / "shape")

    with pytest.raises(CheckpointError, match=r"missing tensors: score\.weight"):
        GemmaForSequenceClassification.from_pretrained(checkpoint)
    (tmp_path / "missing" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GemmaForCausalLM.from_pretrained(tmp_path / "missing")


@torch.no_grad()
def test_tied_lm_head_in_file(checkpoint, tmp_path):
    rewrite(checkpoint, tmp_path / "same", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    model = GemmaForCausalLM.from_pretrained(tmp_path / "same")
    assert model.lm_head.weight is model.model.embed_tokens.weight

    rewrite(checkpoint, tmp_path / "diff", lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        GemmaForCausalLM.from_pretrained(tmp_path / "diff")


def test_meta_build_leaves_nothing_on_meta(checkpoint):
    model = GemmaForCausalLM.from_pretrained(checkpoint)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training


@torch.no_grad()
@pytest.mark.parametrize("task", ["causal", "classify"])
@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3_text"])
def test_saved_config_names_the_architecture_as_transformers_does(tmp_path, family, task):
    """vLLM and transformers' Auto classes pick the model class from config.json's `architectures`."""
    import transformers

    theirs = write_hf_checkpoint(tmp_path / "theirs", task=task, family=family, **SHAPES["gqa"])
    cls = GemmaForCausalLM if task == "causal" else GemmaForSequenceClassification
    ours = cls.from_pretrained(theirs)
    ours.config.architectures = ["SomethingElse"]  # a stale value read from a file must not survive a save
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    expected = json.loads((theirs / "config.json").read_text())
    for key in ("architectures", "model_type", "dtype"):
        assert written[key] == expected[key], key

    auto = transformers.AutoModelForCausalLM if task == "causal" else transformers.AutoModelForSequenceClassification
    loaded = auto.from_pretrained(tmp_path / "ours", dtype=torch.float32, attn_implementation="eager").eval()
    assert type(loaded).__name__ == expected["architectures"][0]
    x = ids()
    torch.testing.assert_close(loaded(x).logits, ours(x).logits, atol=1e-5, rtol=0)


def test_saved_dtype_is_the_weights_dtype(checkpoint, tmp_path):
    GemmaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def test_auto_dtype_is_the_checkpoints(tmp_path, tiny_lm_dir):
    """dtype="auto" (vLLM's default): config.json's dtype for an HF directory, bfloat16 for a .gguf; names check."""
    from gemma.weights import checkpoint_dtype, resolve_dtype

    model = GemmaForCausalLM.from_pretrained(write_hf_checkpoint(tmp_path / "fp32", **SHAPES["mqa"]))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert checkpoint_dtype(tmp_path / "fp32") == torch.float32 and checkpoint_dtype(tmp_path / "bf16") == torch.bfloat16
    assert checkpoint_dtype(tmp_path / "model.gguf") == torch.bfloat16
    assert resolve_dtype("auto", tmp_path / "bf16") == torch.bfloat16 and resolve_dtype("float16", "x") == torch.float16
    with pytest.raises(ValueError, match="dtype must be 'auto' or one of"):
        resolve_dtype("fp8", tmp_path / "bf16")
    from gemma import LLM

    assert LLM(str(tiny_lm_dir), kv_cache_memory="4MiB").engine.model.dtype == torch.float32  # LLM's default: auto
