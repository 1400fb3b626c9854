"""A radix tree of fixed-size blocks, keyed by chained block keys.

The tree knows nothing of models or tensors: each node holds an opaque block
``handle`` and its size in bytes. Leaves that no request references are evicted
least-recently-used first, and a ``free`` callback receives each evicted node.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False, slots=True)
class Node:
    """One block of the tree."""

    key: int                                 # chained block key (0 for the root)
    parent: Node | None                      # None only for the root
    tokens: tuple[int, ...]                  # the block's token ids, guards against key collisions
    handle: Any = None                       # opaque block handle (the store's Block)
    nbytes: int = 0                          # bytes the handle holds
    children: dict[int, Node] = field(default_factory=dict)  # child key -> child
    lock_ref: int = 0                        # requests using this block; > 0 means not evictable
    last_access: int = 0                     # logical clock of the last match/insert touching it
    hit_count: int = 0                       # times a match reused this block

    @property
    def is_leaf(self) -> bool:
        return not self.children


class RadixTree:
    """Blocks chained from one root; namespaces live in the keys themselves."""

    def __init__(self, free: Callable[[Node], None] = lambda node: None) -> None:
        self.root = Node(key=0, parent=None, tokens=())
        self.root.lock_ref = 1               # the root is never evicted
        self.free = free
        self.nbytes = 0
        self.num_nodes = 0
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def match(self, keys: Sequence[int], tokens_per_block: Sequence[tuple[int, ...]]) -> list[Node]:
        """Longest chain of nodes whose keys and tokens equal the given blocks; touches them."""
        node, path, now = self.root, [], self._tick()
        for key, tokens in zip(keys, tokens_per_block):
            child = node.children.get(key)
            if child is None or child.tokens != tuple(tokens):
                break
            child.last_access = now
            path.append(child)
            node = child
        return path

    def insert(self, parent: Node | None, key: int, tokens: tuple[int, ...], handle: Any, nbytes: int) -> Node:
        """Add a new child block under ``parent`` (None: the root). The key must be new there."""
        parent = parent or self.root
        if key in parent.children:
            raise KeyError(f"block key {key:#x} already present under this parent")
        node = Node(key, parent, tokens if type(tokens) is tuple else tuple(tokens), handle, nbytes,
                    last_access=self._tick())
        parent.children[key] = node
        self.nbytes += nbytes
        self.num_nodes += 1
        return node

    def lock(self, nodes: Sequence[Node]) -> None:
        """Mark nodes as in use: they cannot be evicted until released."""
        for node in nodes:
            node.lock_ref += 1

    def release(self, nodes: Sequence[Node]) -> None:
        """Undo one ``lock`` of each node."""
        for node in nodes:
            if node.lock_ref <= 0:
                raise RuntimeError("release() of a block that is not locked (released twice?)")
            node.lock_ref -= 1

    def evict(self, bytes_needed: int) -> list[Node]:
        """Evict unreferenced leaves, least recently used first, until ``bytes_needed`` are freed.

        A parent whose last child goes becomes a leaf and may be evicted in the same call.
        Returns the evicted nodes (each already passed to ``free``).
        """
        heap = [(n.last_access, i, n) for i, n in enumerate(self.nodes()) if self._evictable(n)]
        heapq.heapify(heap)
        evicted, freed, tie = [], 0, len(heap)
        while heap and freed < bytes_needed:
            _, _, node = heapq.heappop(heap)
            self._remove(node)
            evicted.append(node)
            freed += node.nbytes
            parent = node.parent
            if parent is not None and self._evictable(parent):
                tie += 1
                heapq.heappush(heap, (parent.last_access, tie, parent))
        return evicted

    def clear(self) -> list[Node]:
        """Evict every unreferenced block (locked nodes and their ancestors stay)."""
        return self.evict(self.nbytes + 1) if self.num_nodes else []

    def nodes(self) -> Iterator[Node]:
        """Every node except the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _evictable(self, node: Node) -> bool:
        return node is not self.root and node.is_leaf and node.lock_ref == 0

    def _remove(self, node: Node) -> None:
        del node.parent.children[node.key]
        self.nbytes -= node.nbytes
        self.num_nodes -= 1
        self.free(node)
