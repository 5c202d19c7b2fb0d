"""PEFT (the oracle, test-only) LoRA adapters on tiny random checkpoints: written in PEFT's own format, with random
non-zero A and B, and PEFT's model to compare against."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.checkpoints import load_hf


def write_peft_adapter(
    checkpoint: Path, out: Path, family: str = "gemma", r: int = 4, alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 1, use_rslora: bool = False,
    layers: list[int] | None = None, std: float = 0.2,
) -> Path:
    """Save a PEFT LoRA adapter of the checkpoint's model (adapter_config.json + adapter_model.safetensors)."""
    from peft import LoraConfig, get_peft_model

    base = load_hf(checkpoint, family=family)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        layers_to_transform=layers, lora_dropout=0.0)
    model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT starts B at zero (no change); random non-zero A and B make the delta visible
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(out)
    return out


def load_peft(checkpoint: Path, adapter: Path, family: str = "gemma"):
    """PEFT's model of the checkpoint with the adapter, fp32, eager attention, eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(checkpoint, family=family), adapter).eval()


def write_random_adapter(
    out: Path, config, r: int = 4, alpha: float = 8.0, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 1,
    std: float = 0.2, **extra_config,
) -> Path:
    """A LoRA adapter in PEFT's file format (random non-zero A and B) for a model of `config`, without PEFT."""
    import json

    from safetensors.torch import save_file

    from gemma.lora import target_shapes

    out.mkdir(parents=True, exist_ok=True)
    shapes, g = target_shapes(config), torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for t in targets:
            prefix = f"base_model.model.model.layers.{layer}.{'mlp' if t in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{t}"
            fan_in, fan_out = shapes[t]
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * std
    save_file(tensors, out / "adapter_model.safetensors")
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
           "use_dora": False, "use_rslora": False} | extra_config
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out
