"""Starting tensor-parallel workers: ranks 1..N-1, each a process with its own model shard and KV pools.

The engine only needs a `WorkerHandle` (alive / stop / describe). `LocalLauncher` starts the ranks as local
processes (this module); a Ray-actor launcher (deployments/) starts them as actors in a placement group.
Every worker runs `run_worker`: join the group, load its shard, receive the KV layout, then serve steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Protocol

from gemma.weights import DTYPES

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class WorkerSpec:
    """What every rank needs to build its shard: the same for all ranks."""

    model: str  # a named model, HF directory or .gguf
    dtype: str = "float32"
    device: str = "cpu"  # "cuda" means cuda:<rank> for local processes
    world_size: int = 2
    host: str = "127.0.0.1"
    port: int = 0  # the rendezvous, hosted by rank 0
    backend: str = "gloo"
    timeout_s: float = 120.0  # a collective waiting this long fails (e.g. a rank died mid-step)

    def device_of(self, rank: int) -> str:
        return f"cuda:{rank}" if self.device == "cuda" else self.device


class WorkerHandle(Protocol):
    def alive(self) -> bool: ...
    def stop(self, timeout_s: float = 10.0) -> None: ...
    def describe(self) -> str: ...


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_worker(spec: WorkerSpec, rank: int) -> None:
    """The body of rank `rank` (>= 1): join, load this rank's shard, build the KV pools rank 0 describes, serve."""
    from gemma.engine.model_runner import ModelRunner
    from gemma.model import GemmaForCausalLM
    from gemma.parallel import TPGroup

    tp = TPGroup.connect(rank, spec.world_size, spec.host, spec.port, spec.backend, spec.timeout_s)
    model = GemmaForCausalLM.from_pretrained(spec.model, dtype=DTYPES[spec.dtype], device=spec.device_of(rank), tp=tp)
    ModelRunner.follow(model).serve()
    logger.info("tensor-parallel rank %d stopped", rank)


class LocalLauncher:
    """Ranks 1..N-1 as local processes: `python -m gemma.engine.launcher`, a fresh interpreter each, so nothing
    of the engine's process (nor its `__main__` script, as multiprocessing's spawn would) is re-run."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        payload = json.dumps(dataclasses.asdict(spec))
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "gemma.engine.launcher", "--rank", str(rank), "--spec", payload])
            for rank in range(1, spec.world_size)
        ]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, timeout_s: float = 10.0) -> None:
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(timeout_s)

    def describe(self) -> str:
        return ", ".join(f"rank {r} pid {p.pid} exit {p.poll()}" for r, p in enumerate(self.procs, start=1))


def start_tensor_parallel(spec: WorkerSpec, launcher: type = LocalLauncher):
    """Start ranks 1..N-1 with `launcher`, join as rank 0, load rank 0's shard; returns (model, workers)."""
    from gemma.model import GemmaForCausalLM
    from gemma.parallel import TPGroup

    if spec.port == 0:
        spec = WorkerSpec(**{**spec.__dict__, "port": free_port(spec.host)})
    workers = launcher(spec)
    try:
        tp = TPGroup.connect(0, spec.world_size, spec.host, spec.port, spec.backend, spec.timeout_s, workers.alive)
        model = GemmaForCausalLM.from_pretrained(spec.model, dtype=DTYPES[spec.dtype], device=spec.device_of(0), tp=tp)
    except BaseException:
        workers.stop(timeout_s=1.0)
        raise
    return model, workers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a tensor-parallel worker rank (started by LocalLauncher)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--spec", required=True, help="WorkerSpec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"rank {args.rank} %(levelname)s %(name)s: %(message)s")
    run_worker(WorkerSpec(**json.loads(args.spec)), args.rank)


if __name__ == "__main__":
    main()
