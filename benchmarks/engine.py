"""Engine throughput and latency against transformers' `generate` on the same weights and dtype, in one run.

    python benchmarks/engine.py [--model gemma-3-270m | --tiny] [--dtype bfloat16] [--concurrency 1,4,16,32,64]
                                [--requests-per-level N] [--output-len 64,256] [--skip-transformers]
                                [--out benchmarks/results] [--quick] [--time-cap S] [--threads N]
                                [--quantization auto|gguf|none] [--skip-llama-cpp]

`--quick` is a smoke run in seconds: the tiny random model (`--tiny`: a 6-layer Gemma 3 of width 64 written
in HF layout to a temporary directory), one request per slot and outputs of 16-64 tokens. The full run on the
real Gemma 3 270M takes ~15 minutes on 2 CPU cores; run it on an otherwise idle machine (the load average
at the start is printed and saved: two OpenMP threads sharing their cores with another process slow down
many times over).

Workload: every concurrency level c gets its own fixed set of requests (seeded by --seed and c, so levels
never share a prompt prefix and prefix caching plays no part): prompts of uniformly random length in
--prompt-len (32-512) made of uniformly random token ids in [10, vocab) (ids below 10 are Gemma's special
tokens), and an output length uniform in --output-len (64-256), greedy with ignore_eos so every request
produces exactly its output length. Level c is a closed loop: c requests in flight, the next one added as
soon as one finishes, until the set is done (default c + c // 2 requests, at least 4). Output tok/s is all output
tokens over the level's wall time (ramp-down included); TTFT is first token minus `add_request`; ITL is the
gap between a request's consecutive tokens, pooled over all requests; peak KV is the max of
`engine.kv.usage` after each step. Everything is timed with the engine's own `step()` loop (with the model's
tokenizer, so the engine detokenizes as it does when serving). Single-stream decode tok/s excludes the first
token: (tokens - 1) / (last token - first token), summed over the c=1 requests.

Baselines, same run, same weights and dtype: transformers loads our model's weights as loaded, saved in HF
layout to a temporary directory (dense tensors, same values and dtype). `--hf-weights gguf` has transformers
load the .gguf itself instead: transformers 5.24 then keeps the Q4_K blocks packed and runs ggml kernels in
float32 whatever the dtype (a different computation, reading fewer weight bytes).
- transformers `generate` one request at a time over the c=1 requests (single-stream tok/s, TTFT, ITL);
- our `GemmaForCausalLM` static generate one request at a time over the same requests (reference row);
- "transformers 1-at-a-time" at c=32, an estimate: running the c=32 requests one after another would take
  sum_i (prefill_i + (out_i - 1) * ITL), prefill_i measured per request (`max_new_tokens=1`) and ITL the
  mean gap of the single-stream runs; its tok/s is sum_i out_i over that time;
- transformers static batched `generate` over the same c=32 requests, in batches of 32 (left padding,
  max_new_tokens = the batch's longest output), counting only each request's own out_i tokens as output;
  its TTFT counts from its batch's start.
- llama.cpp (`llama-cpp-python`, the `bench` extra), for a .gguf model: the same file and the same thread count,
  greedy (top_k=1) over the same token ids, one request at a time over the c=1 requests (its `Llama` object holds
  one sequence: the Python API offers no batched decoding of several requests to drive at c > 1).
Our model is loaded with `--quantization` ("auto", the engine's default: a .gguf's blocks kept on the CPU,
gemma.cpu.quant; "gguf" likewise, or an error where it cannot; "none": dequantized to --dtype); transformers always
gets dense weights (the GGUF dequantized to --dtype).
Memory-bandwidth bound: the fastest of five timed sums and five dot products x . x over a 1 GiB tensor (each reads
it once; the dot, a plain BLAS stream, read ~5-10% faster than ATen's sum on an Intel Xeon) gives read bandwidth;
one decode step reads every parameter once (the tied embedding / LM head once), so bound = bandwidth / weight bytes.
Targets are reported PASS/MISS, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import FIRST_ID  # noqa: F401 - re-exported: benchmarks/gpu_check.py reads bench.FIRST_ID
from common import Request, cpu_name, load_average_warning, log, make_requests, parse_range, pyplot, tiny_checkpoint
from common import fmt as _fmt
from gemma import GemmaForCausalLM, GemmaTokenizer, SamplingParams
from gemma.engine import EngineConfig, LLMEngine
from gemma.generation import generate_steps
from gemma.registry import resolve_checkpoint
from gemma.weights import DTYPES, resolve_quantization


@dataclass
class Trace:
    """One request as a client saw it: when it was sent and when each output token arrived (monotonic)."""

    sent: float
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- systems under test ----------------------------------------------------------------------------------

def run_engine(engine: LLMEngine, requests: list[Request], concurrency: int, time_cap: float | None = None,
               desc: str = "") -> tuple[list[Trace], float, float, int]:
    """Closed loop at `concurrency`; returns traces, wall seconds, peak KV usage, preemptions.

    With `time_cap`, no request is added after that many seconds (those in flight finish)."""
    traces: dict[str, Trace] = {}
    queue = list(enumerate(requests))[::-1]
    peak, preemptions = engine.kv.usage, 0
    start = time.monotonic()

    def add() -> None:
        i, r = queue.pop()
        rid = f"{desc}-{i}"
        traces[rid] = Trace(time.monotonic())
        engine.add_request(rid, r.prompt, SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True))

    while queue and len(traces) < concurrency:
        add()
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False, file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.monotonic()
            peak = max(peak, engine.kv.usage)
            for out in outs:
                new = out.outputs[0].new_token_ids
                traces[out.request_id].times += [now] * len(new)
                traces[out.request_id].tokens += new
                if out.finished:
                    preemptions += out.metrics.num_preemptions
                    bar.update(1)
                    if queue and (time_cap is None or now - start < time_cap):
                        add()
    return list(traces.values()), time.monotonic() - start, peak, preemptions


def run_ours_generate(model: GemmaForCausalLM, r: Request) -> Trace:
    """Our static `generate` on one request, timed per token through `generate_steps` (what `generate` runs)."""
    trace = Trace(time.monotonic())
    ids = torch.tensor([r.prompt], device=model.device)
    for step in generate_steps(model, ids, max_new_tokens=r.max_tokens, eos_token_id=[]):
        trace.tokens.append(step.tolist()[0])  # .tolist() waits for the device
        trace.times.append(time.monotonic())
    return trace


class _StepTimes:
    """A transformers streamer that records when each generated step arrives (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.tokens: list[list[int]] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        ids = value.reshape(-1).tolist()  # waits for the device
        if self._prompt_seen:
            self.times.append(time.monotonic())
            self.tokens.append(ids)
        self._prompt_seen = True

    def end(self) -> None:
        pass


def run_hf(hf, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, _StepTimes]:
    """transformers `generate` on left-padded prompts (greedy, no eos); returns its start time and step times."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    # eos must not stop a row: a None in the passed config falls back to the model's own generation_config
    hf.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    streamer = _StepTimes()
    start = time.monotonic()
    hf.generate(ids, attention_mask=mask, generation_config=config, streamer=streamer)
    if len(streamer.times) != max_new_tokens:
        raise RuntimeError(f"transformers generated {len(streamer.times)} steps, not {max_new_tokens}")
    return start, streamer


def run_hf_one(hf, r: Request) -> Trace:
    start, s = run_hf(hf, [r.prompt], r.max_tokens)
    return Trace(start, s.times, [t[0] for t in s.tokens])


def run_hf_static(hf, requests: list[Request], batch: int = 32) -> tuple[list[Trace], float]:
    """Static batches of `batch` requests; a request's trace keeps only its own max_tokens steps."""
    traces, wall = [], 0.0
    for b in tqdm(range(0, len(requests), batch), desc="transformers static", leave=False, file=sys.stderr):
        chunk = requests[b : b + batch]
        start, s = run_hf(hf, [r.prompt for r in chunk], max(r.max_tokens for r in chunk))
        # batches run back to back: times are relative to the first batch's start
        traces += [Trace(wall, [wall + t - start for t in s.times[: r.max_tokens]]) for r in chunk]
        wall += s.times[-1] - start
    return traces, wall


# ---- measurements --------------------------------------------------------------------------------------

def read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of the fastest of `repeats` full reads of a `gib` GiB float32 tensor by a sum and by a dot product
    with itself (one read each: the second operand is the same memory), whichever streams faster here."""
    x = torch.ones(int(gib * 2**30) // 4, device=device)
    best = float("inf")
    for read in (lambda: x.sum(), lambda: torch.dot(x, x)):
        for _ in range(repeats + 1):  # the first is a warm-up
            sync(device)
            t = time.perf_counter()
            read().item()
            best = min(best, time.perf_counter() - t)
    del x
    return gib * 2**30 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and of any weights kept in GGUF blocks (buffers), a tied tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def run_llama_cpp(path: Path, requests: list[Request], warm: Request, threads: int) -> list[Trace]:
    """llama.cpp on the same GGUF through llama-cpp-python, one request at a time, greedy, timed per token."""
    import llama_cpp
    import llama_cpp.llama
    from llama_cpp import Llama

    if _cpu_has("amx_tile"):
        # llama.cpp's extra buffer types (weights repacked for AMX) crash llama_decode with SIGSEGV on AMX CPUs
        # (llama-cpp-python 0.3.36, Intel Xeon, 2026-12-05): load without them, as plain ggml CPU buffers
        default_params = llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
        log.info("llama.cpp: AMX CPU, loading without extra buffer types (use_extra_bufts=False)")
    longest = max(len(r.prompt) + r.max_tokens for r in [*requests, warm])
    llm = Llama(model_path=str(path), n_ctx=longest + 8, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)

    def one(r: Request) -> Trace:
        trace = Trace(time.monotonic())
        for token in llm.generate(r.prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            trace.tokens.append(int(token))
            trace.times.append(time.monotonic())
            if len(trace.tokens) == r.max_tokens:
                break
        return trace

    one(warm)
    return [one(r) for r in tqdm(requests, desc="llama.cpp", leave=False, file=sys.stderr)]


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


def summarize(system: str, concurrency: int, traces: list[Trace], wall: float | None = None,
              peak_kv: float | None = None, preemptions: int | None = None) -> dict:
    """One table row; `wall` defaults to the sum of the requests' own times (one at a time, back to back)."""
    traces = [t for t in traces if t.times]
    if wall is None:
        wall = sum(t.times[-1] - t.sent for t in traces)
    gaps = [b - a for t in traces for a, b in zip(t.times, t.times[1:])]
    ttft = [t.times[0] - t.sent for t in traces]
    decode_time = sum(t.times[-1] - t.times[0] for t in traces)
    tokens = sum(len(t.times) for t in traces)
    return {
        "system": system, "concurrency": concurrency, "requests": len(traces), "output_tokens": tokens,
        "wall_s": wall, "output_tok_s": tokens / wall if wall else None,
        "decode_tok_s": (tokens - len(traces)) / decode_time if decode_time else None,
        "ttft_p50_s": float(np.percentile(ttft, 50)) if ttft else None,
        "itl_p50_s": float(np.percentile(gaps, 50)) if gaps else None,
        "itl_p99_s": float(np.percentile(gaps, 99)) if gaps else None,
        "itl_mean_s": float(np.mean(gaps)) if gaps else None,
        "peak_kv_usage": peak_kv, "preemptions": preemptions,
    }


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'system':<34}{'conc':>5}{'reqs':>6}{'out tok/s':>11}{'TTFT p50':>10}{'ITL p50':>9}{'ITL p99':>9}"
          f"{'peak KV':>9}{'preempt':>8}")
    print(f"{'':<34}{'':>5}{'':>6}{'':>11}{'ms':>10}{'ms':>9}{'ms':>9}{'%':>9}")
    for r in rows:
        print(f"{r['system']:<34}{r['concurrency']:>5}{r['requests']:>6}{_fmt(r['output_tok_s']):>11}"
              f"{_fmt(r['ttft_p50_s'], 1e3):>10}{_fmt(r['itl_p50_s'], 1e3):>9}{_fmt(r['itl_p99_s'], 1e3):>9}"
              f"{_fmt(r['peak_kv_usage'], 100):>9}{_fmt(r['preemptions'], 1, 'd'):>8}")


def target(name: str, value: float | None, goal: float | None, unit: str = "x") -> dict:
    ok = None if value is None or goal is None else value >= goal
    status = {True: "PASS", False: "MISS", None: "n/a "}[ok]
    print(f"  [{status}] {name}: {_fmt(value, 1, '.2f')}{unit} (target >= {_fmt(goal, 1, '.2f')}{unit})")
    return {"target": name, "value": value, "goal": goal, "pass": ok}


# ---- the run -------------------------------------------------------------------------------------------

def load_hf(path: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    log.info("transformers loaded in %.1f s", time.perf_counter() - t)
    return hf.to(device).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="a named model, an HF directory or a .gguf")
    p.add_argument("--tiny", action="store_true", help="a tiny random Gemma 3 instead of --model")
    p.add_argument("--quick", action="store_true", help="--tiny with few, short requests: a smoke run in seconds")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--concurrency", default="1,4,16,32,64")
    p.add_argument("--requests-per-level", type=int, default=None, help="default: max(4, c + c // 2) at level c")
    p.add_argument("--prompt-len", type=parse_range, default=(32, 512), help="min,max prompt tokens")
    p.add_argument("--output-len", type=parse_range, default=(64, 256), help="min,max output tokens")
    p.add_argument("--time-cap", type=float, default=None, help="seconds after which a level adds no request")
    p.add_argument("--kv-cache-memory", default=None, help="engine KV pool; default 1GiB (8MiB with --tiny)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-llama-cpp", action="store_true", help="no llama.cpp row (it runs only for a .gguf)")
    p.add_argument("--quantization", choices=("auto", "gguf", "none"), default="auto",
                   help="our model: a .gguf's blocks kept on the CPU (auto, the engine's default; gguf) or dequantized "
                        "(none)")
    p.add_argument("--hf-weights", choices=("dense", "gguf"), default="dense",
                   help="transformers' weights for a .gguf model: ours saved in HF layout (dense, same dtype), or "
                        "transformers' own GGUF loader (keeps Q4_K blocks packed, computes in float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    if args.quick:
        args.tiny = True
        args.requests_per_level = args.requests_per_level or 0  # 0: one request per slot, see per_level
        args.output_len = (16, 64)
    args.kv_cache_memory = args.kv_cache_memory or ("8MiB" if args.tiny else "1GiB")
    levels = [int(c) for c in args.concurrency.split(",")]
    dtype = DTYPES[args.dtype]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def per_level(c: int) -> int:
        if args.requests_per_level is None:
            return max(4, c + c // 2)
        return args.requests_per_level or max(2, c)

    if args.threads:
        torch.set_num_threads(args.threads)
    load = load_average_warning()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tiny_checkpoint(tmp)) if args.tiny else resolve_checkpoint(args.model)
        name = "tiny" if args.tiny else (args.model if path != Path(args.model) else path.stem)
        t = time.perf_counter()
        quantization = resolve_quantization(None if args.quantization == "none" else args.quantization, path,
                                            str(device), 1)
        model = GemmaForCausalLM.from_pretrained(path, dtype=dtype, device=device, quantization=quantization)
        args.quantization = quantization or "none"
        tokenizer = None if args.tiny else GemmaTokenizer.from_pretrained(path)  # the engine detokenizes as it serves
        log.info("%s (%s, %s) loaded in %.1f s", name, args.dtype, device, time.perf_counter() - t)
        vocab = model.config.vocab_size
        sets = {c: make_requests(per_level(c), vocab, args.seed * 1000 + c, args.prompt_len, args.output_len)
                for c in sorted(set(levels) | {1})}
        warm = make_requests(1, vocab, -1, (48, 48), (8, 8))
        bandwidth, wbytes = read_bandwidth(device), weight_bytes(model)
        log.info("read bandwidth %.1f GB/s, weights %.0f MB: bound %.1f tok/s", bandwidth / 1e9, wbytes / 1e6,
                 bandwidth / wbytes)
        rows, traces = run_ours(args, model, tokenizer, levels, sets, warm)
        checks = {"engine c=1 vs gemma generate": agreement(traces["engine"], traces["gemma"])}
        hf_rows = []
        if path.suffix == ".gguf" and not args.skip_llama_cpp:
            traces["llama.cpp"] = run_llama_cpp(path, sets[1], warm[0], torch.get_num_threads())
            rows.append(summarize("llama.cpp (1 at a time)", 1, traces["llama.cpp"]))
            log.info("llama.cpp one at a time: %.1f decode tok/s", rows[-1]["decode_tok_s"])
            checks["llama.cpp vs gemma generate"] = agreement(traces["llama.cpp"], traces["gemma"])
        if not args.skip_transformers:
            hf_path = path
            if path.suffix == ".gguf" and args.hf_weights == "dense":
                hf_path = Path(tmp) / "dense"
                if quantization is not None:  # transformers gets the blocks dequantized to --dtype
                    del model
                    gc.collect()
                    model = GemmaForCausalLM.from_pretrained(path, dtype=dtype, device=device)
                model.save_pretrained(hf_path)  # our weights as loaded: the same values in the same dtype
            del model
            gc.collect()
            hf_rows, traces["transformers"] = run_transformers(load_hf(hf_path, dtype, device), levels, sets, warm)
            checks["transformers vs gemma generate"] = agreement(traces["transformers"], traces["gemma"])
    rows = hf_rows[:1] + rows + hf_rows[1:]
    report(args, name, device, rows, checks, bandwidth, wbytes, load)


def run_ours(args: argparse.Namespace, model: GemmaForCausalLM, tokenizer: GemmaTokenizer | None, levels: list[int],
             sets: dict[int, list[Request]], warm: list[Request]) -> tuple[list[dict], dict[str, list[Trace]]]:
    """The engine at every level, then our static generate one request at a time over the c=1 requests."""
    engine = LLMEngine(model, tokenizer, EngineConfig(
        max_num_seqs=max(levels), kv_cache_memory=args.kv_cache_memory,
        max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed,
    ))
    run_engine(engine, warm, 1, desc="warm-up")
    rows, traces = [], {"engine": []}
    for c in levels:
        level, wall, peak, pre = run_engine(engine, sets[c], c, args.time_cap, desc=f"engine c={c}")
        rows.append(summarize("engine", c, level, wall, peak, pre))
        log.info("engine c=%d: %.1f output tok/s over %.1f s", c, rows[-1]["output_tok_s"], wall)
        if c == 1:
            traces["engine"] = level
    del engine
    gc.collect()
    run_ours_generate(model, warm[0])
    progress = tqdm(sets[1], desc="gemma generate", leave=False, file=sys.stderr)
    traces["gemma"] = [run_ours_generate(model, r) for r in progress]
    rows.insert(0, summarize("gemma generate (1 at a time)", 1, traces["gemma"]))
    return rows, traces


def run_transformers(
    hf, levels: list[int], sets: dict[int, list[Request]], warm: list[Request]
) -> tuple[list[dict], list[Trace]]:
    """One at a time over the c=1 requests; over the c=32 ones, the one-at-a-time estimate and static batches."""
    run_hf_one(hf, warm[0])
    single = [run_hf_one(hf, r) for r in tqdm(sets[1], desc="transformers", leave=False, file=sys.stderr)]
    rows = [summarize("transformers generate (1 at a time)", 1, single)]
    log.info("transformers one at a time: %.1f decode tok/s", rows[0]["decode_tok_s"])
    if 32 in levels:
        reqs = sets[32]
        progress = tqdm(reqs, desc="transformers prefills", leave=False, file=sys.stderr)
        prefill = [run_hf_one(hf, Request(r.prompt, 1)) for r in progress]  # TTFT alone: max_new_tokens=1
        itl = rows[0]["itl_mean_s"]
        seconds = sum(t.times[0] - t.sent + (r.max_tokens - 1) * itl for t, r in zip(prefill, reqs))
        tokens = sum(r.max_tokens for r in reqs)
        rows.append({**summarize("transformers 1 at a time (estimate)", 32, []), "requests": len(reqs),
                     "output_tokens": tokens, "wall_s": seconds, "output_tok_s": tokens / seconds})
        static, wall = run_hf_static(hf, reqs)
        rows.append(summarize("transformers static batch of 32", 32, static, wall))
        log.info("transformers static batches: %.1f useful output tok/s", rows[-1]["output_tok_s"])
    return rows, single


def agreement(a: list[Trace], b: list[Trace]) -> dict:
    """How far two runs of the same greedy requests agree: identical requests, tokens before the first difference."""
    same = [next((k for k, (x, y) in enumerate(zip(s.tokens, t.tokens)) if x != y), min(len(s.tokens), len(t.tokens)))
            for s, t in zip(a, b)]
    return {"identical": sum(s.tokens == t.tokens for s, t in zip(a, b)), "requests": len(same),
            "tokens_before_difference": sum(same), "tokens": sum(len(t.tokens) for t in b[: len(same)])}


def report(args: argparse.Namespace, name: str, device: torch.device, rows: list[dict], checks: dict[str, dict],
           bandwidth: float, wbytes: int, load: float) -> None:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_name(torch.get_num_threads())
    bound = bandwidth / wbytes
    print_table(rows, f"engine benchmark: {name}, {args.dtype}, quantization {args.quantization}, {device_name}")

    def row(system: str, c: int) -> dict | None:
        return next((r for r in rows if r["system"].startswith(system) and r["concurrency"] == c), None)

    engine1, hf1, ours1 = row("engine", 1), row("transformers generate", 1), row("gemma generate", 1)
    llama1 = row("llama.cpp", 1)
    print("\nsingle stream, decode tok/s (TTFT p50):")
    for label, r in (("engine", engine1), ("gemma generate", ours1), ("transformers generate", hf1),
                     ("llama.cpp", llama1)):
        if r:
            print(f"  {label:<24}{_fmt(r['decode_tok_s']):>8} tok/s  ({_fmt(r['ttft_p50_s'], 1e3)} ms)")
    share = engine1["decode_tok_s"] / bound if engine1 else None
    print(f"  memory-bandwidth bound  {bound:>8.1f} tok/s  = {bandwidth / 1e9:.1f} GB/s read / {wbytes / 1e6:.0f} MB "
          f"of weights per token; engine at {_fmt(share, 100, '.0f')}% of it")
    for label, a in checks.items():
        print(f"  greedy tokens, {label}: {a['identical']}/{a['requests']} requests identical, "
              f"{a['tokens_before_difference']}/{a['tokens']} tokens before the first difference")

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b and a[key] and b[key] else None

    e32, hf_one32, hf_static32 = row("engine", 32), row("transformers 1 at a time", 32), row("transformers static", 32)
    print("\ntargets:")
    targets = [
        target("single-stream decode vs transformers generate", ratio(engine1, hf1, "decode_tok_s"), 2.0),
        target("single-stream decode vs memory-bandwidth bound", share and share * 100, 75.0, "%"),
        target("c=32 output tok/s vs transformers 1 at a time", ratio(e32, hf_one32, "output_tok_s"), 8.0),
        target("c=32 output tok/s vs transformers static batch", ratio(e32, hf_static32, "output_tok_s"), 2.0),
    ]
    if llama1:
        targets.append(target("single-stream decode vs llama.cpp", ratio(engine1, llama1, "decode_tok_s"), 1.2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine-{name}-{args.dtype}" + ("-hf-gguf" if args.hf_weights == "gguf" and not args.tiny else "")
    stem += "-gguf-blocks" if args.quantization == "gguf" else ""
    meta = {
        "model": name, "dtype": args.dtype, "device": device_name, "torch": torch.__version__,
        "args": vars(args), "read_bandwidth_bytes_s": bandwidth,
        "weight_bytes": wbytes, "bandwidth_bound_tok_s": bound, "load_average_at_start": load,
    }
    result = {**meta, "rows": rows, "checks": checks, "targets": targets}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, bound, out / f"{stem}.png", f"{name} {args.dtype} on {device_name}")
    print(f"\nwrote {out / stem}.json and .png")


def plot(rows: list[dict], bound: float, file: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4))
    eng = [r for r in rows if r["system"] == "engine"]
    cs = [r["concurrency"] for r in eng]
    ax.plot(cs, [r["output_tok_s"] for r in eng], "o-", label="engine (closed loop)")
    for r, style in ((next((r for r in rows if r["system"].startswith("transformers generate")), None), "--"),
                     (next((r for r in rows if r["system"].startswith("gemma generate")), None), ":")):
        if r:
            ax.axhline(r["output_tok_s"], linestyle=style, color="gray", label=r["system"])
    for r in rows:
        if r["system"].startswith("transformers") and r["concurrency"] > 1:
            ax.plot([r["concurrency"]], [r["output_tok_s"]], "s", label=r["system"])
    ax.axhline(bound, color="red", linewidth=0.8, label="1-stream bandwidth bound")
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s", title=title)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.legend(fontsize=7)
    for key, label in (("ttft_p50_s", "TTFT p50"), ("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99")):
        lat.plot(cs, [r[key] * 1e3 for r in eng], "o-", label=f"engine {label}")
    lat.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="engine latency")
    lat.set_xticks(cs, [str(c) for c in cs])
    lat.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
