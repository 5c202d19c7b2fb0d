"""Command line: `python -m gemma generate --model gemma-3-270m --prompt "The capital of France is"`.

Streams the continuation to stdout as it is generated; progress and timings go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import get_args

import torch

from gemma.engine.config import DType, LoadConfig
from gemma.weights import resolve_dtype, resolve_quantization


def generate(args: argparse.Namespace) -> int:
    from gemma.generation import generate_steps
    from gemma.model import GemmaForCausalLM
    from gemma.tokenizer import GemmaTokenizer

    log = logging.getLogger("gemma")
    start = time.perf_counter()
    quantization = resolve_quantization(args.quantization, args.model, args.device, 1)
    log.info("loading %s (%s, quantization %s)", args.model, args.dtype, quantization)
    tokenizer = GemmaTokenizer.from_pretrained(args.model)
    dtype = resolve_dtype(args.dtype, args.model)
    model = GemmaForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device, quantization=quantization)
    if torch.device(args.device).type == "cpu":  # the engine's CPU kernels (gemma.cpu.fastpath), as LLM has them
        from gemma.cpu.fastpath import set_cpu_matmul

        set_cpu_matmul(model)
    log.info("loaded in %.1f s", time.perf_counter() - start)

    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    else:
        ids = tokenizer.encode(args.prompt)
    stop = list(model.config.eos_token_ids)
    if args.chat and tokenizer.end_of_turn_token_id is not None:
        stop.append(tokenizer.end_of_turn_token_id)  # an instruction-tuned model ends its turn, not the text

    if not args.chat:
        sys.stdout.write(args.prompt)
    decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
    steps = generate_steps(
        model, torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, eos_token_id=stop, seed=args.seed,
    )
    count, first, t0 = 0, None, time.perf_counter()
    for next_ids in steps:
        token = int(next_ids[0])
        count += 1
        first = first or time.perf_counter() - t0
        if token in stop:
            break
        sys.stdout.write(decoder.step(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    elapsed = time.perf_counter() - t0
    decode_rate = (count - 1) / (elapsed - first) if count > 1 else float("nan")
    log.info(
        "%d prompt tokens, %d new tokens in %.2f s: first token %.2f s, then %.1f tokens/s",
        len(ids), count, elapsed, first or 0.0, decode_rate,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma", description="Gemma in PyTorch")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a continuation of a prompt")
    load = LoadConfig()  # the library's defaults, as LLM and LLMEngine.from_pretrained take them
    gen.add_argument("--model", default=load.model, help="a named model, an HF checkpoint directory or a .gguf")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=64)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--dtype", choices=get_args(DType), default=load.dtype)
    gen.add_argument("--device", default=load.device, help="default: cuda when available, else cpu")
    gen.add_argument("--quantization", choices=["auto", "gguf", "none"], default=load.quantization,
                     help="auto (default): a .gguf's blocks kept on the CPU; none: every tensor dequantized to --dtype")
    args = parser.parse_args(argv)
    args.quantization = None if args.quantization == "none" else args.quantization
    if args.max_tokens < 1 or args.temperature < 0:
        parser.error("--max-tokens must be >= 1 and --temperature >= 0")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return generate(args)


if __name__ == "__main__":
    sys.exit(main())
