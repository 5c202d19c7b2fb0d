"""Decode attention over paged KV pools on the CPU: our kernel (gemma/cpu/csrc/attention.cpp) against PyTorch.

    python benchmarks/attention.py [--threads 2] [--rows 1,8,32] [--context 256,1024,4096] [--out benchmarks/results]

Each case is n rows (sequences), one query token each, over `context` keys per row held in pages of 16 slots
taken in random order from one KV pool (as the engine's paged cache holds them), on the 270M's heads (4 query
heads over 1 KV head of 256) and gemma-2b's (8 over 1). Systems, in the same run:
- ours, each variant this CPU runs (AVX-512F, AVX2): the keys and values read in place, fp32 maths;
- PyTorch: each row's keys and values gathered into a padded batch, then `F.scaled_dot_product_attention` in bf16
  with a mask (what the engine's unfused path computes).
Reported: milliseconds per call (median of `--repeats`), the KV bytes read per second, and the speedup over PyTorch.
Also checks that every variant agrees with PyTorch to bf16 rounding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import cpu_name, load_average_warning, log, pyplot, results_dir
from gemma.cpu import kernels

PAGE = 16  # slots per page, the engine's default block size
SHAPES = {"gemma-3-270m": (4, 1, 256), "gemma-2b": (8, 1, 256)}  # query heads, KV heads, head size


def median_ms(f, repeats: int) -> float:
    f()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def case(shape: str, n: int, context: int, repeats: int, isas: list[str], g: torch.Generator) -> dict:
    H, Hkv, D = SHAPES[shape]
    pages = -(-n * context // PAGE) + 4
    k = torch.randn(1, pages * PAGE, Hkv, D, generator=g).to(torch.bfloat16)
    v = torch.randn(1, pages * PAGE, Hkv, D, generator=g).to(torch.bfloat16)
    q = torch.randn(n, H, D, generator=g).to(torch.bfloat16)
    order = torch.randperm(pages, generator=g)[:, None] * PAGE + torch.arange(PAGE)  # pages in random order
    slots = order.flatten()[: n * context].view(n, context)
    allowed = torch.ones(n, context, dtype=torch.bool)
    scale = D**-0.5

    def pytorch() -> torch.Tensor:
        kk = k[0][slots].transpose(1, 2)  # (n, Hkv, S, D)
        vv = v[0][slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=allowed[:, None, None], scale=scale,
                                              enable_gqa=H != Hkv)[:, :, 0]

    want = pytorch().float()
    row = {"shape": shape, "rows": n, "context": context, "kv_mb": 2 * n * context * Hkv * D * 2 / 1e6,
           "pytorch_ms": median_ms(pytorch, repeats)}
    for isa in isas:
        kernels.set_attention_isa(isa)
        got = kernels.decode_attention(q, k, v, slots, allowed, scale).float()
        row[f"{isa}_max_err"] = float((got - want).abs().max())
        row[f"{isa}_ms"] = median_ms(lambda: kernels.decode_attention(q, k, v, slots, allowed, scale), repeats)
    kernels.set_attention_isa("auto")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--context", default="256,1024,4096")
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load = load_average_warning()
    kernels.load()
    isas = (["avx512"] if kernels.set_attention_isa("auto") == "avx512" else []) + ["avx2"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        for n in (int(r) for r in args.rows.split(",")):
            for context in (int(c) for c in args.context.split(",")):
                rows.append(case(shape, n, context, args.repeats, isas, g))
                log.info("%s", rows[-1])
    device = cpu_name(torch.get_num_threads())
    print(f"\ndecode attention, {device}, load average {load:.1f} at the start")
    head = f"{'shape':<14}{'rows':>5}{'context':>8}{'KV MB':>8}{'PyTorch ms':>12}"
    head += "".join(f"{isa + ' ms':>11}{'GB/s':>7}{'speedup':>9}" for isa in isas)
    print(head)
    for r in rows:
        line = f"{r['shape']:<14}{r['rows']:>5}{r['context']:>8}{r['kv_mb']:>8.1f}{r['pytorch_ms']:>12.3f}"
        for isa in isas:
            ms = r[f"{isa}_ms"]
            line += f"{ms:>11.3f}{r['kv_mb'] / ms:>7.1f}{r['pytorch_ms'] / ms:>8.1f}x"
        print(line)
    worst = max(r[f"{isa}_max_err"] for r in rows for isa in isas)
    print(f"largest difference from PyTorch's bf16 attention: {worst:.4f}")
    out = results_dir(args.out)
    (out / "attention.json").write_text(json.dumps({"device": device, "load_average": load, "rows": rows}, indent=1))
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(SHAPES), figsize=(6 * len(SHAPES), 4), squeeze=False)
        for ax, shape in zip(axes[0], SHAPES):
            mine = [r for r in rows if r["shape"] == shape]
            labels = [f"{r['rows']}x{r['context']}" for r in mine]
            for j, system in enumerate(["pytorch"] + isas):
                ax.bar([i + 0.8 * j / (len(isas) + 1) for i in range(len(mine))], [r[f"{system}_ms"] for r in mine],
                       width=0.8 / (len(isas) + 1), label=system)
            ax.set_xticks(range(len(mine)), labels, rotation=45)
            ax.set_yscale("log")
            ax.set_ylabel("ms per call")
            ax.set_title(f"{shape} heads: rows x context")
            ax.legend()
        fig.suptitle(f"decode attention, {device}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "attention.png", dpi=100)
    print(f"\nwrote {out / 'attention.json'}")


if __name__ == "__main__":
    main()
