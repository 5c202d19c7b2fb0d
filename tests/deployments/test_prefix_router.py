"""`PrefixAwareRouter`'s choices, without a cluster: the same prefix to the same replica from any caller, few keys
moved when replicas come and go, balance when the preferred replica is far busier, the default choice without a key.
(tests/serve/test_prefix_routing.py measures it on a Ray cluster.)"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID  # noqa: E402

from deployments.prefix_router import PrefixAwareRouter  # noqa: E402

DEPLOYMENT = DeploymentID(name="model", app_name="app")
BLOCK = 4


@dataclass(frozen=True)
class FakeReplica:
    replica_id: ReplicaID
    max_ongoing_requests: int = 32


def replicas(names: list[str]) -> list[FakeReplica]:
    return [FakeReplica(ReplicaID(unique_id=n, deployment_id=DEPLOYMENT)) for n in names]


def router(**kwargs) -> PrefixAwareRouter:
    r = PrefixAwareRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(**{"block_size": BLOCK, "prefix_blocks": 2, **kwargs})
    return r


def request(ids) -> SimpleNamespace:
    return SimpleNamespace(args=[ids, None, "rid"], kwargs={})


def choose(r: PrefixAwareRouter, candidates: list[FakeReplica], ids) -> list[list[str]]:
    ranks = asyncio.run(r.choose_replicas(candidates, request(ids)))
    return [[x.replica_id.unique_id for x in rank] for rank in ranks]


def prompt(seed: int, n: int = 30) -> list[int]:
    return random.Random(seed).choices(range(10, 1000), k=n)


def test_a_prefix_goes_to_one_replica_whatever_the_caller_and_the_rest_of_the_prompt():
    pool = replicas(["a", "b", "c"])
    base = prompt(1)
    first = choose(router(), pool, base)
    assert len(first) == 2 and len(first[0]) == 1 and len(first[1]) == 2 and first[0][0] not in first[1]
    for tail_seed in range(5):  # another tail after the 2 key blocks, another caller, another candidate order
        other = choose(router(), list(reversed(pool)), base[: 2 * BLOCK] + prompt(100 + tail_seed, 12))
        assert other[0] == first[0]
    spread = {choose(router(), pool, prompt(s))[0][0] for s in range(30)}
    assert spread == {"a", "b", "c"}  # different prefixes spread over the replicas


def test_replicas_coming_and_going_move_only_their_share_of_prefixes():
    keys = [prompt(s) for s in range(300)]
    r = router()
    before = {i: choose(r, replicas(["a", "b", "c"]), k)[0][0] for i, k in enumerate(keys)}
    after = {i: choose(r, replicas(["a", "c"]), k)[0][0] for i, k in enumerate(keys)}
    assert all(after[i] == before[i] for i in before if before[i] != "b")  # only b's prefixes moved
    grown = {i: choose(r, replicas(["a", "b", "c", "d"]), k)[0][0] for i, k in enumerate(keys)}
    moved = [i for i in before if grown[i] != before[i]]
    assert all(grown[i] == "d" for i in moved) and 40 < len(moved) < 110  # ~ a quarter went to the new one


def test_a_far_busier_preferred_replica_gives_way_to_the_least_loaded():
    pool = replicas(["a", "b", "c"])
    r = router(imbalanced_threshold=3)
    ids = prompt(7)
    preferred = choose(r, pool, ids)[0][0]
    idlest = next(x for x in pool if x.replica_id.unique_id != preferred)
    for x in pool:
        r._replica_queue_len_cache.update(x.replica_id, 0 if x is idlest else 3)
    assert choose(r, pool, ids)[0][0] == preferred  # 3 more than the idlest: within the threshold
    for x in pool:
        r._replica_queue_len_cache.update(x.replica_id, 0 if x is idlest else 4)
    assert choose(r, pool, ids)[0][0] == idlest.replica_id.unique_id


@pytest.mark.parametrize("args", [[[5, 6, 7]], ["request-id"], []])
def test_without_a_prefix_key_two_random_replicas_as_by_default(args):
    pool = replicas(["a", "b", "c"])
    r = router()
    ranks = asyncio.run(r.choose_replicas(pool, SimpleNamespace(args=args, kwargs={})))
    assert len(ranks) == 1 and len(ranks[0]) == 2
    assert asyncio.run(r.choose_replicas(pool, None))[0][0] in pool
    assert asyncio.run(r.choose_replicas([], None)) == []


def test_bad_router_kwargs_are_refused_naming_them():
    with pytest.raises(ValueError, match="request_router_kwargs"):
        router(prefix_blocks=0)
