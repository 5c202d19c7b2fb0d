"""Multi-LoRA serving cost: closed-loop throughput at concurrency 16 with 4 adapters mixed, against the base alone.

    python benchmarks/lora.py [--model gemma-3-270m] [--dtype bfloat16] [--concurrency 16] [--adapters 4]
                              [--rank 16] [--requests 64] [--prompt-len 32,256] [--output-len 64,128]
                              [--threads 2] [--quick] [--out benchmarks/results]

Adapters: `--adapters` random PEFT-format LoRA adapters of rank `--rank` on every target (q/k/v/o/gate/up/down),
written to a temporary directory. The same seeded requests (random prompt ids, `ignore_eos` so every system makes
the same number of tokens) run in three phases, each an engine in this process kept at `--concurrency` requests
in flight (a new one is added as one finishes):
1. base: an engine without LoRA (the CPU fast path's fused decode layer, CUDA graphs where there are);
2. LoRA on, base requests: the same requests on an engine with `enable_lora` (what enabling LoRA costs by itself);
3. mixed: request i runs with adapter i mod `--adapters`, all of them on the device at once (`max_loras`).
Per phase: output tok/s, TTFT p50, ITL p50, and the throughput lost against phase 1. Target (reported, never
asserted): mixed loses <= 25% of the base's throughput on a CPU. `--quick`: a tiny random model, seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import closed_loop, cpu_name, fmt, load_average_warning, log, parse_range, pyplot, results_dir, tiny_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemma import GemmaForCausalLM, LoRARequest  # noqa: E402
from gemma.engine import EngineConfig, LLMEngine  # noqa: E402
from gemma.lora import TARGETS, target_shapes  # noqa: E402
from gemma.sampling import SamplingParams  # noqa: E402
from gemma.weights import resolve_dtype  # noqa: E402

LOSS_GOAL = 0.25


def write_adapter(directory: Path, config, rank: int, seed: int) -> Path:
    """A random LoRA adapter in PEFT's file format on every target module (small weights: a plausible delta)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for target, (fan_in, fan_out) in target_shapes(config).items():
            part = "self_attn" if target in TARGETS[:4] else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * fan_in**-0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    save_file(tensors, directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS), "bias": "none"}))
    return directory


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=parse_range, default=(32, 256))
    p.add_argument("--output-len", type=parse_range, default=(64, 128))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny random model")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load = load_average_warning()
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    if args.quick:
        args.model = tiny_checkpoint(str(tmp / "tiny"))
    dtype = resolve_dtype(args.dtype, args.model)
    model = GemmaForCausalLM.from_pretrained(args.model, dtype=dtype)
    config = model.config
    loras = [LoRARequest(f"adapter-{k}", k + 1, str(write_adapter(tmp / f"a{k}", config, args.rank, k + 1)))
             for k in range(args.adapters)]
    rng = random.Random(args.seed)
    requests = [([rng.randrange(10, config.vocab_size) for _ in range(rng.randint(*args.prompt_len))],
                 rng.randint(*args.output_len)) for _ in range(args.requests)]
    engine_settings = dict(max_num_seqs=args.concurrency, max_model_len=args.prompt_len[1] + args.output_len[1] + 1)
    phases = [
        ("base", EngineConfig(**engine_settings), [None] * len(requests)),
        ("LoRA on, base requests", EngineConfig(**engine_settings, enable_lora=True, max_loras=args.adapters,
                                                max_lora_rank=args.rank), [None] * len(requests)),
        (f"mixed, {args.adapters} adapters", EngineConfig(**engine_settings, enable_lora=True, max_loras=args.adapters,
                                                          max_lora_rank=args.rank),
         [loras[i % len(loras)] for i in range(len(requests))]),
    ]
    rows = []
    for name, config_, adapters in phases:
        if rows:  # each engine hooks the model for its own steps; a fresh copy keeps the phases apart
            model = GemmaForCausalLM.from_pretrained(args.model, dtype=dtype)
        engine = LLMEngine(model, None, config_)
        warm = [(r[0][:16], greedy(4), a) for r, a in zip(requests[: args.concurrency], adapters)]
        closed_loop(engine, warm, args.concurrency)  # first-use costs (kernels, adapter loads) out of the timing
        result, _ = closed_loop(engine, [(p, greedy(n), a) for (p, n), a in zip(requests, adapters)],
                                args.concurrency)
        rows.append({"phase": name, **result})
        log.info("%s: %.1f output tok/s", name, result["output_tok_s"])
    report(args, rows, load)


def report(args: argparse.Namespace, rows: list[dict], load: float) -> None:
    cpu = cpu_name(args.threads) if not torch.cuda.is_available() else torch.cuda.get_device_name()
    base = rows[0]["output_tok_s"]
    print(f"\nMulti-LoRA: {Path(args.model).name} {args.dtype}, concurrency {args.concurrency}, {args.requests} requests "
          f"(prompts {args.prompt_len}, outputs {args.output_len}), {args.adapters} adapters of rank {args.rank}; "
          f"{time.strftime('%Y-%m-%d')}, {cpu}, load {load:.1f}")
    print("| phase | output tok/s | vs base | TTFT p50 | ITL p50 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        r["loss"] = 1 - r["output_tok_s"] / base
        print(f"| {r['phase']} | {r['output_tok_s']:.1f} | {-r['loss']:+.1%} | {fmt(r['ttft_p50_s'], 1e3, '.0f')} ms | "
              f"{fmt(r['itl_p50_s'], 1e3, '.0f')} ms |")
    loss = rows[-1]["loss"]
    print(f"mixed adapters vs base: {loss:.1%} lower throughput (goal <= {LOSS_GOAL:.0%}): "
          f"{'PASS' if loss <= LOSS_GOAL else 'MISS'}")
    out = results_dir(args.out)
    stem = f"lora-{Path(args.model).name}-{args.dtype}"
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "cpu": cpu, "load": load, "date": time.strftime(
        "%Y-%m-%d"), "rows": rows}, indent=2, default=str))
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.barh([r["phase"] for r in rows], [r["output_tok_s"] for r in rows])
        ax.set_xlabel(f"output tok/s at concurrency {args.concurrency}")
        fig.suptitle(f"{Path(args.model).name}: {args.adapters} LoRA adapters (rank {args.rank}) vs base, {cpu}",
                     fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    log.info("results: %s", out / f"{stem}.json")


if __name__ == "__main__":
    main()
