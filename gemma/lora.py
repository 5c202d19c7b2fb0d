"""LoRA adapters: PEFT adapter files, and the batched low-rank delta added to the parallel layers' products.

    adapter = load_adapter("my-adapter/", model.config, max_lora_rank=64)   # adapter_config.json + safetensors
    bank = LoRABank(model, max_loras=4)       # hooks on q/k/v/o/gate/up/down of every layer (`Linear.lora`)
    bank.load([adapter, None, None, None])    # the adapters in the slots
    bank.activate([0, 0, -1, -1])             # the step's token rows: slot per row (-1: the base model)

An adapter is PEFT's LoRA (`adapter_config.json` with `peft_type: LORA`, and `adapter_model.safetensors`; pickled
`.bin` files are never read) on any subset of q/k/v/o/gate/up/down of Gemma 1, 2 or 3, with rank `r`, `lora_alpha`
and `use_rslora` (scaling alpha / sqrt(r), else alpha / r), optionally on some layers only (`layers_to_transform`).
What does not fit the base model is refused with a `LoRAError` (a ValueError) naming it: a tensor of the wrong
shape or layer, a target module other than those seven (embeddings, lm_head), DoRA, LoRA biases, per-module rank or
alpha patterns, `modules_to_save`, PEFT variants that change the maths (QA-LoRA, aLoRA, layer replication), a rank above
`max_lora_rank`.

The delta of a layer is PEFT's `lora_B(lora_A(x)) * scaling`, computed for every row of a step at once: the loaded
adapters' A matrices are packed into one (R, in) matrix per layer and target, their B matrices (the scaling folded
in) into one (R, out), R the sum of their ranks; a row multiplies `x A^T` by a 0/1 mask that keeps its adapter's
columns only (none for a base-model row), then by B. Two products and a multiply per layer and target, whatever the
mix of adapters in the step. Tensor parallelism follows the layer's shard: a column-parallel layer keeps A whole
and this rank's rows of B; a row-parallel layer this rank's columns of A and all of B, its delta added to the
partial product before the all-reduce (the sum over ranks of x_r A_r^T B^T is x A^T B^T).

On a CPU the adapters are kept and applied in fp32 (PyTorch's half-precision products of a few rows are slow
there, and the delta is small next to the layer's own product); on a GPU in the model's dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma.config import GemmaConfig
from gemma.parallel import Linear, RowParallelLinear

logger = logging.getLogger(__name__)

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# PEFT's saved names: `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (a multimodal Gemma 3 adds
# `language_model.`); an adapter name before `.weight` appears in some hand-made files
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class LoRAError(ValueError):
    """An adapter that cannot be served on this model; the message names what is wrong."""


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's `LoRARequest`: the adapter a request runs with. `lora_int_id` (>= 1) identifies the adapter in the engine;
    `lora_path` is its directory (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not self.lora_path:
            raise ValueError(f"LoRA adapter {self.lora_name!r}: lora_path is empty")
        object.__setattr__(self, "lora_path", str(self.lora_path))

    @property
    def cache_salt(self) -> bytes:
        """What the prefix cache's block hashes start from for this adapter: its KV differs from the base model's and
        from every other adapter's (gemma.engine.block_manager)."""
        return hashlib.sha256(f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode()).digest()


@dataclass
class LoRAAdapter:
    """One adapter's weights, whole (every rank cuts its own shard): `weights[(layer, target)] = (A (r, in), B (out, r)
    * scaling)` in fp32 on the CPU."""

    name: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def targets(self) -> list[str]:
        return [t for t in TARGETS if any(k[1] == t for k in self.weights)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


def target_shapes(config: GemmaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target module of the whole (unsharded) model."""
    C, D, I = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * D, config.num_key_value_heads * D
    return {"q_proj": (C, q), "k_proj": (C, kv), "v_proj": (C, kv), "o_proj": (q, C),
            "gate_proj": (C, I), "up_proj": (C, I), "down_proj": (I, C)}


def read_adapter_config(path: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what this loader serves (see the module doc)."""
    if not path.is_dir():
        raise LoRAError(f"LoRA adapter {str(path)!r}: not a directory")
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoRAError(f"LoRA adapter {str(path)!r}: no {CONFIG_NAME}") from None
    except ValueError as exc:
        raise LoRAError(f"LoRA adapter {str(path)!r}: {CONFIG_NAME} is not valid JSON ({exc})") from None
    where = f"LoRA adapter {str(path)!r}: {CONFIG_NAME}"
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoRAError(f"{where}: peft_type is {cfg['peft_type']!r}; only LORA adapters are supported")
    if cfg.get("use_dora"):
        raise LoRAError(f"{where}: use_dora is true; DoRA adapters are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise LoRAError(f"{where}: bias is {cfg.get('bias')!r} (lora_bias {cfg.get('lora_bias')}); only adapters "
                        "without biases (bias: none) are supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoRAError(f"{where}: {key} is set; adapters with one rank and alpha for all modules are supported")
    for key in ("use_qalora", "layer_replication", "alora_invocation_tokens", "arrow_config", "fan_in_fan_out"):
        if cfg.get(key):
            raise LoRAError(f"{where}: {key} is {cfg[key]!r}; plain LoRA (without it) is supported")
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if cfg.get(key):
            raise LoRAError(f"{where}: {key} is {cfg[key]!r}; adapters that change modules other than "
                            f"{', '.join(TARGETS)} are not supported")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        unsupported = sorted(set(targets) - set(TARGETS))
        if unsupported:
            raise LoRAError(f"{where}: target modules {unsupported} are not supported; supported: {', '.join(TARGETS)}")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise LoRAError(f"{where}: {key} must be a positive number, got {cfg.get(key)!r}")
    return cfg


def load_adapter(path: str | Path, config: GemmaConfig, max_lora_rank: int | None = None, name: str | None = None
                 ) -> LoRAAdapter:
    """Read and check a PEFT LoRA adapter directory against the base model's `config` (see the module doc)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_adapter_config(path)
    label = f"LoRA adapter {name or str(path)!r}"
    file = path / WEIGHTS_NAME
    if not file.is_file():
        found = sorted(p.name for p in path.glob("adapter_model*"))
        raise LoRAError(f"{label}: no {WEIGHTS_NAME}" + (f" (found {found}; only safetensors files are read)" if found else ""))
    rank = int(cfg["r"])
    if max_lora_rank is not None and rank > max_lora_rank:
        raise LoRAError(f"{label}: rank {rank} is above max_lora_rank ({max_lora_rank})")
    scaling = cfg["lora_alpha"] / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
    shapes = target_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(file, device="cpu").items():
        if "lora_magnitude_vector" in key:
            raise LoRAError(f"{label}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
        m = _KEY.search(key)
        if m is None:
            raise LoRAError(f"{label}: tensor {key!r} is not a LoRA A/B weight of a decoder layer's "
                            f"{', '.join(TARGETS)}; that target is not supported")
        layer, target, half = int(m[1]), m[3], m[4]
        if target not in TARGETS:
            raise LoRAError(f"{label}: tensor {key!r}: target module {target!r} is not supported; supported: "
                            f"{', '.join(TARGETS)}")
        if layer >= config.num_hidden_layers:
            raise LoRAError(f"{label}: tensor {key!r} is for layer {layer}; the model has {config.num_hidden_layers}")
        fan_in, fan_out = shapes[target]
        expected = (rank, fan_in) if half == "A" else (fan_out, rank)
        if tuple(tensor.shape) != expected:
            raise LoRAError(f"{label}: tensor {key!r} has shape {tuple(tensor.shape)}; this model needs {expected} "
                            f"(r={rank}, {target} of {fan_in} -> {fan_out} features)")
        halves.setdefault((layer, target), {})[half] = tensor.float()
    weights = {}
    for (layer, target), ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{label}: layer {layer} {target} has lora_{next(iter(ab))} without its other half")
        weights[(layer, target)] = (ab["A"].contiguous(), (ab["B"] * scaling).contiguous())
    if not weights:
        raise LoRAError(f"{label}: {WEIGHTS_NAME} holds no LoRA weights")
    return LoRAAdapter(name or str(path), rank, scaling, weights)


# ---- the batched delta --------------------------------------------------------------------------------------------


@dataclass
class _Packed:
    """One layer-and-target's loaded adapters, packed: A (R, in) and B (R, out) for this rank."""

    a: torch.Tensor
    b: torch.Tensor


class LoRAHook:
    """A `Linear`'s adapters (its `lora` attribute): `hook(x, y)` adds to y = x W^T (before any all-reduce) the delta of
    each row's adapter in the bank's current step; nothing outside a step or where no loaded adapter targets it."""

    def __init__(self, bank: LoRABank, layer: int, target: str) -> None:
        self.bank, self.layer, self.target = bank, layer, target

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mask = self.bank.masks.get(self.target)
        packed = self.bank.packed.get((self.layer, self.target)) if mask is not None else None
        if packed is None:
            return y
        xs = x.reshape(-1, x.shape[-1]).to(packed.a.dtype)
        if xs.shape[0] != mask.shape[0]:
            raise ValueError(f"LoRA step has {mask.shape[0]} rows, the layer got {xs.shape[0]}")
        delta = (F.linear(xs, packed.a) * mask) @ packed.b  # (N, out)
        return y.add_(delta.view(y.shape).to(y.dtype))


class LoRABank:
    """`max_loras` adapter slots on a model's device (this rank's shards), packed per layer and target, and the rows of
    the current step (see the module doc). Installing it hooks every q/k/v/o/gate/up/down `Linear` of `model`."""

    def __init__(self, model: nn.Module, max_loras: int, dtype: torch.dtype | None = None) -> None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        decoder = model.model if hasattr(model, "lm_head") else model
        self.device = next(model.parameters()).device
        model_dtype = next(model.parameters()).dtype
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else model_dtype)
        self.linears: dict[tuple[int, str], Linear] = {}
        for i, layer in enumerate(decoder.layers):
            for target in TARGETS:
                parent = layer.self_attn if target in ATTENTION_TARGETS else layer.mlp
                self.linears[(i, target)] = getattr(parent, target)
        self.hooks = {key: LoRAHook(self, *key) for key in self.linears}
        self.install()
        self.slots: list[LoRAAdapter | None] = [None] * max_loras
        self.packed: dict[tuple[int, str], _Packed] = {}
        self.columns: dict[str, torch.Tensor] = {}  # target -> (R,) the slot of each packed column
        self.masks: dict[str, torch.Tensor] = {}  # target -> (N, R) of the step under way; empty outside a step

    def load(self, slots: list[LoRAAdapter | None]) -> None:
        """Put these adapters in the slots (one per slot, None: empty) and repack; a no-op if they are there already."""
        if len(slots) != len(self.slots):
            raise ValueError(f"{len(slots)} slots given, the bank has {len(self.slots)}")
        if all(a is b for a, b in zip(slots, self.slots)):
            return
        self.slots = list(slots)
        self.packed, self.columns = {}, {}
        for target in TARGETS:
            present = [(k, a) for k, a in enumerate(self.slots) if a is not None and target in a.targets]
            if not present:
                continue
            self.columns[target] = torch.tensor([k for k, a in present for _ in range(a.rank)], device=self.device)
            for (layer, t), linear in self.linears.items():
                if t != target:
                    continue
                parts = [self._shard(linear, a, layer, target) for _, a in present]
                a = torch.cat([p[0] for p in parts]).to(self.device, self.dtype).contiguous()
                b = torch.cat([p[1] for p in parts]).to(self.device, self.dtype).contiguous()
                self.packed[(layer, target)] = _Packed(a, b)

    @staticmethod
    def _shard(linear: Linear, adapter: LoRAAdapter, layer: int, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A (r, in), B^T (r, out)) of one adapter at one layer; zeros where the adapter skips the layer."""
        ab = adapter.weights.get((layer, target))
        if isinstance(linear, RowParallelLinear):  # input features sharded: A's columns; B whole
            if ab is None:
                return torch.zeros(adapter.rank, linear.in_features), torch.zeros(adapter.rank, linear.out_features)
            return linear.load_shard(ab[0]), ab[1].t()
        if ab is None:
            return torch.zeros(adapter.rank, linear.in_features), torch.zeros(adapter.rank, linear.out_features)
        return ab[0], linear.load_shard(ab[1]).t()  # column-parallel, output features sharded: B's rows; A whole

    def install(self) -> None:
        """Hook the layers to this bank (again, where another bank over the same model took them since)."""
        for key, linear in self.linears.items():
            linear.lora = self.hooks[key]

    def activate(self, row_slots: list[int] | torch.Tensor) -> None:
        """Start a step whose token rows use these slots (-1: no adapter): every hooked layer adds their deltas."""
        if next(iter(self.linears.values())).lora is not next(iter(self.hooks.values())):
            self.install()  # engines that take turns over one model object (tests do) each hook it for their steps
        rows = torch.as_tensor(row_slots, device=self.device)
        self.masks = {t: (rows[:, None] == cols[None, :]).to(self.dtype) for t, cols in self.columns.items()}

    def deactivate(self) -> None:
        self.masks = {}

    def remove(self) -> None:
        """Unhook the layers (the model is the base model again)."""
        for linear in self.linears.values():
            linear.__dict__.pop("lora", None)
        self.packed, self.masks = {}, {}
