"""Failures mid-generation, memory pressure, threads and tenants, with a prefix cache in the loop.

After any failure (a simulated CUDA OOM, Ctrl-C, a streamer that raises, NaN logits) the
cache must be consistent with no block left locked, and the next call must give the same
output as a run that never failed.
"""

from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager

import pytest
import torch

import prefix_cache.cache as cache_mod
import specdec
import specdec.prefill as prefill_mod
from conftest import VOCAB, hf_greedy, prompts, run_in_threads, tiny_model
from integrations import last_stats, patched
from prefix_cache import PrefixCache

MAX_NEW = 6


@functools.cache
def target():
    return tiny_model("llama")


@functools.cache
def draft():
    return tiny_model("llama", seed=3, layers=1)


def assert_consistent(cache: PrefixCache) -> None:
    """Parent links, byte and node counts add up, within budget, and nothing is locked."""
    tree, total, count = cache._tree, 0, 0
    for node in tree.nodes():
        assert node.parent.children[node.key] is node and node.handle is not None
        assert node.lock_ref == 0, "a block is still locked after the call"
        total, count = total + node.nbytes, count + 1
    assert total == tree.nbytes == cache.nbytes <= cache.max_bytes
    assert count == tree.num_nodes and tree.root.lock_ref == 1


@contextmanager
def failing(obj, name: str, error: BaseException, at: int = 1):
    """``obj.name`` raises ``error`` on its ``at``-th call (counting from 1), else runs as usual."""
    original, own, calls = getattr(obj, name), name in vars(obj), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            raise error
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        if own:                          # a module's function
            setattr(obj, name, original)
        else:                            # a method: the class's again
            delattr(obj, name)


def chat_prompts():
    """A 40-token shared prefix (5 blocks of 8) + a short turn, twice."""
    system = prompts(1, [40], seed=9)[0]
    return [torch.cat([system, prompts(1, [5], seed=s)[0]], dim=1) for s in (1, 2)]


FAILURES = {  # where: (object to break, attribute, call number, generate keywords)
    "prefill_forward": (lambda c: target(), "forward", 1, {}),
    "decode_forward": (lambda c: target(), "forward", 3, {}),
    "draft_forward": (lambda c: draft(), "forward", 2, {"draft_model": draft(), "num_draft_tokens": 2}),
    "building_kv_from_hits": (lambda c: prefill_mod, "gather_rows", 1, {}),
    "reloading_a_spilled_block": (lambda c: c, "_reload", 1, {}),
    "storing_the_result": (lambda c: cache_mod, "stack_kv", 1, {}),
}


@pytest.mark.parametrize("where", list(FAILURES))
@pytest.mark.parametrize("make_error", [lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                        KeyboardInterrupt], ids=["oom", "ctrl-c"])
def test_failure_mid_generation_leaves_the_cache_consistent(where, make_error):
    get_obj, name, at, kwargs = FAILURES[where]
    error = make_error()
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    first, second = chat_prompts()
    expected = specdec.generate(target(), second, max_new_tokens=MAX_NEW, **kwargs)
    specdec.generate(target(), first, max_new_tokens=MAX_NEW, prefix_cache=cache, **kwargs)  # warm: shared prefix
    with failing(get_obj(cache), name, error, at) as calls:
        with pytest.raises(type(error)) as info:
            specdec.generate(target(), second, max_new_tokens=MAX_NEW, prefix_cache=cache, **kwargs)
    assert calls[0] == at
    if isinstance(error, torch.OutOfMemoryError):
        message = str(info.value)
        assert "out of memory in specdec.generate (batch 1, prompt 45 tokens, max_new_tokens 6)" in message
        assert "PrefixCache(max_bytes=...)" in message and "next call can run" in message
        assert info.value.__cause__ is error
    assert_consistent(cache)
    out, stats = specdec.generate(target(), second, max_new_tokens=MAX_NEW, prefix_cache=cache, return_stats=True,
                                  **kwargs)
    assert torch.equal(out, expected) and stats.cached_prompt_tokens == [40]
    assert_consistent(cache)


def test_a_failing_match_in_a_batch_releases_the_rows_matched_before_it():
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    first, second = chat_prompts()
    specdec.generate(target(), first, max_new_tokens=2, prefix_cache=cache)
    batch = torch.cat([second, first], dim=0)
    with failing(cache, "match", KeyboardInterrupt(), at=2):
        with pytest.raises(KeyboardInterrupt):
            specdec.generate(target(), batch, max_new_tokens=2, prefix_cache=cache)
    assert_consistent(cache)


class RaisingStreamer:
    """An HF-style streamer whose client goes away after a few tokens."""

    def __init__(self, fail_at: int):
        self.fail_at, self.tokens, self.puts = fail_at, [], 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == self.fail_at:
            raise ConnectionError("client disconnected")
        self.tokens.extend(value.flatten().tolist())

    def end(self) -> None:
        pass


@pytest.mark.parametrize("drafter", [{}, {"prompt_lookup_num_tokens": 3}])
def test_a_raising_streamer_leaves_no_locked_blocks(drafter):
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    first, second = chat_prompts()
    expected = specdec.generate(target(), second, max_new_tokens=MAX_NEW)
    specdec.generate(target(), first, max_new_tokens=MAX_NEW, prefix_cache=cache)
    streamer = RaisingStreamer(fail_at=3)
    with pytest.raises(ConnectionError):
        specdec.generate(target(), second, max_new_tokens=MAX_NEW, prefix_cache=cache, streamer=streamer, **drafter)
    assert streamer.tokens[:second.shape[1]] == second[0].tolist()
    assert_consistent(cache)
    out = specdec.generate(target(), second, max_new_tokens=MAX_NEW, prefix_cache=cache, **drafter)
    assert torch.equal(out, expected)


@contextmanager
def nan_logits_from(model, call: int):
    """From its ``call``-th forward on, the model's logits are NaN (a late fp16 overflow)."""
    calls, original = [0], model.forward

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] >= call:
            out.logits.fill_(float("nan"))
        return out

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


@pytest.mark.parametrize("settings", [{}, {"do_sample": True, "top_k": 5},
                                      {"draft_model": "self:1", "num_draft_tokens": 2}])
def test_nan_logits_mid_generation_raise_before_any_garbage_token(settings):
    model, ids = target(), prompts(1, [7], seed=2)[0]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    reference = specdec.generate(model, ids, max_new_tokens=12, generator=gen(), num_draft_tokens=2, **{
        k: v for k, v in settings.items() if k != "num_draft_tokens"})
    streamer = RaisingStreamer(fail_at=-1)
    with nan_logits_from(model, call=3), pytest.raises(FloatingPointError, match="NaN/inf logits"):
        specdec.generate(model, ids, max_new_tokens=12, streamer=streamer, generator=gen(), num_draft_tokens=2,
                         **{k: v for k, v in settings.items() if k != "num_draft_tokens"})
    streamed = streamer.tokens[ids.shape[1]:]
    assert streamed == reference[0, ids.shape[1]:ids.shape[1] + len(streamed)].tolist()  # only real tokens
    assert all(0 <= t < VOCAB for t in streamed)


# ---------------------------------------------------------------- memory pressure

def test_churn_small_budget_never_evicts_in_use_blocks_and_changes_nothing():
    """Many distinct prompts (4 shared prefixes x 4 suffixes), batches of 1 and 2, three drafters,
    a budget of 12 blocks: every result equals the no-cache run, the budget holds at every insert,
    and the tree never frees a locked block."""
    model, block = target(), 8
    per_block = 3 * 2 * 2 * block * 16 * 4     # layers x (K, V) x kv heads x tokens x head_dim x fp32
    cache = PrefixCache(max_bytes=12 * per_block, block_size=block)
    tree, free, insert, extend = cache._tree, cache._tree.free, cache._tree.insert, cache._tree.extend

    def checked_free(node):
        assert node.lock_ref == 0, "evicted a block in use"
        free(node)

    def checked_insert(*args):
        node = insert(*args)
        assert tree.nbytes <= cache.max_bytes
        return node

    def checked_extend(*args):
        nodes = extend(*args)
        assert tree.nbytes <= cache.max_bytes
        return nodes

    tree.free, tree.insert, tree.extend = checked_free, checked_insert, checked_extend
    drafters = [{}, {"prompt_lookup_num_tokens": 3}, {"draft_model": "self:1", "num_draft_tokens": 2}]
    heads = [prompts(1, [17 + 6 * f], seed=20 + f)[0] for f in range(4)]
    for i in range(16):
        rows = [torch.cat([heads[(i + r) % 4], prompts(1, [3 + (i + r) % 5], seed=i + 40 * r)[0]], dim=1)
                for r in range(1 + i % 2)]
        width = max(r.shape[1] for r in rows)
        ids = torch.stack([torch.nn.functional.pad(r[0], (width - r.shape[1], 0)) for r in rows])
        mask = torch.stack([torch.nn.functional.pad(torch.ones(r.shape[1], dtype=torch.long),
                                                    (width - r.shape[1], 0)) for r in rows])
        kwargs = dict(max_new_tokens=4, **drafters[i % 3])
        out = specdec.generate(model, ids, mask, prefix_cache=cache, **kwargs)
        assert torch.equal(out, specdec.generate(model, ids, mask, **kwargs)), i
        assert_consistent(cache)
    stats = cache.stats
    assert stats.evictions > 0 and stats.hits > 0


# ---------------------------------------------------------------- threads and tenants

TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")


def tenant_namespace(input_ids, kwargs) -> str:
    return TENANT.get()


def test_threads_through_one_patched_model_and_cache_match_sequential_runs():
    model = target()
    system = prompts(1, [24], seed=11)[0]
    jobs = [(f"tenant-{t}", torch.cat([system, prompts(1, [3 + j], seed=10 * t + j)[0]], dim=1))
            for t in range(4) for j in range(2)]
    expected = [specdec.generate(model, ids, max_new_tokens=MAX_NEW) for _, ids in jobs]
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    results = [None] * len(jobs)

    def work(t: int) -> None:
        for i, (tenant, ids) in enumerate(jobs):
            if tenant == f"tenant-{t}":
                TENANT.set(tenant)
                results[i] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW)

    with patched(model, prompt_lookup_num_tokens=3, prefix_cache=cache, cache_namespace=tenant_namespace):
        run_in_threads(work, 4, timeout=60)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert_consistent(cache)
    assert cache.stats.hits >= 4  # each tenant's second prompt reused its own first one


def test_tenants_of_a_patched_model_never_hit_each_others_blocks():
    model, ids = target(), prompts(1, [40], seed=12)[0]
    mask = torch.ones_like(ids)
    cache = PrefixCache(max_bytes=64 << 20, block_size=8)
    seen = []

    def run(tenant: str) -> None:
        def call():
            TENANT.set(tenant)
            model.generate(ids, attention_mask=mask, max_new_tokens=3)
            seen.append((tenant, last_stats(model).cached_prompt_tokens[0]))
        contextvars.copy_context().run(call)

    with patched(model, prefix_cache=cache, cache_namespace=tenant_namespace):
        for tenant in ("alice", "bob", "alice", "bob", "carol"):
            run(tenant)
    assert seen == [("alice", 0), ("bob", 0), ("alice", 32), ("bob", 32), ("carol", 0)]


# ---------------------------------------------------------------- compiled calls in threads

@pytest.mark.parametrize("threads", [2, 4, 8])
def test_compiled_calls_in_threads_each_equal_hf_greedy(threads):
    """compile=True keeps static runners (KV cache, slot buffers, graphs) per model and shape:
    concurrent calls must each get one of their own, never share one."""
    from specdec import static

    model = tiny_model("llama", seed=5)
    jobs = [prompts(1, [4 + t % 5], seed=30 + t) for t in range(threads)]
    expected = [hf_greedy(model, ids, mask, 40, eos_token_id=None) for ids, mask in jobs]
    specdec.generate(model, *jobs[0], max_new_tokens=40, eos_token_id=None, compile=True)  # a runner exists
    for _ in range(3):
        results = [None] * threads

        def work(t: int) -> None:
            results[t] = specdec.generate(model, *jobs[t], max_new_tokens=40, eos_token_id=None, compile=True)

        run_in_threads(work, threads, timeout=120)
        assert all(torch.equal(r, e) for r, e in zip(results, expected))
    runners = [r for key, r in static._RUNNERS.items() if key[0] == id(model)]
    assert 1 <= len(runners) <= static.MAX_COPIES and not any(r in static._BUSY for r in runners)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_compiled_calls_in_threads_capture_and_replay_graphs_correctly():
    """On CUDA the runners capture graphs: a capture in one thread (thread-local capture mode, one
    at a time) must neither break nor record another thread's forwards."""
    from specdec import static

    model = tiny_model("llama", seed=9).cuda()
    jobs = [tuple(t.cuda() for t in prompts(1, [4 + t], seed=60 + t)) for t in range(4)]
    expected = [hf_greedy(model, ids, mask, 40, eos_token_id=None) for ids, mask in jobs]
    before = static.captures
    for _ in range(2):   # the first round captures (each copy its own graphs), the second replays
        results = [None] * len(jobs)

        def work(t: int) -> None:
            results[t] = specdec.generate(model, *jobs[t], max_new_tokens=40, eos_token_id=None, compile=True,
                                          draft_model="self:1", num_draft_tokens=3)

        run_in_threads(work, len(jobs), timeout=300)
        assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert static.captures > before


def test_compiled_calls_beyond_the_copy_limit_wait_for_a_runner(monkeypatch):
    from specdec import static

    monkeypatch.setattr(static, "MAX_COPIES", 1)
    model = tiny_model("llama", seed=6)
    jobs = [prompts(1, [5 + t], seed=40 + t) for t in range(4)]
    expected = [hf_greedy(model, ids, mask, 20, eos_token_id=None) for ids, mask in jobs]
    results = [None] * 4

    def work(t: int) -> None:
        results[t] = specdec.generate(model, *jobs[t], max_new_tokens=20, eos_token_id=None, compile=True,
                                      draft_model="self:1", num_draft_tokens=2)

    run_in_threads(work, 4, timeout=120)
    assert all(torch.equal(r, e) for r, e in zip(results, expected))
    assert len([key for key in static._RUNNERS if key[0] == id(model)]) == 1  # one target runner, shared in turn


def test_a_failing_compiled_call_gives_its_runners_back():
    from specdec import static

    model, ids = tiny_model("llama", seed=7), prompts(1, [6], seed=50)[0]
    with failing(static.StaticRunner, "forward", KeyboardInterrupt(), at=3) as calls:
        with pytest.raises(KeyboardInterrupt):
            specdec.generate(model, ids, max_new_tokens=8, compile=True, prompt_lookup_num_tokens=2)
    assert calls[0] == 3
    assert not [r for key, r in static._RUNNERS.items() if key[0] == id(model) and r in static._BUSY]
    out = specdec.generate(model, ids, max_new_tokens=8, compile=True, prompt_lookup_num_tokens=2)
    assert torch.equal(out, hf_greedy(model, ids, torch.ones_like(ids), 8))


def test_overlapping_attention_switches_restore_the_model():
    from specdec.attention import PACKED_GQA, attention_implementation

    model = tiny_model("llama", seed=8)
    before = model.config._attn_implementation
    first, second = attention_implementation(model, PACKED_GQA), attention_implementation(model, PACKED_GQA)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)      # threads leave in any order
    assert model.config._attn_implementation == PACKED_GQA  # the other is still inside
    second.__exit__(None, None, None)
    assert model.config._attn_implementation == before


# ---------------------------------------------------------------- faults inside eviction

def held_by_storage(cache: PrefixCache) -> int:
    """Device bytes the cache's K/V storage really holds: every distinct storage its blocks (and
    segments waiting for compaction) point at."""
    tensors = []
    for node in cache._tree.nodes():
        block = node.handle
        tensors += block.own if block.segment is None else block.segment.parts
    for segment in cache._shrunk:
        tensors += segment.parts
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def row_kv(seed: int, tokens: int, layers: int = 2) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, tokens, 4, generator=g), torch.randn(1, 2, tokens, 4, generator=g))
            for _ in range(layers)]


def full_cache(offload: bool) -> tuple[PrefixCache, int]:
    """A cache of exactly 4 blocks of 4 tokens, full: one 4-block prompt (one segment)."""
    from prefix_cache.store import block_nbytes

    per_block = block_nbytes(row_kv(0, 4), 4)
    cache = PrefixCache(max_bytes=4 * per_block, block_size=4, offload_bytes=8 * per_block if offload else 0)
    assert cache.insert(list(range(16)), row_kv(0, 16)) == 16 and cache.nbytes == cache.max_bytes
    return cache, per_block


FAULTS = [(name, offload, at) for name, offload in (("empty", True), ("cat", True), ("cat", False))
          for at in (1, 2, 3)]


@pytest.mark.parametrize("name,offload,at", FAULTS, ids=[f"{n}-{'spill' if o else 'drop'}-{a}" for n, o, a in FAULTS])
def test_an_oom_inside_eviction_keeps_nbytes_equal_to_the_bytes_held(name, offload, at):
    """torch.empty (the CPU spill of an evicted block) or torch.cat (compacting a segment that lost
    blocks, or stacking the new row) raises once while an insert evicts: nbytes must still be the
    bytes storage holds, and the next insert must work and bring the cache back within budget."""
    cache, per_block = full_cache(offload)
    new_ids, new_kv = [100 + i for i in range(8)], row_kv(1, 8)       # 2 new blocks: 2 evicted
    with failing(torch, name, torch.OutOfMemoryError("CUDA out of memory (simulated)"), at) as calls:
        try:
            cache.insert(new_ids, new_kv)
        except torch.OutOfMemoryError:
            pass
    assert calls[0] >= min(at, 1)
    assert cache.nbytes == held_by_storage(cache), f"{calls[0]} calls of torch.{name}"
    assert cache.stats.offloaded_bytes == sum(b.nbytes for _, b in cache._spill._entries.values())
    cache.insert(new_ids, new_kv)
    assert cache.nbytes == held_by_storage(cache) <= cache.max_bytes
    with cache.match(new_ids + [0]) as hit:
        assert hit.num_tokens == 8 and torch.equal(hit.kv()[1][0], new_kv[1][0])
    assert_consistent(cache)
