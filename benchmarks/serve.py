"""What Ray Serve adds: the same streaming workload against the engine in-process and through the HTTP app, in one run.

    python benchmarks/serve.py [--model gemma-3-270m] [--dtype bfloat16] [--concurrency 1,4,16]
                               [--requests-per-level N] [--max-tokens 64,256] [--prompt-len 32,512]
                               [--threads N] [--out benchmarks/results] [--quick]
                               [--device cuda --random-weights gemma-3-270m]   # a GPU node

Two phases, one after the other, so they never compete for the cores:
1. engine direct: an `AsyncLLMEngine` built in this process by `deployments.model.build_engine` from the same
   `AppArgs` the app gets (what a model replica runs), requests through `engine.generate`, torch on --threads;
2. through Serve: the engine is shut down and freed, then Ray starts (num_cpus = max(cores, --threads); with
   deployments/app.py SERVE_ENV, Serve's lower-overhead request path, as cluster/ and `make serve` start Ray) and
   serve_config.yaml's application is deployed as `serve deploy` does (tests/helpers/serve_utils.py), with these args,
   every deployment at num_replicas 1 (no autoscaling during a measurement), and the model replica at
   `ray_actor_options.num_cpus` = --threads (Ray sets OMP_NUM_THREADS = num_cpus in the replica: the same torch
   threads as phase 1) in a bundle of that many CPUs; the ingress and tokenizer keep the shipped num_cpus 0 and
   the shipped logging (access log on). Requests are streaming `POST /v1/completions` over HTTP (httpx, SSE),
   the prompt sent as token ids so no tokenization differs between the phases.

Workload (benchmarks/engine.py's): each concurrency level c has its own requests, seeded by --seed and c:
prompts of uniformly random length in --prompt-len made of random ids in [10, vocab), an output length uniform in
--max-tokens (one number: fixed), greedy with ignore_eos so every request produces exactly that many tokens.
Both phases get the very same requests. Each level is a closed loop: c requests in flight, the next sent as soon
as one finishes, until the level's --requests-per-level (default max(8, 2c)) are done.

Per request: TTFT is the first streamed token (engine) or the first SSE event carrying text (Serve) minus the
send time; ITL is the gap between consecutive streamed chunks (one token each, except where the ingress held
back text that was not yet valid UTF-8: the table's chunk count shows it), pooled over the level. Output tok/s is
all output tokens (Serve: from each stream's usage chunk) over the level's wall time. Targets (reported, never
asserted): Serve adds <= 15 ms to the p50 TTFT at c=1, and loses <= 10% of the output tok/s at c=16.

`--quick` is a smoke run (~1 min): a tiny random Gemma 3 with a word-level tokenizer written to a temporary
directory, max(2, c) requests at level c, 16-32 output tokens; results go to *-quick.json / .png.

`--device cuda` runs the model on the node's GPU in both phases (the replica gets `num_gpus: 1` in a
`{CPU: threads, GPU: 1}` bundle); `--random-weights PRESET` (for a machine without the model's files, such as a
bare GPU node) serves random weights of that preset's shapes (`GemmaConfig.from_preset`) with a word-level
tokenizer of its vocabulary, written to a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import Request, cpu_name, fmt, load_average_warning, log, make_requests, parse_range, results_dir, tiny_checkpoint
from common import pyplot, tiny_tokenizer
from deployments.app import AppArgs, serve_env
from gemma.registry import resolve_checkpoint
from gemma.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("engine direct", "through Serve")
TTFT_ADDED_GOAL_MS = 15.0  # Serve's added p50 TTFT at c=1
THROUGHPUT_LOSS_GOAL = 10.0  # % of output tok/s lost through Serve at c=16


@dataclass
class Stream:
    """One request as its client saw it: send time, arrival of each chunk that carried tokens (monotonic)."""

    sent: float
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    text: str = ""
    error: str | None = None


# ---- phase 1: the engine in this process ---------------------------------------------------------------

async def closed_loop(one, requests: list[Request], concurrency: int, desc: str) -> tuple[list[Stream], float]:
    """`concurrency` workers, each sending its next request as soon as its last one finishes."""
    todo = iter(enumerate(requests))
    streams: list[Stream | None] = [None] * len(requests)
    with tqdm(total=len(requests), desc=desc, unit="req", leave=False, file=sys.stderr) as bar:
        async def worker() -> None:
            for i, r in todo:  # one iterator shared by every worker
                streams[i] = await one(i, r)
                bar.update(1)

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.monotonic() - start
    return streams, wall


def params(r: Request) -> SamplingParams:
    return SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)


async def run_direct(app_args: AppArgs, threads: int, levels: list[int], sets: dict[int, list[Request]],
                     warm: list[Request]) -> tuple[dict[int, tuple[list[Stream], float]], float]:
    """Every level against an in-process AsyncLLMEngine; the engine is shut down and freed before returning."""
    from deployments.model import build_engine

    torch.set_num_threads(threads)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by the engine's own process (engine_process), as in a replica
    t = time.perf_counter()
    try:
        engine = build_engine(app_args.engine_args())
    finally:
        os.environ.pop("OMP_NUM_THREADS") if saved is None else os.environ.update(OMP_NUM_THREADS=saved)
    load_s = time.perf_counter() - t
    log.info("engine direct: loaded in %.1f s, %d torch threads", load_s, threads)

    async def one(rid: str, r: Request) -> Stream:
        s = Stream(time.monotonic())
        try:
            async for out in engine.generate(r.prompt, params(r), rid):
                o = out.outputs[0]
                if o.new_token_ids:
                    s.times.append(time.monotonic())
                    s.tokens += len(o.new_token_ids)
                    s.text += o.new_text or ""
        except Exception as exc:  # noqa: BLE001 - counted and reported as a failed request
            s.error = repr(exc)
        return s

    results = {}
    try:
        await closed_loop(lambda i, r: one(f"warm-{i}", r), warm, 1, "direct warm-up")
        for c in levels:
            results[c] = await closed_loop(lambda i, r, c=c: one(f"c{c}-{i}", r), sets[c], c, f"direct c={c}")
            log.info("engine direct c=%d: %.1f s", c, results[c][1])
    finally:
        await engine.shutdown()
        engine.close()
        engine = None  # the last reference (`one` reads it too): the weights and KV pool go now
        gc.collect()
    return results, load_s


# ---- phase 2: through Ray Serve over HTTP ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_app_config(app_args: AppArgs, threads: int, model_options: dict | None = None) -> tuple[dict, dict]:
    """serve_config.yaml's application with `app_args`, fixed single replicas and the model on `threads` CPUs (then
    `model_options` over the model deployment's); and the file's top-level options (http_options, logging_config)."""
    import yaml

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app = copy.deepcopy(config["applications"][0])
    app["args"] = {**app["args"], **app_args.model_dump()}
    # Serve refuses options for a deployment the app lacks: no classifier_model, no classifier entry
    app["deployments"] = [d for d in app["deployments"] if d["name"] != "classifier" or app_args.classifier_model]
    for dep in app["deployments"]:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
        if dep["name"] == "model":
            gpus = 1 if app_args.device == "cuda" else 0
            dep["ray_actor_options"] = {"num_cpus": threads, "num_gpus": gpus}
            dep["placement_group_bundles"] = [{"CPU": threads, "GPU": gpus} if gpus else {"CPU": threads}]
            dep["max_ongoing_requests"] = app_args.max_num_seqs
            dep.update(model_options or {})
    return app, config


def start_serve(app_args: AppArgs, threads: int, timeout_s: float = 600.0, model_options: dict | None = None) -> str:
    """Start Ray and Serve here and deploy the app (as `serve deploy` does); returns its base URL."""
    import ray
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    app, config = serve_app_config(app_args, threads, model_options)
    t = time.perf_counter()
    # address="local": always a new cluster of our own, never one another process left running on this machine
    with serve_env():  # Serve's request path in every Ray process, as cluster/ and `make serve` start Ray
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, threads), include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={**config.get("http_options", {}), "host": "127.0.0.1",
                                                         "port": port})
    schema = ServeDeploySchema.model_validate({"applications": [app], "logging_config": config.get("logging_config")})
    serve.context._get_global_client().deploy_apps(schema)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == "RUNNING":
            break
        if status is not None and status.status == "DEPLOY_FAILED":
            logs = "/tmp/ray/session_latest/logs/serve/"
            raise RuntimeError(f"the app failed to deploy (logs: {logs}): {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the app was not RUNNING after {timeout_s:.0f} s")
        time.sleep(0.25)
    log.info("Ray + Serve started and the app deployed in %.1f s (model replica: num_cpus %d)",
             time.perf_counter() - t, threads)
    return f"http://127.0.0.1:{port}"


def stop_serve() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()


async def run_http(url: str, model_name: str, levels: list[int], sets: dict[int, list[Request]],
                   warm: list[Request]) -> dict[int, tuple[list[Stream], float]]:
    import httpx

    async def one(client: httpx.AsyncClient, r: Request) -> Stream:
        body = {"model": model_name, "prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        s = Stream(time.monotonic())
        try:
            async with client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    s.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                    return s
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now, data = time.monotonic(), line[6:]
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        s.error = str(event["error"])
                        break
                    text = "".join(c.get("text") or "" for c in event.get("choices") or [])
                    if text:
                        s.times.append(now)
                        s.text += text
                    if event.get("usage"):
                        s.tokens = event["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            s.error = repr(exc)
        if s.error is None and not s.tokens:
            s.error = "no usage chunk in the stream"
        return s

    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        warmed, _ = await closed_loop(lambda i, r: one(client, r), warm, 1, "Serve warm-up")
        if warmed[0].error:
            raise RuntimeError(f"the warm-up request failed: {warmed[0].error}")
        results = {}
        for c in levels:
            results[c] = await closed_loop(lambda i, r: one(client, r), sets[c], c, f"Serve c={c}")
            log.info("through Serve c=%d: %.1f s", c, results[c][1])
    return results


# ---- report ---------------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(system: str, concurrency: int, streams: list[Stream], wall: float) -> dict:
    ok = [s for s in streams if s is not None and s.error is None and s.times]
    errors = [s.error for s in streams if s is not None and s.error is not None]
    ttft = [s.times[0] - s.sent for s in ok]
    gaps = [b - a for s in ok for a, b in zip(s.times, s.times[1:])]
    tokens = sum(s.tokens for s in ok)
    return {
        "system": system, "concurrency": concurrency, "requests": len(ok), "failed": len(streams) - len(ok),
        "errors": errors[:5], "output_tokens": tokens, "chunks": sum(len(s.times) for s in ok), "wall_s": wall,
        "output_tok_s": tokens / wall if wall else None,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99), "itl_mean_s": float(np.mean(gaps)) if gaps else None,
        "ttft_s": ttft,
    }


def compare(c: int, direct: list[Stream], served: list[Stream]) -> dict:
    """Per level: Serve minus direct, on the p50s and paired request by request (the same requests in both)."""
    pairs = [(d, s) for d, s in zip(direct, served) if d and s and d.times and s.times and not d.error and not s.error]
    added = [(s.times[0] - s.sent) - (d.times[0] - d.sent) for d, s in pairs]
    return {
        "concurrency": c, "ttft_added_paired_p50_s": pct(added, 50),
        "identical_text": sum(d.text == s.text for d, s in pairs), "pairs": len(pairs),
    }


def print_table(rows: list[dict], deltas: dict[int, dict], title: str) -> None:
    print(f"\n{title}")
    head = f"{'conc':>5}  {'system':<14}{'reqs':>5}{'fail':>5}{'tokens':>8}{'chunks':>8}{'out tok/s':>10}"
    print(head + f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}")
    print(f"{'':>5}  {'':<14}{'':>5}{'':>5}{'':>8}{'':>8}{'':>10}{'ms':>10}{'ms':>10}{'ms':>9}{'ms':>9}")
    for r in rows:
        print(f"{r['concurrency']:>5}  {r['system']:<14}{r['requests']:>5}{r['failed']:>5}{r['output_tokens']:>8}"
              f"{r['chunks']:>8}{fmt(r['output_tok_s']):>10}{fmt(r['ttft_p50_s'], 1e3):>10}"
              f"{fmt(r['ttft_p99_s'], 1e3):>10}{fmt(r['itl_p50_s'], 1e3):>9}{fmt(r['itl_p99_s'], 1e3):>9}")
        d = deltas.get(r["concurrency"])
        if d and r["system"] == SYSTEMS[1]:
            print(f"{'':>5}  {'Serve - direct':<40}{fmt(d['throughput_change_pct'], 1, '+.1f'):>9}%"
                  f"{fmt(d['ttft_added_p50_s'], 1e3, '+.1f'):>10}{fmt(d['ttft_added_p99_s'], 1e3, '+.1f'):>10}"
                  f"{fmt(d['itl_added_p50_s'], 1e3, '+.1f'):>9}{fmt(d['itl_added_p99_s'], 1e3, '+.1f'):>9}")


def target(name: str, value: float | None, goal: float, unit: str) -> dict:
    """A target that `value` must not exceed."""
    ok = None if value is None else value <= goal
    status = {True: "met", False: "not met", None: "n/a"}[ok]
    print(f"  [{status}] {name}: {fmt(value, 1, '.1f')} {unit} (target <= {goal:g} {unit})")
    return {"target": name, "value": value, "goal": goal, "unit": unit, "met": ok}


def plot(rows: list[dict], file: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(11, 4))
    for system, color in zip(SYSTEMS, ("tab:blue", "tab:orange")):
        sys_rows = [r for r in rows if r["system"] == system]
        cs = [r["concurrency"] for r in sys_rows]
        tput.plot(cs, [r["output_tok_s"] for r in sys_rows], "o-", color=color, label=system)
        for key, style, label in (("ttft_p50_s", "o-", "TTFT p50"), ("ttft_p99_s", "o:", "TTFT p99"),
                                  ("itl_p50_s", "s-", "ITL p50"), ("itl_p99_s", "s:", "ITL p99")):
            lat.plot(cs, [(r[key] or float("nan")) * 1e3 for r in sys_rows], style, color=color,
                     label=f"{system} {label}")
    cs = sorted({r["concurrency"] for r in rows})
    tput.set(xscale="log", xlabel="concurrency", ylabel="output tokens/s", title=title)
    tput.set_ylim(bottom=0)
    lat.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="ms", title="latency")
    for ax in (tput, lat):
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


# ---- the run -------------------------------------------------------------------------------------------

def random_checkpoint(preset: str, directory: str) -> Path:
    """Random bf16 weights of `preset`'s shapes in HF layout, with a word-level tokenizer of its whole vocabulary."""
    from gemma import GemmaConfig, GemmaForCausalLM

    config = GemmaConfig.from_preset(preset)
    torch.manual_seed(0)
    GemmaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    log.info("random %s weights written to %s", preset, directory)
    return Path(tiny_tokenizer(directory, config.vocab_size))


def vocab_size(path: Path) -> int:
    """The model's vocabulary size, from its config (an HF directory's config.json or a .gguf's metadata)."""
    if path.suffix == ".gguf":
        from gemma.gguf_file import open_gguf

        return open_gguf(path).config.vocab_size
    from gemma import GemmaConfig

    return GemmaConfig.from_pretrained(path).vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="a named model, an HF directory or a .gguf")
    p.add_argument("--quick", action="store_true", help="a tiny random model, few short requests: a smoke run")
    p.add_argument("--random-weights", default=None, metavar="PRESET",
                   help="random weights of this preset's shapes (e.g. gemma-3-270m) instead of --model's files")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    p.add_argument("--requests-per-level", type=int, default=None, help="default max(8, 2c) at level c")
    p.add_argument("--max-tokens", type=parse_range, default=(64, 256), help="output tokens: N or min,max")
    p.add_argument("--prompt-len", type=parse_range, default=(32, 512), help="prompt tokens: N or min,max")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads in both phases = the model replica's num_cpus (default: all cores)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default max(32, largest concurrency)")
    p.add_argument("--kv-cache-memory", default=None, help="default 1GiB (16MiB with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.quick:
        args.max_tokens = (16, 32)
    args.kv_cache_memory = args.kv_cache_memory or ("16MiB" if args.quick else "1GiB")

    def per_level(c: int) -> int:
        if args.requests_per_level:
            return args.requests_per_level
        return max(2, c) if args.quick else max(8, 2 * c)

    load = load_average_warning()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path, name = Path(tiny_tokenizer(tiny_checkpoint(tmp))), "tiny"
        elif args.random_weights:
            path, name = random_checkpoint(args.random_weights, tmp), f"{args.random_weights}-random"
        else:
            path = resolve_checkpoint(args.model)
            name = args.model if path != Path(args.model) else path.stem
        vocab = vocab_size(path)
        app_args = AppArgs(
            model=str(path), served_model_name=name, dtype=args.dtype, seed=args.seed,
            max_num_seqs=args.max_num_seqs or max(32, *levels), kv_cache_memory=args.kv_cache_memory,
            max_model_len=2048 if args.quick else 4096, device=args.device,
            classifier_model=None,  # generation is what is measured: no second copy of the model beside it
        )
        sets = {c: make_requests(per_level(c), vocab, args.seed * 1000 + c, args.prompt_len, args.max_tokens)
                for c in levels}
        warm = make_requests(2, vocab, -1, (48, 48), (8, 8))
        log.info("%s, %s: %d levels, %d requests, %d output tokens per phase", name, args.dtype, len(levels),
                 sum(len(s) for s in sets.values()), sum(r.max_tokens for s in sets.values() for r in s))

        direct, load_s = asyncio.run(run_direct(app_args, args.threads, levels, sets, warm))
        url = start_serve(app_args, args.threads)
        try:
            served = asyncio.run(run_http(url, name, levels, sets, warm))
        finally:
            stop_serve()
    report(args, name, levels, direct, served, load, load_s)


def report(args: argparse.Namespace, name: str, levels: list[int], direct: dict, served: dict, load: float,
           load_s: float) -> None:
    import ray

    rows, deltas = [], {}
    for c in levels:
        d, s = summarize(SYSTEMS[0], c, *direct[c]), summarize(SYSTEMS[1], c, *served[c])
        rows += [d, s]

        def diff(key: str, d: dict = d, s: dict = s) -> float | None:
            return s[key] - d[key] if s[key] is not None and d[key] is not None else None

        change = (s["output_tok_s"] / d["output_tok_s"] - 1) * 100 if s["output_tok_s"] and d["output_tok_s"] else None
        deltas[c] = {**compare(c, direct[c][0], served[c][0]), "throughput_change_pct": change,
                     **{f"{k.replace('_p', '_added_p', 1)}": diff(k)
                        for k in ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")}}
    device = cpu_name(args.threads)
    if args.device == "cuda":
        device = f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores"
    print_table(rows, deltas, f"Serve benchmark: {name}, {args.dtype}, {device}; closed loop, "
                              f"prompts {args.prompt_len[0]}-{args.prompt_len[1]}, "
                              f"outputs {args.max_tokens[0]}-{args.max_tokens[1]} tokens")
    for c, d in deltas.items():
        print(f"  c={c}: Serve's added TTFT paired by request, p50 {fmt(d['ttft_added_paired_p50_s'], 1e3, '+.1f')} ms;"
              f" greedy text identical in {d['identical_text']}/{d['pairs']} requests")
    one, sixteen = deltas.get(1), deltas.get(16)
    print("\ntargets:")
    added = one["ttft_added_p50_s"] * 1e3 if one and one["ttft_added_p50_s"] is not None else None
    loss = -sixteen["throughput_change_pct"] if sixteen and sixteen["throughput_change_pct"] is not None else None
    targets = [
        target("Serve's added TTFT p50 at c=1", added, TTFT_ADDED_GOAL_MS, "ms"),
        target("Serve's output tok/s loss at c=16", loss, THROUGHPUT_LOSS_GOAL, "%"),
    ]
    out = results_dir(args.out)
    stem = f"serve-{name}-{args.dtype}" + ("-quick" if args.quick else "")
    if args.device == "cuda":
        stem += "-" + torch.cuda.get_device_name().replace(" ", "_")
    result = {
        "model": name, "dtype": args.dtype, "device": device, "torch": torch.__version__, "ray": ray.__version__,
        "args": vars(args), "load_average_at_start": load, "engine_load_s": load_s,
        "rows": rows, "deltas": list(deltas.values()), "targets": targets,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(rows, out / f"{stem}.png", f"{name} {args.dtype}: engine direct vs through Serve")
    print(f"\nwrote {out / stem}.json and .png")


if __name__ == "__main__":
    main()
