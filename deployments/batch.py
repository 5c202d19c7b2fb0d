"""Offline batch inference on Ray Data: rows in, the same rows out with their generations (or labels).

    python -m deployments.batch --model gemma-3-270m --input prompts.jsonl --output out.jsonl \\
        [--task generate|chat|classify] [--concurrency N | MIN,MAX] [--tp-size N] [--batch-size N] \\
        [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] [--stop STR ...] \\
        [--response-format json_object | --json-schema schema.json]
    ray job submit --working-dir . -- python -m deployments.batch ...   # on a cluster (ray.init() reads RAY_ADDRESS)

    from deployments.batch import BatchArgs, run_batch
    summary = run_batch(BatchArgs(model="gemma-3-270m", input="in.parquet", output="out.parquet"))

Input: JSONL (.jsonl or .json, one object per line), Parquet or CSV (format from the extension, or
`input_format`): a file, a directory or a glob, on any filesystem Ray Data reads (a local path must be one every
node sees: one machine, or NFS). A row carries `prompt` (generate), `messages` (chat: OpenAI-style `{role,
content}` list, rendered with the chat template) or `text` (classify); any other columns (`id`, ...) are carried
through. Per-row sampling overrides live in one optional column, `sampling_params`: an object with
`SamplingParams` fields (a JSON string in CSV) that overrides the job's defaults field by field. `n` must be 1
and `logprobs` unset. Structured outputs: `structured_outputs` (json, regex, choice, grammar) or OpenAI's
`response_format` there, or `--json-schema FILE` / `--response-format` for every row; a row whose constraint does
not compile gets its `error` (a bad job default fails the job at once). An optional `lora` column runs a row with a LoRA adapter: a name of the job's `lora_modules`
(`--lora NAME=PATH`, repeatable) or an adapter directory (with `--enable-lora`); empty cells run the base model.

Output: every input column, then `generated_text`, `prompt_tokens`, `completion_tokens`, `finish_reason`, `error`
(classify: `label`, `probs`, `prompt_tokens`, `error`); `error` is null on rows that went well. Rows in == rows
out, in input order (unless `preserve_order=False`): a bad row (no prompt, prompt too long for max_model_len,
invalid overrides, bad messages, wrong types) gets its `error` and the job goes on. An output path with an
extension (.jsonl, .json, .parquet, .csv) is one file, written once every row is done; a path without one is a
directory that Ray Data writes file by file as rows finish (`output_format`, default jsonl) - the choice for big
jobs. CSV output holds lists and objects as JSON strings.

Stages (deployments/batch_stages.py): read -> tokenize (CPU actor pool) -> generate (an actor pool of engines,
`concurrency` = N or (MIN, MAX) to autoscale; each actor one tensor-parallel group) -> detokenize (CPU actor
pool) -> write. Ray Data streams blocks between them, so every stage works at once, and shows its progress bars.
`run_batch` returns (and logs) a `BatchSummary`: rows, errors, tokens, tokens/s, elapsed and start-up time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import uuid
import warnings
from typing import Any, Literal

import ray
from pydantic import BaseModel, Field, model_validator
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import BlockAccessor
from ray.data.datasource import BlockBasedFileDatasink
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deployments.batch_stages import (
    ClassifyStage,
    DetokenizeStage,
    GenerateStage,
    Task,
    TokenizeStage,
    finish_batch,
    jsonable,
)
from deployments.model import ServingEngineConfig

logger = logging.getLogger(__name__)

Format = Literal["jsonl", "parquet", "csv"]
EXTENSIONS: dict[str, Format] = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".csv": "csv"}
# What the light parts of a job reserve, so that a job fits on a 2-CPU machine beside an engine of 1 CPU: the tokenize
# and detokenize actors (each), and every read, finish and write task. Ray Data's default (1 CPU a task) left a read
# task waiting forever for a CPU the actors held ("Active & requested resources: 3/2 CPU").
CPU_STAGE_CPUS = 0.25
IO_TASK_CPUS = 0.25
IO_ARGS = {"ray_remote_args": {"num_cpus": IO_TASK_CPUS}}


class BatchArgs(ServingEngineConfig):
    """A batch job: where rows come from and go, the model and its engine, the pools, the sampling defaults.

    The model and engine settings (model, dtype, device, tp_size, max_num_seqs, max_model_len, kv_cache_memory, ...)
    are `ServingEngineConfig`'s fields, declared once in gemma.engine; `model` is a classifier HF directory for
    `task="classify"`, `tp_size` the ranks of each engine actor (one placement-group bundle each, on one node), and
    `seed` that of the engine's generator (rows without a sampling seed). Rows longer than max_model_len get an error.
    """

    input: str  # file, directory or glob; local or any filesystem Ray Data supports (s3://, gs://, ...)
    output: str  # a file (with an extension) or a directory (without one)
    task: Task = "generate"
    input_format: Format | None = None  # default: from the input's extension
    output_format: Format | None = None  # default: from the output's extension, else jsonl
    tokenizer: str | None = None  # default: `model`
    num_cpus: float = Field(1.0, gt=0)  # per rank; on CPU also its torch threads (Ray sets OMP_NUM_THREADS)
    concurrency: int | tuple[int, int] = 1  # engine actors: N, or (MIN, MAX) for an autoscaling pool
    cpu_concurrency: int | tuple[int, int] = 1  # tokenize and detokenize actors, each
    batch_size: int = Field(128, ge=1)  # rows per engine call; above max_num_seqs so the engine stays full
    sampling_params: dict[str, Any] = {}  # defaults for every row (SamplingParams fields, and OpenAI's
    #                                       response_format); rows override them
    classifier_batch_size: int = Field(16, ge=1)  # rows per classifier forward
    return_token_ids: bool = False  # add `completion_token_ids` to generate/chat output
    preserve_order: bool = True  # rows out in input order (else as they finish: a little faster)

    @model_validator(mode="after")
    def _check(self) -> BatchArgs:
        for name in ("concurrency", "cpu_concurrency"):
            value = getattr(self, name)
            low, high = (value, value) if isinstance(value, int) else value
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be N >= 1 or (MIN, MAX) with 1 <= MIN <= MAX, got {value}")
        if self.input_format is None and _extension_format(self.input) is None:
            raise ValueError(f"cannot tell the format of {self.input!r} from its name: give input_format (--input-format)")
        from deployments.batch_stages import with_response_format
        from gemma.sampling import SamplingParams
        from gemma.structured import check_grammar

        # a bad default fails the job now, not every row
        self.sampling_params = with_response_format(self.sampling_params)
        params = SamplingParams.model_validate(self.sampling_params)
        if params.structured_outputs is not None:
            check_grammar(params.structured_outputs)
        return self


class BatchSummary(BaseModel):
    output: str
    rows: int  # rows written
    rows_in: int  # rows read
    errors: int  # rows with an `error`
    prompt_tokens: int  # of the rows without an error
    completion_tokens: int
    elapsed_s: float  # the whole job: actors starting, models loading, reading, writing
    startup_s: float | None  # until the first model actor had loaded its model
    rows_per_s: float
    tokens_per_s: float  # completion tokens per second


@ray.remote(num_cpus=0)
class _Tally:
    """Counts what the stages saw; read once at the end (Ray Data's writers return nothing to count with)."""

    def __init__(self) -> None:
        self.counts = {"rows_in": 0, "rows": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.first_ready: float | None = None  # time.time() when the first model actor was ready

    def ready(self, when: float) -> None:
        self.first_ready = when if self.first_ready is None else min(self.first_ready, when)

    def add(self, **counts: int) -> None:
        for key, value in counts.items():
            self.counts[key] += int(value)

    def totals(self) -> tuple[dict[str, int], float | None]:
        return self.counts, self.first_ready


class _TPPlacement:
    """`ray_remote_args_fn` of the engine pool when tp_size > 1: each new engine actor gets a placement group of
    its own (tp_size bundles, STRICT_PACK: the ranks all-reduce after every layer, so one node) and runs in
    bundle 0 as rank 0; RayActorLauncher then starts ranks 1..N-1 in bundles 1..N-1 of that group. One group per
    actor, not one for the pool, because Ray Data's static remote args would put every actor in the same one.
    Ray Data calls this in the driver, so the groups are ours to remove when the job ends (an actor that an
    autoscaling pool retires leaves its group reserved until then)."""

    def __init__(self, bundle: dict[str, float], tp_size: int) -> None:
        self.bundles, self.groups = [dict(bundle) for _ in range(tp_size)], []

    def __call__(self) -> dict[str, Any]:
        pg = placement_group(self.bundles, strategy="STRICT_PACK")
        self.groups.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)}

    def remove(self) -> None:
        for pg in self.groups:
            remove_placement_group(pg)
        self.groups.clear()


def _pool(concurrency: int | tuple[int, int]) -> ActorPoolStrategy:
    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency)
    return ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])


def _extension_format(path: str) -> Format | None:
    name = path.rstrip("/").lower()
    return next((fmt for ext, fmt in EXTENSIONS.items() if name.endswith(ext)), None)


def _ray_path(path: str) -> str:
    """Absolute, so every worker reads the same path whatever its working directory. A local path must be one
    that every node sees (one machine, or NFS): Ray Data reads and writes it from whichever node runs the task."""
    return path if "://" in path else os.path.abspath(path)


def read_rows(args: BatchArgs) -> Dataset:
    fmt = args.input_format or _extension_format(args.input)
    path = _ray_path(args.input)
    if fmt == "jsonl":
        # lines=True reads through pandas, which keeps a column whose rows disagree on its type (a prompt that
        # is a number): such a row then gets an error instead of failing the whole read
        return ray.data.read_json(path, lines=True, **IO_ARGS)
    return ray.data.read_parquet(path, **IO_ARGS) if fmt == "parquet" else ray.data.read_csv(path, **IO_ARGS)


def build_dataset(args: BatchArgs, tally: Any = None, placement: _TPPlacement | None = None) -> Dataset:
    """The lazy pipeline from the input rows to the output rows (nothing runs until it is consumed)."""
    ds = read_rows(args)
    ds.context.execution_options.preserve_order = args.preserve_order  # this dataset's own copy of the context
    tokenizer = args.tokenizer or args.model
    defaults = dict(args.sampling_params)
    cpu = {"batch_format": "pandas", "batch_size": args.batch_size, "num_cpus": CPU_STAGE_CPUS,
               "compute": _pool(args.cpu_concurrency)}
    ds = ds.map_batches(TokenizeStage, fn_constructor_args=(tokenizer, args.task, defaults, tally), **cpu)
    gpus = 1 if args.device == "cuda" else 0
    if args.task == "classify":
        ds = ds.map_batches(
            ClassifyStage,
            fn_constructor_args=(args.model, args.dtype, args.device, args.classifier_batch_size, tally),
            batch_format="pandas", batch_size=args.batch_size, num_cpus=args.num_cpus, num_gpus=gpus,
            compute=_pool(args.concurrency),
        )
    else:
        remote_args_fn = placement if args.tp_size > 1 else None
        engine = args.model_dump(include=set(ServingEngineConfig.model_fields))
        with warnings.catch_warnings():
            # ray_remote_args_fn is deprecated in Ray 2.60 with no replacement yet for a placement group per actor;
            # Ray's own LLM batch processor (ray.llm) places its TP engines the same way
            warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
            ds = ds.map_batches(
                GenerateStage, fn_constructor_args=(engine, tally),
                batch_format="pandas", batch_size=args.batch_size, num_cpus=args.num_cpus, num_gpus=gpus,
                compute=_pool(args.concurrency), ray_remote_args_fn=remote_args_fn,
            )
        ds = ds.map_batches(DetokenizeStage, fn_constructor_args=(tokenizer,), **cpu)
    return ds.map_batches(
        finish_batch, batch_format="pandas", num_cpus=IO_TASK_CPUS,
        fn_kwargs={"task": args.task, "output_format": _output_format(args), "tally": tally,
                   "return_token_ids": args.return_token_ids},
    )


def _output_format(args: BatchArgs) -> Format:
    return args.output_format or _extension_format(args.output) or "jsonl"


class JSONLinesDatasink(BlockBasedFileDatasink):
    """One JSON object per row, written with the `json` module: unlike `write_json` (pandas' `to_json`), it takes
    a column whose rows hold different types (Ray Data keeps those as pickled objects; pandas 3.1 crashes on them)."""

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, file_format="jsonl", **kwargs)

    def write_block_to_file(self, block: BlockAccessor, file: Any) -> None:
        lines = (json.dumps(jsonable(row), ensure_ascii=False, default=str) + "\n" for row in block.to_pandas().to_dict("records"))
        file.write("".join(lines).encode())


def write_rows(ds: Dataset, args: BatchArgs) -> None:
    fmt = _output_format(args)
    write = {
        "jsonl": lambda path, **kw: ds.write_datasink(JSONLinesDatasink(path, **kw), **IO_ARGS),
        "parquet": lambda path, **kw: ds.write_parquet(path, **kw, **IO_ARGS),
        "csv": lambda path, **kw: ds.write_csv(path, **kw, **IO_ARGS),
    }[fmt]
    if _extension_format(args.output) is None:
        write(_ray_path(args.output))
        return
    # One file: Ray Data writes a directory, so write one file into a scratch directory beside it, then move it.
    import pyarrow.fs as pafs

    if "://" in args.output:
        fs, path = pafs.FileSystem.from_uri(args.output)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(args.output)
    scratch = f"{path}.parts-{uuid.uuid4().hex[:8]}"
    scheme = args.output.split("://")[0] + "://" if "://" in args.output else ""
    try:
        write(scheme + scratch, min_rows_per_file=2**31 - 1)  # one file: every row in one write task (Arrow takes an int32 here)
        files = [f.path for f in fs.get_file_info(pafs.FileSelector(scratch, allow_not_found=True)) if f.is_file]
        if len(files) > 1:
            raise RuntimeError(f"expected one output file in {scratch}, found {len(files)}")
        if files:
            fs.move(files[0], path)
        else:  # no rows: an empty file says so
            fs.open_output_stream(path).close()
    finally:
        if fs.get_file_info(scratch).type != pafs.FileType.NotFound:
            fs.delete_dir(scratch)


def job_resources(args: BatchArgs) -> dict[str, dict[str, float]]:
    """What the job holds at its smallest (the minimum of each actor pool) and one read/finish/write task needs, by
    part: {"engines": {"CPU": .., "GPU": ..}, "tokenize / detokenize": {...}, "a read or write task": {...}}."""
    engines = args.concurrency if isinstance(args.concurrency, int) else args.concurrency[0]
    light = args.cpu_concurrency if isinstance(args.cpu_concurrency, int) else args.cpu_concurrency[0]
    ranks = engines * args.tp_size
    parts = {"engines": {"CPU": ranks * args.num_cpus, "GPU": float(ranks) if args.device == "cuda" else 0.0}}
    stages = 1 if args.task == "classify" else 2  # classify has no detokenize stage
    parts["tokenize / detokenize"] = {"CPU": stages * light * CPU_STAGE_CPUS, "GPU": 0.0}
    parts["a read or write task"] = {"CPU": IO_TASK_CPUS, "GPU": 0.0}
    return parts


def check_resources(args: BatchArgs, cluster: dict[str, float]) -> None:
    """Refuse at once, naming what is missing, a job the Ray cluster can never run (instead of waiting forever)."""
    parts = job_resources(args)
    for resource in ("CPU", "GPU"):
        need = sum(p[resource] for p in parts.values())
        have = float(cluster.get(resource, 0.0))
        if need > have + 1e-9:
            detail = ", ".join(f"{name} {p[resource]:g}" for name, p in parts.items() if p[resource])
            raise ValueError(
                f"the job needs {need:g} {resource} ({detail}) but the Ray cluster has {have:g}: lower num_cpus, "
                "concurrency, cpu_concurrency or tp_size, or add nodes"
            )


def run_batch(args: BatchArgs | dict[str, Any]) -> BatchSummary:
    """Run the job to the end; connects to Ray first if needed (`ray.init()`, which reads RAY_ADDRESS)."""
    args = args if isinstance(args, BatchArgs) else BatchArgs.model_validate(args)
    if not ray.is_initialized():
        ray.init()
    check_resources(args, ray.cluster_resources())
    bundle = {"CPU": args.num_cpus} | ({"GPU": 1.0} if args.device == "cuda" else {})
    placement = _TPPlacement(bundle, args.tp_size)
    tally = _Tally.remote()
    start, start_wall = time.monotonic(), time.time()  # wall clock: the actors' ready times come from other processes
    try:
        write_rows(build_dataset(args, tally, placement), args)
        counts, ready = ray.get(tally.totals.remote())
    finally:
        placement.remove()  # the engines are gone once the write returns; their TP ranks go with the groups
        ray.kill(tally)
    elapsed = time.monotonic() - start
    summary = BatchSummary(
        output=args.output, **counts, elapsed_s=round(elapsed, 3),
        startup_s=None if ready is None else round(max(0.0, ready - start_wall), 3),
        rows_per_s=round(counts["rows"] / elapsed, 3),
        tokens_per_s=round(counts["completion_tokens"] / elapsed, 3),
    )
    if summary.rows != summary.rows_in:  # never expected: every stage returns every row it gets
        logger.error("read %d rows but wrote %d", summary.rows_in, summary.rows)
    logger.info("batch done: %s", summary.model_dump_json())
    return summary


# ---- command line ----------------------------------------------------------------------------------------


def _concurrency(text: str) -> int | tuple[int, int]:
    parts = [int(x) for x in text.split(",")]
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None = None) -> BatchArgs:
    # a flag left out is left out of BatchArgs too, so every default is the field's (shown by --help)
    p = argparse.ArgumentParser(prog="python -m deployments.batch", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS)

    def add(flag: str, help: str = "", **kwargs: Any) -> None:
        default = BatchArgs.model_fields[flag.removeprefix("--").replace("-", "_")].default
        if default is not None:
            help = f"{help}; default: {default}" if help else f"default: {default}"
        p.add_argument(flag, help=help, **kwargs)

    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    add("--task", choices=["generate", "chat", "classify"])
    add("--input-format", "default: from --input's extension", choices=["jsonl", "parquet", "csv"])
    add("--output-format", "default: from --output's extension, else jsonl", choices=["jsonl", "parquet", "csv"])
    add("--model")
    add("--tokenizer", "default: --model")
    add("--dtype", choices=["float32", "bfloat16", "float16"])
    add("--device", choices=["cpu", "cuda"])
    add("--tp-size", type=int)
    add("--num-cpus", "per rank (CPU: also its torch threads)", type=float)
    add("--concurrency", "engine actors: N or MIN,MAX (autoscaling)", type=_concurrency)
    add("--cpu-concurrency", "tokenize / detokenize actors: N or MIN,MAX", type=_concurrency)
    add("--batch-size", "rows per engine call", type=int)
    add("--max-num-seqs", type=int)
    add("--max-model-len", "default: the model's positions, at most 8192", type=int)
    add("--kv-cache-memory")
    add("--quantization", "a .gguf's blocks kept on the CPU (auto, gguf) or dequantized (none)",
        choices=["auto", "gguf", "none"])
    p.add_argument("--max-tokens", type=int, help="default: SamplingParams' (vLLM's), 16")
    p.add_argument("--temperature", type=float, help="default: SamplingParams' (vLLM's), 1.0; 0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, help="sampling seed of every row (rows may override it)")
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--sampling-params", type=json.loads, help="JSON object of more SamplingParams defaults")
    p.add_argument("--response-format", type=_response_format,
                   help='every row\'s output format: json_object, or OpenAI\'s response_format as JSON')
    p.add_argument("--json-schema", type=_schema_file, help="a JSON schema file every row's output matches")
    p.add_argument("--lora", action="append", type=_lora_module, dest="lora_modules", metavar="NAME=PATH",
                   help="a LoRA adapter rows may name in their `lora` column (repeatable; turns --enable-lora on)")
    p.add_argument("--enable-lora", action="store_true", help="rows may name adapter directories in `lora`")
    add("--max-loras", "adapters an engine computes with at once", type=int)
    add("--max-lora-rank", type=int)
    p.add_argument("--return-token-ids", action="store_true", help="add completion_token_ids to the output")
    p.add_argument("--no-preserve-order", dest="preserve_order", action="store_false")
    a = vars(p.parse_args(argv))
    if a.get("quantization") == "none":
        a["quantization"] = None
    if "lora_modules" in a:
        a["lora_modules"] = dict(a["lora_modules"])
    sampling = dict(a.pop("sampling_params", {}))
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "response_format"):
        if name in a:
            sampling[name] = a.pop(name)
    schema = a.pop("json_schema", None)
    if schema is not None:
        if "response_format" in sampling:
            p.error("give one of --response-format and --json-schema")
        sampling["structured_outputs"] = {"json": schema}
    return BatchArgs(**a, sampling_params=sampling)


def _response_format(text: str) -> dict[str, Any]:
    return {"type": "json_object"} if text in ("json_object", "json") else json.loads(text)


def _schema_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = run_batch(parse_args(argv))
    print(json.dumps(summary.model_dump(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
