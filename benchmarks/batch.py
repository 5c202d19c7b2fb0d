"""A batch job on Ray Data against the same prompts sent to the HTTP server, in one run: rows/s and tokens/s.

    python benchmarks/batch.py [--model gemma-3-270m] [--dtype bfloat16] [--prompts 200] [--prompt-len 32,256]
                               [--max-tokens 32,128] [--threads N] [--http-concurrency 32] [--max-num-seqs 32]
                               [--out benchmarks/results] [--quick]

Two phases, one after the other, so they never compete for the cores:
1. batch: Ray starts (num_cpus = --threads + 2: the engine actor takes --threads, which Ray turns into its torch
   threads, and the light tokenize / detokenize actors fit beside it), the prompts are written as a JSONL file
   and `deployments.batch.run_batch` runs them through one engine actor (`concurrency` 1, rows per engine call
   = --batch-size) into a JSONL file. Its wall time covers the whole job; "after start-up" divides by the time
   from the engine actor having loaded its model to the end (`BatchSummary.startup_s`).
2. HTTP: Ray is shut down, then started again with Serve and serve_config.yaml's application deployed
   (benchmarks/serve.py's `start_serve`: `deployments.app:build_app`, single replicas, the model replica on
   --threads CPUs); the same prompts go as non-streaming `POST /v1/completions`, at most --http-concurrency in
   flight (httpx). Its wall time runs from the first request to the last answer; the deploy time is the
   start-up column.

Workload: --prompts prompts of uniformly random length in --prompt-len, made of random token ids in [10, vocab)
(benchmarks/common.py) decoded to text (both phases send that same text, so both tokenize it), each with its own
output length in --max-tokens (a per-row `sampling_params` override in the batch file, `max_tokens` over HTTP),
greedy with ignore_eos so every row produces exactly that many tokens. The greedy texts of the two phases are
compared and the count of identical ones reported (not asserted: bf16 numerics can differ with batch makeup).

`--quick` is a smoke run: a tiny random Gemma 3 with a word-level tokenizer in a temporary directory, 24 prompts
of 8-16 output tokens; results go to *-quick.json / .png. The full run (the real 270M, 200 prompts) takes several
minutes per phase on 2 cores: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    cpu_name,
    fmt,
    load_average_warning,
    log,
    make_requests,
    parse_range,
    pyplot,
    results_dir,
    tiny_checkpoint,
    tiny_tokenizer,
)
from serve import start_serve, stop_serve, vocab_size
from tqdm import tqdm

from deployments.app import AppArgs
from gemma.registry import resolve_checkpoint
from gemma.tokenizer import GemmaTokenizer

SYSTEMS = ("batch job (Ray Data)", "HTTP server (Serve)")


def run_batch_phase(app_args: AppArgs, prompts: list[dict], threads: int, batch_size: int, tmp: Path) -> dict:
    import ray

    from deployments.batch import BatchArgs, run_batch
    from deployments.model import ServingEngineConfig

    source, output = tmp / "prompts.jsonl", tmp / "out.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    ray.init(address="local", num_cpus=threads + 2, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False)
    try:
        summary = run_batch(BatchArgs(
            input=str(source), output=str(output), num_cpus=threads, batch_size=batch_size,
            sampling_params={"temperature": 0, "ignore_eos": True},
            **app_args.model_dump(include=set(ServingEngineConfig.model_fields)),  # the HTTP phase's engine
        ))
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    busy = summary.elapsed_s - (summary.startup_s or 0.0)
    return {
        "system": SYSTEMS[0], "rows": summary.rows, "errors": summary.errors, "output_tokens": summary.completion_tokens,
        "wall_s": summary.elapsed_s, "startup_s": summary.startup_s,
        "rows_per_s": summary.rows / summary.elapsed_s, "output_tok_s": summary.completion_tokens / summary.elapsed_s,
        "rows_per_s_after_startup": summary.rows / busy if busy > 0 else None,
        "output_tok_s_after_startup": summary.completion_tokens / busy if busy > 0 else None,
        "texts": {r["id"]: r["generated_text"] for r in rows}, "summary": summary.model_dump(),
    }


async def send_all(url: str, name: str, prompts: list[dict], concurrency: int) -> tuple[dict, list[str], float]:
    """Every prompt as one non-streaming completion, at most `concurrency` in flight; texts by id, errors, wall."""
    import httpx

    texts, errors, tokens = {}, [], 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(900.0), limits=limits) as client:
        with tqdm(total=len(prompts), desc="HTTP", unit="req", file=sys.stderr) as bar:
            async def one(p: dict) -> None:
                nonlocal tokens
                body = {"model": name, "prompt": p["prompt"], "max_tokens": p["sampling_params"]["max_tokens"],
                        "temperature": 0, "ignore_eos": True}
                async with gate:
                    try:
                        r = await client.post("/v1/completions", json=body)
                    except httpx.HTTPError as exc:
                        errors.append(repr(exc))
                        return
                    finally:
                        bar.update(1)
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    return
                answer = r.json()
                texts[p["id"]] = answer["choices"][0]["text"]
                tokens += answer["usage"]["completion_tokens"]

            start = time.monotonic()
            await asyncio.gather(*(one(p) for p in prompts))
            wall = time.monotonic() - start
    return {"texts": texts, "output_tokens": tokens}, errors, wall


def run_http_phase(app_args: AppArgs, prompts: list[dict], threads: int, concurrency: int) -> dict:
    t = time.perf_counter()
    url = start_serve(app_args, threads)
    deploy_s = time.perf_counter() - t
    try:
        got, errors, wall = asyncio.run(send_all(url, app_args.served_model_name, prompts, concurrency))
    finally:
        stop_serve()
    done = len(got["texts"])
    return {
        "system": SYSTEMS[1], "rows": done, "errors": len(errors), "output_tokens": got["output_tokens"],
        "wall_s": wall, "startup_s": deploy_s, "rows_per_s": done / wall, "output_tok_s": got["output_tokens"] / wall,
        "rows_per_s_after_startup": done / wall, "output_tok_s_after_startup": got["output_tokens"] / wall,
        "texts": got["texts"], "error_samples": errors[:5],
    }


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'system':<22}{'rows':>6}{'errors':>7}{'out tokens':>11}{'wall s':>8}{'start-up s':>11}{'rows/s':>8}"
          f"{'out tok/s':>10}{'rows/s*':>9}{'out tok/s*':>11}")
    for r in rows:
        print(f"{r['system']:<22}{r['rows']:>6}{r['errors']:>7}{r['output_tokens']:>11}{fmt(r['wall_s']):>8}"
              f"{fmt(r['startup_s']):>11}{fmt(r['rows_per_s'], 1, '.2f'):>8}{fmt(r['output_tok_s']):>10}"
              f"{fmt(r['rows_per_s_after_startup'], 1, '.2f'):>9}{fmt(r['output_tok_s_after_startup']):>11}")
    print("  wall: batch = the whole job (actor start, model load, read, write); HTTP = first request to last answer"
          " (the app deployed before).\n  *: after start-up (batch: from its engine having loaded the model).")


def plot(rows: list[dict], file: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in zip(axes, ("output_tok_s", "rows_per_s"), ("output tokens/s", "rows/s")):
        names = [r["system"] for r in rows]
        whole = [r[key] for r in rows]
        after = [r[f"{key}_after_startup"] or 0 for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], whole, 0.4, label="wall (batch: incl. start-up)")
        ax.bar([x + 0.2 for x in xs], after, 0.4, label="after start-up")
        ax.set_xticks(list(xs), names)
        ax.set(ylabel=label, title=title if ax is axes[0] else label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="a named model, an HF directory or a .gguf")
    p.add_argument("--quick", action="store_true", help="a tiny random model, few short prompts: a smoke run")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompts", type=int, default=None, help="default 200 (24 with --quick)")
    p.add_argument("--prompt-len", type=parse_range, default=(32, 256), help="prompt tokens: N or min,max")
    p.add_argument("--max-tokens", type=parse_range, default=None, help="output tokens: N or min,max (32,128)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the engine's CPUs = torch threads, both phases")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences the engine runs at once, both phases")
    p.add_argument("--batch-size", type=int, default=None, help="rows per engine call (default: all prompts)")
    p.add_argument("--http-concurrency", type=int, default=None, help="requests in flight (default --max-num-seqs)")
    p.add_argument("--kv-cache-memory", default=None, help="default 1GiB (16MiB with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    args.prompts = args.prompts or (24 if args.quick else 200)
    args.max_tokens = args.max_tokens or ((8, 16) if args.quick else (32, 128))
    args.kv_cache_memory = args.kv_cache_memory or ("16MiB" if args.quick else "1GiB")
    args.http_concurrency = args.http_concurrency or args.max_num_seqs

    load = load_average_warning()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path, name = Path(tiny_tokenizer(tiny_checkpoint(tmp))), "tiny"
        else:
            path = resolve_checkpoint(args.model)
            name = args.model if path != Path(args.model) else path.stem
        app_args = AppArgs(model=str(path), served_model_name=name, dtype=args.dtype, seed=args.seed,
                           max_num_seqs=args.max_num_seqs, kv_cache_memory=args.kv_cache_memory,
                           max_model_len=2048 if args.quick else 4096,
                           classifier_model=None)  # generation is measured: no classifier replica beside it
        tok = GemmaTokenizer.from_pretrained(path)
        requests = make_requests(args.prompts, vocab_size(path), args.seed, args.prompt_len, args.max_tokens)
        prompts = [{"id": i, "prompt": tok.decode(r.prompt, skip_special_tokens=True),
                    "sampling_params": {"max_tokens": r.max_tokens}} for i, r in enumerate(requests)]
        log.info("%s, %s: %d prompts, %d output tokens per phase", name, args.dtype, len(prompts),
                 sum(r.max_tokens for r in requests))
        batch = run_batch_phase(app_args, prompts, args.threads, args.batch_size or len(prompts), Path(tmp))
        http = run_http_phase(app_args, prompts, args.threads, args.http_concurrency)
    report(args, name, [batch, http], load)


def report(args: argparse.Namespace, name: str, rows: list[dict], load: float) -> None:
    import ray

    batch, http = rows
    same = sum(batch["texts"].get(i) == t for i, t in http["texts"].items())
    device = cpu_name(args.threads)
    print_table(rows, f"Batch benchmark: {name}, {args.dtype}, {device}; {args.prompts} prompts of "
                      f"{args.prompt_len[0]}-{args.prompt_len[1]} tokens, outputs {args.max_tokens[0]}-"
                      f"{args.max_tokens[1]} tokens, engine max_num_seqs {args.max_num_seqs}, "
                      f"HTTP concurrency {args.http_concurrency}")
    ratio = batch["output_tok_s"] / http["output_tok_s"] if http["output_tok_s"] else None
    print(f"  batch / HTTP output tok/s: {fmt(ratio, 1, '.2f')}x (wall), "
          f"{fmt(batch['output_tok_s_after_startup'] / http['output_tok_s'], 1, '.2f')}x (after start-up); "
          f"greedy text identical in {same}/{len(http['texts'])} prompts")
    out = results_dir(args.out)
    stem = f"batch-{name}-{args.dtype}" + ("-quick" if args.quick else "")
    result = {
        "model": name, "dtype": args.dtype, "device": device, "torch": torch.__version__, "ray": ray.__version__,
        "args": vars(args), "load_average_at_start": load, "identical_text": same,
        "rows": [{k: v for k, v in r.items() if k != "texts"} for r in rows],
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / f"{stem}.png", f"{name} {args.dtype}")
    print(f"\nwrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
