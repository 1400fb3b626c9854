"""A radix tree of fixed-size blocks, keyed by chained block keys.

The tree knows nothing of models or tensors: each node holds an opaque block
``handle`` and its size in bytes. Leaves that no request references are evicted
least-recently-used first, and a ``free`` callback receives each evicted node.

Blocks added by one ``extend`` form a ``Run``: their nodes in order and their tokens as one bytes
string. ``match_blocks`` compares a run's tokens with the prompt's in one bytes comparison instead of
one dict lookup and one comparison per block, so a long shared prefix costs a few Python steps per
run, not per block (plus one attribute write per block to mark it used).
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol


class Node:
    """One block of the tree.

    A plain class with slots (cheaper to build than a dataclass: an insert builds one per block).
    ``tokens`` guards against key collisions; the tree stores them as given, a tuple of ints or
    their int64 LE bytes (what ``PrefixCache`` passes: one slice per block, no per-token objects),
    and ``Node.tokens`` reads both as a tuple.
    """

    __slots__ = ("key", "parent", "_tokens", "handle", "nbytes", "children", "lock_ref", "last_access",
                 "hit_count", "run", "run_index")

    def __init__(self, key: int, parent: Node | None, tokens: tuple[int, ...] | bytes, handle: Any = None,
                 nbytes: int = 0, children: dict[int, Node] | None = None, lock_ref: int = 0,
                 last_access: int = 0, hit_count: int = 0) -> None:
        self.key = key                       # chained block key (0 for the root)
        self.parent = parent                 # None only for the root
        self._tokens = tokens                # the block's token ids (tuple, or int64 LE bytes)
        self.handle = handle                 # opaque block handle (the store's Block)
        self.nbytes = nbytes                 # bytes the handle holds
        self.children = {} if children is None else children  # child key -> child
        self.lock_ref = lock_ref             # requests using this block; > 0 means not evictable
        self.last_access = last_access       # logical clock of the last match/insert touching it
        self.hit_count = hit_count           # times a match reused this block
        self.run: Run | None = None          # the blocks added with it by one ``extend`` (None: added alone)
        self.run_index = 0                   # its position in ``run.nodes``

    @property
    def tokens(self) -> tuple[int, ...]:
        """The block's token ids."""
        t = self._tokens
        return struct.unpack(f"<{len(t) >> 3}q", t) if type(t) is bytes else t

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __repr__(self) -> str:
        return (f"Node(key={self.key:#x}, tokens={self.tokens!r}, nbytes={self.nbytes}, "
                f"children={len(self.children)}, lock_ref={self.lock_ref}, last_access={self.last_access}, "
                f"hit_count={self.hit_count})")


def _as_tokens(tokens: Sequence[int] | bytes) -> tuple[int, ...] | bytes:
    t = type(tokens)
    return tokens if t is tuple or t is bytes else tuple(tokens)


class Run:
    """Nodes added by one ``extend``, each the child of the one before, and their tokens (bytes) joined.

    Eviction takes leaves, so a run loses nodes from its end only: ``nodes`` is trimmed as they go,
    and every node in it is still in the tree.
    """

    __slots__ = ("nodes", "tokens")

    def __init__(self, nodes: list[Node], tokens: bytes) -> None:
        self.nodes = nodes
        self.tokens = tokens


class Blocks(Protocol):
    """A prompt's full blocks as ``match_blocks`` reads them (``prefix_cache.keys.BlockChain``)."""

    def __len__(self) -> int: ...

    def key_after(self, parent_key: int | None, i: int) -> int:
        """Key of block i as the child of a block keyed ``parent_key`` (None: of the root)."""

    def token_bytes(self, i: int) -> bytes:
        """Block i's tokens as int64 LE bytes."""

    def equal_blocks(self, i: int, tokens: bytes, j: int, limit: int) -> int:
        """How many blocks from i equal those of ``tokens`` from block j, at most ``limit``."""


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
            if child is None or child._tokens != _as_tokens(tokens):
                break
            child.last_access = now
            path.append(child)
            node = child
        return path

    def match_blocks(self, blocks: Blocks) -> list[Node]:
        """``match`` for a tree whose tokens are bytes (what ``PrefixCache`` stores): the longest chain
        of nodes equal to ``blocks``, touched. One key is computed per step from the parent node's own
        key; a step into a run takes as many of its blocks as equal the prompt's, compared in one go."""
        node, path, i, n = self.root, [], 0, len(blocks)
        while i < n:
            child = node.children.get(blocks.key_after(None if node is self.root else node.key, i))
            if child is None or child._tokens != blocks.token_bytes(i):
                break
            run, j = child.run, child.run_index
            m = 1 if run is None else 1 + blocks.equal_blocks(i + 1, run.tokens, j + 1,
                                                              min(len(run.nodes) - j, n - i) - 1)
            path.extend(run.nodes[j:j + m] if m > 1 else (child,))
            i, node = i + m, path[-1]
        now = self._tick()
        for node in path:
            node.last_access = now
        return path

    def insert(self, parent: Node | None, key: int, tokens: tuple[int, ...], handle: Any, nbytes: int) -> Node:
        """Add a new child block under ``parent`` (None: the root). The key must be new there."""
        parent = parent or self.root
        if key in parent.children:
            raise KeyError(f"block key {key:#x} already present under this parent")
        node = Node(key, parent, _as_tokens(tokens), handle, nbytes, None, 0, self._tick())
        parent.children[key] = node
        self.nbytes += nbytes
        self.num_nodes += 1
        return node

    def extend(self, parent: Node | None, keys: Sequence[int], tokens: Sequence[tuple[int, ...] | bytes],
               handles: Sequence[Any], nbytes: int) -> list[Node]:
        """Add a chain of new blocks under ``parent`` (None: the root), each of ``nbytes``; returns
        its nodes. The same as ``insert`` block by block (each block the child of the one before,
        touched in order), in one loop: only the first key can already be present, under ``parent``.
        ``tokens``: tuples or bytes, stored as they are; bytes make the nodes one ``Run``."""
        parent = parent or self.root
        if not keys:
            return []
        if keys[0] in parent.children:
            raise KeyError(f"block key {keys[0]:#x} already present under this parent")
        nodes, clock = [], self._clock
        append, new = nodes.append, Node
        for key, toks, handle in zip(keys, tokens, handles):
            clock += 1
            node = new(key, parent, toks, handle, nbytes, None, 0, clock)
            parent.children[key] = node
            append(node)
            parent = node
        self._clock = clock
        self.nbytes += nbytes * len(nodes)
        self.num_nodes += len(nodes)
        if type(tokens[0]) is bytes:                     # what match_blocks reads in one go
            run = Run(list(nodes), b"".join(tokens))
            for j, node in enumerate(nodes):
                node.run, node.run_index = run, j
        return nodes

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
        Returns the evicted nodes (each already passed to ``free``). If ``free`` raises, the node
        it was given stays in the tree (the ones evicted before it are gone) and the error propagates.
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
        # free first: if it raises (an OOM spilling the block), the node stays, linked and counted,
        # so the tree's bytes still equal what its blocks hold
        self.free(node)
        del node.parent.children[node.key]
        self.nbytes -= node.nbytes
        self.num_nodes -= 1
        if node.run is not None:                  # a leaf: the last of its run still in the tree
            del node.run.nodes[node.run_index:]
            node.run = None
