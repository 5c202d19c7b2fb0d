"""Reading and writing HF-layout checkpoints: `config.json` plus safetensors, single or sharded.

Loading builds the model on the meta device, then assigns the checkpoint's tensors into it (`assign=True`):
safetensors hands out memory-mapped tensors, so when the checkpoint's dtype is the one asked for no tensor is
copied at all, and otherwise each tensor is converted on its own. Peak RSS stays near the size of the weights
(benchmarks/load_memory.py measures it). Every tensor is checked: missing, unexpected and misshaped tensors
are errors that name them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from gemma.config import GemmaConfig
from gemma.gguf_file import QuantTensor, open_gguf
from gemma.parallel import SINGLE, TPGroup
from gemma.registry import resolve_checkpoint

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger(__name__)

# dtype names accepted on command lines and in configs, besides "auto" (`resolve_dtype`)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(name_or_path: str | os.PathLike) -> torch.dtype:
    """The dtype a checkpoint asks for (vLLM's `dtype="auto"`): an HF directory's config.json `dtype` (transformers
    5) or `torch_dtype`, float32 when it names none or another; bfloat16 for a `.gguf`, whose quantized weights have
    no float dtype of their own (bf16 activations read half the bytes of fp32 ones, and the CPU kernels take them)."""
    path = resolve_checkpoint(name_or_path)
    if path.suffix == ".gguf":
        return torch.bfloat16
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32  # from_pretrained reports what is wrong with the checkpoint
    name = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def resolve_dtype(dtype: str | torch.dtype, name_or_path: str | os.PathLike) -> torch.dtype:
    """A dtype name ("auto" = the checkpoint's, `checkpoint_dtype`) or torch dtype, as the torch dtype to load in."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return checkpoint_dtype(name_or_path)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_quantization(
    quantization: str | None, name_or_path: str | os.PathLike, device: str, tp_size: int
) -> str | None:
    """"auto" as what it means for this checkpoint and placement: "gguf" for a .gguf on the CPU at tp_size 1 (its
    blocks kept, gemma.cpu.quant) where the CPU kernels build, else None; any other value is checked and returned."""
    if quantization != "auto":
        if quantization is not None:
            from gemma.cpu.quant import check

            check(quantization, resolve_checkpoint(name_or_path).suffix, device, tp_size)
        return quantization
    if resolve_checkpoint(name_or_path).suffix != ".gguf" or torch.device(device).type != "cpu" or tp_size != 1:
        return None
    from gemma.cpu import kernels

    return "gguf" if kernels.available() else None


SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HEAD_PREFIXES = ("lm_head.", "score.")  # task heads: the only tensors a base model may skip

M = TypeVar("M", bound="PretrainedMixin")


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or misshaped tensors (all named)."""


def checkpoint_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory, from its index when it is sharded."""
    directory = Path(directory)
    index = directory / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / SAFE_WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {directory}")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def iter_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, floating tensors cast to `dtype` (if given).

    A tensor already in `dtype` is a memory-mapped view, not a copy. One that needs a cast is read through a
    mapping of its own that is closed right after the cast: the pages of the source dtype leave the process
    at once instead of piling up in a mapping shared by the whole file (peak ~1.1x instead of ~3x the weights
    for an fp32 file loaded as bf16).
    """
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                stored = SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())
                if dtype is None or stored == dtype or stored is None or not stored.is_floating_point:
                    yield name, f.get_tensor(name)
                    continue
                with safe_open(file, framework="pt") as own:
                    converted = own.get_tensor(name).to(dtype)
                yield name, converted


def _target_name(name: str, has_base_prefix: bool) -> str:
    """Map a checkpoint name onto the model: a base model drops `model.`, a head model adds it if absent."""
    if has_base_prefix:
        return name if name.startswith(("model.", *HEAD_PREFIXES)) else f"model.{name}"
    return name.removeprefix("model.")


def load_checkpoint(
    model: nn.Module,
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    total: int | None = None,
) -> None:
    """Assign `tensors` into `model` (built on the meta device), casting floating tensors to `dtype`.

    Under tensor parallelism each tensor is checked against the full (unsharded) shape, then cut down to this
    rank's shard by the owning layer's `load_shard` before anything is copied or cast. A `QuantTensor` (a GGUF
    loaded with quantization="gguf") stays in its blocks where its module has a kernel for them
    (gemma.cpu.quant.keep_quantized), and is dequantized to `dtype` elsewhere.
    """
    config: GemmaConfig = model.config
    has_base_prefix = hasattr(model, "model")
    tied = config.tie_word_embeddings and hasattr(model, "lm_head")
    with torch.device("meta"):  # the shapes a checkpoint must have: those of the unsharded model
        full = type(model)(config).state_dict()
    expected = {k: v.shape for k, v in full.items() if not (tied and k == "lm_head.weight")}
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    unexpected, misshaped = [], []
    quantized: dict[str, QuantTensor] = {}
    tied_head: torch.Tensor | None = None
    for name, tensor in tqdm(tensors, total=total, desc="loading weights", unit="tensor", disable=None):
        target = _target_name(name, has_base_prefix)
        if isinstance(tensor, QuantTensor):
            if target in expected and tuple(tensor.shape) == tuple(expected[target]) and _keeps_blocks(modules, target):
                quantized[target] = tensor
                continue
            tensor = tensor.dequantize(dtype)
        if tied and target == "lm_head.weight":
            tied_head = tensor  # accepted only if it equals the embedding, checked below
            continue
        if target not in expected:
            if not has_base_prefix and target.startswith(HEAD_PREFIXES):
                logger.info("base model: ignoring head tensor %s", name)
            else:
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[target]):
            misshaped.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[target])}")
            continue
        state[target] = _shard(modules, target, tensor).to(
            device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype
        )
    missing = sorted(set(expected) - set(state) - set(quantized))
    problems = [
        f"{label}: {', '.join(names)}"
        for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected), ("misshaped tensors", misshaped))
        if names
    ]
    if problems:
        raise CheckpointError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(problems))
    if tied_head is not None:
        embed = state["model.embed_tokens.weight"]
        ok = tied_head.shape == expected["model.embed_tokens.weight"]
        if not ok or not torch.equal(_shard(modules, "model.embed_tokens.weight", tied_head).to(device, dtype), embed):
            raise CheckpointError(
                "lm_head.weight differs from model.embed_tokens.weight but config.tie_word_embeddings is true"
            )
    model.load_state_dict(state, strict=not tied and not quantized, assign=True)
    if quantized:
        from gemma.cpu.quant import keep_quantized

        for target, tensor in quantized.items():
            keep_quantized(modules[target.rpartition(".")[0]], tensor, dtype)
    if tied and "model.embed_tokens.weight" in quantized:
        keep_quantized(model.lm_head, quantized["model.embed_tokens.weight"], dtype)  # the same blocks, not a copy
    elif tied:
        model.tie_weights()


def _keeps_blocks(modules: dict[str, nn.Module], target: str) -> bool:
    """Whether the checkpoint tensor `target` can stay quantized: a Linear's or the embedding's weight at TP 1."""
    from gemma.layers import ScaledEmbedding
    from gemma.parallel import Linear

    owner = modules.get(target.rpartition(".")[0])
    return (target.endswith(".weight") and isinstance(owner, (Linear, ScaledEmbedding))
            and owner.tp.size == 1)


def _shard(modules: dict[str, nn.Module], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a checkpoint tensor (all of it for replicated parameters)."""
    owner = modules.get(name.rpartition(".")[0])
    load_shard = getattr(owner, "load_shard", None)
    return tensor if load_shard is None else load_shard(tensor)


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


def save_safetensors(
    state: dict[str, torch.Tensor], directory: str | os.PathLike, max_shard_size: int | str = "5GB"
) -> list[Path]:
    """Write `state` as `model.safetensors`, or as numbered shards plus an index when larger than a shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        size += nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors files without it
    if len(shards) == 1:
        path = directory / SAFE_WEIGHTS_NAME
        save_file(shards[0], path, metadata=metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path, metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for the model classes (which take a `GemmaConfig`)."""

    config: GemmaConfig

    @classmethod
    def from_pretrained(
        cls: type[M],
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp: TPGroup = SINGLE,
        quantization: str | None = None,
        **config_overrides: Any,
    ) -> M:
        """Load a checkpoint in eval mode: an HF directory (config.json + safetensors, single or sharded), a
        `.gguf` file (config from its metadata, tensors dequantized, or with `quantization="gguf"` kept in their
        blocks where the CPU kernels take them: gemma.cpu.quant), or a named model ("gemma-3-270m").
        With a tensor-parallel group `tp`, this rank keeps only its shard of each tensor."""
        start = time.perf_counter()
        path = resolve_checkpoint(path)
        if quantization is not None:
            from gemma.cpu.quant import KERNEL_TYPES, check

            check(quantization, path.suffix, device, tp.size)
        if path.suffix == ".gguf":
            gguf = open_gguf(path)
            config = GemmaConfig.model_validate({**gguf.config.model_dump(), **config_overrides})
            keep = KERNEL_TYPES if quantization == "gguf" else frozenset()
            tensors, total = gguf.tensors(dtype, keep), len(gguf)
        else:
            config = GemmaConfig.from_pretrained(path, **config_overrides)
            files = checkpoint_files(path)
            total = 0
            for file in files:
                with safe_open(file, framework="pt") as f:
                    total += len(f.keys())
            tensors = iter_safetensors(files, dtype)
        with torch.device("meta"):
            model = cls(config, tp)
        load_checkpoint(model, tensors, dtype, device, total=total)
        logger.info("loaded %s from %s in %.1f s", cls.__name__, path, time.perf_counter() - start)
        return model.eval()

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB") -> None:
        """Write config.json and safetensors in HF layout (a tied LM head is not stored twice).

        config.json carries what transformers 5 writes besides the config: `architectures` (transformers' class
        for this model type and task, which is how vLLM and the Auto classes pick the model: without it vLLM
        serves a causal LM as an embedding model) and `dtype` (the weights' dtype).
        """
        if any("qtype" in m.__dict__ for m in self.modules()):
            raise ValueError("a model loaded with quantization='gguf' cannot be saved as safetensors; load it with "
                             "quantization=None to save it")
        state = self.state_dict()
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        extra = {"architectures": [hf_architecture(type(self), self.config.model_type)],
                 "dtype": str(dtype).removeprefix("torch.")}
        config = self.config.model_copy(deep=True)
        if config.model_extra is not None:
            config.model_extra.pop("torch_dtype", None)  # transformers 4's name for `dtype`; one of them, not both
            config.model_extra.update(extra)
        config.save_pretrained(directory)
        save_safetensors(state, directory, max_shard_size)


# transformers' class per model type for each of our classes (Gemma 3's classifier has "Text" in its name)
HF_ARCHITECTURES: dict[str, dict[str, str]] = {
    "GemmaForCausalLM": {
        "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
    },
    "GemmaForSequenceClassification": {
        "gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
        "gemma3_text": "Gemma3TextForSequenceClassification",
    },
    "GemmaModel": {"gemma": "GemmaModel", "gemma2": "Gemma2Model", "gemma3_text": "Gemma3TextModel"},
}


def hf_architecture(cls: type, model_type: str) -> str:
    """transformers' class name for a model of our class `cls` (or a subclass of one) and `model_type`."""
    for base in cls.__mro__:
        if base.__name__ in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[base.__name__][model_type]
    raise ValueError(f"{cls.__name__} has no transformers architecture (known: {sorted(HF_ARCHITECTURES)})")
