"""Preallocated per-row KV storage for the decoding engine (``pipelines.serve_engine``): the runner's memory.

``KVSlots`` holds, per decoder layer, keys and values (R, H_kv, L, dh) for R row slots of L positions each. A
row lives in one slot from its prefill to its end: its prompt's keys/values are written once at positions
0..P-1, each decode step writes one position (its current length) and reads the first ``max length`` positions
of the running slots as a view, never a copy: no concatenation per token, no re-padding when rows join. Rows of
one batch always occupy slots 0..B-1 (a departing row's slot is filled by moving the last row into it: one
copy per departure, not per token). Storage grows by doubling (rows or positions) when an admission needs more,
so the amortised cost of growing is O(1) per token.

``ImageSlots`` holds AGF's keys and values (I, H, K, N, dh) per injection layer, one slot per image: the ``n``
choices of one request point at the same slot (a reference count frees it when the last one ends). Images of
different token counts (a Qwen base) share the store padded to the longest; ``mask`` marks each slot's real keys.

``SlotCache`` is what one decoder forward receives as its ``cache`` (transformers' ``Cache`` interface, only
``update`` is used): in ``chunk`` mode (a prompt prefilled whole or over several steps) it writes a chunk's
positions [p, p + c) into the rows' slots and returns the reading slots' first ``read`` positions, the slot's
earlier positions plus the chunk itself, which the caller's 4-D mask makes causal; in ``decode`` mode it
writes the step's one position per row and returns the slots' first ``read`` positions, which the caller's 4-D
mask limits to each row's length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def _grown(need: int, have: int, cap: int | None = None) -> int:
    """Doubling growth: at least ``need``, at least twice ``have`` (capped at ``cap`` when that still fits)."""
    size = max(need, 2 * have)
    return max(need, min(size, cap)) if cap else size


class KVSlots:
    """Keys and values (R, H_kv, L, dh) per decoder layer, one row per slot."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 max_length: int | None = None, max_rows: int | None = None):
        self.shape = (kv_heads, head_dim)
        self.layers, self.dtype, self.device = layers, dtype, device
        self.max_length, self.max_rows = max_length, max_rows
        self.keys: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]  # each (R, H_kv, L, dh)
        self.values: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]

    def _empty(self, rows: int, length: int) -> torch.Tensor:
        return torch.zeros(rows, self.shape[0], length, self.shape[1], dtype=self.dtype, device=self.device)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, rows: int, length: int, used: int, used_length: int) -> None:
        """Make room for ``rows`` slots of ``length`` positions; the first ``used`` slots' first ``used_length``
        positions are kept (the only copy of live keys/values the store ever makes besides ``move``)."""
        if rows <= self.rows and length <= self.length:
            return
        new_rows = self.rows if rows <= self.rows else _grown(rows, self.rows, self.max_rows)
        new_len = self.length if length <= self.length else _grown(length, self.length, self.max_length)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                fresh = self._empty(new_rows, new_len)
                if used and used_length:
                    fresh[:used, :, :used_length] = old[:used, :, :used_length]
                store[i] = fresh

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot ``src``'s first ``length`` positions into slot ``dst`` (a departure's compaction)."""
        for store in (self.keys, self.values):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]


class ImageSlots:
    """AGF keys and values (I, H, K, N, dh) per injection layer; one slot per image, shared by its rows."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per injection layer (I, H, K, N, dh)
        self.values: list[torch.Tensor] = []
        self.refs: list[int] = []  # slot -> rows reading it (0: free)
        self.lengths: list[int] = []  # slot -> its image's token count (<= N)

    def add(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> int:
        """Store one image's keys/values (per injection layer (1, H, K, N, dh)) for ``rows`` rows -> its slot."""
        if not self.keys:
            self.keys = [k.new_zeros((4, *k.shape[1:])) for k, _ in kv]
            self.values = [v.new_zeros((4, *v.shape[1:])) for _, v in kv]
            self.refs, self.lengths = [0] * 4, [0] * 4
        n = kv[0][0].shape[3]
        if kv[0][0].shape[1:3] != self.keys[0].shape[1:3] or kv[0][0].shape[4] != self.keys[0].shape[4]:
            raise ValueError(f"AGF keys of shape {tuple(kv[0][0].shape[1:])} do not match this engine's image "
                             f"slots {tuple(self.keys[0].shape[1:])}: heads, vision layers and width must agree")
        if n > self.keys[0].shape[3]:  # a longer image (Qwen): widen every slot, zero-padded
            grow = n - self.keys[0].shape[3]
            self.keys = [torch.nn.functional.pad(t, (0, 0, 0, grow)) for t in self.keys]
            self.values = [torch.nn.functional.pad(t, (0, 0, 0, grow)) for t in self.values]
        if 0 not in self.refs:  # double the slots
            grow = len(self.refs)
            self.keys = [torch.cat([t, t.new_zeros(t.shape)]) for t in self.keys]
            self.values = [torch.cat([t, t.new_zeros(t.shape)]) for t in self.values]
            self.refs += [0] * grow
            self.lengths += [0] * grow
        slot = self.refs.index(0)
        for store, new in ((self.keys, [k for k, _ in kv]), (self.values, [v for _, v in kv])):
            for t, x in zip(store, new):
                t[slot, :, :, :n] = x[0]
                t[slot, :, :, n:] = 0
        self.refs[slot], self.lengths[slot] = rows, n
        return slot

    def mask(self, slots: torch.Tensor) -> torch.Tensor | None:
        """(B', N) bool: the real keys of the image slots ``slots`` (B',); None when every one is full length."""
        lengths = torch.tensor([self.lengths[s] for s in slots.tolist()], device=slots.device)
        width = self.keys[0].shape[3]
        if bool((lengths == width).all()):
            return None
        return torch.arange(width, device=slots.device)[None] < lengths[:, None]

    def release(self, slot: int) -> None:
        self.refs[slot] -= 1

    def gather(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per injection layer keys/values (B', H, K, N, dh) of the image slots ``slots`` (B',) in row order."""
        if bool((slots == slots[0]).all()):  # one image (e.g. the n choices of one request): a broadcast view
            return [(k[slots[:1]].expand(len(slots), *k.shape[1:]), v[slots[:1]].expand(len(slots), *v.shape[1:]))
                    for k, v in zip(self.keys, self.values)]
        return [(k[slots], v[slots]) for k, v in zip(self.keys, self.values)]


class SlotCache(Cache):
    """One forward's view of ``KVSlots`` (only ``update`` is called by the decoder's attention layers).

    chunk: ``rows`` (M,) destination slots, ``src`` (M,) chunk row, ``seq`` (M,) sequence index and ``pos`` (M,)
    position of each (slot, token) write: the chunks' keys/values (P, H, S, dh) go to their slots (a request with n
    choices is written into its n slots, so each choice later decodes in its own), then ``reads`` (P,) the slot
    each chunk row reads (its request's first): their first ``read`` positions come back, (P, H, read, dh), a view
    when the slots are consecutive (a gather otherwise, e.g. with n > 1).
    decode: ``rows`` is the batch's slot range (0..B-1), ``pos`` (B,) each row's write position, ``read`` the
    positions returned (max length + 1); the caller's mask hides each row's positions past its length.
    """

    def __init__(self, store: KVSlots, mode: str, pos: torch.Tensor, rows: torch.Tensor | int,
                 src: torch.Tensor | None = None, seq: torch.Tensor | None = None, read: int = 0,
                 reads: torch.Tensor | None = None):
        super().__init__(layers=[])
        self.store, self.mode, self.pos, self.rows, self.src, self.seq, self.read = store, mode, pos, rows, src, seq, read
        if mode == "decode":
            self.slot_ids = torch.arange(rows, device=pos.device)
        if mode == "chunk":  # consecutive reading slots: a slice (a view), else an index (a gather)
            first = int(reads[0])
            consecutive = torch.equal(reads, torch.arange(first, first + len(reads), device=reads.device))
            self.reads = slice(first, first + len(reads)) if consecutive else reads

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args,
               **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]  # (R, H, L, dh)
        if self.mode == "chunk":  # key_states (P, H, S, dh)
            keys[self.rows, :, self.pos] = key_states[self.src, :, self.seq].to(keys.dtype)  # (M, H, dh)
            values[self.rows, :, self.pos] = value_states[self.src, :, self.seq].to(values.dtype)
            return keys[self.reads, :, : self.read], values[self.reads, :, : self.read]  # (P, H, read, dh)
        b = self.rows  # decode: key_states (B, H, 1, dh)
        keys[self.slot_ids, :, self.pos] = key_states[:, :, 0].to(keys.dtype)
        values[self.slot_ids, :, self.pos] = value_states[:, :, 0].to(values.dtype)
        return keys[:b, :, : self.read], values[:b, :, : self.read]  # views: (B, H, read, dh)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.read
