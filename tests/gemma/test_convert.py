"""`python -m gemma.convert`: an original gemma_pytorch checkpoint round-trips to the HF layout."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.checkpoints import SHAPES, load_hf, write_hf_checkpoint
from gemma import GemmaConfig, GemmaForCausalLM, GemmaTokenizer
from tests.helpers.tokenizer_fixtures import write_sentencepiece_model


def to_original(hf_state: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """The gemma_pytorch layout: `embedder.weight`, fused q/k/v rows, and its RoPE buffer."""
    state = {"freqs_cis": torch.randn(8, 4, dtype=torch.complex64)}
    for name, t in hf_state.items():
        if name == "model.embed_tokens.weight":
            state["embedder.weight"] = t
        elif name.endswith("q_proj.weight"):
            prefix = name.removesuffix("q_proj.weight")
            k, v = hf_state[f"{prefix}k_proj.weight"], hf_state[f"{prefix}v_proj.weight"]
            state[f"{prefix}qkv_proj.weight"] = torch.cat([t, k, v])
        elif not name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = t
    return state


@pytest.mark.parametrize("shape", ["mqa", "gqa"])
@torch.no_grad()
def test_convert_round_trip(tmp_path, shape):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", **SHAPES[shape])
    config = GemmaConfig.from_pretrained(hf_dir)
    ckpt = tmp_path / "gemma.ckpt"
    torch.save({"model_state_dict": to_original(load_file(hf_dir / "model.safetensors"), config)}, ckpt)
    sp_dir = write_sentencepiece_model(tmp_path / "sp")
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "gemma.convert", "--input", str(ckpt), "--output", str(out),
           "--tokenizer", str(sp_dir / "tokenizer.model"), "--config", str(hf_dir / "config.json")]
    subprocess.run(cmd, check=True, capture_output=True, text=True)

    converted, original = load_file(out / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    ids = torch.randint(4, 211, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(GemmaForCausalLM.from_pretrained(out)(ids).logits, GemmaForCausalLM.from_pretrained(hf_dir)(ids).logits)
    assert (load_hf(out)(ids).logits - load_hf(hf_dir)(ids).logits).abs().max() == 0  # transformers reads it too
    text = "Hello world, 東京 👋"
    assert GemmaTokenizer.from_pretrained(out).encode(text) == GemmaTokenizer.from_pretrained(sp_dir).encode(text)


def test_wrong_variant_and_pickled_code_are_refused(tmp_path):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", **SHAPES["gqa"])
    ckpt = tmp_path / "gemma.ckpt"
    config = GemmaConfig.from_pretrained(hf_dir)
    torch.save({"model_state_dict": to_original(load_file(hf_dir / "model.safetensors"), config)}, ckpt)
    run = [sys.executable, "-m", "gemma.convert", "--input", str(ckpt), "--output", str(tmp_path / "out")]
    wrong = subprocess.run([*run, "--variant", "2b"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "qkv_proj.weight" in wrong.stderr and "wrong --variant" in wrong.stderr

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"model_state_dict": {"x": Exploit(str(marker))}}, evil)
    refused = subprocess.run([*run[:4], str(evil), *run[5:], "--variant", "2b"], capture_output=True, text=True)
    assert refused.returncode == 2 and "error:" in refused.stderr
    assert not marker.exists()  # the pickled payload never ran


class Exploit:
    """A pickle whose loading would create a file: `weights_only=True` must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
