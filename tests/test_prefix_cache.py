"""Prefix cache units: keys, tree, cache, offload, threads, and a stateful property test.

K/V here are small fake tensors from a simulated allocator: position t of a sequence holds
a value derived from ids[:t+1] and the namespace, as a real model's K/V would be.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import run_in_threads
from prefix_cache import CacheStats, PrefixCache, PrefixMatch
from prefix_cache.keys import block_key, block_keys, namespace_bytes, root_key
from prefix_cache.store import kv_nbytes
from prefix_cache.tree import RadixTree

BLOCK_SIZES = [1, 4, 16]
LAYERS, HEADS, DIM = 2, 2, 3
NAMESPACES = [None, "tenant-a", "tenant-b"]


def fake_kv(ids: list[int], namespace: str | None = None, extra: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k, v) of shape (1, HEADS, len(ids) + extra, DIM); each position depends on its whole prefix."""
    salt = NAMESPACES.index(namespace) * 7919 if namespace in NAMESPACES else 17
    acc, vals = salt, []
    for i, t in enumerate(list(ids) + [0] * extra):
        acc = (acc * 31 + t + 1) % 100003
        vals.append(float(acc))
    base = torch.tensor(vals).view(1, 1, -1, 1).expand(1, HEADS, -1, DIM)       # (1, H, T, D)
    offs = torch.arange(HEADS * DIM, dtype=torch.float32).view(1, HEADS, 1, DIM)
    return [((base + offs + 1000 * layer).contiguous(), (-base - offs - layer).contiguous())
            for layer in range(LAYERS)]


def block_bytes(block_size: int) -> int:
    return LAYERS * 2 * HEADS * block_size * DIM * 4


def assert_kv_equal(got, want) -> None:
    assert len(got) == len(want)
    for (k1, v1), (k2, v2) in zip(got, want):
        assert k1.shape == k2.shape and torch.equal(k1, k2) and torch.equal(v1, v2)


def check_invariants(cache: PrefixCache, namespaces=NAMESPACES, outstanding: list[PrefixMatch] = ()) -> None:
    """Keys chain correctly, ref counts match live matches, bytes add up and stay in budget."""
    tree, total, refs, storages = cache._tree, 0, {}, {}
    for m in outstanding:
        if not m.released:
            for n in m.nodes:
                refs[id(n)] = refs.get(id(n), 0) + 1
    for child in tree.root.children.values():
        ns = next(ns for ns in namespaces
                  if block_key(root_key(ns), child.tokens, namespace_bytes(ns)) == child.key)
        stack = [child]
        while stack:
            node = stack.pop()
            parent_key = root_key(ns) if node.parent is tree.root else node.parent.key
            assert node.key == block_key(parent_key, node.tokens, namespace_bytes(ns))
            assert len(node.tokens) == cache.block_size
            assert node.lock_ref == refs.pop(id(node), 0) >= 0
            assert node.handle is not None and node.nbytes == kv_nbytes(node.handle.kv)
            for part in node.handle.parts:
                storages[part.untyped_storage().data_ptr()] = part.untyped_storage().nbytes()
            total += node.nbytes
            stack.extend(node.children.values())
    assert not refs, "a locked node was evicted"
    assert total == tree.nbytes == cache.nbytes <= cache.max_bytes
    assert sum(storages.values()) == total, "evicted blocks' bytes are still held (segments not compacted)"
    assert cache._spill.nbytes <= cache.offload_bytes


# ---------------------------------------------------------------- keys

def test_keys_equal_prefixes_equal_chains():
    a = block_keys(list(range(40)), 8)
    b = block_keys(list(range(32)) + [99] * 9, 8)
    assert len(a) == 5 and len(b) == 5
    assert a[:4] == b[:4] and a[4] != b[4]
    assert block_keys(torch.arange(40), 8) == a                 # tensors and lists agree
    assert block_keys(list(range(7)), 8) == []                  # full blocks only


def test_keys_namespace_changes_every_key():
    ids = list(range(64))
    plain, a, b, empty = (block_keys(ids, 4, ns) for ns in (None, "a", "b", ""))
    for other in (a, b, empty):
        assert all(x != y for x, y in zip(plain, other))
    assert all(x != y for x, y in zip(a, b))


@pytest.mark.parametrize("pos", [0, 5, 17, 31])
def test_keys_changed_token_changes_its_block_and_later(pos):
    ids = list(range(100, 132))
    changed = ids.copy()
    changed[pos] += 1
    a, b = block_keys(ids, 4), block_keys(changed, 4)
    blk = pos // 4
    assert a[:blk] == b[:blk]
    assert all(x != y for x, y in zip(a[blk:], b[blk:]))


def test_keys_reject_non_integer_ids():
    for bad in ([1.5, 2], ["a"], torch.ones(4), torch.ones(2, 3, dtype=torch.long), [True]):
        with pytest.raises(ValueError, match="token"):
            block_keys(bad, 2)


# ---------------------------------------------------------------- tree

def _chain_tree(tree: RadixTree, ids: list[int], bs: int, parent=None):
    keys, toks = block_keys(ids, bs), [tuple(ids[i:i + bs]) for i in range(0, len(ids) // bs * bs, bs)]
    nodes = []
    for key, t in zip(keys, toks):
        parent = tree.insert(parent, key, t, handle=t, nbytes=1)
        nodes.append(parent)
    return keys, toks, nodes


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_tree_match_insert_and_collision_guard(bs):
    tree = RadixTree()
    ids = list(range(3 * bs))
    keys, toks, nodes = _chain_tree(tree, ids, bs)
    assert tree.match(keys, toks) == nodes and tree.nbytes == 3
    assert tree.match(keys[:2], toks[:2]) == nodes[:2]
    bad = [toks[0], tuple(t + 1 for t in toks[1]), toks[2]]       # same keys, different tokens
    assert tree.match(keys, bad) == nodes[:1]
    with pytest.raises(KeyError):
        tree.insert(None, keys[0], toks[0], None, 1)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_tree_evicts_lru_leaves_first_then_parents(bs):
    freed = []
    tree = RadixTree(free=freed.append)
    _, _, a = _chain_tree(tree, [1] * (2 * bs), bs)                     # a0 -> a1
    b = tree.insert(a[0], 12345, (2,) * bs, None, 1)                    # a0 -> b (newer than a1)
    keys_c, toks_c, c = _chain_tree(tree, [3] * (2 * bs), bs)           # c0 -> c1
    tree.match(keys_c[:1], toks_c[:1])                                  # touch c0 only
    tree.lock([c[1]])
    assert tree.evict(2) == [a[1], b]
    assert tree.evict(1) == [a[0]]                                      # a0 became a leaf
    assert tree.evict(10) == []                                         # c1 locked, c0 its parent
    tree.release([c[1]])
    assert tree.evict(10) == [c[1], c[0]] and freed == [a[1], b, a[0], c[1], c[0]]
    assert tree.nbytes == 0 and tree.num_nodes == 0
    with pytest.raises(RuntimeError):
        tree.release([c[1]])


# ---------------------------------------------------------------- cache

@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_cache_insert_match_roundtrip(bs):
    cache = PrefixCache(max_bytes=1 << 20, block_size=bs)
    rng = random.Random(bs)
    ids = [rng.randrange(50) for _ in range(3 * bs)]
    assert cache.insert(ids, fake_kv(ids)) == 3 * bs
    assert cache.insert(ids, fake_kv(ids)) == 0                           # present: touched only
    assert cache.nbytes == 3 * block_bytes(bs) and cache.stats.inserted_blocks == 3
    with cache.match(ids + [7]) as hit:
        assert hit.num_tokens == 3 * bs
        assert_kv_equal(hit.kv(), fake_kv(ids[:3 * bs]))
        assert all(n.lock_ref == 1 for n in hit.nodes)
    assert all(n.lock_ref == 0 for n in hit.nodes)
    hit = cache.match(ids)                                                # keeps one token to run
    assert hit.num_tokens == 2 * bs
    cache.release(hit)
    cache.release(hit)                                                    # idempotent
    miss = cache.match([999] * (2 * bs))
    assert miss.num_tokens == 0 and miss.kv() == []
    s = cache.stats
    assert (s.hits, s.misses, s.hit_tokens) == (2, 1, 5 * bs)
    check_invariants(cache)


def test_cache_insert_copies_and_accepts_longer_kv():
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    ids = list(range(10))
    kv = fake_kv(ids, extra=3)                                            # T = 13 >= 10 ids
    assert cache.insert(torch.tensor(ids), kv) == 8
    for k, v in kv:
        k.zero_(), v.zero_()                                              # caller frees/reuses its cache
    with cache.match(ids) as hit:
        assert_kv_equal(hit.kv(), fake_kv(ids[:8]))


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_cache_namespace_isolation(bs):
    cache = PrefixCache(max_bytes=1 << 20, block_size=bs)
    ids = list(range(2 * bs + 1))
    cache.insert(ids, fake_kv(ids, "tenant-a"), namespace="tenant-a")
    for ns in (None, "tenant-b", ""):
        with cache.match(ids, namespace=ns) as hit:
            assert hit.num_tokens == 0
    with cache.match(ids, namespace="tenant-a") as hit:
        assert hit.num_tokens == 2 * bs
        assert_kv_equal(hit.kv(), fake_kv(ids[:2 * bs], "tenant-a"))
    cache.insert(ids, fake_kv(ids), namespace=None)                       # same ids, own blocks
    assert cache.stats.inserted_blocks == 2 * (len(ids) // bs)
    check_invariants(cache, NAMESPACES + [""])


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_cache_eviction_lru_and_budget(bs):
    cache = PrefixCache(max_bytes=4 * block_bytes(bs), block_size=bs)
    seqs = [[s] * (2 * bs) for s in (1, 2)]
    for ids in seqs:
        cache.insert(ids, fake_kv(ids))
    with cache.match(seqs[0] + [0]):                                       # seq 0 most recent
        pass
    third = [3] * (2 * bs)
    assert cache.insert(third, fake_kv(third)) == 2 * bs                   # evicts seq 1 (LRU)
    assert cache.stats.evictions == 2
    assert cache.match(seqs[1] + [0]).num_tokens == 0
    with cache.match(seqs[0] + [0]) as hit:
        assert hit.num_tokens == 2 * bs
        big = [4] * (5 * bs)
        assert cache.insert(big, fake_kv(big)) == 2 * bs                   # only what fits next to the lock
        assert cache.nbytes == cache.max_bytes
        check_invariants(cache, outstanding=[hit])
    assert cache.evict(1) == block_bytes(bs)
    cache.clear()
    assert cache.nbytes == 0 and cache.stats.blocks == 0


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_cache_offload_spills_and_reloads(bs):
    cache = PrefixCache(max_bytes=2 * block_bytes(bs), block_size=bs, offload_bytes=2 * block_bytes(bs))
    a, b, c = ([s] * (2 * bs) for s in (1, 2, 3))
    cache.insert(a, fake_kv(a))
    cache.insert(b, fake_kv(b))                                           # a spills to CPU
    s = cache.stats
    assert (s.evictions, s.offloads, s.offloaded_blocks) == (2, 2, 2)
    assert s.offloaded_bytes == 2 * block_bytes(bs) and cache.nbytes == 2 * block_bytes(bs)
    with cache.match(a + [0]) as hit:                                     # a comes back, b spills
        assert hit.num_tokens == 2 * bs
        assert_kv_equal(hit.kv(), fake_kv(a))
        assert all(k.device.type == "cpu" for k, _ in hit.kv())
    assert cache.stats.reloads == 2 and cache.stats.offloads == 4
    cache.insert(c, fake_kv(c))                                           # a spills, b is dropped (LRU)
    assert cache.match(b + [0]).num_tokens == 0
    with cache.match(a + [0]) as hit:
        assert_kv_equal(hit.kv(), fake_kv(a))
    check_invariants(cache)
    cache.clear()
    assert cache.stats.offloaded_bytes == 0 and cache.nbytes == 0


def test_cache_validation_messages():
    for kwargs, msg in [(dict(max_bytes=0), "max_bytes"), (dict(max_bytes=1, block_size=0), "block_size"),
                        (dict(max_bytes=1, offload_bytes=-1), "offload_bytes")]:
        with pytest.raises(ValueError, match=msg):
            PrefixCache(**kwargs)
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    ids = list(range(8))
    kv = fake_kv(ids)
    with pytest.raises(ValueError, match="integers"):
        cache.insert([0.5] * 8, kv)
    with pytest.raises(ValueError, match="1-D"):
        cache.match(torch.tensor([ids]))
    with pytest.raises(ValueError, match="token_ids\\[:6\\]"):
        cache.insert(ids, fake_kv(ids[:6]))
    with pytest.raises(ValueError, match="batch size"):
        cache.insert(ids, [(k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)) for k, v in kv])
    with pytest.raises(ValueError, match="different sequence lengths"):
        cache.insert(ids, [kv[0], fake_kv(ids, extra=1)[1]])
    with pytest.raises(ValueError, match="disagree"):
        cache.insert(ids, [(kv[0][0], kv[0][1][:, :, :5])])
    with pytest.raises(ValueError, match="non-empty list"):
        cache.insert(ids, [])
    with pytest.raises(ValueError, match="4-D"):
        cache.insert(ids, [(kv[0][0][0], kv[0][1][0])])
    assert cache.nbytes == 0 and isinstance(cache.stats, CacheStats)


def test_cache_thread_safety():
    bs = 4
    cache = PrefixCache(max_bytes=12 * block_bytes(bs), block_size=bs, offload_bytes=6 * block_bytes(bs))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            ids = [rng.randrange(3) for _ in range(rng.randrange(1, 6 * bs))]
            ns = rng.choice(NAMESPACES)
            if rng.random() < 0.5:
                cache.insert(ids, fake_kv(ids, ns), namespace=ns)
            else:
                with cache.match(ids, namespace=ns) as hit:
                    assert_kv_equal(hit.kv(), fake_kv(ids[:hit.num_tokens], ns) if hit.num_tokens else [])

    run_in_threads(worker, 6, timeout=30)
    check_invariants(cache)
    assert all(n.lock_ref == 0 for n in cache._tree.nodes())


# ---------------------------------------------------------------- block layout and op counts

def _random_kv(shapes, T, seed=0):
    """Per layer (k, v) with given (heads_k, dim_k, heads_v, dim_v) shapes, (1, heads, T, dim)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, hk, T, dk, generator=g), torch.randn(1, hv, T, dv, generator=g))
            for hk, dk, hv, dv in shapes]


@pytest.mark.parametrize("bs", [1, 4])
def test_block_is_one_tensor_and_kv_tensor_views_it(bs):
    cache = PrefixCache(max_bytes=1 << 20, block_size=bs)
    ids = list(range(3 * bs + 1))
    cache.insert(ids, fake_kv(ids))
    for node in cache._tree.nodes():                                       # (2 * layers, heads, bs, dim)
        (part,) = node.handle.parts
        assert part.shape == (2 * LAYERS, HEADS, bs, DIM)
    with cache.match(ids) as hit:
        t = hit.kv_tensor()
        assert t.shape == (LAYERS, 2, HEADS, 3 * bs, DIM)
        want = fake_kv(ids[:3 * bs])
        for i, (k, v) in enumerate(want):
            assert torch.equal(t[i, 0], k[0]) and torch.equal(t[i, 1], v[0])
        kv = hit.kv()
        assert_kv_equal(kv, want)
        base = kv[0][0].untyped_storage().data_ptr()                      # all layers: views of one cat
        assert all(x.untyped_storage().data_ptr() == base for pair in kv for x in pair)
    with pytest.raises(ValueError, match="miss"):
        cache.match([99, 98] * bs).kv_tensor()


def test_mixed_kv_shapes_roundtrip_with_offload():
    """K and V of different head_dim (MLA) and layers of different heads: one part per shape."""
    shapes = [(2, 3, 2, 5), (4, 3, 4, 5), (2, 3, 2, 5)]
    bs, T = 4, 13
    per_block = sum(hk * dk + hv * dv for hk, dk, hv, dv in shapes) * bs * 4
    cache = PrefixCache(max_bytes=3 * per_block, block_size=bs, offload_bytes=3 * per_block)
    ids, other = list(range(T)), list(range(100, 100 + T))
    kv = _random_kv(shapes, T)
    assert cache.insert(ids, kv) == 12
    assert len(next(cache._tree.nodes()).handle.parts) == 4            # (heads, dim) in {2, 4} x {3, 5}
    assert cache.nbytes == 3 * per_block
    cache.insert(other, _random_kv(shapes, T, seed=1))                    # spills ids' blocks
    with cache.match(ids) as hit:                                          # reloaded
        assert hit.num_tokens == 12 and cache.stats.reloads == 3
        assert_kv_equal(hit.kv(), [(k[:, :, :12], v[:, :, :12]) for k, v in kv])
        with pytest.raises(ValueError, match="kv\\(\\)"):
            hit.kv_tensor()
    check_invariants_bytes(cache)


def check_invariants_bytes(cache):
    total = sum(sum(p.numel() * p.element_size() for p in n.handle.parts) for n in cache._tree.nodes())
    assert total == cache.nbytes <= cache.max_bytes


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops(fn) -> int:
    with _CountOps() as c:
        fn()
    return c.n


@pytest.mark.parametrize("layers", [2, 12])
def test_op_count_does_not_scale_with_blocks_times_layers(layers):
    """Insert: O(layers + blocks) tensor ops; a hit: O(layers), whatever the number of blocks."""
    shapes, bs = [(2, 3, 2, 3)] * layers, 4

    def insert_ops(blocks):
        kv = _random_kv(shapes, blocks * bs)
        return _ops(lambda: PrefixCache(max_bytes=1 << 24, block_size=bs).insert(list(range(blocks * bs)), kv))

    def hit_ops(blocks):
        cache = PrefixCache(max_bytes=1 << 24, block_size=bs)
        cache.insert(list(range(blocks * bs)), _random_kv(shapes, blocks * bs))

        def hit():
            with cache.match(list(range(blocks * bs)) + [0]) as m:
                assert m.num_tokens == blocks * bs
                m.kv()
        return _ops(hit)

    per_block = (insert_ops(40) - insert_ops(8)) / 32
    assert per_block <= 3, per_block                                      # a view and a clone per block
    assert insert_ops(8) <= 4 * layers + 40
    assert hit_ops(40) == hit_ops(8) <= 4 * layers + 8                    # one cat, then per-layer views


# ---------------------------------------------------------------- property test

class CacheMachine(RuleBasedStateMachine):
    """Random insert / match / release / evict / clear; invariants after every step."""

    @initialize(bs=st.sampled_from([1, 2, 4]), budget=st.integers(1, 12), offload=st.integers(0, 6))
    def setup(self, bs, budget, offload):
        self.bs = bs
        self.cache = PrefixCache(max_bytes=budget * block_bytes(bs), block_size=bs,
                                 offload_bytes=offload * block_bytes(bs))
        self.held: list[PrefixMatch] = []

    ids = st.lists(st.integers(0, 2), max_size=14)
    ns = st.sampled_from(NAMESPACES)

    @rule(ids=ids, ns=ns)
    def insert(self, ids, ns):
        stored = self.cache.insert(ids, fake_kv(ids, ns), namespace=ns)
        assert stored % self.bs == 0 and 0 <= stored <= len(ids)
        if stored:
            with self.cache.match(ids + [0], namespace=ns) as hit:       # what was stored is a hit now
                assert hit.num_tokens >= stored

    @rule(ids=ids, ns=ns, keep=st.booleans())
    def match(self, ids, ns, keep):
        hit = self.cache.match(ids, namespace=ns)
        n = hit.num_tokens
        assert n % self.bs == 0 and n <= max(len(ids) - 1, 0)
        assert_kv_equal(hit.kv(), fake_kv(ids[:n], ns) if n else [])
        if keep:
            self.held.append(hit)
        else:
            hit.release()

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def release(self, i):
        self.held.pop(i % len(self.held)).release()

    @rule(n=st.integers(0, 4))
    def evict(self, n):
        before = self.cache.nbytes
        freed = self.cache.evict(n * block_bytes(self.bs))
        assert self.cache.nbytes == before - freed

    @rule()
    def clear(self):
        self.cache.clear()
        assert self.cache.stats.offloaded_bytes == 0
        assert self.cache.nbytes == sum(n.nbytes for n in self.cache._tree.nodes())

    @invariant()
    def consistent(self):
        if hasattr(self, "cache"):
            check_invariants(self.cache, outstanding=self.held)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=160, stateful_step_count=100, deadline=None)  # ~12k steps


def test_evicting_part_of_an_insert_frees_its_bytes():
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    ids = list(range(32))
    kv = fake_kv(ids)
    cache.insert(ids, kv)
    per_block = cache.nbytes // 8
    assert cache.evict(3 * per_block) == 3 * per_block
    check_invariants(cache)                                 # storage held == 5 blocks' bytes
    with cache.match(ids) as m:
        assert m.num_tokens == 20
        assert_kv_equal(m.kv(), [(k[:, :, :20], v[:, :, :20]) for k, v in kv])


def test_a_full_miss_hashes_one_block(monkeypatch):
    import prefix_cache.keys as keys_mod

    calls = []
    real = keys_mod.xxhash.xxh3_64_intdigest
    monkeypatch.setattr(keys_mod.xxhash, "xxh3_64_intdigest", lambda *a: calls.append(1) or real(*a))
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    with cache.match(torch.arange(8192)) as m:
        assert m.num_tokens == 0
    assert len(calls) <= 2                                  # the namespace's root key + block 0


# ---------------------------------------------------------------- the batched insert path

@pytest.mark.parametrize("bs", [1, 3, 16])
@pytest.mark.parametrize("ns", [None, "", "tenant-a"])
def test_batched_hashing_equals_block_by_block(bs, ns):
    """keys_range hashes many blocks in one pass over a buffer; the keys are block_key's chain,
    whichever order blocks were hashed in (lazily one by one first, then the rest in a batch)."""
    from prefix_cache.keys import BlockChain, token_array

    ids = token_array([random.Random(bs).randrange(-2**40, 2**40) for _ in range(24 * bs - 1)])
    want, key = [], root_key(ns)
    for i in range(23):
        key = block_key(key, ids[i * bs:(i + 1) * bs].tolist(), namespace_bytes(ns))
        want.append(key)
    assert BlockChain(ids, bs, ns).keys() == want
    chain = BlockChain(ids, bs, ns)
    assert [chain.key(i) for i in range(2)] == want[:2]                # lazy walk first
    assert chain.keys_range(5, 9) == want[5:9] and chain.keys() == want
    for i in range(23):
        assert chain.token_bytes(i) == np.asarray(chain.tokens(i), dtype="<i8").tobytes()
    assert chain.token_bytes_range(2, 5) == [chain.token_bytes(i) for i in range(2, 5)]


def test_tree_extend_equals_block_by_block_insert():
    """RadixTree.extend builds the same chain as insert block by block: keys, tokens, bytes, clock."""
    ids = list(range(12))
    keys, toks = block_keys(ids, 3), [tuple(ids[i:i + 3]) for i in range(0, 12, 3)]
    one, many = RadixTree(), RadixTree()
    nodes_one = _chain_tree(one, ids, 3)[2]
    nodes_many = many.extend(None, keys, toks, toks, 1)
    assert [(n.key, n.tokens, n.handle, n.last_access) for n in nodes_many] == \
        [(n.key, n.tokens, n.handle, n.last_access) for n in nodes_one]
    assert (many.nbytes, many.num_nodes, many._clock) == (one.nbytes, one.num_nodes, one._clock)
    assert all(b.parent is a for a, b in zip(nodes_many, nodes_many[1:]))
    assert many.match(keys, toks) == nodes_many and many.extend(nodes_many[-1], [], [], [], 1) == []
    with pytest.raises(KeyError):
        many.extend(None, keys[:1], toks[:1], [None], 1)


@pytest.mark.parametrize("seed", range(6))
def test_match_blocks_equals_the_block_by_block_match(seed):
    """RadixTree.match_blocks (a run of blocks compared in one go) finds the nodes ``match`` finds
    block by block, on trees of runs that branch, are evicted from their ends and get single blocks."""
    from prefix_cache.keys import BlockChain, token_array

    rng, bs = random.Random(seed), 3
    tree = RadixTree()
    stems = [[rng.randrange(4) for _ in range(rng.randrange(1, 12) * bs)] for _ in range(4)]

    def prompt():
        stem = rng.choice(stems)
        return stem[:rng.randrange(len(stem) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(0, 6) * bs)]

    for step in range(60):
        chain = BlockChain(token_array(prompt()), bs)
        n = len(chain)
        want = tree.match(chain.keys(), chain.token_bytes_range(0, n))
        assert tree.match_blocks(chain) == want, step
        assert all(node.run is None or node.run.nodes[node.run_index] is node for node in tree.nodes())
        start = len(want)
        if start < n and rng.random() < 0.7:
            parent = want[-1] if want else None
            keys = chain.keys_from(parent.key if parent else None, start, n)
            if rng.random() < 0.2:                                    # a block added alone (a reload)
                tree.insert(parent, keys[0], chain.token_bytes(start), None, 1)
            else:
                tree.extend(parent, keys, chain.token_bytes_range(start, n), [None] * (n - start), 1)
        if rng.random() < 0.3:
            tree.evict(rng.randrange(1, 8))


def test_a_long_hit_hashes_once_per_step_into_a_run(monkeypatch):
    """A lookup hashes one key where it steps into another node's children, not one per block: a
    prefix stored by one insert, then a branch stored by a second insert, cost a few hashes."""
    import prefix_cache.keys as keys_mod

    cache = PrefixCache(max_bytes=1 << 26, block_size=4)
    ids = list(range(4096))
    cache.insert(ids, fake_kv(ids))
    branch = ids[:2048] + [7] * 1024
    cache.insert(branch, fake_kv(branch))
    calls = []
    real = keys_mod.xxhash.xxh3_64_intdigest
    monkeypatch.setattr(keys_mod.xxhash, "xxh3_64_intdigest", lambda *a: calls.append(1) or real(*a))
    with cache.match(ids + [0]) as m:
        assert m.num_tokens == 4096 and len(calls) <= 2                   # root key + block 0
        assert_kv_equal(m.kv(), fake_kv(ids))
    calls.clear()
    with cache.match(branch + [0]) as m:
        assert m.num_tokens == 3072 and len(calls) <= 3                   # + the first block of the branch
        assert_kv_equal(m.kv(), fake_kv(branch))
    check_invariants(cache)


def test_views_of_one_insert_survive_release_and_eviction():
    """kv_parts(copy=False) of blocks stored by one insert are views of the cache's storage, equal
    to the copy, and stay equal after the match is released and its blocks evicted."""
    cache = PrefixCache(max_bytes=1 << 20, block_size=4)
    ids = list(range(40))
    cache.insert(ids, fake_kv(ids))
    with cache.match(ids) as m:
        views, copies = m.kv_parts(copy=False), m.kv_parts()
        assert views[0].untyped_storage().data_ptr() == next(cache._tree.nodes()).handle.parts[0].untyped_storage().data_ptr()
    cache.evict(cache.nbytes // 2)                                          # compacts the segment
    cache.clear()
    assert all(torch.equal(v, c) for v, c in zip(views, copies))
    cache.insert(ids[:20], fake_kv(ids[:20]))
    cache.insert(ids[20:] + ids[:20], fake_kv(ids[20:] + ids[:20]))
    with cache.match(ids[:20] + [0]) as m:
        assert torch.equal(m.kv_parts(copy=False)[0], m.kv_parts()[0])


def test_nodes_store_token_bytes_and_read_as_tuples():
    """The cache stores a block's tokens as int64 bytes; Node.tokens reads them as the tuple, and a
    collision guard, spill and reload compare them as before (negative and large ids included)."""
    bs = 4
    cache = PrefixCache(max_bytes=2 * block_bytes(bs), block_size=bs, offload_bytes=2 * block_bytes(bs))
    a = [-5, 2**40, 7, 0, 1, 2, 3, 2**62]
    b = [9] * 8
    cache.insert(a, fake_kv(a))
    nodes = list(cache._tree.nodes())
    assert all(type(n._tokens) is bytes for n in nodes)
    assert sorted(n.tokens for n in nodes) == sorted([tuple(a[:4]), tuple(a[4:])])
    assert "tokens=" in repr(nodes[0]) and "nbytes=" in repr(nodes[0].handle)
    cache.insert(b, fake_kv(b))                                           # a spills to CPU
    assert cache.stats.offloaded_blocks == 2
    with cache.match(a + [1]) as hit:                                     # reloaded: tokens compared as bytes
        assert hit.num_tokens == 8 and cache.stats.reloads == 2
        assert_kv_equal(hit.kv(), fake_kv(a))
        assert [n.tokens for n in hit.nodes] == [tuple(a[:4]), tuple(a[4:])]
    check_invariants(cache)


def test_insert_after_partial_eviction_and_spill_extends_the_kept_path():
    """An insert whose prefix is present, partly evicted and partly spilled: the kept blocks are
    touched, spilled copies of the new blocks are discarded, the new blocks chain under the path."""
    bs = 2
    cache = PrefixCache(max_bytes=8 * block_bytes(bs), block_size=bs, offload_bytes=6 * block_bytes(bs))
    ids = list(range(12))
    cache.insert(ids, fake_kv(ids))
    cache.evict(3 * block_bytes(bs))                                      # the last 3 blocks spill
    assert cache.stats.offloaded_blocks == 3
    assert cache.insert(ids + [50, 51], fake_kv(ids + [50, 51])) == 8     # 3 spilled + 1 new block back
    assert cache.stats.offloaded_blocks == 0 and cache._spill.nbytes == 0
    with cache.match(ids + [50, 51, 0]) as hit:
        assert hit.num_tokens == 14
        assert_kv_equal(hit.kv(), fake_kv(ids + [50, 51]))
    check_invariants(cache)
