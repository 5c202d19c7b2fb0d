"""`PrefixAwareRouter`: the model deployment's Ray Serve request router, sending a prompt to the replica most likely to
hold its prefix in its KV cache.

Chat traffic re-sends the same system prompt and history every turn; each model replica caches the KV of prompts it
served (gemma.engine.block_manager), so a turn served by the replica that served the previous one skips most of its
prefill. Serve's default router (power of two choices) sends it anywhere. This one is a `ray.serve.request_router.
RequestRouter` (set through the deployment's `request_router_config` in serve_config.yaml), running in every caller
of the deployment's handle (the ingress replicas):

- The key of a request is the engine's own block hash (`hash_block`, a sha256 chain) of its prompt's first
  `prefix_blocks` full blocks of `block_size` token ids: requests sharing those blocks share the key. A prompt with
  no full block before its last token has no key and goes to the less loaded of two random replicas, as by default.
- The replica for a key is chosen by rendezvous hashing (the highest hash of key + replica id): every caller picks
  the same one without sharing state, and when replicas come and go with autoscaling only the keys of the replicas
  that came or went move.
- Balance: the preferred replica is the first rank; the next two by the same hash are the second, tried when the
  first's queue is full. When the preferred replica's queue (Serve's cached queue length) is more than
  `imbalanced_threshold` requests longer than the shortest, the request goes to the least loaded replica instead.

- LoRA adapters: a request that names one (its `multiplexed_model_id`, deployments/model.py) is routed among the
  replicas that hold the adapter, as Serve's default router does (`MultiplexMixin`: those that hold it, else those
  holding the fewest, after a timeout any); the prefix key then ranks those replicas.

It reads nothing from the replicas beyond the queue lengths Serve already tracks (no routing stats): the key
predicts the cache contents because this router put them there.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from gemma.engine.block_manager import prompt_chain


class PrefixAwareRouter(MultiplexMixin, RequestRouter):
    """See the module doc. `request_router_kwargs`: `block_size` (the engine's; default 16), `prefix_blocks` (how
    many leading full blocks make the key; default 8), `imbalanced_threshold` (default 8 requests)."""

    def initialize_state(self, block_size: int = 16, prefix_blocks: int = 8, imbalanced_threshold: int = 8) -> None:
        if block_size < 1 or prefix_blocks < 1 or imbalanced_threshold < 0:
            raise ValueError(
                "request_router_kwargs: block_size and prefix_blocks must be >= 1 and imbalanced_threshold >= 0, got "
                f"{block_size}, {prefix_blocks}, {imbalanced_threshold}"
            )
        self.block_size, self.prefix_blocks, self.imbalanced_threshold = block_size, prefix_blocks, imbalanced_threshold

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if getattr(getattr(pending_request, "metadata", None), "multiplexed_model_id", ""):
            holders = self.apply_multiplex_routing(pending_request)
            candidate_replicas = [r for r in candidate_replicas if r.replica_id in holders]
        if not candidate_replicas:
            return []
        key = self.prefix_key(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous(key, r.replica_id.unique_id), reverse=True)
        loads = {r.replica_id: self._replica_queue_len_cache.get(r.replica_id) for r in ranked}
        known = [q for q in loads.values() if q is not None]
        preferred = loads[ranked[0].replica_id]
        if preferred is not None and known and preferred - min(known) > self.imbalanced_threshold:
            # the preferred replica is far busier than the idlest: balance wins over the cache
            by_load = sorted(ranked, key=lambda r: (loads[r.replica_id] is None, loads[r.replica_id] or 0))
            return [by_load[:2]]
        return [ranked[:1], ranked[1:3]]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give `replica` to the request the routing task chose it for; where that request is not in Serve's index,
        to the oldest waiting one. The calls one caller makes while serving one request share its internal request
        id (the ingress sends each prompt of a request as a call of its own), and Serve's index keeps one of them:
        matching only by id would leave the others waiting forever."""
        pending = self._get_pending_request_matching_internal_request_id(request_metadata)
        if pending is None:
            pending = next((pr for pr in self._pending_requests_to_fulfill if not pr.future.done()), None)
        if pending is None:
            return
        self._cancel_routing_task_for_pending_request(pending)
        self._record_queue_wait_time(pending)
        pending.future.set_result(replica)
        self._remove_pending_request_from_indices(pending)

    def prefix_key(self, pending_request: PendingRequest | None) -> bytes | None:
        """The hash chain of the prompt's first `prefix_blocks` full blocks (None: no prompt, or too short)."""
        if pending_request is None or not pending_request.args:
            return None
        ids = pending_request.args[0]
        if not isinstance(ids, list) or not ids or not isinstance(ids[0], int):
            return None  # not a generate call (abort, stats, health checks): any replica
        head = ids[: self.prefix_blocks * self.block_size + 1]  # the last token never counts: +1
        chain = prompt_chain(head, self.block_size)
        return chain[-1] if chain else None


def rendezvous(key: bytes, replica: str) -> int:
    """The rendezvous-hashing score of `replica` for `key`."""
    return int.from_bytes(hashlib.blake2b(key + replica.encode(), digest_size=8).digest(), "big")
