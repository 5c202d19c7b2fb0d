"""Accuracy of a GGUF kept quantized (gemma.cpu.quant) against the same file dequantized to fp32.

    python benchmarks/gguf_quality.py [--model gemma-3-270m] [--tokens 32] [--threads 2] [--out benchmarks/results]

The fp32 model (every tensor dequantized, `quantization=None`) is the reference. The quantized model (bf16
activations, the engine's default) runs twice: with every product integer (x quantized per 16 values, what decode
steps compute) and with every product dequantized (what long prefills and big batches compute). For each:
- NLL of tests/data/gemma3_270m_reference.json's paragraph against the reference's;
- greedy agreement: along the fp32 model's greedy continuations (`--tokens` each) of 15 prompts (12 slices of the
  paragraph and the reference file's 3 prompts), the share of positions whose argmax equals the fp32 model's.
Targets (reported, never asserted): NLL within 0.5%, agreement >= 95%.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from common import cpu_name, log, results_dir

REFERENCE = Path(__file__).parents[1] / "tests" / "data" / "gemma3_270m_reference.json"
PATHS = {"integer products": str(2**62), "dequantized products": "1"}  # GEMMA_CPU_DENSE_ROWS


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="a named model or a .gguf")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from gemma import GemmaForCausalLM, GemmaTokenizer
    from gemma.cpu import quant
    from gemma.cpu.fastpath import set_cpu_matmul

    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    text = ref["paragraph"]
    tok = GemmaTokenizer.from_pretrained(args.model)
    prompts = [tok.encode(text[i : i + 60]) for i in range(0, len(text) - 60, 97)][:12]
    prompts += [case["prompt_ids"] for case in ref["greedy_20"]]
    f = GemmaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ids = torch.tensor([tok.encode(text)])
    nll_f = f(ids, labels=ids).loss.item()
    log.info("fp32 reference: paragraph NLL %.4f over %d tokens; %d prompts", nll_f, ids.shape[1], len(prompts))
    runs = []
    for prompt in prompts:
        seq = f.generate(torch.tensor([prompt]), max_new_tokens=args.tokens)
        n = len(prompt)
        runs.append((seq, n, f(seq).logits[0, n - 1 : -1].argmax(-1)))
    rows = []
    for label, dense_rows in PATHS.items():
        os.environ["GEMMA_CPU_DENSE_ROWS"] = dense_rows
        q = GemmaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, quantization="gguf")
        set_cpu_matmul(q, "kernel")
        nll = q(ids, labels=ids).loss.item()
        same = sum(int((q(seq).logits[0, n - 1 : -1].argmax(-1) == want).sum()) for seq, n, want in runs)
        total = sum(want.numel() for _, _, want in runs)
        rows.append({"path": label, "nll": nll, "nll_vs_fp32": (nll - nll_f) / nll_f, "agreement": same / total,
                     "tokens": total})
    os.environ.pop("GEMMA_CPU_DENSE_ROWS")
    device = cpu_name(torch.get_num_threads())
    print(f"\nGGUF kept quantized vs dequantized to fp32: {args.model}, {device}, GGUF kernels {quant.isa()}")
    print(f"{'products':<22}{'NLL':>8}{'vs fp32':>9}{'greedy agreement':>22}")
    for r in rows:
        print(f"{r['path']:<22}{r['nll']:>8.4f}{100 * r['nll_vs_fp32']:>+8.2f}%"
              f"{100 * r['agreement']:>11.1f}% of {r['tokens']}")
    print(f"{'fp32 reference':<22}{nll_f:>8.4f}")
    print("\ntargets:")
    for r in rows:
        ok = abs(r["nll_vs_fp32"]) <= 0.005 and r["agreement"] >= 0.95
        print(f"  [{'PASS' if ok else 'MISS'}] {r['path']}: NLL within 0.5% and agreement >= 95%")
    out = results_dir(args.out) / f"gguf_quality-{Path(str(args.model)).stem}.json"
    out.write_text(json.dumps({"model": args.model, "device": device, "isa": quant.isa(), "nll_fp32": nll_f,
                               "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
