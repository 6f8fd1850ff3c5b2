"""The KV connector: the one place that owns "this sequence's KV comes from / goes to elsewhere".

Shaped like vLLM v1's connector, in two halves:

* **scheduler side** (``KVConnector``, one per engine, on the engine thread). Prefill
  role: which positions of which sequence leave this engine in a step
  (``Scheduler.stream_kv``), and, when a sequence's prompt is done, its control
  message (``KVControl``: ids, first token, logprobs, where it stands) after its last
  rows; the sequence then ends here and its blocks are free. Decode role:
  ``reserve`` allocates the blocks the incoming rows land in (returns their ids) and
  holds room for the tokens to come; ``load`` writes a ``KVPiece`` into them;
  ``take`` hands the reservation to the arriving request; ``release`` gives it back.
* **worker side** (``KVConnectorWorker``, one per rank, owned by the ``ModelRunner``):
  reads and writes latent rows of the paged cache — a whole request at once, or
  layer by layer while the forward computes (``after_layer``).

Two transfer modes, chosen by ``EngineArgs.kv_transfer``:

* ``whole``: after the step that completes a prompt, every layer's rows of the
  sequence are read at once into one piece;
* ``layerwise``: in every step that computes positions of a sequence, layer i's rows
  of those positions are put out as soon as layer i has written them, while layer
  i+1 computes (cached prefix rows go out at once, all layers).

Pieces and the control message go into a ``KVOutbox`` (thread-safe, in host memory);
a transport (``deploy.kv_transfer`` on Ray; the ``KVPayload`` of ``export_kv``
in-process) takes them to the decode engine in order: pieces, then control. fp8
rows travel as their ``uint8`` bytes (fp8 tensors cannot be pickled).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable

import torch

from engine.args import KV_TRANSFER_MODES
from engine.kv_cache import KVCacheManager
from engine.model.kv_cache_fp8 import convert_rows
from engine.outputs import KVControl
from engine.step import StepInput


@dataclasses.dataclass
class KVPiece:
    """Latent rows of one sequence: cache layers ``[first_layer, +num_layers)`` × positions ``[start, +num_tokens)``."""

    seq_id: str
    first_layer: int
    start: int
    rows_bytes: torch.Tensor  # [layers, tokens, row bytes] uint8
    rows_dtype: str  # the cache dtype the bytes hold, e.g. "bfloat16", "float32", "uint8" (packed FP8)

    @classmethod
    def from_rows(cls, seq_id: str, first_layer: int, start: int, rows: torch.Tensor) -> "KVPiece":
        """``rows`` [layers, tokens, width] in the cache dtype (copied to host memory)."""
        return cls(seq_id, first_layer, start, rows.contiguous().cpu().view(torch.uint8),
                   str(rows.dtype).removeprefix("torch."))

    @property
    def rows(self) -> torch.Tensor:
        """[layers, tokens, width] in the cache dtype."""
        return self.rows_bytes.view(getattr(torch, self.rows_dtype))

    @property
    def num_layers(self) -> int:
        return self.rows_bytes.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rows_bytes.shape[1]

    @property
    def nbytes(self) -> int:
        return self.rows_bytes.numel()


@dataclasses.dataclass
class KVPayload:
    """A whole hand-off in one object (the in-process transfer): the pieces, then the control."""

    control: KVControl
    pieces: list[KVPiece]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


# ---- prefill side: what leaves ----------------------------------------------------------------
@dataclasses.dataclass
class _Outgoing:
    pieces: list[KVPiece] = dataclasses.field(default_factory=list)
    control: KVControl | None = None
    touched: float = dataclasses.field(default_factory=time.monotonic)  # the last put, finish or take


class KVOutbox:
    """Pieces and control messages waiting for their decode engine, per sequence; thread-safe.

    The engine thread puts; a transport takes (``take(seq_id, cursor)``: the pieces from
    ``cursor`` on and the control once it is there). ``notify(seq_id)`` (set by the owner,
    e.g. to wake an asyncio waiter) is called after every change. A sequence is dropped when
    its control was taken, when it is aborted, or by ``expire()`` once it holds rows or its
    control and nobody has put or taken anything for ``ttl_s`` (its decode side is gone: the
    lease of ``deploy.worker``). A sequence still computing with nothing out yet never expires.
    """

    def __init__(self, ttl_s: float = 300.0):
        self.ttl_s = ttl_s
        self.notify: Callable[[str], None] = lambda seq_id: None
        self._lock = threading.Lock()
        self._seqs: dict[str, _Outgoing] = {}

    def open(self, seq_id: str) -> None:
        with self._lock:
            self._seqs[seq_id] = _Outgoing()

    def put(self, piece: KVPiece) -> None:
        with self._lock:
            out = self._seqs.get(piece.seq_id)
            if out is None:  # aborted meanwhile
                return
            out.pieces.append(piece)
            out.touched = time.monotonic()
        self.notify(piece.seq_id)

    def finish(self, control: KVControl) -> None:
        with self._lock:
            out = self._seqs.get(control.seq_id)
            if out is None:
                return
            out.control = control
            out.touched = time.monotonic()
        self.notify(control.seq_id)

    def take(self, seq_id: str, cursor: int) -> tuple[list[KVPiece], KVControl | None]:
        """Pieces from ``cursor`` on, and the control message once every piece is out (then the
        sequence is dropped). KeyError when the sequence is unknown (never opened, aborted, expired)."""
        with self._lock:
            out = self._seqs[seq_id]
            out.touched = time.monotonic()
            pieces = out.pieces[cursor:]
            if out.control is not None:
                del self._seqs[seq_id]
            return pieces, out.control

    def drop(self, seq_id: str) -> None:
        with self._lock:
            self._seqs.pop(seq_id, None)

    def __contains__(self, seq_id: str) -> bool:
        with self._lock:
            return seq_id in self._seqs

    @property
    def nbytes(self) -> int:
        """Host memory held by pieces not taken yet."""
        with self._lock:
            return sum(p.nbytes for out in self._seqs.values() for p in out.pieces)

    def expire(self) -> list[str]:
        """Drop the sequences whose rows nobody took for ``ttl_s``; their ids."""
        now = time.monotonic()
        with self._lock:
            gone = [s for s, out in self._seqs.items()
                    if (out.pieces or out.control is not None) and now - out.touched > self.ttl_s]
            for seq_id in gone:
                del self._seqs[seq_id]
        return gone


# ---- decode side: what arrives ----------------------------------------------------------------
@dataclasses.dataclass
class Reservation:
    block_ids: list[int]  # where the incoming rows land
    num_tokens: int  # rows expected (the sender's prompt + tokens before this leg)
    extra_blocks: int  # room held for the tokens the sequence will generate
    expires: float  # time.monotonic() after which an unused reservation is given back


class KVConnector:
    """Scheduler side, on the engine thread (see the module docstring)."""

    def __init__(self, kv: KVCacheManager, outbox: KVOutbox, mode: str = "whole", reservation_ttl_s: float = 120.0):
        if mode not in KV_TRANSFER_MODES:
            raise ValueError(f"kv_transfer: must be one of {KV_TRANSFER_MODES}, got {mode!r}")
        self.kv = kv
        self.mode = mode
        self.outbox = outbox
        self.reservation_ttl_s = reservation_ttl_s
        self.reservations: dict[str, Reservation] = {}

    # decode role
    @property
    def num_reserved_blocks(self) -> int:
        """Room held for reserved sequences' future tokens (their rows' blocks are allocated already)."""
        return sum(r.extra_blocks for r in self.reservations.values())

    def reserve(self, seq_id: str, num_kv_tokens: int, num_total_tokens: int) -> list[int] | None:
        """Blocks for ``num_kv_tokens`` incoming rows (their ids) and room held for the rest of
        ``num_total_tokens``; None when the cache cannot hold them now."""
        if seq_id in self.reservations or seq_id in self.kv.tables:
            raise ValueError(f"request_id: {seq_id!r} already holds KV here")
        held = self.num_reserved_blocks
        total = self.kv.blocks_needed(num_total_tokens)
        if total > self.kv.num_free_blocks - held:
            return None
        blocks = self.kv.allocate(seq_id, num_kv_tokens)
        assert blocks is not None
        self.reservations[seq_id] = Reservation(list(blocks), num_kv_tokens, total - len(blocks),
                                                time.monotonic() + self.reservation_ttl_s)
        return list(blocks)

    def reservation(self, seq_id: str) -> Reservation:
        r = self.reservations.get(seq_id)
        if r is None:
            raise KeyError(f"{seq_id}: no KV reservation here (never reserved, expired or released)")
        return r

    def take(self, seq_id: str, control: KVControl) -> None:
        """The sequence arrives: its reservation becomes its blocks (held room is given back)."""
        r = self.reservation(seq_id)
        if control.num_tokens != r.num_tokens:
            raise ValueError(f"kv: {control.num_tokens} rows sent, {r.num_tokens} reserved")
        del self.reservations[seq_id]

    def release(self, seq_id: str) -> None:
        if self.reservations.pop(seq_id, None) is not None:
            self.kv.free(seq_id)

    def expire(self, keep: frozenset[str] | set[str] = frozenset()) -> None:
        """Give back the reservations past their expiry, but those in ``keep`` (a transfer is filling them)."""
        now = time.monotonic()
        for seq_id in [s for s, r in self.reservations.items() if r.expires < now and s not in keep]:
            self.release(seq_id)


# ---- worker side: reading and writing rows --------------------------------------------------
class KVConnectorWorker:
    """Moves a sequence's latent rows out of / into a rank's paged cache.

    ``begin_step`` learns the step's saves (layer-wise mode); the model calls
    ``after_layer(i)`` once layer i's rows of the step are written; pieces go to ``outbox``.
    """

    def __init__(self, kv_caches: list[torch.Tensor], block_size: int, kv_lora_rank: int,
                 outbox: KVOutbox | None = None):
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.kv_lora_rank = kv_lora_rank
        self.outbox = outbox
        self.sent_layers = range(len(kv_caches))  # the layers a hand-off carries (the runner narrows it)
        self._saves: list[tuple[str, torch.Tensor, int]] = []  # (seq id, slots, first position) this step

    @property
    def row_width(self) -> int:
        return self.kv_caches[0].shape[-1]

    def _slots(self, table: list[int], start: int, num_tokens: int) -> torch.Tensor:
        pos = torch.arange(start, start + num_tokens)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.kv_caches[0].device)

    def read(self, seq_id: str, table: list[int], start: int, num_tokens: int,
             layers: range | None = None) -> KVPiece:
        """Rows of positions ``[start, start + num_tokens)`` for ``layers`` (default: ``sent_layers``)."""
        layers = layers if layers is not None else self.sent_layers
        slots = self._slots(table, start, num_tokens)
        rows = torch.stack([self.kv_caches[i].view(-1, self.row_width)[slots] for i in layers])
        return KVPiece.from_rows(seq_id, layers.start, start, rows)

    def write(self, table: list[int], piece: KVPiece) -> None:
        """Write a piece into this cache (converting between the plain and the FP8 layout)."""
        if piece.first_layer + piece.num_layers > len(self.kv_caches):
            raise ValueError(f"kv: piece of layers {piece.first_layer}..{piece.first_layer + piece.num_layers - 1} "
                             f"does not fit {len(self.kv_caches)} cache layers")
        slots = self._slots(table, piece.start, piece.num_tokens)
        rows = piece.rows
        for i in range(piece.num_layers):
            cache = self.kv_caches[piece.first_layer + i]
            layer_rows = convert_rows(rows[i].to(cache.device), self.kv_lora_rank, cache)  # FP8 <-> plain
            cache.view(-1, cache.shape[-1]).index_copy_(0, slots, layer_rows)

    # layer-wise streaming
    def begin_step(self, step: StepInput, tables: dict[str, list[int]]) -> None:
        """Send the already-computed part of each save at once; remember the rest for ``after_layer``."""
        self._saves = []
        if not step.kv_saves or self.outbox is None:
            return
        computing = {s.seq_id: s for s in step.sequences}
        for save in step.kv_saves:
            seq, table = computing[save.seq_id], tables[save.seq_id]
            if save.start < seq.start:  # rows already in the cache (prefix-cache hit): every layer now
                self.outbox.put(self.read(save.seq_id, table, save.start, seq.start - save.start))
            end = save.start + save.num_tokens
            if end > seq.start:
                self._saves.append((save.seq_id, self._slots(table, seq.start, end - seq.start), seq.start))

    def after_layer(self, layer: int) -> None:
        """Layer ``layer``'s rows of this step exist: put them out."""
        cache = self.kv_caches[layer]
        for seq_id, slots, start in self._saves:
            rows = cache.view(-1, self.row_width)[slots].unsqueeze(0)  # [1, N, width]
            self.outbox.put(KVPiece.from_rows(seq_id, layer, start, rows))

    @property
    def streaming(self) -> bool:
        return bool(self._saves)

