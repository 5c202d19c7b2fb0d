"""Peak resident memory while loading a checkpoint, as a multiple of the loaded weights' size.

    python benchmarks/load_memory.py [--layers 8] [--out benchmarks/results]

Writes a ~600 MB fp32 checkpoint, then loads it in fresh processes (ours, and transformers' as the
baseline when it is installed) and prints a table; saves a bar chart when matplotlib is installed.
Each step runs in its own process so that `ru_maxrss` is that load's peak (a child's `ru_maxrss` starts at
its parent's RSS at fork, so the parent never holds a model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, psutil, torch
dtype = getattr(torch, sys.argv[3])
if sys.argv[1] == "gemma":
    from gemma import GemmaForCausalLM
else:
    from transformers import GemmaForCausalLM
with torch.device("meta"):  # torch's one-time lazy init (~80 MB) is not part of loading
    torch.nn.Embedding(2, 2), torch.nn.Linear(2, 2)
rss0 = psutil.Process().memory_info().rss  # after the imports: only the load is measured
t = time.perf_counter()
model = GemmaForCausalLM.from_pretrained(sys.argv[2], dtype=dtype)
seconds = time.perf_counter() - t
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# touch every weight, as the first forward pass would, so memory-mapped pages are counted too
for p in model.parameters():
    p.view(-1)[::256].sum()  # one element per page: resident without any temporary copy
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"weights": weights, "peak_delta": peak - rss0, "load_peak_delta": load_peak - rss0, "seconds": seconds}))
"""


WRITE = r"""
import sys, torch
from gemma import GemmaConfig, GemmaForCausalLM
config = GemmaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=int(sys.argv[2]),
                     num_attention_heads=8, num_key_value_heads=1, head_dim=128)
torch.manual_seed(0)
GemmaForCausalLM(config).save_pretrained(sys.argv[1])
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print("writing checkpoint ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", WRITE, tmp, str(args.layers)], check=True)
        loaders = ["gemma"]
        try:
            import transformers  # noqa: F401

            loaders.append("transformers")
        except ImportError:
            pass
        for loader in loaders:
            for dtype in ("float32", "bfloat16"):
                out = subprocess.run([sys.executable, "-c", CHILD, loader, tmp, dtype], capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append({"loader": loader, "dtype": dtype, **r, "ratio": r["peak_delta"] / r["weights"]})
    print(f"{'loader':<13}{'dtype':<10}{'weights MB':>11}{'peak RSS MB':>13}{'ratio':>8}{'load s':>8}")
    for r in rows:
        print(f"{r['loader']:<13}{r['dtype']:<10}{r['weights'] / 1e6:>11.0f}{r['peak_delta'] / 1e6:>13.0f}"
              f"{r['ratio']:>8.2f}{r['seconds']:>8.2f}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "load_memory.json").write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([f"{r['loader']}\n{r['dtype']}" for r in rows], [r["ratio"] for r in rows])
    ax.axhline(1.3, color="red", linestyle="--", label="target 1.3x")
    ax.set_ylabel("peak RSS / weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "load_memory.png")


if __name__ == "__main__":
    main()
