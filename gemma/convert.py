"""Convert an original gemma_pytorch checkpoint to the HF layout.

    python -m gemma.convert --input gemma-2b.ckpt --tokenizer tokenizer.model --output DIR [--variant 2b|7b]

The original file is a torch pickle holding `model_state_dict`, with `embedder.weight` for the embedding and a
fused `qkv_proj` per layer (rows: all query heads, then the key heads, then the value heads); the other names
already match HF's. It is read with `torch.load(weights_only=True)`: tensors only, never arbitrary objects.
The result is written by the same `save_pretrained` as any model, after the same name and shape checks as any
load, so a wrong variant fails with the names of the tensors that do not fit.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from gemma.config import GemmaConfig
from gemma.weights import DTYPES, load_checkpoint

logger = logging.getLogger(__name__)



def read_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a gemma_pytorch checkpoint, loaded without unpickling anything but tensors."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is impossible, weights_only still holds
        data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("model_state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'model_state_dict')")
    return state


def original_to_hf(state: dict[str, torch.Tensor], config: GemmaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename and split the original tensors into HF names: `embedder` -> embed_tokens, `qkv_proj` -> q/k/v."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for name, tensor in state.items():
        if name == "freqs_cis":  # a RoPE table buffer, recomputed at run time
            continue
        if name == "embedder.weight":
            yield "model.embed_tokens.weight", tensor
        elif name.endswith("self_attn.qkv_proj.weight"):
            if tensor.shape[0] != q_rows + 2 * kv_rows:
                raise ValueError(
                    f"{name}: {tensor.shape[0]} rows, but the config's heads need {q_rows} + 2 * {kv_rows}; "
                    "wrong --variant?"
                )
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            prefix = name.removesuffix("qkv_proj.weight")
            yield f"{prefix}q_proj.weight", q
            yield f"{prefix}k_proj.weight", k
            yield f"{prefix}v_proj.weight", v
        else:
            yield name, tensor


def convert(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    config: GemmaConfig,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write `output` as an HF checkpoint (config.json, safetensors, tokenizer files) loadable by us and HF."""
    from gemma.model import GemmaForCausalLM
    from gemma.tokenizer import GemmaTokenizer

    state = read_original_checkpoint(checkpoint)
    with torch.device("meta"):
        model = GemmaForCausalLM(config)
    load_checkpoint(model, original_to_hf(state, config), dtype)
    output = Path(output)
    model.save_pretrained(output)
    if tokenizer is not None:
        GemmaTokenizer.from_pretrained(tokenizer).save_pretrained(output)
    logger.info("wrote %s", output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="original gemma_pytorch checkpoint (.ckpt)")
    parser.add_argument("--output", required=True, help="directory for the HF checkpoint")
    parser.add_argument("--tokenizer", help="the checkpoint's SentencePiece tokenizer.model")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--variant", choices=["2b", "7b"], default="7b", help="published shapes (default 7b)")
    shape.add_argument("--config", help="a config.json to use instead of a published variant")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = GemmaConfig.from_pretrained(args.config) if args.config else GemmaConfig.from_preset(f"gemma-{args.variant}")
    try:
        convert(args.input, args.output, config, args.tokenizer, DTYPES[args.dtype])
    except (ValueError, OSError, ImportError, pickle.UnpicklingError) as exc:
        # UnpicklingError: weights_only refused an object that is not a tensor
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
