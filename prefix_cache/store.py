"""Storage of one block's K/V for every layer, and a CPU spill area for evicted blocks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]   # per layer: (key, value), each (1, heads, T, head_dim)


@dataclass(eq=False)
class Block:
    """One block's K/V for every layer, and the devices it lives on when in use."""

    kv: KV                                 # per layer (k, v), each (1, heads, block_size, head_dim)
    home: tuple[torch.device, ...]         # device of each layer's tensors when on device
    nbytes: int                            # bytes of all tensors of the block


def kv_nbytes(kv: KV) -> int:
    """Bytes held by a list of (k, v) tensors."""
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def block_nbytes(kv_layers: KV, block_size: int) -> int:
    """Bytes one block of ``block_size`` positions cut from ``kv_layers`` will take."""
    def one(t: torch.Tensor) -> int:                     # t: (1, heads, T, head_dim)
        return t.shape[0] * t.shape[1] * block_size * t.shape[3] * t.element_size()

    return sum(one(k) + one(v) for k, v in kv_layers)


def copy_block(kv_layers: KV, start: int, stop: int) -> Block:
    """A block holding its own copy of positions ``start:stop`` of every layer."""
    fmt = torch.contiguous_format
    kv = [(k[:, :, start:stop].clone(memory_format=fmt), v[:, :, start:stop].clone(memory_format=fmt))
          for k, v in kv_layers]  # (1, heads, block_size, head_dim)
    return Block(kv=kv, home=tuple(k.device for k, _ in kv), nbytes=kv_nbytes(kv))


def concat_blocks(blocks: Sequence[Block]) -> KV:
    """Per layer, the blocks' K and V concatenated along the sequence: (1, heads, n*bs, head_dim)."""
    if not blocks:
        return []
    layers = range(len(blocks[0].kv))
    return [(torch.cat([b.kv[i][0] for b in blocks], dim=2),
             torch.cat([b.kv[i][1] for b in blocks], dim=2)) for i in layers]


def to_cpu(block: Block) -> Block:
    """A CPU copy of a block (pinned memory when CUDA is available, for fast reloads)."""
    pin = torch.cuda.is_available()

    def host(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin).copy_(t)

    kv = [(host(k), host(v)) for k, v in block.kv]
    return Block(kv=kv, home=block.home, nbytes=block.nbytes)


def to_home(block: Block) -> Block:
    """The block moved back to the devices it came from."""
    kv = [(k.to(dev), v.to(dev)) for (k, v), dev in zip(block.kv, block.home)]
    return Block(kv=kv, home=block.home, nbytes=block.nbytes)


class SpillStore:
    """Evicted blocks kept on CPU up to ``max_bytes``, least recently spilled dropped first.

    Entries are keyed by the block's chained key; the tokens guard against collisions.
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
        self._entries[key] = (tuple(tokens), to_cpu(block))
        self.nbytes += block.nbytes
        return True

    def contains(self, key: int, tokens: Sequence[int]) -> bool:
        """Whether a block with this key and these tokens is spilled here."""
        entry = self._entries.get(key)
        return entry is not None and entry[0] == tuple(tokens)

    def pop(self, key: int) -> Block:
        """Remove a spilled block and return it (still on CPU; see ``to_home``)."""
        _, block = self._entries.pop(key)
        self.nbytes -= block.nbytes
        return block

    def restore(self, key: int, tokens: tuple[int, ...], block: Block) -> None:
        """Put back a block just popped (already on CPU), as the most recent entry."""
        self._entries[key] = (tuple(tokens), block)
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
