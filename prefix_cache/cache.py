"""PrefixCache: reuse the K/V of shared prompt prefixes across generate() calls."""

from __future__ import annotations

import dataclasses
import numbers
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .identity import check_model_key, model_identity
from .keys import BlockChain, TokenIds, token_array
from .store import (KV, Block, Layout, Segment, SpillStore, block_nbytes, compact, concat_parts, cut_blocks,
                    dead_nbytes, layout_of, stack_kv, to_home)
from .tree import Node, RadixTree


@dataclass
class CacheStats:
    """Counters since the cache was built (a snapshot; ``cache.stats`` returns a fresh one)."""

    hits: int = 0              # match() calls that reused at least one block
    misses: int = 0            # match() calls that reused nothing
    hit_tokens: int = 0        # prompt tokens whose prefill was skipped
    inserted_blocks: int = 0   # blocks newly stored by insert()
    evictions: int = 0         # blocks removed from the device (spilled or dropped)
    offloads: int = 0          # evicted blocks spilled to CPU
    reloads: int = 0           # spilled blocks brought back to the device by a hit
    blocks: int = 0            # blocks held on the device now
    offloaded_blocks: int = 0  # blocks spilled to CPU now
    offloaded_bytes: int = 0   # bytes spilled to CPU now


@dataclass(eq=False)
class PrefixMatch:
    """The cached prefix of a prompt; holds its blocks until released."""

    num_tokens: int                                   # matched tokens, a multiple of block_size
    nodes: list[Node]                                 # the matched blocks, root side first
    cache: PrefixCache | None = field(default=None, repr=False)
    released: bool = False

    @property
    def layout(self) -> Layout | None:
        """Where each layer's K/V lives in ``kv_parts()`` (None on a miss)."""
        return self.nodes[0].handle.layout if self.nodes else None

    def kv(self) -> KV:
        """Per layer (key, value), each (1, heads, num_tokens, head_dim); [] on a miss.

        The tensors are views of one fresh tensor (``kv_parts()``), not of the cache's blocks.
        """
        parts = self.kv_parts()
        return self.layout.split([p.unsqueeze(1) for p in parts]) if parts else []

    def kv_parts(self, copy: bool = True) -> list[torch.Tensor]:
        """The matched K/V as the layout's parts, each (members, heads, num_tokens, head_dim): one
        ``torch.cat`` per part over the matched blocks (one part unless K and V or layers differ in
        shape); ``layout.split`` turns batched parts into per-layer views. [] on a miss.

        ``copy=False``: where the blocks were stored by one insert (one slice of its storage), views
        of the cache's own storage instead of a copy. They stay valid after ``release`` (an eviction
        moves survivors to new storage, it never writes into the old), but must only be read."""
        if self.released and self.nodes:
            raise RuntimeError("kv() after release(): read the K/V before releasing the match")
        if self.cache is None:
            return concat_parts([node.handle for node in self.nodes], copy)
        with self.cache._lock:           # another thread's eviction may be compacting these blocks' segment
            return concat_parts([node.handle for node in self.nodes], copy)

    def kv_tensor(self) -> torch.Tensor:
        """The matched K/V as one tensor (layers, 2, heads, num_tokens, head_dim); layer i's key is
        ``[i, 0]``, its value ``[i, 1]``. ValueError on a miss, or when K and V (or layers) differ
        in shape (then use ``kv()``)."""
        if not self.nodes:
            raise ValueError("kv_tensor() of a miss: check num_tokens first")
        if not self.layout.fused:
            raise ValueError("this model's layers differ in K/V shape (e.g. MLA); use kv() or kv_parts()")
        (part,) = self.kv_parts()                          # (2 * layers, heads, T, head_dim)
        return part.view(self.layout.num_layers, 2, *part.shape[1:])

    def release(self) -> None:
        """Let the cache evict these blocks again (idempotent)."""
        if self.cache is not None:
            self.cache.release(self)

    def __enter__(self) -> PrefixMatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PrefixCache:
    """A byte-bounded radix tree of K/V blocks shared by prompts with a common prefix.

    Args:
        max_bytes: device bytes the cached K/V may take.
        block_size: tokens per block; matches and inserts work in whole blocks.
        offload_bytes: CPU bytes for evicted blocks (0: evicted blocks are dropped).
        cache_drafts: whether ``specdec.generate`` also keeps a draft model's K/V here (under a
            namespace of its own, sharing this budget), so that a hit skips the draft's prefill of
            the shared prefix as well as the target's. False: only the target's K/V is cached and
            the draft model runs over the whole prompt on every call.
        min_hit_tokens: a match of fewer tokens is a miss (its blocks are not read): where
            prefilling a short prefix costs no more than reading it back (a launch-bound GPU), the
            cache prefills instead. None: 256 for a model on a CUDA device, 0 otherwise (every hit
            is used); on a GPU ``specdec.generate`` replaces the 256 by a threshold learned from its
            own prefill timings (``specdec.hit_policy``). An int is used as given.

    Every key holds the identity of the model whose K/V the block is (``match``/``insert`` with
    ``model=``; ``specdec.generate`` passes its target and draft): by default one that no other
    model object ever gets and that changes when the weights are moved, cast, quantized or
    overwritten in place, so a cache shared by several models never hands one model another's
    K/V. ``set_model_key(model, "name")`` keys a model by a name instead, so that the cache
    outlives the model object (``prefix_cache.identity`` tells the rules).
    """

    def __init__(self, max_bytes: int, block_size: int = 16, offload_bytes: int = 0,
                 cache_drafts: bool = True, min_hit_tokens: int | None = None) -> None:
        _check_sizes(max_bytes, block_size, offload_bytes)
        if not isinstance(cache_drafts, bool):
            raise TypeError(f"cache_drafts must be True or False, got {cache_drafts!r}")
        self.min_hit_tokens = _check_min_hit(min_hit_tokens)
        self._model_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # module -> model_key
        self.cache_drafts = cache_drafts
        self.max_bytes = int(max_bytes)
        self.block_size = int(block_size)
        self.offload_bytes = int(offload_bytes)
        self._lock = threading.Lock()
        self._tree = RadixTree(free=self._free)
        self._spill = SpillStore(self.offload_bytes)
        self._spilling = self.offload_bytes > 0     # whether evicted blocks go to the spill store
        self._stats = CacheStats()
        self._shrunk: list[Segment] = []             # segments that lost blocks since the last compaction

    @property
    def nbytes(self) -> int:
        """Bytes of K/V held on the device now (spilled bytes: ``stats.offloaded_bytes``): the
        cached blocks, plus evicted blocks' bytes that a failed compaction (an OOM copying the
        survivors) left in storage until the next eviction frees them."""
        with self._lock:
            return self._held()

    @property
    def stats(self) -> CacheStats:
        with self._lock:
            return dataclasses.replace(self._stats, blocks=self._tree.num_nodes,
                                       offloaded_blocks=len(self._spill),
                                       offloaded_bytes=self._spill.nbytes)

    def set_model_key(self, model: torch.nn.Module, model_key: str | None) -> None:
        """Key ``model``'s blocks by ``model_key`` (a name for its weights, e.g. 'org/model@rev') instead
        of by the model object, so another object loaded from the same weights and given the same
        key hits them. The parameters' names, shapes and dtypes still join the key (a quantized or
        cast model misses); loading other weights under the same key is the caller's error. None:
        back to the per-object identity."""
        model_identity(model)                              # TypeError for anything but a module
        if model_key is None:
            self._model_keys.pop(model, None)
        else:
            self._model_keys[model] = check_model_key(model_key)

    def model_identity(self, model: torch.nn.Module) -> str:
        """The identity this cache joins to the keys of ``model``'s blocks (``prefix_cache.identity``)."""
        return model_identity(model, self._model_keys.get(model))

    def hit_threshold(self, model: torch.nn.Module | str | None = None) -> int:
        """Fewest tokens a match must cover to be used: ``min_hit_tokens``, or when that is None,
        256 for a module on a CUDA device and 0 otherwise."""
        if self.min_hit_tokens is not None:
            return self.min_hit_tokens
        param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        return 256 if param is not None and param.device.type == "cuda" else 0

    def match(self, token_ids: TokenIds, namespace: str | None = None, model: torch.nn.Module | str | None = None,
              min_tokens: int | None = None) -> PrefixMatch:
        """The longest cached prefix of ``token_ids`` in whole blocks, leaving >= 1 token to run.

        ``model``: the model whose K/V is wanted (its identity joins every key), or its identity
        string (``model_identity(model)``, computed once for many calls); None: blocks inserted with
        no model. A prefix shorter than ``min_tokens`` (None: ``hit_threshold(model)``) is a miss.
        The returned match locks its blocks: call ``release`` (or use it as a context manager).
        """
        ids = token_array(token_ids)
        usable = max(len(ids) - 1, 0) // self.block_size
        chain = self._chain(ids[:usable * self.block_size], namespace, model)
        threshold = self.hit_threshold(model) if min_tokens is None else min_tokens
        with self._lock:
            path = self._tree.match_blocks(chain)          # hashes stop at the first miss
            self._tree.lock(path)
            try:
                self._reload(path, chain)
            except BaseException:                          # OOM bringing a block back, Ctrl-C: no lock leaks
                self._tree.release(path)
                raise
            if len(path) * self.block_size < threshold:   # cheaper to prefill than to read back
                self._tree.release(path)
                path = []
            self._count_match(path)
        return PrefixMatch(num_tokens=len(path) * self.block_size, nodes=path, cache=self)

    def release(self, match: PrefixMatch) -> None:
        """Unlock a match's blocks (a second release of the same match does nothing)."""
        with self._lock:
            if not match.released:
                match.released = True
                self._tree.release(match.nodes)

    def insert(self, token_ids: TokenIds, kv_layers: KV, namespace: str | None = None,
               model: torch.nn.Module | str | None = None) -> int:
        """Store the full blocks of ``token_ids`` from their K/V; returns how many tokens were new.

        ``model``: the model that computed the K/V, or its identity string (see ``match``).

        ``kv_layers``: per layer (k, v), each (1, heads, T, head_dim) with T >= len(token_ids),
        position t holding the K/V of ``token_ids[t]``. Slices are copied, so the caller's cache
        may be freed. Present blocks are only touched. Evicts least-recently-used unreferenced
        blocks to stay within ``max_bytes``; if the new blocks still don't fit, stores the prefix
        that does.
        """
        ids = token_array(token_ids)
        _check_kv(kv_layers, len(ids))
        chain = self._chain(ids, namespace, model)
        with self._lock:
            path = self._tree.match_blocks(chain)
            self._tree.lock(path)
            try:
                return self._store_new(path, chain, kv_layers) * self.block_size
            finally:
                self._tree.release(path)

    def evict(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of device memory if unreferenced blocks allow; returns bytes freed."""
        with self._lock:
            freed = sum(node.nbytes for node in self._tree.evict(nbytes))
            self._compact()
            return freed

    def clear(self) -> None:
        """Drop every block not held by an unreleased match, spilled ones included (stats are kept)."""
        with self._lock:
            evictions, self._spilling = self._stats.evictions, False   # dropped, not spilled or counted
            try:
                self._tree.clear()
            finally:
                self._spilling, self._stats.evictions = self.offload_bytes > 0, evictions
                self._compact()
            self._spill.clear()

    def _chain(self, ids, namespace: str | None, model: torch.nn.Module | str | None) -> BlockChain:
        if isinstance(model, torch.nn.Module):
            model = self.model_identity(model)
        elif model is not None and not isinstance(model, str):
            raise TypeError(f"model must be the torch.nn.Module that computed the K/V, its identity "
                            f"(cache.model_identity(model)) or None, got {type(model).__name__}")
        return BlockChain(ids, self.block_size, namespace, model)

    # -- internals (called with the lock held) ------------------------------------------------

    def _store_new(self, path: list[Node], chain: BlockChain, kv_layers: KV) -> int:
        """Append new blocks after ``path`` (locked); returns how many.

        All new blocks are views of one stack of the row's K/V (a ``Segment``): a copy per
        insert, not per block or layer. The host work per block is one hash, one ``Block`` and
        one tree node: keys are hashed in one pass and the nodes built in one loop
        (``RadixTree.extend``). Nothing can evict between building the nodes and returning, so
        the new nodes are not locked.
        """
        start, bs = len(path), self.block_size
        parent, parent_key = (path[-1], path[-1].key) if path else (self._tree.root, None)
        if start == len(chain) or chain.key_after(parent_key, start) in parent.children:
            return 0                                        # nothing new, or a key collision
        per_block = block_nbytes(kv_layers, bs)
        self._make_room((len(chain) - start) * per_block)
        count = min(len(chain) - start, max(self.max_bytes - self._tree.nbytes, 0) // per_block)
        if count == 0:
            return 0                                        # out of budget
        layout = layout_of(kv_layers)
        parts = stack_kv(kv_layers, start * bs, (start + count) * bs, layout)
        blocks = cut_blocks(parts, bs, layout, fresh=True)
        keys = chain.keys_from(parent_key, start, start + count)
        if len(self._spill):
            for key in keys:
                self._spill.discard(key)
        self._tree.extend(parent, keys, chain.token_bytes_range(start, start + count), blocks, blocks[0].nbytes)
        self._stats.inserted_blocks += count
        return count

    def _reload(self, path: list[Node], chain: BlockChain) -> None:
        """Extend a locked match ``path`` with spilled blocks brought back to the device."""
        while len(self._spill) and len(path) < len(chain):
            i, parent = len(path), (path[-1] if path else self._tree.root)
            key, tokens = chain.key_after(path[-1].key if path else None, i), chain.token_bytes(i)
            if not self._spill.contains(key, tokens) or key in parent.children:
                break                                       # not spilled, or a key collision
            block = self._spill.pop(key)                    # popped first: making room may spill more
            try:
                home = to_home(block) if self._make_room(block.nbytes) else None
            except BaseException:
                self._spill.restore(key, tokens, block)
                raise
            if home is None:
                self._spill.restore(key, tokens, block)
                break
            self._add(parent, key, tokens, home, path)
            self._stats.reloads += 1

    def _add(self, parent: Node, key: int, tokens: bytes, block: Block, path: list[Node]) -> None:
        node = self._tree.insert(parent, key, tokens, block, block.nbytes)
        self._tree.lock([node])
        path.append(node)

    def _make_room(self, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit in the budget; whether they do."""
        self._compact()                              # what a failed compaction left, first
        excess = self._tree.nbytes + nbytes - self.max_bytes
        if excess > 0:
            self._tree.evict(excess)
            self._compact()
        return self._tree.nbytes + nbytes <= self.max_bytes

    def _held(self) -> int:
        """Device bytes held: the tree's blocks + evicted bytes still in uncompacted segments."""
        return self._tree.nbytes + sum(dead_nbytes(s) for s in {id(s): s for s in self._shrunk}.values())

    def _free(self, node: Node) -> None:
        """Tree callback for an evicted node: spill its block to CPU when there is a budget. Changes
        nothing if the spill raises (the tree then keeps the node)."""
        spilled = self._spilling and self._spill.spill(node.key, node._tokens, node.handle)
        self._stats.evictions += 1
        self._stats.offloads += int(spilled)
        block, node.handle = node.handle, None
        block.alive = False
        if block.segment is not None:
            self._shrunk.append(block.segment)

    def _compact(self) -> None:
        """Give evicted blocks' bytes back: shrink each segment that lost blocks (one copy each).
        A segment leaves the to-do list only once compacted: after a failed copy (OOM) it stays,
        its dead bytes still counted in ``nbytes``, and the next eviction tries again."""
        while self._shrunk:
            compact(self._shrunk[-1])
            self._shrunk.pop()

    def _count_match(self, path: list[Node]) -> None:
        for node in path:
            node.hit_count += 1
        if path:
            self._stats.hits += 1
            self._stats.hit_tokens += len(path) * self.block_size
        else:
            self._stats.misses += 1


def _check_sizes(max_bytes: int, block_size: int, offload_bytes: int) -> None:
    for name, value in (("max_bytes", max_bytes), ("block_size", block_size), ("offload_bytes", offload_bytes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
            raise TypeError(f"{name} must be a number, got {value!r}; e.g. PrefixCache(max_bytes=2 << 30) "
                            "for 2 GiB of K/V")
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be finite, got {value!r}; e.g. PrefixCache(max_bytes=2 << 30) "
                             "for 2 GiB of K/V")
        if value != int(value):   # int() would round it silently (0.5 bytes -> 0, 1.5 tokens -> 1)
            unit = "tokens" if name == "block_size" else "bytes"
            raise ValueError(f"{name} must be a whole number of {unit}, got {value!r}; e.g. "
                             f"{name}={max(int(value), 1)}")
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be > 0 (device bytes for cached K/V), got {max_bytes}; "
                         "e.g. PrefixCache(max_bytes=2 << 30) for 2 GiB")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1 token, got {block_size}; 16 is a good default")
    if offload_bytes < 0:
        raise ValueError(f"offload_bytes must be >= 0 (0 disables CPU offload), got {offload_bytes}")


def _check_min_hit(min_hit_tokens: object) -> int | None:
    if min_hit_tokens is None:
        return None
    if isinstance(min_hit_tokens, bool) or not isinstance(min_hit_tokens, numbers.Integral):
        raise TypeError(f"min_hit_tokens must be an int (tokens) or None (by device), got {min_hit_tokens!r}")
    if min_hit_tokens < 0:
        raise ValueError(f"min_hit_tokens must be >= 0 tokens, got {min_hit_tokens}; 0 uses every hit")
    return int(min_hit_tokens)


def _check_kv(kv_layers: KV, num_ids: int) -> None:
    """ValueError unless kv_layers is a list of (k, v) shaped (1, heads, T, head_dim), T >= num_ids."""
    if not isinstance(kv_layers, (list, tuple)) or not kv_layers:
        raise ValueError("kv_layers must be a non-empty list over layers of (key, value) tensors; "
                         "read them from a DynamicCache with prefix_cache.hf_cache.kv_from_cache(cache)")
    lengths = set()
    for i, pair in enumerate(kv_layers):
        k, v = _layer_pair(pair, i)
        ks, vs = k.shape, v.shape                          # one torch.Size each, not one per read
        if ks[0] != 1 or vs[0] != 1:
            raise ValueError(f"layer {i}: batch size is {ks[0]}, must be 1; select one row "
                             "(kv_from_cache(cache, row=r)) and insert rows one by one")
        if ks[1] != vs[1] or ks[2] != vs[2]:
            raise ValueError(f"layer {i}: key {tuple(ks)} and value {tuple(vs)} disagree "
                             "on heads or sequence length")
        lengths.add(ks[2])
    if len(lengths) > 1:
        raise ValueError(f"layers hold different sequence lengths {sorted(lengths)}; pass K/V of one "
                         "full-attention cache (sliding-window caches are not supported)")
    if lengths.pop() < num_ids:
        raise ValueError(f"kv_layers hold {k.shape[2]} positions but {num_ids} token ids were given; "
                         f"pass only the ids the K/V belongs to, e.g. token_ids[:{k.shape[2]}]")


def _layer_pair(pair: object, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(pair, (list, tuple)) and len(pair) == 2:
        k, v = pair
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and v.dim() == 4:
            return k, v
    raise ValueError(f"layer {i}: expected a (key, value) pair of 4-D tensors shaped "
                     "(1, heads, T, head_dim)")
