"""`LLMEngine`: requests in, one `step()` at a time, outputs out (synchronous; `AsyncLLMEngine` wraps it).

`add_request` validates a request up front (a bad one raises and touches nothing else); `step()` schedules,
runs the model once, samples every sequence that reached the end of its known tokens with its own
parameters, detokenizes incrementally, applies stop conditions and returns what changed. `abort_request`
frees a request's blocks at any time. With `enable_lora` a request may run with a LoRA adapter (`lora_request`,
loaded and checked when the request is added; gemma.engine.lora_manager).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import count
from typing import Any

import torch

from gemma.engine.block_manager import KVCacheManager
from gemma.engine.config import EngineConfig
from gemma.engine.kv_budget import split_kv_budget
from gemma.engine.launcher import (
    LocalLauncher,
    WorkerHandle,
    WorkerSpec,
    start_tensor_parallel,
)
from gemma.engine.batch import KVLayout
from gemma.engine.lora_manager import LoRASettings
from gemma.engine.model_runner import ModelRunner
from gemma.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from gemma.engine.scheduler import Scheduler
from gemma.engine.sequence import Sequence
from gemma.lora import LoRARequest
from gemma.model import GemmaForCausalLM
from gemma.sampling import SamplingParams, sample
from gemma.structured import GrammarCompiler
from gemma.tokenizer import GemmaTokenizer, IncrementalDecoder
from gemma.weights import DTYPES, parse_size, resolve_dtype, resolve_quantization

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Per-sequence output state the scheduler does not need."""

    decoder: IncrementalDecoder | None
    generator: torch.Generator | None
    text: str = ""
    reported_tokens: int = 0
    reported_text: int = 0
    checked_text: int = 0  # text already searched for stop strings
    logprobs: list[dict[int, float]] | None = None
    matcher: Any = None  # the grammar's matcher (gemma.structured), for a request with structured_outputs


class LLMEngine:
    def __init__(
        self, model: GemmaForCausalLM, tokenizer: GemmaTokenizer | None = None, config: EngineConfig | None = None,
        workers: WorkerHandle | None = None,
    ) -> None:
        """`model` is rank 0's shard when `model.tp` has several ranks; `workers` are ranks 1..N-1, already
        started (see gemma.engine.launcher) and waiting for the KV layout this constructor broadcasts."""
        self.model, self.tokenizer = model, tokenizer
        self.config = config = config or EngineConfig()
        cfg = model.config
        self.max_model_len = config.max_model_len or min(cfg.max_position_embeddings, 8192)
        windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]
        specs = split_kv_budget(
            bytes_per_block_per_layer=ModelRunner.kv_bytes_per_block_per_layer(model, config.block_size),
            layer_windows=windows, budget_bytes=parse_size(config.kv_cache_memory), block_size=config.block_size,
            max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )
        group_windows = [s.window for s in specs]
        self.kv = KVCacheManager(specs, config.block_size, config.enable_prefix_caching)
        lora = LoRASettings(config.max_loras, config.max_lora_rank, config.max_cpu_loras or config.max_loras) \
            if config.enable_lora else None
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   lora.max_loras if lora else None)
        layout = KVLayout([group_windows.index(w) for w in windows], group_windows,
                          [s.num_blocks for s in specs], config.block_size)
        # the runner decides what the device gets (CPU kernels, CUDA graphs) and tells the other ranks
        self.runner = ModelRunner(model, layout, config.cpu_matmul, config.enforce_eager, config.max_num_seqs,
                                  self.max_model_len, lora)
        self.cpu_matmul = self.runner.cpu_matmul
        self.workers = workers
        self.generator = self.runner.generator(config.seed)
        self.requests: dict[str, tuple[list[Sequence], str | None]] = {}
        self.streams: dict[int, _Stream] = {}
        self._seq_ids = count()
        self.grammars: GrammarCompiler | None = None  # made at the first request with structured_outputs
        self._grammars_lock = threading.Lock()  # prepare() runs on async engines' worker threads
        if config.structured_outputs_at_start and tokenizer is not None:
            self.grammar_compiler()
        logger.info("engine: KV groups %s, block size %d, max_model_len %d",
                    [(s.window, s.num_blocks) for s in specs], config.block_size, self.max_model_len)
        if self.runner.needs_warm_up:
            logger.info("engine: warmed up in %.2f s", self.warm_up())

    @classmethod
    def from_pretrained(
        cls, model: str, dtype: str = "auto", device: str | None = None, tp_size: int = 1,
        config: EngineConfig | None = None, launcher: type = LocalLauncher, host: str = "127.0.0.1",
        quantization: str | None = "auto",
    ) -> LLMEngine:
        """Load `model` (a named model, HF directory or .gguf) and its tokenizer and build an engine on them.

        With `tp_size > 1` this process is rank 0 and `launcher(spec)` starts ranks 1..N-1 (local processes by
        default; deployments/ passes a Ray-actor launcher); they rendezvous at `host`.
        """
        # "auto": the checkpoint's dtype (vLLM's meaning), resolved here so that every rank loads the same
        torch_dtype = resolve_dtype(dtype, model)  # raises, naming it, on an unknown name
        dtype = next(name for name, d in DTYPES.items() if d == torch_dtype)
        if tp_size < 1:
            raise ValueError(f"tp_size must be >= 1, got {tp_size}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        quantization = resolve_quantization(quantization, model, device, tp_size)
        tokenizer = GemmaTokenizer.from_pretrained(model)
        workers = None
        if tp_size == 1:
            lm = GemmaForCausalLM.from_pretrained(model, dtype=torch_dtype, device=device, quantization=quantization)
        else:
            backend = "nccl" if device.startswith("cuda") else "gloo"
            spec = WorkerSpec(str(model), dtype, device, tp_size, host=host, backend=backend)
            lm, workers = start_tensor_parallel(spec, launcher)
        try:
            return cls(lm, tokenizer, config, workers)
        except BaseException:
            if workers is not None:
                workers.stop(timeout_s=1.0)
            raise

    # ---- requests ----------------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
        arrival_time: float | None = None, prompt: str | None = None, lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request; raises ValueError (and queues nothing) when it cannot be served."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids: every id must be an int in [0, {vocab})")
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids: every id must be in [0, {vocab})")
        budget = self.max_model_len - len(prompt_token_ids)
        if budget < 1:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.max_model_len}, leaving no room to generate"
            )
        if params.max_tokens is not None and params.max_tokens > budget:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                f"({self.max_model_len})"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        self.prepare(params)
        if lora_request is not None:
            self.add_lora(lora_request)  # raises, naming what does not fit
        seqs = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), params, index=i,
                           lora_request=lora_request)
            if arrival_time is not None:
                seq.arrival_time = arrival_time
            generator = None
            if params.seed is not None:
                generator = self.runner.generator(params.seed + i)
            decoder = self.tokenizer.incremental_decoder(params.skip_special_tokens) if self.tokenizer else None
            matcher = self.grammars.matcher(params.structured_outputs) if params.structured_outputs else None
            self.streams[seq.seq_id] = _Stream(decoder, generator, logprobs=[] if params.logprobs is not None else None,
                                               matcher=matcher)
            seqs.append(seq)
        self.requests[request_id] = (seqs, prompt)
        for seq in seqs:
            self.scheduler.add(seq)

    def prepare(self, params: SamplingParams) -> None:
        """Compile the request's output constraint, if it has one (cached by its spec; thread-safe, so an async
        engine calls this off its step loop before `add_request`). ValueError naming `structured_outputs.<kind>`
        when it does not compile."""
        if params.structured_outputs is None:
            return
        self.grammar_compiler().compile(params.structured_outputs)

    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's grammar compiler, made on first use (its tokenizer preprocessing starts then)."""
        with self._grammars_lock:
            if self.grammars is None:
                if self.tokenizer is None:
                    raise ValueError("structured_outputs: needs an engine with a tokenizer")
                self.grammars = GrammarCompiler(self.tokenizer.backend_tokenizer.to_str(),
                                                self.model.config.vocab_size, self.model.config.eos_token_ids)
        return self.grammars

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (None if unknown or done)."""
        if request_id not in self.requests:
            return None
        seqs, _ = self.requests[request_id]
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
                self.scheduler.finish(seq)
        return self._output(request_id)

    # ---- LoRA adapters (vLLM's names) ----

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load an adapter into the host cache now (requests naming it load it anyway); raises ValueError naming what
        does not fit the model."""
        if self.runner.lora is None:
            raise ValueError("lora_request needs an engine with enable_lora=True")
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a gemma.LoRARequest, got {type(lora_request).__name__}")
        self.runner.lora.add(lora_request)
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.lora is not None and self.runner.lora.remove(lora_int_id)

    def list_loras(self) -> set[int]:
        return self.runner.lora.list() if self.runner.lora is not None else set()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def check_health(self) -> None:
        """Raise if a tensor-parallel worker has died (a server replaces the replica then)."""
        if self.workers is not None and not self.workers.alive():
            raise RuntimeError(f"tensor-parallel worker(s) died: {self.workers.describe()}")

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (ranks 1..N-1); the engine cannot step afterwards."""
        if self.workers is not None:
            if self.workers.alive():
                self.model.tp.broadcast_object(None)
            self.workers.stop()
            self.workers = None
        if self.grammars is not None:
            self.grammars.shutdown()

    @property
    def num_requests_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_requests_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the step ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run, sample, detokenize, stop. Returns outputs of requests that changed."""
        batch = self.scheduler.schedule()
        touched = {seq.request_id for seq in batch.preempted}
        if not batch:
            return [self._output(r) for r in touched]
        now = time.monotonic()
        for seq in batch.seqs:
            seq.first_scheduled_time = seq.first_scheduled_time or now
        logits, sampled = self.runner.execute(batch, self.kv)
        self.scheduler.step_done(batch)
        seqs = [batch.seqs[i] for i in sampled]
        if seqs:
            eos = self.model.config.eos_token_ids
            result = sample(
                logits, [s.params for s in seqs], [s.prompt_token_ids for s in seqs],
                [s.output_token_ids for s in seqs],
                [(list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else eos)) for s in seqs],
                [self.streams[s.seq_id].generator or self.generator for s in seqs],
                self._token_masks(seqs),
            )
            now = time.monotonic()
            for j, seq in enumerate(seqs):
                top = result.top_logprobs[j] if result.top_logprobs is not None else None
                chosen = result.logprobs[j] if result.logprobs is not None else None
                self._append(seq, result.token_ids[j], top, chosen, now)
                touched.add(seq.request_id)
        return [self._output(r) for r in touched]

    def _token_masks(self, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor] | None:
        """The rows of `seqs` under a grammar and, per row, the bitmask of the tokens it allows next."""
        rows = [j for j, seq in enumerate(seqs) if self.streams[seq.seq_id].matcher is not None]
        if not rows:
            return None
        return rows, self.grammars.fill_bitmask([self.streams[seqs[j].seq_id].matcher for j in rows])

    def _append(self, seq: Sequence, token: int, top: dict[int, float] | None, chosen: float | None, now: float) -> None:
        params, stream = seq.params, self.streams[seq.seq_id]
        if stream.matcher is not None and not self._grammar_allows(seq, stream, token):
            return None
        seq.output_token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        if stream.logprobs is not None:
            stream.logprobs.append({**(top or {}), token: chosen})
        if stream.decoder is not None:
            stream.text += stream.decoder.step(token)
        n_out = len(seq.output_token_ids)
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.model.config.eos_token_ids:
                return self._finish(seq, "stop", token)
            if token in params.stop_token_ids:
                return self._finish(seq, "stop", token)
            if params.stop and self._stop_string(seq, stream):
                return None
        if stream.matcher is not None and stream.matcher.is_stopped():
            return self._finish(seq, "stop")  # the grammar is complete: nothing but EOS could follow
        if (params.max_tokens is not None and n_out >= params.max_tokens) or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")
        return None

    def _grammar_allows(self, seq: Sequence, stream: _Stream, token: int) -> bool:
        """Feed the grammar `token`. False (and the sequence ends, "abort") when the token breaks it: only a row
        whose every allowed token was banned by something else, such as min_tokens holding back EOS, samples
        one."""
        matcher = stream.matcher
        if token in self.model.config.eos_token_ids and matcher.is_accepting():
            return True  # ends the sequence as any EOS does
        if matcher.consume_token(token):
            return True
        logger.warning("request %s: token %d breaks its grammar (%s); ending it", seq.request_id, token,
                       matcher.get_error())
        self._finish(seq, "abort")
        return False

    def _stop_string(self, seq: Sequence, stream: _Stream) -> bool:
        """End the sequence at the first stop string in the new text; truncate the text there."""
        params = seq.params
        # a stop string may begin in text checked before: look back by the longest one
        begin = max(0, stream.checked_text - max(len(s) for s in params.stop) + 1)
        stream.checked_text = len(stream.text)
        hits = [(stream.text.find(s, begin), s) for s in params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        stream.text = stream.text[: index + len(stop) if params.include_stop_str_in_output else index]
        stream.decoder = None  # nothing after the stop string is ever emitted
        self._finish(seq, "stop", stop)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        stream = self.streams[seq.seq_id]
        if stream.decoder is not None:
            stream.text += stream.decoder.flush()
        seq.finish(reason, stop_reason)
        self.scheduler.finish(seq)

    def _output(self, request_id: str) -> RequestOutput:
        seqs, prompt = self.requests[request_id]
        outputs = []
        for seq in seqs:
            stream = self.streams[seq.seq_id]
            # text that may be the start of a stop string is held back until it is known not to be one, so the
            # deltas (new_text) always add up to the final text
            shown = len(stream.text)
            if seq.params.stop and not seq.is_finished:
                shown = max(stream.reported_text, shown - max(len(x) for x in seq.params.stop) + 1)
            outputs.append(CompletionOutput(
                index=seq.index, text=stream.text, token_ids=list(seq.output_token_ids),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                logprobs=list(stream.logprobs) if stream.logprobs is not None else None,
                new_token_ids=seq.output_token_ids[stream.reported_tokens:],
                new_text=stream.text[stream.reported_text:shown],
            ))
            stream.reported_tokens, stream.reported_text = len(seq.output_token_ids), shown
        first = seqs[0]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time,
            first_scheduled_time=min((s.first_scheduled_time for s in seqs if s.first_scheduled_time), default=None),
            first_token_time=min((s.first_token_time for s in seqs if s.first_token_time), default=None),
            last_token_time=max((s.last_token_time for s in seqs if s.last_token_time), default=None),
            finish_time=max((s.finish_time or 0.0) for s in seqs) if all(s.is_finished for s in seqs) else None,
            num_preemptions=sum(s.num_preemptions for s in seqs),
        )
        finished = all(s.is_finished for s in seqs)
        if finished:  # forget it: the caller has its last output
            del self.requests[request_id]
            for seq in seqs:
                del self.streams[seq.seq_id]
        return RequestOutput(request_id, prompt, list(first.prompt_token_ids), outputs, finished, metrics,
                             first.num_cached_tokens)

    def warm_up(self) -> float:
        """Run each kind of step once on throwaway requests; returns the seconds it took. Called by the
        constructor on a GPU.

        A CUDA kernel's code is loaded (and, without a build for the card, compiled) when it first runs, and
        the first request to need a kernel would wait for it: this took 2.8 s on a fresh H100 machine, 0.3 s in
        the next process (the driver caches compiled code on disk). Here that cost is paid before the first
        request: a prefill of two prompts, a step that decodes them while a third prefills, graph-replayed
        decodes, and greedy, top-k/top-p and logprobs sampling. The prompts are shorter than a block, so nothing
        enters the prefix cache; the sampling is seeded, so the engine's own generator is untouched; the
        counters are reset after."""
        start = time.perf_counter()
        n = max(1, min(self.config.block_size - 1, self.max_model_len // 4, 8))
        prompt, tokens = [0] * n, min(4, self.max_model_len - n)
        greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=tokens, temperature=1.0, top_k=50, top_p=0.9, seed=0, logprobs=2,
                                 ignore_eos=True)
        if self.requests:
            raise RuntimeError("warm_up runs on an idle engine: it steps every request in flight")
        ids = [f"__warm-up-{i}" for i in range(3)]
        self.add_request(ids[0], prompt, greedy)
        self.add_request(ids[1], prompt, sampled)
        self.step()  # two prefills
        self.add_request(ids[2], prompt, greedy)
        self.run_to_completion(ids)  # two decodes beside a prefill, then decodes
        for kv in (self.kv, *self.kv.groups):
            kv.prefix_queries = kv.prefix_hits = 0
        return time.perf_counter() - start

    def run_to_completion(self, request_ids: Iterable[str]) -> dict[str, RequestOutput]:
        """Step until every given request finishes; their final outputs by id."""
        pending, done = set(request_ids), {}
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
        return done
