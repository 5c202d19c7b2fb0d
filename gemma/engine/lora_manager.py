"""`LoRAManager`: the adapters of one rank: a host-memory cache of loaded adapters and the device slots of a step.

Adapters are identified by `LoRARequest.lora_int_id` (vLLM's rule): the first request of an id loads its files
(gemma.lora.load_adapter, which refuses misfits with a LoRAError naming why) into the host cache, least recently
used first out beyond `max_cpu_loras`; a later request of the same id with another name or path is refused. The
device holds `max_loras` adapters (gemma.lora.LoRABank's slots): rank 0 plans each step's slot table (`plan`: the
step's adapters stay or come in, the least recently used others make room; the scheduler admits at most
`max_loras` adapters at a time, so they always fit), and every rank applies it (`apply`: an adapter not in its
host cache is read again from its path) before the step's forward. The table and the per-row slots travel in the
step's `StepInput` (`LoRAStep`), so tensor-parallel ranks load the same adapters into the same slots, each cutting
its own shard.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from gemma.lora import LoRAAdapter, LoRABank, LoRARequest, load_adapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoRASettings:
    """What every rank's manager needs (rank 0 sends it to the others with the KV layout)."""

    max_loras: int
    max_lora_rank: int
    max_cpu_loras: int


@dataclass
class LoRAStep:
    """A step's adapters: the device slots' adapters (None: empty) and each token row's slot (-1: the base model)."""

    slots: list[LoRARequest | None]
    row_slots: list[int]


class LoRAManager:
    def __init__(self, model: nn.Module, settings: LoRASettings) -> None:
        if settings.max_cpu_loras < settings.max_loras:
            raise ValueError(f"max_cpu_loras ({settings.max_cpu_loras}) must be >= max_loras ({settings.max_loras})")
        self.settings = settings
        self.config = model.config
        self.bank = LoRABank(model, settings.max_loras)
        self.cache: OrderedDict[int, tuple[LoRARequest, LoRAAdapter]] = OrderedDict()  # least recently used first
        self.slots: list[LoRARequest | None] = [None] * settings.max_loras  # what the device holds (`apply`)
        self._plan: list[LoRARequest | None] = [None] * settings.max_loras  # rank 0's table of the next step
        self._last_use = [0] * settings.max_loras
        self._tick = 0
        self.num_loads = 0  # adapters read from files (host-cache misses)

    # ---- the host cache ----

    def add(self, request: LoRARequest) -> LoRAAdapter:
        """The adapter of `request`, loaded into the host cache if it is not there; raises ValueError (LoRAError
        naming the misfit, or an id already used by another adapter)."""
        hit = self.cache.get(request.lora_int_id)
        if hit is not None:
            known, adapter = hit
            if (known.lora_name, known.lora_path) != (request.lora_name, request.lora_path):
                raise ValueError(f"lora_int_id {request.lora_int_id} is adapter {known.lora_name!r} at "
                                 f"{known.lora_path!r}; {request.lora_name!r} at {request.lora_path!r} needs another id")
            self.cache.move_to_end(request.lora_int_id)
            return adapter
        adapter = load_adapter(request.lora_path, self.config, self.settings.max_lora_rank, request.lora_name)
        self.num_loads += 1
        logger.info("LoRA adapter %s (id %d): rank %d on %s, %.1f MB", request.lora_name, request.lora_int_id,
                    adapter.rank, "/".join(adapter.targets), adapter.nbytes / 1e6)
        self.cache[request.lora_int_id] = (request, adapter)
        while len(self.cache) > self.settings.max_cpu_loras:
            self.cache.popitem(last=False)  # a slot keeps its own reference while it holds the adapter
        return adapter

    def remove(self, lora_int_id: int) -> bool:
        """Forget an adapter (host cache and slots); whether it was known."""
        known = self.cache.pop(lora_int_id, None) is not None
        for table in (self.slots, self._plan):
            for k, r in enumerate(table):
                if r is not None and r.lora_int_id == lora_int_id:
                    table[k] = None
                    known = True
        if known:
            self.bank.load([a if r is not None else None for r, a in zip(self.slots, self.bank.slots)])
        return known

    def list(self) -> set[int]:
        return set(self.cache) | {r.lora_int_id for r in self.slots if r is not None}

    # ---- the device slots ----

    def plan(self, requests: list[LoRARequest]) -> list[LoRARequest | None]:
        """Rank 0: the slot table of a step that uses these adapters (distinct, at most max_loras)."""
        table = self._plan
        if len(requests) > len(table):
            raise ValueError(f"a step uses {len(requests)} adapters; max_loras is {len(table)}")
        self._tick += 1
        wanted = {r.lora_int_id for r in requests}
        held = {r.lora_int_id: k for k, r in enumerate(table) if r is not None}
        for r in requests:
            k = held.get(r.lora_int_id)
            if k is None:  # an empty slot, else the least recently used one this step does not need
                free = [k for k, s in enumerate(table) if s is None or s.lora_int_id not in wanted]
                k = min(free, key=lambda k: (table[k] is not None, self._last_use[k]))
                table[k] = r
            self._last_use[k] = self._tick
        return list(table)

    def apply(self, slots: list[LoRARequest | None]) -> None:
        """Every rank: put the slot table's adapters on the device (rank 0's `plan` decided it)."""
        held = {r.lora_int_id: a for r, a in zip(self.slots, self.bank.slots) if r is not None and a is not None}
        self.slots = list(slots)
        # an adapter a slot already holds is kept as it is, even where the host cache has let it go
        self.bank.load([None if r is None else held.get(r.lora_int_id) or self.add(r) for r in slots])

    def step(self, requests: list[LoRARequest | None], counts: list[int]) -> LoRAStep | None:
        """Rank 0: the `LoRAStep` of a step whose sequences use `requests` (None: base) for `counts` tokens each; None
        when no sequence has an adapter."""
        used = list({r.lora_int_id: r for r in requests if r is not None}.values())
        if not used:
            return None
        slots = self.plan(used)
        slot_of = {r.lora_int_id: k for k, r in enumerate(slots) if r is not None}
        rows = [slot_of[r.lora_int_id] if r is not None else -1 for r, n in zip(requests, counts) for _ in range(n)]
        return LoRAStep(slots, rows)
