"""Hypothesis fuzzing: the radix tree against a dict model, ``verify`` against an exact reference,
and ``generate`` on random tiny models with random settings (derandomized: a fixed set of examples,
so fp32 near-ties of a random model can never make CI flaky).

test_prefix_cache.py fuzzes the PrefixCache facade (keys, spill, K/V); here the tree itself gets
>= 10k random operations with every invariant checked after each one.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specdec
from conftest import hf_greedy, tiny_model
from prefix_cache.tree import RadixTree
from specdec.verify import BROKEN, verify, verify_greedy

# ---------------------------------------------------------------- radix tree vs a dict

TOKENS = st.tuples(st.integers(0, 2), st.integers(0, 1))          # one block: 6 possible token tuples
PATH = st.lists(TOKENS, min_size=1, max_size=4)
OPS = st.one_of(
    st.tuples(st.just("insert"), PATH, st.integers(1, 3)),
    st.tuples(st.just("lock"), PATH, st.just(0)),
    st.tuples(st.just("release"), st.just(()), st.integers(0, 50)),
    st.tuples(st.just("evict"), st.just(()), st.integers(0, 8)),
    st.tuples(st.just("collide"), PATH, st.just(0)),
    st.tuples(st.just("clear"), st.just(()), st.just(0)),
)
MIN_OPS, EXAMPLES = 210, 50                                        # >= 10,500 operations in all


class TreeModel:
    """A RadixTree over a simulated allocator, mirrored by {path of blocks: handle}."""

    def __init__(self):
        self.live: set[int] = set()                 # handles allocated and not yet freed
        self.next_handle = 0
        self.tree = RadixTree(free=self._free)
        self.model: dict[tuple, int] = {}           # block path -> handle
        self.held: list[list] = []                  # locked match paths

    def _free(self, node) -> None:
        assert node.lock_ref == 0, "freed a locked block"
        assert node.handle in self.live, "freed twice"
        self.live.remove(node.handle)

    def keys(self, path) -> list[int]:
        return [hash(tuple(path[:i + 1])) for i in range(len(path))]

    def insert(self, path, nbytes: int) -> None:
        keys = self.keys(path)
        found = self.tree.match(keys, path)
        parent = found[-1] if found else None
        for i in range(len(found), len(path)):
            handle, self.next_handle = self.next_handle, self.next_handle + 1
            self.live.add(handle)
            parent = self.tree.insert(parent, keys[i], path[i], handle, nbytes)
            self.model[tuple(path[:i + 1])] = handle

    def lock(self, path) -> None:
        found = self.tree.match(self.keys(path), path)
        want = 0
        while want < len(path) and tuple(path[:want + 1]) in self.model:
            want += 1
        assert len(found) == want
        assert [n.handle for n in found] == [self.model[tuple(path[:i + 1])] for i in range(want)]
        self.tree.lock(found)
        self.held.append(found)

    def collide(self, path) -> None:
        """A key already present under a parent with other tokens: insert refuses, match stops there."""
        keys = self.keys(path)
        found = self.tree.match(keys, path)
        if not found:
            return
        wrong = tuple(t + 7 for t in path[len(found) - 1])
        parent = found[-2] if len(found) > 1 else None
        try:
            self.tree.insert(parent, keys[len(found) - 1], wrong, -1, 1)
            raise AssertionError("a present key was inserted twice")
        except KeyError:
            pass
        assert self.tree.match(keys[:len(found)], path[:len(found) - 1] + [wrong]) == found[:-1]

    def evict(self, nbytes: int) -> None:
        before = self.tree.nbytes
        evicted = self.tree.evict(nbytes)
        freed = sum(n.nbytes for n in evicted)
        assert before - self.tree.nbytes == freed
        if freed < nbytes:                           # stopped early: nothing evictable is left
            assert not any(n.is_leaf and n.lock_ref == 0 for n in self.tree.nodes())
        self._forget(evicted)

    def clear(self) -> None:
        self._forget(self.tree.clear())

    def _forget(self, evicted) -> None:
        gone = {n.handle for n in evicted}
        self.model = {path: h for path, h in self.model.items() if h not in gone}

    def check(self) -> None:
        refs: dict[int, int] = {}
        for path in self.held:
            for node in path:
                refs[id(node)] = refs.get(id(node), 0) + 1
        seen, total = {}, 0
        stack = [(child, (child.tokens,)) for child in self.tree.root.children.values()]
        while stack:
            node, path = stack.pop()
            assert node.parent.children[node.key] is node and node.key == hash(path)
            assert node.lock_ref == refs.pop(id(node), 0), "lock count differs from the live matches"
            assert node.last_access <= self.tree._clock
            seen[path] = node.handle
            total += node.nbytes
            stack.extend((c, path + (c.tokens,)) for c in node.children.values())
        assert not refs, "a locked block left the tree"
        assert seen == self.model and set(seen.values()) == self.live
        assert total == self.tree.nbytes and len(seen) == self.tree.num_nodes
        assert self.tree.root.lock_ref == 1


def test_radix_tree_survives_10k_random_operations():
    done = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(OPS, min_size=MIN_OPS, max_size=MIN_OPS + 30))
    def run(ops):
        m = TreeModel()
        for op, path, n in ops:
            if op == "insert":
                m.insert(list(path), n)
            elif op == "lock":
                m.lock(list(path))
            elif op == "release" and m.held:
                m.tree.release(m.held.pop(n % len(m.held)))
            elif op == "evict":
                m.evict(n)
            elif op == "collide":
                m.collide(list(path))
            elif op == "clear":
                m.clear()
            m.check()
        while m.held:                               # everything released: all of it can go
            m.tree.release(m.held.pop())
        m.clear()
        m.check()
        assert m.tree.num_nodes == 0 and not m.live
        done.append(len(ops))

    run()
    assert sum(done) >= 10_000, sum(done)


# ---------------------------------------------------------------- verify vs an exact reference

def eighths(v: int):
    """A distribution over v tokens in multiples of 1/8 (exact in float32)."""
    return st.lists(st.integers(0, 8), min_size=v - 1, max_size=v - 1).map(
        lambda cuts: [b - a for a, b in zip([0] + sorted(cuts), sorted(cuts) + [8])])


def odd_uniform():
    """(2j+1)/2048: never on a CDF step c/T (T <= 8) or an acceptance bound, so float32 = exact."""
    return st.integers(0, 1023).map(lambda j: (2 * j + 1) / 2048)


def reference_row(p, q, tokens, proposed, accept_u, draw_u):
    """Leviathan et al.'s rule in exact fractions: (accepted, next token)."""
    n = 0
    while n < proposed:
        x = tokens[n]
        qx = Fraction(1) if q is None else q[n][x]
        if p[n][x] > 0 and Fraction(accept_u[n]) * qx <= p[n][x]:
            n += 1
        else:
            break
    dist = p[n]
    if n < proposed:
        qn = [Fraction(int(i == tokens[n])) for i in range(len(dist))] if q is None else q[n]
        diff = [max(a - b, Fraction(0)) for a, b in zip(dist, qn)]
        dist = diff if sum(diff) > 0 else dist
    target, cdf = Fraction(draw_u[n]) * sum(dist), Fraction(0)
    for token, mass in enumerate(dist):
        cdf += mass
        if mass > 0 and cdf > target:
            return n, token
    raise AssertionError("no token")


@st.composite
def verify_case(draw):
    b, k, v = draw(st.integers(1, 3)), draw(st.integers(0, 4)), draw(st.integers(2, 6))
    p = [[[Fraction(w, 8) for w in draw(eighths(v))] for _ in range(k + 1)] for _ in range(b)]
    q = None if draw(st.booleans()) else [[[Fraction(w, 8) for w in draw(eighths(v))] for _ in range(k)]
                                           for _ in range(b)]
    tokens = [[draw(st.sampled_from([t for t in range(v) if q[r][j][t] > 0]) if q else st.integers(0, v - 1))
               for j in range(k)] for r in range(b)]
    proposed = [draw(st.integers(0, k)) for _ in range(b)]
    accept_u = [[draw(odd_uniform()) for _ in range(k)] for _ in range(b)]
    draw_u = [[draw(odd_uniform()) for _ in range(k + 1)] for _ in range(b)]
    return p, q, tokens, proposed, accept_u, draw_u


def _t(x, v: int) -> torch.Tensor:
    """Nested [row][position][token] fractions -> (B, n, V) float32."""
    flat = [float(c) for rows in x for row in rows for c in row]
    return torch.tensor(flat, dtype=torch.float32).view(len(x), -1, v)


@settings(max_examples=300, deadline=None)
@given(verify_case())
def test_verify_equals_the_exact_reference(case):
    p, q, tokens, proposed, accept_u, draw_u = case
    b, k, v = len(p), len(p[0]) - 1, len(p[0][0])
    got = verify(_t(p, v), None if q is None else _t(q, v), torch.tensor(tokens, dtype=torch.long).view(b, k),
                 torch.tensor(proposed), torch.tensor(accept_u).view(b, k), torch.tensor(draw_u))
    want = [reference_row(*row) for row in zip(p, q or [None] * b, tokens, proposed, accept_u, draw_u)]
    assert list(zip(got.num_accepted.tolist(), got.next_token.tolist())) == want


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.integers(0, 4), st.integers(2, 6), st.data())
def test_verify_greedy_equals_the_reference_and_flags_nan(b, k, v, data):
    logits = torch.tensor(data.draw(st.lists(st.lists(st.lists(st.integers(-2, 2), min_size=v, max_size=v),
                                                      min_size=k + 1, max_size=k + 1), min_size=b, max_size=b)),
                          dtype=torch.float32)                       # small ints: ties are common
    broken = data.draw(st.lists(st.integers(0, k), max_size=2))
    for pos in broken:
        logits[0, pos, data.draw(st.integers(0, v - 1))] = float("nan")
    tokens = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, v - 1), min_size=k, max_size=k),
                                             min_size=b, max_size=b)), dtype=torch.long).view(b, k)
    proposed = torch.tensor(data.draw(st.lists(st.integers(0, k), min_size=b, max_size=b)))
    got = verify_greedy(logits, tokens, proposed)
    for r in range(b):
        n = 0
        best = [None if row.isnan().any() else row.tolist().index(max(row.tolist())) for row in logits[r]]
        while n < int(proposed[r]) and best[n] == int(tokens[r, n]):
            n += 1
        assert int(got.num_accepted[r]) == n
        assert int(got.next_token[r]) == (BROKEN if best[n] is None else best[n])


# ---------------------------------------------------------------- generate on random tiny models

@functools.cache
def model(arch: str, seed: int):
    return tiny_model(arch, seed=seed)


ARCHS = ["llama", "qwen2", "gemma", "phi3", "gpt2", "opt", "gpt_neox"]


@st.composite
def generate_case(draw):
    arch, seed = draw(st.sampled_from(ARCHS)), draw(st.integers(0, 1))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 96, (n,), generator=g)
        mask[i, width - n:] = 1
    drafter = draw(st.sampled_from([{}, {"prompt_lookup_num_tokens": 3}, {"draft_model": "self:1"},
                                    {"draft_model": "other"}]))
    k = draw(st.sampled_from(["auto", 1, 2, 5]))
    hf = dict(max_new_tokens=draw(st.integers(1, 10)), eos_token_id=draw(st.sampled_from([None, 5, 17])),
              min_new_tokens=draw(st.integers(0, 3)))
    return arch, seed, ids, mask, drafter, k, hf


def _drafting(arch, seed, drafter, k):
    if drafter.get("draft_model") == "other":                # a separate draft: the other seed's model
        return {"draft_model": model(arch, 1 - seed), "num_draft_tokens": k}
    return {**drafter, "num_draft_tokens": k}


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")   # HF's, for min_new_tokens > max_new_tokens
@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(generate_case())
def test_random_models_and_settings_greedy_equals_hf(case):
    arch, seed, ids, mask, drafter, k, hf = case
    target = model(arch, seed)
    out = specdec.generate(target, ids, mask, **_drafting(arch, seed, drafter, k), **hf)
    assert torch.equal(out, hf_greedy(target, ids, mask, pad_token_id=0, **hf))


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(generate_case(), st.sampled_from([dict(temperature=0.7), dict(top_k=4), dict(top_p=0.8),
                                         dict(min_p=0.1, temperature=1.3), dict(top_k=1)]))
def test_random_models_and_settings_sampled_rows_are_valid(case, warp):
    arch, seed, ids, mask, drafter, k, hf = case
    target = model(arch, seed)
    k = 2 if k == "auto" else k                           # a fixed k: seeded runs repeat exactly
    def run():
        return specdec.generate(target, ids, mask, do_sample=True, generator=torch.Generator().manual_seed(3),
                                **_drafting(arch, seed, drafter, k), **warp, **hf)

    out = run()
    assert torch.equal(out, run())
    assert torch.equal(out[:, :ids.shape[1]], ids) and out.shape[1] <= ids.shape[1] + hf["max_new_tokens"]
    new = out[:, ids.shape[1]:]
    assert bool(((new >= 0) & (new < 96)).all())
    for row in new.tolist():
        eos = hf["eos_token_id"]
        if eos is not None and eos in row[hf["min_new_tokens"]:]:
            end = row.index(eos, hf["min_new_tokens"]) + 1
            assert all(t == 0 for t in row[end:])           # padded after EOS
        if eos is not None:
            assert eos not in row[:hf["min_new_tokens"]]     # min_new_tokens holds EOS back
    if warp == dict(top_k=1):                                # top_k=1 sampling is greedy
        assert torch.equal(out, hf_greedy(target, ids, mask, pad_token_id=0, **hf))
