"""Storage of one block's K/V for every layer, and a CPU spill area for evicted blocks.

A block is stored as one tensor holding every layer's K and V, so inserting or matching
n blocks costs O(n) tensor ops, not O(n * layers). The per-layer tensors of a row,
``k0, v0, k1, v1, ...`` (each (1, heads, T, head_dim)), are grouped by (heads, head_dim,
dtype) into "parts"; each part stacks its members along a new first dim:
``(members, heads, T, head_dim)``. In the usual case every layer has the same heads and
head_dim for K and V, there is one part ``(2 * layers, heads, T, head_dim)``, a view of
``(layers, 2, heads, T, head_dim)``. Models whose K and V differ (MLA) or whose layers
differ in heads get one part per shape. A ``Layout`` records where each layer's K and V live.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: (key, value), each (1, heads, T, head_dim)


@dataclass(frozen=True)
class Layout:
    """Where each layer's K and V live in a block's parts, and the device each layer wants them on."""

    slots: tuple[tuple[int, int], ...]     # for tensor j of (k0, v0, k1, v1, ...): (part, index in part)
    members: tuple[tuple[int, ...], ...]   # for each part: the tensors j it stacks, in order
    devices: tuple[torch.device, ...]      # home device of each layer's K/V

    @property
    def num_layers(self) -> int:
        return len(self.devices)

    @property
    def fused(self) -> bool:
        """One part (2 * layers, heads, T, head_dim): every K and V has the same shape and dtype."""
        return len(self.members) == 1

    def split(self, parts: Sequence[torch.Tensor]) -> KV:
        """Per layer (k, v) views of ``parts``, each part (members, *rest); layer tensors are ``rest``."""
        flat = [None] * len(self.slots)
        pieces = [p.unbind(0) for p in parts]
        for j, (g, i) in enumerate(self.slots):
            flat[j] = pieces[g][i]
        if len(set(self.devices)) > 1:                     # a model spread over devices (device_map)
            flat = [t.to(self.devices[j // 2]) for j, t in enumerate(flat)]
        return [(flat[2 * i], flat[2 * i + 1]) for i in range(self.num_layers)]


def layout_of(kv_layers: KV) -> Layout:
    """The layout of a row's per-layer (k, v), each (1, heads, T, head_dim)."""
    groups: dict[tuple, int] = {}
    members: list[list[int]] = []
    slots = []
    for j, t in enumerate(t for pair in kv_layers for t in pair):
        shape = t.shape                                  # one torch.Size per tensor, not one per read
        g = groups.setdefault((shape[1], shape[3], t.dtype), len(groups))
        if g == len(members):
            members.append([])
        slots.append((g, len(members[g])))
        members[g].append(j)
    return Layout(slots=tuple(slots), members=tuple(tuple(m) for m in members),
                  devices=tuple(k.device for k, _ in kv_layers))


class Block:
    """One block's K/V for every layer: each part (members, heads, block_size, head_dim).

    Blocks cut by one insert are views of one shared ``Segment`` (one copy per insert, not
    one per block); blocks reloaded from CPU own their storage (``segment`` is None). A block
    holds no tensor of its own in a segment: ``parts`` slices the segment when read. A plain
    class with slots: an insert builds one per block.
    """

    __slots__ = ("own", "layout", "nbytes", "segment", "index", "alive")

    def __init__(self, own: tuple[torch.Tensor, ...], layout: Layout, nbytes: int, segment: Segment | None = None,
                 index: int = 0, alive: bool = True) -> None:
        self.own = own              # the block's own parts; () when it lives in a segment
        self.layout = layout
        self.nbytes = nbytes        # bytes of all parts
        self.segment = segment      # the storage this block is a slice of
        self.index = index          # position in the segment, in blocks
        self.alive = alive          # False once evicted (its bytes leave the segment)

    def __repr__(self) -> str:
        return (f"Block(nbytes={self.nbytes}, index={self.index}, alive={self.alive}, "
                f"in_segment={self.segment is not None})")

    @property
    def parts(self) -> tuple[torch.Tensor, ...]:
        """Per part (members, heads, block_size, head_dim): its own tensors, or views of its segment."""
        if self.segment is None:
            return self.own
        return tuple(self.segment.view(g, self.index, self.index + 1) for g in range(len(self.segment.parts)))

    @property
    def device(self) -> torch.device:
        return (self.own or self.segment.parts)[0].device

    @property
    def kv(self) -> KV:
        """Per layer (k, v), each (1, heads, block_size, head_dim) (views)."""
        return self.layout.split([p.unsqueeze(1) for p in self.parts])


@dataclass(eq=False)
class Segment:
    """The storage of consecutive blocks cut by one insert: parts (members, heads, n * bs, head_dim).

    Its bytes are freed when its last block goes; when only some go, ``compact`` copies the
    survivors into smaller storage, so evicted bytes really leave the device.
    """

    parts: tuple[torch.Tensor, ...]
    blocks: list[Block]
    block_size: int

    def view(self, g: int, first: int, stop: int) -> torch.Tensor:
        """Part ``g`` of blocks ``first..stop-1`` (a view)."""
        return self.parts[g][:, :, first * self.block_size:stop * self.block_size]


def dead_nbytes(segment: Segment) -> int:
    """Bytes a segment still holds for its evicted blocks (0 once compacted)."""
    return sum(b.nbytes for b in segment.blocks if not b.alive)


def parts_nbytes(parts: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


def kv_nbytes(kv: KV) -> int:
    """Bytes held by a list of (k, v) tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def block_nbytes(kv_layers: KV, block_size: int) -> int:
    """Bytes one block of ``block_size`` positions cut from ``kv_layers`` will take."""
    def one(t: torch.Tensor) -> int:                     # t: (1, heads, T, head_dim)
        b, h, _, d = t.shape
        return b * h * block_size * d * t.element_size()

    return sum(one(k) + one(v) for k, v in kv_layers)


def stack_kv(kv_layers: KV, start: int, stop: int, layout: Layout) -> list[torch.Tensor]:
    """Positions ``start:stop`` of every layer stacked into the layout's parts, each
    (members, heads, stop - start, head_dim): one ``torch.cat`` of the (1, heads, T, head_dim)
    tensors along their batch dim per part (one part in the usual case)."""
    flat = [t for pair in kv_layers for t in pair]
    home = flat[0].device
    whole = start == 0 and 2 * stop >= flat[0].shape[2]  # cat whole tensors (at most 2x the bytes), narrow once

    def piece(t: torch.Tensor) -> torch.Tensor:          # (1, heads, T or stop - start, head_dim), a view
        t = t if whole else t[:, :, start:stop]
        return t if t.device == home else t.to(home)

    parts = [torch.cat([piece(flat[j]) for j in group]) for group in layout.members]
    if whole and stop != flat[0].shape[2]:
        parts = [p[:, :, :stop] for p in parts]
    return parts


def cut_blocks(parts: Sequence[torch.Tensor], block_size: int, layout: Layout, fresh: bool = False) -> list[Block]:
    """Cut stacked parts (members, heads, n * block_size, head_dim) into n blocks that are views
    of one ``Segment``: one copy per part in all (none if ``fresh``: the parts are a private copy)."""
    n = parts[0].shape[2] // block_size
    own = tuple(p if fresh and p.is_contiguous() else p.clone(memory_format=torch.contiguous_format)
                for p in parts)
    segment = Segment(parts=own, blocks=[], block_size=block_size)
    per_block = parts_nbytes(own) // n if n else 0
    segment.blocks = blocks = [Block((), layout, per_block, segment, i) for i in range(n)]
    return list(blocks)


def compact(segment: Segment) -> None:
    """Free the bytes of a segment's evicted blocks: its live blocks move to fresh, smaller
    storage (one copy per part); a segment with no live block lets its storage go. If the copy
    raises, the segment is left unchanged."""
    live = [b for b in segment.blocks if b.alive]
    if len(live) == len(segment.blocks):
        return
    # copy first, then switch: if the copy raises (OOM) the segment is as it was, dead blocks
    # included, so a later compaction can try again
    parts = tuple(concat_parts(live)) if live else ()
    segment.blocks, segment.parts = live, parts
    for i, block in enumerate(live):
        block.index = i


def _runs(blocks: Sequence[Block]) -> list[list]:
    """Blocks grouped into runs of consecutive views of one segment: [segment, first, stop, block].

    A segment lists its blocks in index order, so a run is found by comparing a slice of
    ``blocks`` with a slice of the segment's list (identity, in C), not block by block.
    """
    runs: list[list] = []
    pos, n = 0, len(blocks)
    while pos < n:
        block = blocks[pos]
        segment = block.segment
        length = 1 if segment is None else _same_prefix(blocks, pos, segment.blocks, block.index)
        runs.append([segment, block.index, block.index + length, block])
        pos += length
    return runs


def _same_prefix(a: Sequence, i: int, b: Sequence, j: int) -> int:
    """How many items from a[i] and b[j] on are the same objects, in order (at least one is)."""
    lo, hi = 1, min(len(a) - i, len(b) - j)
    if a[i:i + hi] == b[j:j + hi]:                      # the usual case: the whole rest of the segment
        return hi
    while lo < hi - 1:                                 # a[i:i+lo] == b[j:j+lo], the first hi differ
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[i:i + mid] == b[j:j + mid] else (lo, mid)
    return lo


def concat_parts(blocks: Sequence[Block], copy: bool = True) -> list[torch.Tensor]:
    """The blocks' parts concatenated along the token dim: per part (members, heads, n*bs, head_dim).

    One ``torch.cat`` per part (one in the usual case) over runs of consecutive blocks, so a
    prefix stored by one insert is one slice; the result is a fresh tensor. ``copy=False``: blocks
    that are one run come back as views of their segment (read-only: never write into them).
    """
    if not blocks:
        return []
    runs = _runs(blocks)
    layout = blocks[0].layout
    if any(r[3].layout is not layout and r[3].layout != layout for r in runs):   # one layout per segment
        raise RuntimeError("matched blocks come from models of different shapes; "
                           "use one cache namespace per model")
    home = blocks[0].device

    def piece(run: list, g: int) -> torch.Tensor:
        segment, first, stop, block = run
        t = block.parts[g] if segment is None else segment.view(g, first, stop)
        return t if t.device == home else t.to(home)

    if not copy and len(runs) == 1:
        return [piece(runs[0], g) for g in range(len(layout.members))]
    return [torch.cat([piece(r, g) for r in runs], dim=2) for g in range(len(layout.members))]


def concat_blocks(blocks: Sequence[Block]) -> KV:
    """Per layer, the blocks' K and V concatenated along the sequence: (1, heads, n*bs, head_dim) views."""
    if not blocks:
        return []
    return blocks[0].layout.split([p.unsqueeze(1) for p in concat_parts(blocks)])


def to_cpu(block: Block) -> Block:
    """A CPU copy of a block: every layer's K/V in one copy per part (one in the usual case).

    From a CUDA device the copy goes to pinned memory without waiting for it: the host never
    reads a spilled block, it is only copied back (``to_home``) on the same stream, after this
    copy. Pinned memory makes both copies asynchronous DMA.
    """
    def host(t: torch.Tensor) -> torch.Tensor:
        cuda = t.device.type == "cuda"
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=cuda).copy_(t, non_blocking=cuda)

    return Block(own=tuple(host(p) for p in block.parts), layout=block.layout, nbytes=block.nbytes)


def to_home(block: Block) -> Block:
    """The block moved back to the device it came from (that of the first layer); from pinned
    memory to a CUDA device without a host wait (torch keeps the pinned buffer until it is read)."""
    home = block.layout.devices[0]
    return Block(own=tuple(p.to(home, non_blocking=p.is_pinned()) for p in block.parts), layout=block.layout,
                 nbytes=block.nbytes)


def _as_tokens(tokens: Sequence[int] | bytes) -> tuple[int, ...] | bytes:
    """Tokens as stored: int64 LE bytes as they are (what the cache passes), else a tuple."""
    return tokens if type(tokens) is bytes else tuple(tokens)


class SpillStore:
    """Evicted blocks kept on CPU up to ``max_bytes``, least recently spilled dropped first.

    Entries are keyed by the block's chained key; the tokens (a tuple, or int64 LE bytes as
    the cache passes them; one form per store) guard against collisions.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[int, tuple[tuple[int, ...], Block]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def spill(self, key: int, tokens: tuple[int, ...], block: Block) -> bool:
        """Keep a CPU copy of ``block``; False when it cannot fit the budget at all."""
        if block.nbytes > self.max_bytes:
            return False
        self.discard(key)
        while self.nbytes + block.nbytes > self.max_bytes:
            self._drop_oldest()
        self._entries[key] = (_as_tokens(tokens), to_cpu(block))
        self.nbytes += block.nbytes
        return True

    def contains(self, key: int, tokens: Sequence[int]) -> bool:
        """Whether a block with this key and these tokens is spilled here."""
        entry = self._entries.get(key)
        return entry is not None and entry[0] == _as_tokens(tokens)

    def pop(self, key: int) -> Block:
        """Remove a spilled block and return it (still on CPU; see ``to_home``)."""
        _, block = self._entries.pop(key)
        self.nbytes -= block.nbytes
        return block

    def restore(self, key: int, tokens: tuple[int, ...], block: Block) -> None:
        """Put back a block just popped (already on CPU), as the most recent entry."""
        self._entries[key] = (_as_tokens(tokens), block)
        self.nbytes += block.nbytes
        while self.nbytes > self.max_bytes:
            self._drop_oldest()

    def discard(self, key: int) -> None:
        """Forget a spilled block, if present."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1].nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def _drop_oldest(self) -> None:
        _, (_, block) = self._entries.popitem(last=False)
        self.nbytes -= block.nbytes
