"""GGUF checkpoints (llama.cpp's format): the config, the dequantized tensors and the tokenizer vocabulary.

The `gguf` package's numpy dequantizers expand every quant type it knows (F32, F16, BF16, Q4_0, Q5_0, Q8_0,
the K-quants, ...); anything else is a clear error. Tensors are renamed from llama.cpp's names to HF's and
cast to the requested dtype one at a time.

The file's header is parsed here, not by `gguf.GGUFReader`: that reader builds a numpy array per element of
every metadata array, which for Gemma 3's 262k-entry vocabulary took ~9 s and ~950 MB of RSS (measured on
the 270M); this parser reads numeric arrays in bulk and strings in one pass (~0.3 s). tests/test_gguf.py
checks that it reads exactly what GGUFReader reads.

What a Gemma GGUF does not say, checked against transformers' GGUF loader (transformers 5.24,
`modeling_gguf_pytorch_utils.py` / `integrations/ggml.py`) and llama.cpp (`convert_hf_to_gguf.py`,
`src/llama-model.cpp`):
- Norm weights: llama.cpp's converter stores every Gemma `*norm.weight` with the +1 of `(1 + w)` already
  added; we subtract it (transformers does the same for gemma2/gemma3; its table has no entry for Gemma 1,
  whose GGUFs have the +1 too, so we subtract it for all three generations).
- Gemma 3 layer pattern: not stored; llama.cpp and transformers (Gemma3TextConfig's default
  `sliding_window_pattern=6`) both make every 6th layer global. So do we.
- Gemma 3 local RoPE base: not stored; both use 10000 for sliding layers (`rope.freq_base` is the global one).
- query_pre_attn_scalar: not stored. llama.cpp scales by 1/sqrt(head_dim), except for the 27B models, which
  use 1/sqrt(hidden_size / num_heads) (Gemma 2 27B: 144, Gemma 3 27B: 168, as in their config.json).
  transformers takes its class default (256), which is wrong for both 27Bs. We follow llama.cpp.
- Gemma 2 soft-capping: stored (`gemma2.attn_logit_softcapping`, `gemma2.final_logit_softcapping`).
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma.config import GemmaConfig

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
TWENTY_SEVEN_B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp identifies the 27B models by depth

# llama.cpp tensor name (after "blk.N.") -> ours, per generation. Gemma 1's "ffn_norm" is the norm in front
# of the MLP, which HF calls post_attention_layernorm; Gemma 2/3 have a real post-attention norm.
_COMMON = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_LAYER_NAMES = {
    "gemma": {**_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma2": {
        **_COMMON, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_LAYER_NAMES["gemma3"] = {**_LAYER_NAMES["gemma2"], "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFError(ValueError):
    """A GGUF file this library cannot load correctly (architecture, quant type or tensor)."""


GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: scalar struct formats, 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# tensor types stored as plain numpy arrays; every other type is handed to the dequantizer as raw bytes
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass(frozen=True)
class QuantTensor:
    """A 2-D tensor kept in its GGUF blocks: `data` (rows, bytes per row) uint8 of ggml type `qtype`, standing for a
    float tensor of `shape` (rows, cols). gemma.cpu.quant computes with it."""

    data: torch.Tensor
    qtype: int
    shape: tuple[int, int]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor, as the `gguf` package's dequantizer gives it."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        return torch.from_numpy(dequantize(self.data.numpy(), GGMLQuantizationType(self.qtype))).to(dtype)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: int  # ggml type id (gguf.GGMLQuantizationType)
    dims: tuple[int, ...]  # GGUF order: dims[0] is the fastest-varying (columns)
    offset: int  # from the start of the file


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _NUMPY:  # numeric arrays in one read
                array = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.pos)
                self.pos += array.nbytes
                return array.tolist()
            return [self.value(itype) for _ in range(count)]
        raise GGUFError(f"unknown GGUF metadata type {vtype}")


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[TensorInfo], mmap.mmap]:
    """Metadata, tensor directory and a read-only mapping of a GGUF (v2/v3) file."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cur = _Cursor(memoryview(mapped))
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise GGUFError(f"{path.name}: not a GGUF file")
    cur.pos = 4
    version, n_tensors, n_fields = cur.scalar("I"), cur.scalar("Q"), cur.scalar("Q")
    if version < 2:
        raise GGUFError(f"{path.name}: GGUF version {version} is not supported (2 or 3)")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.scalar("I")))
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = fields.get("general.alignment", 32)
    start = -(-cur.pos // align) * align
    return fields, [TensorInfo(n, t, d, start + o) for n, d, t, o in infos], mapped


def tensor_array(info: TensorInfo, mapped: mmap.mmap) -> np.ndarray:
    """The tensor's stored data as GGUFReader gives it: plain types shaped (rows, cols), others raw bytes."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    shape = tuple(reversed(info.dims))
    if info.qtype in _PLAIN:
        count = int(np.prod(shape))
        return np.frombuffer(mapped, dtype=_PLAIN[info.qtype], count=count, offset=info.offset).reshape(shape)
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.qtype)]
    except (ValueError, KeyError):
        raise GGUFError(f"tensor {info.name} has unknown ggml type {info.qtype}") from None
    row_bytes = shape[-1] // block * size
    count = int(np.prod(shape[:-1])) * row_bytes
    return np.frombuffer(mapped, dtype=np.uint8, count=count, offset=info.offset).reshape(*shape[:-1], row_bytes)


def open_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return GGUFCheckpoint(path, *read_gguf_header(path))


class GGUFCheckpoint:
    """One GGUF file: `config`, `tensors(dtype)` under HF names, and `vocab()` for the tokenizer."""

    def __init__(self, path: Path, fields: dict[str, Any], infos: list[TensorInfo], mapped: mmap.mmap) -> None:
        self.path = path
        self.fields, self.infos, self.mapped = fields, infos, mapped
        self.arch = self.field("general.architecture")
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{path.name}: architecture {self.arch!r} is not supported (supported: {sorted(SUPPORTED_ARCHITECTURES)})"
            )

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key.format(arch=getattr(self, "arch", "")), default)

    @functools.cached_property
    def config(self) -> GemmaConfig:
        a = "{arch}."
        heads = self.field(a + "attention.head_count")
        hidden = self.field(a + "embedding_length")
        head_dim = self.field(a + "attention.key_length", hidden // heads)
        layers = self.field(a + "block_count")
        vocab = self.field("tokenizer.ggml.tokens")
        data: dict[str, Any] = dict(
            model_type=SUPPORTED_ARCHITECTURES[self.arch],
            vocab_size=len(vocab) if vocab is not None else self.field(a + "vocab_size"),
            hidden_size=hidden,
            intermediate_size=self.field(a + "feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=self.field(a + "attention.head_count_kv", heads),
            head_dim=head_dim,
            max_position_embeddings=self.field(a + "context_length", 8192),
            rms_norm_eps=self.field(a + "attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=self.field(a + "rope.freq_base", 10000.0),
            tie_word_embeddings=not any(t.name == "output.weight" for t in self.infos),
        )
        for ours, key in [("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id")]:
            if (value := self.field(f"tokenizer.ggml.{key}")) is not None:
                data[ours] = value
        # Instruction-tuned Gemmas end a reply with <end_of_turn>: HF lists it next to <eos> in
        # generation_config.json (eos_token_id [1, 106] for Gemma 3), llama.cpp as its end-of-generation token.
        eot = self.field("tokenizer.ggml.eot_token_id")
        if eot is None and vocab is not None and "<end_of_turn>" in vocab:
            eot = vocab.index("<end_of_turn>")
        if eot is not None and data.get("eos_token_id") is not None and eot != data["eos_token_id"]:
            data["eos_token_id"] = [data["eos_token_id"], eot]
        if self.arch != "gemma":
            data["sliding_window"] = self.field(a + "attention.sliding_window", 4096)
            big = layers == TWENTY_SEVEN_B_LAYERS[self.arch]
            data["query_pre_attn_scalar"] = hidden // heads if big else head_dim
        if self.arch == "gemma2":
            data["attn_logit_softcapping"] = self.field(a + "attn_logit_softcapping", 50.0)
            data["final_logit_softcapping"] = self.field(a + "final_logit_softcapping", 30.0)
        if self.arch == "gemma3":
            data["rope_local_base_freq"] = 10000.0
            data["sliding_window_pattern"] = 6
            if self.field(a + "rope.scaling.type") == "linear":
                data["rope_scaling"] = {"rope_type": "linear", "factor": self.field(a + "rope.scaling.factor")}
        return GemmaConfig.model_validate(data)

    def hf_name(self, name: str) -> str:
        if m := _BLOCK.fullmatch(name):
            layer, part, kind = m.groups()
            if part not in _LAYER_NAMES[self.arch]:
                raise GGUFError(f"{self.path.name}: unexpected tensor {name} for architecture {self.arch}")
            return f"model.layers.{layer}.{_LAYER_NAMES[self.arch][part]}.{kind}"
        stem, _, kind = name.rpartition(".")
        if stem not in _GLOBAL_NAMES:
            raise GGUFError(f"{self.path.name}: unexpected tensor {name} for architecture {self.arch}")
        return f"{_GLOBAL_NAMES[stem]}.{kind}"

    def __len__(self) -> int:
        return len(self.infos)

    def tensors(
        self, dtype: torch.dtype = torch.float32, keep: frozenset[int] = frozenset()
    ) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
        """(HF name, tensor in `dtype`) for every tensor, dequantized; norms back to zero-centred. 2-D tensors of a
        ggml type in `keep` come as `QuantTensor`s instead (their blocks copied out of the file's mapping)."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        for t in self.infos:
            name = self.hf_name(t.name)
            qtype = GGMLQuantizationType(t.qtype)
            data = tensor_array(t, self.mapped)
            if t.qtype in keep and len(t.dims) == 2 and not name.endswith("norm.weight"):
                yield name, QuantTensor(torch.from_numpy(data.copy()), t.qtype, (t.dims[1], t.dims[0]))
                continue
            out = torch.empty(tuple(reversed(t.dims)), dtype=dtype)
            # row chunks of ~16M values: the fp32 intermediates of a 262k-row embedding never exist at once
            step = max(1, 2**24 // max(1, t.dims[0]))
            for start in range(0, out.shape[0], step):
                try:
                    array = dequantize(data[start : start + step], qtype)  # (rows, cols), float32
                except NotImplementedError as exc:
                    raise GGUFError(f"{self.path.name}: tensor {t.name} has unsupported type {qtype.name}") from exc
                chunk = torch.from_numpy(np.array(array, dtype=np.float32, copy=not array.flags.writeable))
                if name.endswith("norm.weight"):
                    chunk -= 1.0  # llama.cpp stored (1 + w)
                out[start : start + step] = chunk
            yield name, out

    def vocab(self) -> dict[str, Any]:
        """The tokenizer arrays and settings, as `gemma.vocab.load_gguf_vocab` needs them."""
        tokens = self.field("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError(f"{self.path.name}: no tokenizer vocabulary (tokenizer.ggml.tokens)")
        model = self.field("tokenizer.ggml.model")
        if model not in (None, "llama"):
            raise GGUFError(f"{self.path.name}: tokenizer model {model!r} is not Gemma's SentencePiece BPE")
        return dict(
            tokens=tokens,
            scores=self.field("tokenizer.ggml.scores") or [0.0] * len(tokens),
            types=self.field("tokenizer.ggml.token_type") or [1] * len(tokens),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
            unk_token_id=self.field("tokenizer.ggml.unknown_token_id"),
            pad_token_id=self.field("tokenizer.ggml.padding_token_id"),
            add_bos_token=self.field("tokenizer.ggml.add_bos_token", True),
            add_eos_token=self.field("tokenizer.ggml.add_eos_token", False),
            chat_template=self.field("tokenizer.chat_template"),
        )
