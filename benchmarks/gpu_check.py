"""One short script for a GPU machine (finishes in under 5 minutes on an H100 / H200); CI never needs it.

    python benchmarks/gpu_check.py [--out DIR] [--time-cap 20] [--skip-transformers]   # on CUDA
    python benchmarks/gpu_check.py --device cpu --tiny                                  # the same logic, tiny shapes

On random weights with gemma-2b shapes (`GemmaConfig.from_preset("gemma-2b")`, built directly on the device,
normal(0, 0.02) init; `--tiny` shrinks every width to a few dozen), it checks and measures:
1. bf16 logits against the fp32 model on 4 prompts: max |bf16 - fp32| over max |fp32| (PASS below 5%) and the
   share of positions whose argmax agrees;
2. engine greedy outputs against one-at-a-time `GemmaForCausalLM.generate` for 8 prompts of mixed length:
   token-for-token in fp32, with the decode steps replayed as CUDA graphs and run eagerly (PASS when all
   equal); in bf16 it reports how many tokens agree before the first difference (random weights have near-tied
   logits that bf16 rounding can flip, so this is information);
3. the engine benchmark of benchmarks/engine.py in bf16 at concurrency 1, 16, 64 (closed loop, prompts 32-512,
   outputs 64-256; a level adds no request after --time-cap seconds) with CUDA graphs, and eagerly
   (`enforce_eager`) at 1 and 64, next to our static generate and transformers (same weights, loaded from our
   state dict) one request at a time, transformers' static batch of the c=64 requests, and the
   memory-bandwidth bound.
A stage that raises is reported as failed and the script goes on (one run reports every stage it can).
Prints one report with the device name and writes gpu_check-<device>.json to --out.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine as bench  # benchmarks/engine.py: workload, closed loop, table

from gemma import GemmaConfig, GemmaForCausalLM, SamplingParams
from gemma.engine import EngineConfig, LLMEngine


def build(tiny: bool, device: torch.device) -> GemmaForCausalLM:
    tiny_shapes = {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16}
    overrides = tiny_shapes if tiny else {}
    config = GemmaConfig.from_preset("gemma-2b", **overrides)
    torch.manual_seed(0)
    with torch.device(device):
        return GemmaForCausalLM(config).eval()  # fp32 random init, on the device from the start


def logits_check(ref: GemmaForCausalLM, test: GemmaForCausalLM, prompts: list[list[int]]) -> dict:
    worst, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=ref.device)
            a = ref(input_ids=ids).logits.float()
            b = test(input_ids=ids).logits.float()
            worst = max(worst, ((b - a).abs().max() / a.abs().max()).item())
            agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
            total += a.shape[1]
    return {"max_rel_diff": worst, "argmax_agree": agree / total, "pass": worst < 0.05}


def greedy_check(model: GemmaForCausalLM, prompts: list[list[int]], max_tokens: int, kv: str, eager: bool) -> dict:
    """Engine (all prompts at once) against `generate` one prompt at a time; tokens equal up to the first difference."""
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=len(prompts), kv_cache_memory=kv, enforce_eager=eager))
    graphs = engine.runner.graphs is not None
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = engine.run_to_completion([str(i) for i in range(len(prompts))])
    same, equal = 0, 0
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p], device=model.device), max_new_tokens=max_tokens, eos_token_id=[])
        ref = ref[0, len(p):].tolist()
        got = outs[str(i)].token_ids
        n = next((k for k, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
        same += n
        equal += got == ref
    return {"requests_equal": equal, "requests": len(prompts), "tokens_before_difference": same,
            "tokens": len(prompts) * max_tokens, "cuda_graphs": graphs, "pass": equal == len(prompts)}


def guarded(report: dict, name: str, fn, *args):
    """fn(*args), or None with the error kept in report["errors"] (the run goes on)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 (a failed stage is reported, not fatal)
        traceback.print_exc()
        report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
        return None


def transformers_twin(model: GemmaForCausalLM):
    """transformers' Gemma with our model's exact weights (no disk round trip)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**model.config.to_dict())
    with torch.device(model.device):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def print_report(report: dict, weights: str, cap: float, budget: float) -> None:
    lg = report["logits"]
    ok = {True: "PASS", False: "FAIL"}
    print(f"\ngpu check on {report['device']} ({weights}), {report['seconds']:.0f} s")
    print(f"  [{ok[lg['pass']]}] bf16 vs fp32 logits: max |diff| / max |fp32| = {lg['max_rel_diff']:.2%}, "
          f"argmax agrees at {lg['argmax_agree']:.1%} of positions")
    for key in ("greedy_fp32", "greedy_fp32_eager", "greedy_bf16"):
        g = report.get(key)
        if g is None:
            print(f"  [FAIL] {key}: {report.get('errors', {}).get(key)}")
            continue
        how = "CUDA graphs" if g["cuda_graphs"] else "eager"
        tag = ok[g["pass"]] if "fp32" in key else "info"
        print(f"  [{tag}] engine ({how}) vs generate one at a time, {key.split('_')[1]}: {g['requests_equal']}/"
              f"{g['requests']} requests equal, {g['tokens_before_difference']}/{g['tokens']} tokens before the "
              f"first difference")
    for name, err in report.get("errors", {}).items():
        if not name.startswith("greedy"):
            print(f"  [FAIL] {name}: {err}")
    rows, bandwidth, wbytes = report["rows"], report["read_bandwidth_bytes_s"], report["weight_bytes"]
    engine1 = next((r for r in rows if r["system"].startswith("engine") and r["concurrency"] == 1), None)
    decode = engine1["decode_tok_s"] if engine1 and engine1["decode_tok_s"] else float("nan")
    print(f"  memory-bandwidth bound {bandwidth / 1e9:.0f} GB/s / {wbytes / 1e9:.2f} GB = {bandwidth / wbytes:.0f} "
          f"tok/s; engine single-stream decode {decode:.0f} tok/s ({decode * wbytes / bandwidth:.0%} of it)")
    if report["skipped"]:
        print(f"  skipped to stay within --budget {budget:.0f} s: {', '.join(report['skipped'])}")
    bench.print_table(rows, f"engine benchmark, bf16, time cap {cap:.0f} s per level")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="default: cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU run of the same logic)")
    p.add_argument("--time-cap", type=float, default=None, help="seconds per level (default 20; 5 with --tiny)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--budget", type=float, default=330.0,
                   help="seconds: a benchmark stage that would start later is skipped (a GPU run has a fixed time budget)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    start = time.monotonic()
    device = torch.device(args.device or "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is full fp32
        torch.backends.cudnn.allow_tf32 = False
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu ({torch.get_num_threads()} threads)"
    cap = args.time_cap or (5.0 if args.tiny else 20.0)
    kv = "8MiB" if args.tiny else "4GiB"
    report: dict = {"device": device_name, "tiny": args.tiny, "torch": torch.__version__}

    fp32 = build(args.tiny, device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    vocab = fp32.config.vocab_size
    rng = random.Random(0)
    lengths = [8, 64, 200, 512] if not args.tiny else [8, 32, 64, 128]
    prompts = [[rng.randrange(bench.FIRST_ID, vocab) for _ in range(n)] for n in lengths]
    report["logits"] = logits_check(fp32, bf16, prompts)
    bench.log.info("logits: %s (%.0f s)", report["logits"], time.monotonic() - start)

    prompts = [[rng.randrange(bench.FIRST_ID, vocab) for _ in range(rng.randint(4, 300))] for _ in range(8)]
    max_tokens = 16 if args.tiny else 32
    for key, model, eager in (("greedy_fp32", fp32, False), ("greedy_fp32_eager", fp32, True),
                              ("greedy_bf16", bf16, False)):
        report[key] = guarded(report, key, greedy_check, model, prompts, max_tokens, kv, eager)
        gc.collect()  # the engine's runner and its CUDA graphs refer to each other: free its KV pools now
        bench.log.info("%s: %s (%.0f s)", key, report[key], time.monotonic() - start)
    del fp32, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    levels = [1, 16, 64]
    out_len = (16, 64) if args.tiny else (64, 256)
    sets = {c: bench.make_requests(max(4, 2 * c), vocab, 1000 + c, (32, 512), out_len) for c in levels}
    warm = bench.make_requests(1, vocab, -1, (48, 48), (8, 8))
    rows, skipped = [], []

    def left() -> float:
        return args.budget - (time.monotonic() - start)

    def bench_engine(eager: bool, levels: list[int]) -> None:
        t0 = time.monotonic()
        engine = LLMEngine(bf16, None, EngineConfig(max_num_seqs=64, kv_cache_memory=kv, enforce_eager=eager))
        name = "engine (CUDA graphs)" if engine.runner.graphs is not None else "engine (eager)"
        report.setdefault("engine_start_s", {})[name] = time.monotonic() - t0
        if device.type == "cuda":
            bench.log.info("%s: started in %.1f s, %.1f GB allocated, %.1f GB reserved", name, time.monotonic() - t0,
                           torch.cuda.memory_allocated() / 1e9, torch.cuda.memory_reserved() / 1e9)
        bench.run_engine(engine, warm, 1, desc="warm-up")
        for c in levels:
            if left() < 2 * cap:  # a level runs its cap plus the drain of what is in flight
                skipped.append(f"{name} c={c}")
                continue
            traces, wall, peak, pre = bench.run_engine(engine, sets[c], c, cap, desc=f"{name} c={c}")
            rows.append(bench.summarize(name, c, traces, wall, peak, pre))
            bench.log.info("%s c=%d: %.1f tok/s (%.0f s)", name, c, rows[-1]["output_tok_s"], time.monotonic() - start)
        del engine
        gc.collect()  # the engine's runner and its CUDA graphs refer to each other
        if device.type == "cuda":
            torch.cuda.empty_cache()

    guarded(report, "engine benchmark, CUDA graphs", bench_engine, False, levels)
    guarded(report, "engine benchmark, eager", bench_engine, True, [1, 64])
    single = sets[1][:2]
    bench.run_ours_generate(bf16, warm[0])
    ours = [bench.run_ours_generate(bf16, r) for r in single]
    rows.insert(0, bench.summarize("gemma generate (1 at a time)", 1, ours))
    if not args.skip_transformers and left() < 60:
        skipped.append("transformers")
    elif not args.skip_transformers:
        hf = transformers_twin(bf16)
        bench.run_hf_one(hf, warm[0])
        theirs = [bench.run_hf_one(hf, r) for r in single]
        rows.insert(0, bench.summarize("transformers generate (1 at a time)", 1, theirs))
        traces, wall = bench.run_hf_static(hf, sets[64], batch=64)
        rows.append(bench.summarize("transformers static batch of 64", 64, traces, wall))
        del hf
    bandwidth = bench.read_bandwidth(device, gib=2.0 if device.type == "cuda" else 1.0)
    wbytes = bench.weight_bytes(bf16)
    report.update(rows=rows, skipped=skipped, read_bandwidth_bytes_s=bandwidth, weight_bytes=wbytes,
                  bound_tok_s=bandwidth / wbytes, seconds=time.monotonic() - start)
    print_report(report, f"{'tiny' if args.tiny else 'gemma-2b'}-shaped random weights", cap, args.budget)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"gpu_check-{'tiny-' if args.tiny else ''}{device_name.split(' (')[0].replace(' ', '_')}.json"
    file.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {file}")


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    main()
