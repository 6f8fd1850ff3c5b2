"""``AttentionMetadata.paged``: every query of a step points at its own context rows in the paged cache.

Checked against the definition (position ``p`` of a sequence lives in slot
``table[p // block_size] * block_size + p % block_size``) on random mixes of decode-sized
sequences (a token, or one plus drafts: the batched absorbed pass) and prefill chunks (spans).
"""

from __future__ import annotations

import random

import torch

from engine.model.attention import MAX_BATCHED_QUERY, AttentionMetadata


def _slot(table: list[int], pos: int, block_size: int) -> int:
    return table[pos // block_size] * block_size + pos % block_size


def test_paged_metadata_points_each_query_at_its_own_context():
    rng = random.Random(0)
    caches = [torch.zeros(4, 16, 8)]
    for _ in range(100):
        block_size = rng.choice([1, 4, 16])
        query_lens = [rng.choice([1, 2, 3, MAX_BATCHED_QUERY, MAX_BATCHED_QUERY + 1, 40]) for _ in range(rng.randint(1, 6))]
        context_lens = [q + rng.randint(0, 70) for q in query_lens]
        # physical blocks scattered, some tables holding a spare block beyond their context
        tables = [rng.sample(range(1000), -(-c // block_size) + rng.randint(0, 2)) for c in context_lens]
        meta = AttentionMetadata.paged(query_lens, context_lens, tables, block_size, caches, torch.device("cpu"))

        assert meta.num_tokens == sum(query_lens)
        assert meta.slot_mapping.tolist() == [_slot(t, p, block_size) for t, q, c in zip(tables, query_lens, context_lens)
                                              for p in range(c - q, c)]
        starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
        long = [i for i, q in enumerate(query_lens) if q > MAX_BATCHED_QUERY]
        assert [(s.q_start, s.q_end) for s in meta.spans] == [(starts[i], starts[i] + query_lens[i]) for i in long]
        for s, i in zip(meta.spans, long):
            assert s.context_slots.tolist() == [_slot(tables[i], p, block_size) for p in range(context_lens[i])]

        short = [i for i, q in enumerate(query_lens) if q <= MAX_BATCHED_QUERY]
        d = meta.decode
        if not short:
            assert d is None
            continue
        want = [(starts[i] + j, k, context_lens[i] - query_lens[i] + j) for k, i in enumerate(short)
                for j in range(query_lens[i])]  # (step row, decode sequence, position) of each real query
        assert d.tokens.tolist() == [r for r, _, _ in want]
        assert d.every_token == (d.tokens.tolist() == list(range(meta.num_tokens)))  # attention skips the gather
        assert d.query_seq.tolist() == [k for _, k, _ in want]
        assert d.query_keys.tolist() == [p + 1 for _, _, p in want]
        assert d.token_index[d.query_valid].tolist() == d.tokens.tolist()
        for (row, k, pos), keys in zip(want, d.key_mask[d.query_valid]):
            table = tables[short[k]]
            assert d.slots[k, :pos + 1].tolist() == [_slot(table, p, block_size) for p in range(pos + 1)]
            assert keys.tolist() == [j <= pos for j in range(keys.shape[0])]  # causal, inside its context
        assert d.key_mask.any(-1).all()  # padded queries attend somewhere too (no all-masked softmax row)


def test_decode_chain_gives_each_pass_what_paged_gives_it():
    """The MTP draft passes' metadata, built at once: pass j is one query per sequence at ``positions[i] + j``,
    attending its whole context, written to its own slot -- what ``paged`` builds for that pass alone."""
    rng = random.Random(1)
    caches = [torch.zeros(4, 16, 8)]
    cpu = torch.device("cpu")
    assert AttentionMetadata.decode_chain([5], [[0]], 0, 16, caches, cpu) == []
    for _ in range(50):
        block_size = rng.choice([1, 4, 16])
        passes = rng.randint(1, 5)
        positions = [rng.randint(0, 70) for _ in range(rng.randint(1, 6))]
        tables = [rng.sample(range(1000), -(-(p + passes) // block_size) + rng.randint(0, 2)) for p in positions]
        chain = AttentionMetadata.decode_chain(positions, tables, passes, block_size, caches, cpu)
        assert len(chain) == passes
        for j, meta in enumerate(chain):
            alone = AttentionMetadata.paged([1] * len(positions), [p + j + 1 for p in positions], tables, block_size,
                                            caches, cpu)
            assert meta.num_tokens == alone.num_tokens and meta.spans == alone.spans == []
            assert meta.slot_mapping.tolist() == alone.slot_mapping.tolist() == [
                _slot(t, p + j, block_size) for t, p in zip(tables, positions)]
            d, a = meta.decode, alone.decode
            for name in ("tokens", "query_seq", "query_keys"):
                assert getattr(d, name).tolist() == getattr(a, name).tolist(), name
            assert (d.every_token, d.query_lens, d.context_lens, d.starts) == (
                a.every_token, a.query_lens, a.context_lens, a.starts)
            for k, p in enumerate(positions):  # every row a query attends is where paged puts it
                assert d.slots[k, :p + j + 1].tolist() == a.slots[k, :p + j + 1].tolist()
            assert d.token_index.tolist() == a.token_index.tolist()
            assert d.key_mask[..., :a.slots.shape[1]].tolist() == a.key_mask.tolist()
            assert not d.key_mask[..., a.slots.shape[1]:].any()  # the shared tensor's padding is never attended
