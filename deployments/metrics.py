"""The app's metrics, exported through Ray's metrics (`ray.serve.metrics`): every definition is here.

Names are vLLM's with `gemma_` for its `vllm:` (Ray deprecates ':' in metric names). Ray's Prometheus export
prefixes `ray_`, adds `_total` to counters and the usual `_bucket` / `_sum` / `_count` to histograms, and tags
every metric recorded in a replica with its `application`, `deployment` and `replica`; ours add `model_name`:

    ray_gemma_num_requests_running              gauge      sequences in the engine's running batch
    ray_gemma_num_requests_waiting              gauge      sequences waiting for a slot (or preempted)
    ray_gemma_kv_cache_usage_perc               gauge      fraction of KV blocks in use, 0..1 (vLLM's name)
    ray_gemma_prefix_cache_queries_total        counter    prompt tokens looked up in the prefix cache
    ray_gemma_prefix_cache_hits_total           counter    of those, tokens served from it
    ray_gemma_prompt_tokens_total               counter    prompt tokens of requests that produced a token
    ray_gemma_generation_tokens_total           counter    generated tokens
    ray_gemma_num_preemptions_total             counter    sequences preempted (their KV dropped, recomputed)
    ray_gemma_request_success_total             counter    finished completions by `finished_reason`
                                                           (stop | length | abort), as vLLM counts them
    ray_gemma_time_to_first_token_seconds       histogram  engine arrival -> first token
    ray_gemma_inter_token_latency_seconds       histogram  between a request's successive tokens
    ray_gemma_e2e_request_latency_seconds       histogram  engine arrival -> finish
    ray_gemma_request_queue_time_seconds        histogram  engine arrival -> first scheduled
    ray_gemma_request_errors_total              counter    ingress: failed requests by `type` (validation,
                                                           authentication, not_found, timeout, too_large,
                                                           overloaded, internal)

Each node's metrics agent serves its own processes' metrics on that node's metrics-export port (`ray start
--metrics-export-port`; `ray.nodes()[i]["MetricsExportPort"]`), refreshed every few seconds; the head lists them
all for Prometheus' file-based discovery in /tmp/ray/prom_metrics_service_discovery.json. Ray 2.60 reports a histogram's
`_sum` from bucket midpoints, so `_sum / _count` is approximate; `_count` and the buckets are exact.

Metrics are created on first use, in the process that records them: Serve's metric classes tag themselves with
the replica they are constructed in, and the plain deployment classes stay usable without Ray (recording
outside a Ray worker goes nowhere; a metric that cannot be created is logged once and dropped).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gemma.engine import RequestOutput

logger = logging.getLogger(__name__)

PREFIX = "gemma_"
# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0]
REQUEST_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0]

# short name -> (kind, description, tag keys besides model_name, histogram boundaries)
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "num_requests_running": ("gauge", "Sequences in the engine's running batch.", (), None),
    "num_requests_waiting": ("gauge", "Sequences waiting to be scheduled.", (), None),
    "kv_cache_usage_perc": ("gauge", "KV-cache usage: 1 means 100 percent.", (), None),
    "prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache.", (), None),
    "prefix_cache_hits": ("counter", "Prompt tokens served from the prefix cache.", (), None),
    "prompt_tokens": ("counter", "Prompt tokens processed.", (), None),
    "generation_tokens": ("counter", "Generation tokens produced.", (), None),
    "num_preemptions": ("counter", "Sequences preempted.", (), None),
    "request_success": ("counter", "Finished completions, by finish reason.", ("finished_reason",), None),
    "time_to_first_token_seconds": ("histogram", "Time to first token.", (), TTFT_BUCKETS),
    "inter_token_latency_seconds": ("histogram", "Time between a request's successive tokens.", (), ITL_BUCKETS),
    "e2e_request_latency_seconds": ("histogram", "Request latency, arrival to finish.", (), REQUEST_BUCKETS),
    "request_queue_time_seconds": ("histogram", "Time from arrival to first scheduled.", (), REQUEST_BUCKETS),
    "request_errors": ("counter", "Requests the ingress answered with an error, by type.", ("type",), None),
}

# (kind, full name, description, tag keys, boundaries) -> an object with inc / set / observe(value, tags=...)
Factory = Callable[[str, str, str, tuple[str, ...], list[float] | None], Any]


def ray_metric(
    kind: str, name: str, description: str, tag_keys: tuple[str, ...], boundaries: list[float] | None
) -> Any:
    from ray.serve import metrics

    if kind == "histogram":
        return metrics.Histogram(name, description=description, boundaries=boundaries, tag_keys=tag_keys)
    return {"counter": metrics.Counter, "gauge": metrics.Gauge}[kind](name, description=description, tag_keys=tag_keys)


def _ray_running() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


class Metrics:
    """The metrics of DEFINITIONS by short name, tagged with `model_name`, each created when first recorded.

    `factory` makes one metric (default: `ray.serve.metrics`); `live` says whether recording goes anywhere (in a
    Ray process, or with an explicit factory), so callers can skip work that only feeds metrics.
    """

    def __init__(self, model_name: str, factory: Factory | None = None) -> None:
        self.model_name = model_name
        self.live = factory is not None or _ray_running()
        self._factory = factory or ray_metric
        self._metrics: dict[str, Any] = {}

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if value > 0:  # Ray's counters reject 0
            self._record(name, "inc", value, tags)

    def set(self, name: str, value: float, **tags: str) -> None:
        self._record(name, "set", value, tags)

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._record(name, "observe", value, tags)

    def _record(self, name: str, method: str, value: float, tags: dict[str, str]) -> None:
        metric = self._metrics.get(name)
        if metric is None:
            kind, description, keys, boundaries = DEFINITIONS[name]
            try:
                metric = self._factory(kind, PREFIX + name, description, ("model_name", *keys), boundaries)
            except Exception:  # metrics must never fail a request
                logger.exception("metric %s%s cannot be created; it is not recorded", PREFIX, name)
                metric = _Dropped()
            self._metrics[name] = metric
        getattr(metric, method)(value, tags={"model_name": self.model_name, **tags})


class _Dropped:
    def inc(self, *_: Any, **__: Any) -> None: ...
    def set(self, *_: Any, **__: Any) -> None: ...
    def observe(self, *_: Any, **__: Any) -> None: ...


class RequestRecorder:
    """One engine request's metrics, from the outputs it streams (the engine's own monotonic timestamps).

    `output(out)` for each output: token counters and inter-token latency as tokens arrive; time to first
    token and the prompt once there is a token; latency, queue time, preemptions and one `request_success` per
    completion (by its finish reason) when it finishes. `left()` when the caller left before the end: the
    unfinished completions count as "abort".
    """

    def __init__(self, metrics: Metrics, n: int) -> None:
        self.metrics, self.n = metrics, n
        self.last: RequestOutput | None = None
        self.done = False

    def output(self, out: RequestOutput) -> None:
        m, previous = self.metrics, self.last
        self.last = out
        new = sum(len(o.new_token_ids) for o in out.outputs)
        if new:
            m.inc("generation_tokens", new)
            # steps in this output: more than one where the stream coalesced outputs (gemma.engine.merge_outputs)
            steps = max(len(o.new_token_ids) for o in out.outputs)
            before = previous.metrics.last_token_time if previous is not None else None
            if before is None:  # the first token(s)
                m.inc("prompt_tokens", len(out.prompt_token_ids))
                if out.metrics.time_to_first_token is not None:
                    m.observe("time_to_first_token_seconds", out.metrics.time_to_first_token)
                before, steps = out.metrics.first_token_time, steps - 1
            last = out.metrics.last_token_time
            if steps > 0 and before is not None and last is not None:
                for _ in range(steps):  # one interval per step, each the mean over the coalesced ones
                    m.observe("inter_token_latency_seconds", (last - before) / steps)
        if out.finished and not self.done:
            self.done = True
            if out.metrics.e2e_latency is not None:
                m.observe("e2e_request_latency_seconds", out.metrics.e2e_latency)
            if out.metrics.queue_time is not None:
                m.observe("request_queue_time_seconds", out.metrics.queue_time)
            m.inc("num_preemptions", out.metrics.num_preemptions)
            for o in out.outputs:
                m.inc("request_success", finished_reason=o.finish_reason or "abort")

    def left(self) -> None:
        if self.done:
            return
        self.done = True
        reasons = [o.finish_reason for o in self.last.outputs] if self.last is not None else [None] * self.n
        for reason in reasons:
            self.metrics.inc("request_success", finished_reason=reason or "abort")


class EngineGauges:
    """Publishes an engine's state: running / waiting sequences, KV-cache usage, and prefix-cache counters
    (the engine keeps cumulative counts; the counters get what was added since the last call). `stats` returns
    them as `AsyncLLMEngine.stats()` does."""

    def __init__(self, metrics: Metrics, stats: Callable[[], dict[str, Any]]) -> None:
        self.metrics, self.stats = metrics, stats
        self._queries = self._hits = 0

    def publish(self) -> None:
        stats, m = self.stats(), self.metrics
        m.set("num_requests_running", stats["num_requests_running"])
        m.set("num_requests_waiting", stats["num_requests_waiting"])
        m.set("kv_cache_usage_perc", stats["kv_cache_usage"])
        queries, hits = stats["prefix_cache_queries"], stats["prefix_cache_hits"]
        m.inc("prefix_cache_queries", queries - self._queries)
        m.inc("prefix_cache_hits", hits - self._hits)
        self._queries, self._hits = queries, hits
