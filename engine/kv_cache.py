"""Paged latent-KV blocks, with prefix caching.

Block bookkeeping only; the tensors live in ``ModelRunner``. Every request owns a
list of block ids (its block table); token ``p`` of the request sits in block
``table[p // block_size]`` at offset ``p % block_size``.

Prefix caching: a *full* block whose rows have been computed is keyed by a
chained hash ``H(parent_hash, its token ids)``, so equal keys mean equal whole
prefixes. A block is shared by reference count. Blocks with no reference sit in
an LRU free queue; a cached one keeps its key until it is handed out again
(evicted), so a later request with the same prefix revives it.

Invariants: ``ref_cnt == 0`` ⇔ the block is in the free queue; after every
request is finished or aborted, all blocks are free.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import OrderedDict

import numpy as np


@dataclasses.dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    """Chained, process-independent key of a full block (the router uses it for prefix affinity)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def block_hashes(token_ids: list[int], block_size: int, limit: int | None = None) -> list[bytes]:
    """Keys of the full blocks of a token sequence (at most ``limit`` blocks)."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out: list[bytes] = []
    parent = None
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("num_blocks: the KV cache needs at least one block (raise kv_cache_memory_gb)")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.num_hashed: dict[str, int] = {}  # full blocks of a request already keyed
        self.prefix_queries = 0  # tokens looked up
        self.prefix_hits = 0  # tokens found

    # ---- queries ---------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def block_table(self, req_id: str) -> list[int]:
        return self.tables.get(req_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- lifecycle ---------------------------------------------------------------
    def match_prefix(self, req_id: str, token_ids: list[int]) -> int:
        """Give a new request the cached blocks of its longest cached prefix; returns tokens covered.

        At most ``len(token_ids) - 1`` tokens are matched: the last known token is always
        computed, since its logits are what the request samples from next.
        """
        assert req_id not in self.tables, f"{req_id} already holds blocks"
        self.tables[req_id] = []
        self.num_hashed[req_id] = 0
        if not self.enable_prefix_caching:
            return 0
        hashes = block_hashes(token_ids, self.block_size, limit=(len(token_ids) - 1) // self.block_size)
        self.prefix_queries += len(token_ids)
        table = self.tables[req_id]
        for h in hashes:
            bid = self.cached.get(h)
            if bid is None:
                break
            self._ref(bid)
            table.append(bid)
        self.num_hashed[req_id] = len(table)
        hit = len(table) * self.block_size
        self.prefix_hits += hit
        return hit

    def allocate(self, req_id: str, num_tokens: int) -> list[int] | None:
        """Grow the request's table to hold ``num_tokens`` tokens; None (nothing changed) if blocks run out."""
        table = self.tables.setdefault(req_id, [])
        self.num_hashed.setdefault(req_id, 0)
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return []
        if need > len(self.free_queue):
            return None
        new = [self._take_free() for _ in range(need)]
        table.extend(new)
        return new

    def commit_computed(self, req_id: str, token_ids: list[int], num_computed: int) -> None:
        """Key the request's blocks that just became full and computed, so others can share them."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[req_id]
        done = self.num_hashed[req_id]
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return
        parent = self.blocks[table[done - 1]].block_hash if done else None
        for i in range(done, full):
            parent = hash_block(parent, token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.blocks[table[i]]
            if block.block_hash is None and parent not in self.cached:
                block.block_hash = parent
                self.cached[parent] = block.block_id
        self.num_hashed[req_id] = full

    def free(self, req_id: str) -> None:
        """Drop the request's references; its tail blocks become the first to be evicted."""
        table = self.tables.pop(req_id, [])
        self.num_hashed.pop(req_id, None)
        for bid in reversed(table):
            block = self.blocks[bid]
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[bid] = None

    # ---- internals -----------------------------------------------------------------
    def _ref(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_cnt == 0:
            del self.free_queue[bid]
        block.ref_cnt += 1

    def _take_free(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None:  # evict its cached contents
            if self.cached.get(block.block_hash) == bid:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return bid
