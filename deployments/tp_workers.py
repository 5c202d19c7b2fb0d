"""Tensor-parallel ranks 1..N-1 of a model replica as Ray actors in the replica's own placement group.

`RayActorLauncher` is the engine's `WorkerHandle` (see gemma.engine.launcher) on Ray: the replica is rank 0 and
sits in bundle 0 of its placement group (Serve's `placement_group_bundles`, `STRICT_PACK`, so every bundle is on
one node and the ranks rendezvous over that node's address); rank r runs in bundle r and takes its resources (one GPU, or its CPUs).
The actors are owned by the replica, so they die with it, and they live in its placement group, which Serve
removes when it stops the replica: no rank outlives its replica.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gemma.engine.launcher import WorkerSpec, run_worker

logger = logging.getLogger(__name__)

WORKER_PREFIX = "gemma-tp-"  # actor names: gemma-tp-<group>-rank<r>


@ray.remote
class TPWorker:
    """One rank: `run` joins the group, loads this rank's shard and serves steps until rank 0 says stop."""

    def run(self, spec: dict, rank: int) -> None:
        logging.basicConfig(level=logging.INFO, format=f"rank {rank} %(levelname)s %(name)s: %(message)s")
        run_worker(WorkerSpec(**spec), rank)


class RayActorLauncher:
    """Starts ranks 1..N-1 as `TPWorker` actors in bundles 1..N-1 of the current placement group."""

    def __init__(self, spec: WorkerSpec) -> None:
        pg = get_current_placement_group()
        if pg is None:
            raise RuntimeError(
                "tp_size > 1 needs the replica to run in a placement group with one bundle per rank "
                "(set placement_group_bundles on the model deployment)"
            )
        if len(pg.bundle_specs) < spec.world_size:
            raise RuntimeError(f"the placement group has {len(pg.bundle_specs)} bundles; tp_size {spec.world_size} needs one per rank")
        payload = dataclasses.asdict(spec)
        group = uuid.uuid4().hex[:12]
        self.actors = []
        for rank in range(1, spec.world_size):
            # a rank takes its whole bundle: on CPU, Ray sets the actor's torch threads (OMP_NUM_THREADS) from it
            bundle = pg.bundle_specs[rank]
            self.actors.append(TPWorker.options(
                name=f"{WORKER_PREFIX}{group}-rank{rank}",  # named: operators (and tests) find ranks without the state API
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote())
        self.runs = [actor.run.remote(payload, rank) for rank, actor in enumerate(self.actors, start=1)]

    def alive(self) -> bool:
        """A rank's `run` returns only when rank 0 stops it, or fails when the actor dies."""
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return not done

    def stop(self, timeout_s: float = 10.0) -> None:
        ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor)

    def describe(self) -> str:
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        return ", ".join(
            f"rank {rank} {'exited' if ref in done else 'running'}" for rank, ref in enumerate(self.runs, start=1)
        )
