"""What the benchmarks share: the mixed-length workload, the tiny random model of `--quick`, formatting.

Imported by benchmarks/engine.py and benchmarks/serve.py (run as scripts, so `from common import ...`).
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma import GemmaConfig, GemmaForCausalLM, GemmaTokenizer

log = logging.getLogger("bench")
FIRST_ID = 10  # prompt ids are drawn from [FIRST_ID, vocab): Gemma's special ids (pad, eos, bos, ...) are below


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int


def make_requests(
    n: int, vocab: int, seed: int, prompt_len: tuple[int, int], output_len: tuple[int, int]
) -> list[Request]:
    """`n` requests: prompts of uniformly random length in `prompt_len` made of random ids in [FIRST_ID, vocab),
    output lengths uniform in `output_len` (both inclusive); the same `seed` gives the same requests."""
    rng = random.Random(seed)
    return [Request([rng.randrange(FIRST_ID, vocab) for _ in range(rng.randint(*prompt_len))], rng.randint(*output_len))
            for _ in range(n)]


def parse_range(text: str) -> tuple[int, int]:
    """"MIN,MAX" (or one number N, meaning N,N) as an inclusive range."""
    parts = [int(x) for x in text.split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1]:
        raise ValueError(f"expected N or MIN,MAX with 0 < MIN <= MAX, got {text!r}")
    return parts[0], parts[1]


def tiny_checkpoint(directory: str, vocab: int = 4096) -> str:
    """A random Gemma 3 (5 sliding layers and a global one), written in HF layout so both libraries load it."""
    config = GemmaConfig(model_type="gemma3_text", vocab_size=vocab, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                         sliding_window=128, max_position_embeddings=2048)
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(directory)
    return directory


def tiny_tokenizer(directory: str, vocab: int = 4096) -> str:
    """A word-level tokenizer of exactly `vocab` ids with Gemma's special tokens (pad 0, eos 1, bos 2, unk 3, ...),
    written as tokenizer.json + tokenizer_config.json, for code that loads a model's tokenizer (the engine's
    `from_pretrained`, the Serve app). Every other id is a plain ASCII word, so each token decodes to text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    words = {t: i for i, t in enumerate(specials)} | {f"▁w{i}": i for i in range(len(specials), vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    GemmaTokenizer(tok).save_pretrained(directory)
    return directory


def cpu_name(threads: int) -> str:
    """The CPU in words for a results table: model, cores, torch threads, vector ISA (the figures depend on
    whether bf16 matmuls are native: see gemma.parallel)."""
    model = "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (f"{model} ({os.cpu_count()} cores, {threads} threads, {torch.backends.cpu.get_cpu_capability()}, "
            f"{'native' if native else 'no native'} bf16)")


def load_average_warning() -> float:
    """The 1-minute load average, with a warning when other processes already use the CPU."""
    load = os.getloadavg()[0]
    if load > 0.5:
        log.warning("load average %.1f before the run: other processes share the CPU and will skew timings", load)
    return load


def fmt(v: float | None, scale: float = 1.0, spec: str = ".1f") -> str:
    return "-" if v is None else format(v * scale, spec)


def results_dir(out: str) -> Path:
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a warning) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).warning("matplotlib is not installed: no plot")
        return None
    return plt


def closed_loop(engine, jobs: list[tuple[list[int], object, object]], concurrency: int) -> tuple[dict, list]:
    """Run (prompt ids, SamplingParams, lora_request or None) jobs on an in-process `LLMEngine`, keeping
    `concurrency` in flight (a new one as one finishes). Returns output tok/s, wall time, tokens and TTFT / ITL
    p50 from the engine's timestamps, and the final outputs in job order."""
    pending, running, outs = list(enumerate(jobs)), set(), {}
    start = time.monotonic()
    while pending or running:
        while pending and len(running) < concurrency:
            i, (prompt, params, lora) = pending.pop(0)
            engine.add_request(str(i), prompt, params, lora_request=lora)
            running.add(str(i))
        for out in engine.step():
            if out.finished:
                running.discard(out.request_id)
                outs[out.request_id] = out
    wall = time.monotonic() - start
    ordered = [outs[str(i)] for i in range(len(jobs))]
    tokens = sum(len(o.outputs[0].token_ids) for o in ordered)
    ttft = sorted(o.metrics.first_token_time - o.metrics.arrival_time for o in ordered)
    itl = sorted((o.metrics.last_token_time - o.metrics.first_token_time) / max(1, len(o.outputs[0].token_ids) - 1)
                 for o in ordered)
    stats = {"output_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens, "ttft_p50_s": ttft[len(ttft) // 2],
             "itl_p50_s": itl[len(itl) // 2]}
    return stats, ordered
