"""Prefix caching and prefix-aware routing on a multi-turn chat workload, in one run.

    python benchmarks/prefix.py [--model gemma-3-270m] [--system-prompts 3] [--conversations 2] [--turns 3]
                                [--system-len 1024,2048] [--user-len 32,96] [--answer-tokens 32] [--threads 2]
                                [--replicas 2] [--skip-serve] [--out benchmarks/results]

Workload (seeded): `--system-prompts` system prompts of random token ids (lengths uniform in --system-len), each
opening `--conversations` conversations of `--turns` turns; a turn appends a user message (--user-len random ids)
to the conversation so far, and the model's greedy answer (--answer-tokens) joins the history. Turn t of every
conversation is sent at once, the next turn when all have answered. Phases, same requests:
1. the engine in this process, `enable_prefix_caching=False`;
2. the same, caching on;
3. the app of serve_config.yaml, sent the prompts of phase 2 again round by round, with `--replicas` model replicas
   (sharing `--threads` CPUs: 1 torch thread each below one CPU) and Serve's default router;
4. the same with the app's prefix router (deployments/prefix_router.py).
Per phase: the share of prompt tokens served from a prefix cache (engine counters, or usage's
`prompt_tokens_details.cached_tokens` over HTTP), TTFT p50 / p99 (engine timestamps, or first streamed token at
the client) and output tokens/s. Targets (reported, never asserted): TTFT p50 of the requests whose cached prefix is
>= 1,024 tokens <= 0.3x the same requests' uncached TTFT; the router's hit rate >= 2x the default router's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import cpu_name, fmt, load_average_warning, log, parse_range, pyplot, results_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deployments.app import AppArgs  # noqa: E402
from gemma.engine import EngineConfig, LLMEngine  # noqa: E402
from gemma.sampling import SamplingParams  # noqa: E402

DEFAULT_ROUTER = {"request_router_class": "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"}
TTFT_RATIO_GOAL = 0.3
ROUTER_HIT_GOAL = 2.0


@dataclass
class Turn:
    conversation: int
    prompt: list[int]
    ttft: float | None = None
    cached: int = 0
    output: list[int] | None = None


def conversations(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """The system prompt of each conversation and its users' messages, per turn."""
    rng = random.Random(args.seed)
    ids = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    systems = [ids(rng.randint(*args.system_len)) for _ in range(args.system_prompts)]
    heads = [systems[i] for i in range(args.system_prompts) for _ in range(args.conversations)]
    users = [[ids(rng.randint(*args.user_len)) for _ in range(args.turns)] for _ in heads]
    return heads, users


def run_turns(heads: list[list[int]], users: list[list[list[int]]], answer, turns: int) -> tuple[list[Turn], float]:
    """Every conversation turn by turn; `answer(turns)` fills each Turn's output, ttft and cached tokens."""
    history = [list(h) for h in heads]
    done, start = [], time.monotonic()
    for t in range(turns):
        batch = [Turn(c, history[c] + users[c][t]) for c in range(len(heads))]
        answer(batch)
        for turn in batch:
            history[turn.conversation] = turn.prompt + turn.output
        done += batch
    return done, time.monotonic() - start


def replay(recorded: list[Turn], conversations: int, answer) -> tuple[list[Turn], float]:
    """The recorded turns' prompts again, round by round (the same histories, whatever this system answers)."""
    done, start = [], time.monotonic()
    for r in range(0, len(recorded), conversations):
        batch = [Turn(t.conversation, t.prompt) for t in recorded[r : r + conversations]]
        answer(batch)
        done += batch
    return done, time.monotonic() - start


def engine_answer(engine: LLMEngine, max_tokens: int):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def answer(batch: list[Turn]) -> None:
        ids = [f"{id(t)}" for t in batch]
        for rid, t in zip(ids, batch):
            engine.add_request(rid, t.prompt, params)
        outs = engine.run_to_completion(ids)
        for rid, t in zip(ids, batch):
            out = outs[rid]
            t.output, t.cached = out.token_ids, out.num_cached_tokens or 0
            t.ttft = out.metrics.first_token_time - out.metrics.arrival_time
    return answer


def http_answer(url: str, model: str, max_tokens: int):
    import httpx

    async def one(client: httpx.AsyncClient, t: Turn) -> None:
        body = {"model": model, "prompt": t.prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        sent = time.monotonic()
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if t.ttft is None and any(c.get("text") for c in event.get("choices") or []):
                    t.ttft = time.monotonic() - sent
                if event.get("usage"):
                    t.cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
                    t.output = [0] * event["usage"]["completion_tokens"]  # counted: the history is replayed

    def answer(batch: list[Turn]) -> None:
        async def all_of() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
                await asyncio.gather(*(one(client, t) for t in batch))
        asyncio.run(all_of())
    return answer


def summary(name: str, turns: list[Turn], wall: float) -> dict:
    prompt = sum(len(t.prompt) for t in turns)
    ttft = sorted(t.ttft for t in turns if t.ttft is not None)
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else None  # noqa: E731
    return {"phase": name, "requests": len(turns), "prompt_tokens": prompt, "hit_rate": sum(t.cached for t in turns) / prompt,
            "ttft_p50_s": q(0.5), "ttft_p99_s": q(0.99), "output_tok_s": sum(len(t.output or []) for t in turns) / wall,
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--system-prompts", type=int, default=3)
    p.add_argument("--conversations", type=int, default=2, help="per system prompt")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--system-len", type=parse_range, default=(1024, 2048))
    p.add_argument("--user-len", type=parse_range, default=(32, 96))
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the engine; Serve: shared by the replicas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=2, help="model replicas of the Serve phases")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging_load = load_average_warning()
    torch.set_num_threads(args.threads)
    config = dict(max_num_seqs=32, kv_cache_memory="1GiB", max_model_len=8192)
    rows, per_phase = [], {}
    for caching in (False, True):
        engine = LLMEngine.from_pretrained(args.model, args.dtype, "cpu", 1, EngineConfig(**config, enable_prefix_caching=caching))
        heads, users = conversations(args, engine.model.config.vocab_size)
        name = f"engine, caching {'on' if caching else 'off'}"
        turns, wall = run_turns(heads, users, engine_answer(engine, args.answer_tokens), args.turns)
        rows.append(summary(name, turns, wall))
        per_phase[name] = turns
        log.info("%s: %.1f s", name, wall)
        del engine
    if not args.skip_serve:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from serve import start_serve, stop_serve

        app_args = AppArgs(model=args.model, dtype=args.dtype, classifier_model=None, **config)
        cpus = args.threads / args.replicas  # Ray sets a replica's torch threads from it (at least 1)
        share = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": 0}, "placement_group_bundles": [{"CPU": cpus}]}
        for router_name, router in (("default router", DEFAULT_ROUTER), ("prefix router", None)):
            name = f"Serve, {args.replicas} replicas, {router_name}"
            options = {"num_replicas": args.replicas, **share, **({"request_router_config": router} if router else {})}
            url = start_serve(app_args, max(1, int(cpus)), model_options=options)
            try:
                recorded = per_phase["engine, caching on"]
                turns, wall = replay(recorded, len(heads), http_answer(url, args.model, args.answer_tokens))
            finally:
                stop_serve()
            rows.append(summary(name, turns, wall))
            per_phase[name] = turns
            log.info("%s: %.1f s", name, wall)
    report(args, rows, per_phase, logging_load)


def report(args: argparse.Namespace, rows: list[dict], per_phase: dict[str, list[Turn]], load: float) -> None:
    cpu = cpu_name(args.threads)
    print(f"\nPrefix caching, multi-turn chat: {args.model} {args.dtype}, {args.system_prompts} system prompts x "
          f"{args.conversations} conversations x {args.turns} turns; {time.strftime('%Y-%m-%d')}, {cpu}, load {load:.1f}")
    print("| phase | requests | prompt tokens | hit rate | TTFT p50 | TTFT p99 | output tok/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['phase']} | {r['requests']} | {r['prompt_tokens']} | {r['hit_rate']:.1%} | "
              f"{fmt(r['ttft_p50_s'], 1e3, '.0f')} ms | {fmt(r['ttft_p99_s'], 1e3, '.0f')} ms | {r['output_tok_s']:.1f} |")
    off, on = per_phase["engine, caching off"], per_phase["engine, caching on"]
    pairs = [(a.ttft, b.ttft) for a, b in zip(off, on) if b.cached >= 1024]
    targets = {}
    if pairs:
        cached_p50 = sorted(b for _, b in pairs)[len(pairs) // 2]
        uncached_p50 = sorted(a for a, _ in pairs)[len(pairs) // 2]
        ratio = cached_p50 / uncached_p50
        targets["ttft_ratio"] = ratio
        print(f"TTFT p50 of the {len(pairs)} requests with >= 1,024 cached tokens: {cached_p50 * 1e3:.0f} ms cached vs "
              f"{uncached_p50 * 1e3:.0f} ms uncached = {ratio:.2f}x (goal <= {TTFT_RATIO_GOAL}x): "
              f"{'PASS' if ratio <= TTFT_RATIO_GOAL else 'MISS'}")
    serve_rows = {r["phase"]: r for r in rows if r["phase"].startswith("Serve")}
    if len(serve_rows) == 2:
        default, ours = (serve_rows[k]["hit_rate"] for k in sorted(serve_rows))
        gain = ours / default if default else float("inf")
        targets["router_hit_gain"] = gain
        print(f"hit rate, prefix router / default router: {ours:.1%} / {default:.1%} = {gain:.2f}x "
              f"(goal >= {ROUTER_HIT_GOAL}x): {'PASS' if gain >= ROUTER_HIT_GOAL else 'MISS'}")
    out = results_dir(args.out)
    stem = f"prefix-{Path(args.model).name}-{args.dtype}" + (f"-{args.replicas}-replicas" if args.replicas != 2 else "")
    (out / f"{stem}.json").write_text(json.dumps({"args": vars(args), "cpu": cpu, "load": load, "date": time.strftime(
        "%Y-%m-%d"), "rows": rows, "targets": targets}, indent=2, default=str))
    plt = pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        names = [r["phase"] for r in rows]
        a.barh(names, [r["hit_rate"] * 100 for r in rows])
        a.set_xlabel("prompt tokens from a prefix cache (%)")
        b.barh(names, [(r["ttft_p50_s"] or 0) * 1e3 for r in rows])
        b.set_xlabel("TTFT p50 (ms)")
        fig.suptitle(f"{args.model}: multi-turn chat, {cpu}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=110)
    log.info("results: %s", out / f"{stem}.json")


if __name__ == "__main__":
    main()
