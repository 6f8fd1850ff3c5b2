"""Which prefill and which decode worker serve a request.

DeepSeek's balancing objectives, over the workers currently in rotation:

* ``pick_prefill``: the fewest *queued prompt tokens* (prompt tokens accepted and
  not yet exported: the attention/compute work ahead of a new prompt), with prefix
  affinity: if a worker recently prefilled the longest prefix of this prompt (full
  blocks, keyed by ``engine.kv_cache.block_hashes``, the same chained hash the
  engines' prefix caches use), it wins as long as its queue is within
  ``affinity_slack_tokens`` of the least loaded one's.
* ``pick_decode``: the least *KV in use* (used + reserved blocks, as a fraction of
  the worker's cache) plus *running requests* (as a fraction of the busiest), in
  that order; ``decode_order`` gives the whole ranking, so the router can fall
  back to the next worker when a reservation is refused.

Ties break by name, so a given state always yields the same choice. Loads are the
workers' ``WorkerLoad`` (``deploy.contract``; refreshed by the router's health loop),
so they are estimates; the router corrects them locally as it dispatches.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from deploy.contract import WorkerLoad
from engine.kv_cache import block_hashes


class PrefixAffinity:
    """An LRU of block hash → the prefill worker that last prefilled a prompt with that full block."""

    def __init__(self, block_size: int, max_entries: int = 100_000):
        self.block_size = block_size
        self.max_entries = max_entries
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def hashes(self, prompt: list[int]) -> list[bytes]:
        return block_hashes(prompt, self.block_size)

    def match(self, hashes: list[bytes]) -> dict[str, int]:
        """Worker → number of leading blocks of this prompt it saw last (longest chain only)."""
        found: dict[str, int] = {}
        for i, h in enumerate(hashes):
            owner = self._owner.get(h)
            if owner is None:
                break
            found[owner] = i + 1
        return found

    def record(self, hashes: list[bytes], worker: str) -> None:
        for h in hashes:
            self._owner[h] = worker
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A worker that restarted lost its cache."""
        for h in [h for h, w in self._owner.items() if w == worker]:
            del self._owner[h]


class Policy:
    def __init__(self, affinity: PrefixAffinity | None = None, affinity_slack_tokens: int = 2048):
        self.affinity = affinity
        self.affinity_slack_tokens = affinity_slack_tokens

    def pick_prefill(self, hashes: list[bytes], loads: Iterable[WorkerLoad]) -> WorkerLoad | None:
        loads = sorted(loads, key=lambda w: (w.queued_prompt_tokens, w.name))
        if not loads:
            return None
        best = loads[0]
        if self.affinity is not None and hashes:
            matched = self.affinity.match(hashes)
            candidates = [w for w in loads if matched.get(w.name)
                          and w.queued_prompt_tokens - best.queued_prompt_tokens <= self.affinity_slack_tokens]
            if candidates:
                return max(candidates, key=lambda w: (matched[w.name], -w.queued_prompt_tokens))
        return best

    def decode_order(self, loads: Iterable[WorkerLoad]) -> list[WorkerLoad]:
        loads = list(loads)
        most_running = max((w.num_running + w.num_waiting for w in loads), default=0) or 1
        return sorted(loads, key=lambda w: (w.kv_fraction + (w.num_running + w.num_waiting) / most_running, w.name))

    def pick_decode(self, loads: Iterable[WorkerLoad]) -> WorkerLoad | None:
        order = self.decode_order(loads)
        return order[0] if order else None
