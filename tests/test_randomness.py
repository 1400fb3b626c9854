"""The sampling randomness table: drawn lazily in chunks, equal to the table drawn up front."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

import specdec
from conftest import VOCAB, prompts, tiny_model
from specdec.randomness import CHUNK, Uniforms


def up_front(batch: int, max_new_tokens: int, seed: int) -> torch.Tensor:
    return torch.rand((batch, max_new_tokens + 1, 3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("max_new", [1, 5, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
def test_one_row_chunked_equals_the_table_drawn_up_front(max_new):
    lazy = Uniforms(1, max_new, torch.Generator().manual_seed(3), "cpu")
    steps = iter([1, 2, 7, 3, 40, 1, 300, 5] * 100)        # positions needed grow unevenly, as with any k
    while lazy.filled < max_new + 1:
        lazy.draw_until(lazy.filled + next(steps))
    assert torch.equal(lazy.full(), up_front(1, max_new, 3))


@pytest.mark.parametrize("batch", [2, 5])
def test_rows_within_one_chunk_equal_the_table_drawn_up_front(batch):
    lazy = Uniforms(batch, CHUNK - 1, torch.Generator().manual_seed(4), "cpu")
    lazy.draw_until(3)
    assert torch.equal(lazy.full(), up_front(batch, CHUNK - 1, 4))


def test_chunks_depend_only_on_the_seed_not_on_when_they_are_drawn():
    one = Uniforms(3, 5 * CHUNK, torch.Generator().manual_seed(5), "cpu")
    other = Uniforms(3, 5 * CHUNK, torch.Generator().manual_seed(5), "cpu")
    for n in (1, CHUNK + 3, 2 * CHUNK, 4 * CHUNK + 1):
        one.draw_until(n)
    other.draw_until(5 * CHUNK + 1)
    assert torch.equal(one.full(), other.full())


def test_at_reads_row_position_use_and_clamps_past_the_end():
    lazy = Uniforms(3, 10, torch.Generator().manual_seed(6), "cpu")
    table = up_front(3, 10, 6)
    rows, produced = torch.tensor([2, 0]), torch.tensor([4, 9])
    assert torch.equal(lazy.at(rows, produced, 1, 2, most_produced=9), table[[2, 0], [5, 10], 2])
    got = lazy.at(rows, produced, torch.arange(3), 1, most_produced=9)
    assert torch.equal(got, table[torch.tensor([[2], [0]]), torch.tensor([[4, 5, 6], [9, 10, 10]]), 1])


def test_seeded_sampling_gives_the_tokens_it_gave_with_the_table_drawn_up_front():
    """Outputs recorded from the code that drew the whole (batch, max_new_tokens + 1, 3) table first."""
    model = tiny_model("llama")
    ids, mask = prompts(1, [5], seed=3)
    out = specdec.generate(model, ids, mask, do_sample=True, max_new_tokens=300, eos_token_id=None,
                           generator=torch.Generator().manual_seed(7), draft_model="self:1", num_draft_tokens=3)
    assert hashlib.sha256(json.dumps(out[0, 5:].tolist()).encode()).hexdigest()[:16] == "c874ceed942fa6d8"
    ids, mask = prompts(2, [5, 3], seed=4)
    out = specdec.generate(model, ids, mask, do_sample=True, max_new_tokens=40, eos_token_id=None, top_k=20,
                           generator=torch.Generator().manual_seed(8))
    assert out[:, 5:].tolist() == [
        [89, 74, 67, 76, 5, 23, 23, 66, 37, 45, 0, 94, 0, 85, 72, 76, 50, 92, 65, 33, 0, 0, 45, 72, 15, 33, 59, 29,
         9, 81, 9, 85, 32, 59, 8, 47, 78, 49, 47, 92],
        [37, 36, 47, 37, 36, 32, 46, 47, 17, 76, 25, 48, 2, 23, 48, 40, 17, 37, 68, 58, 48, 37, 76, 46, 76, 37, 44,
         17, 89, 49, 2, 17, 85, 35, 57, 85, 79, 92, 93, 67]]


@pytest.mark.parametrize("drafter", [{}, {"prompt_lookup_num_tokens": 3}, {"draft_model": "self:1"}])
def test_a_huge_max_new_tokens_with_an_early_eos_finishes_at_once(drafter):
    """Nothing is allocated in proportion to max_new_tokens (10**10 positions of uniforms: 120 GB)."""
    model = tiny_model("llama")
    ids, mask = prompts(1, [5], seed=3)
    seeded = dict(do_sample=True, top_k=1, **drafter)        # top_k=1: sampled, yet one possible text
    text = specdec.generate(model, ids, mask, max_new_tokens=12, eos_token_id=None, **seeded)[0, 5:].tolist()
    eos = text[8]
    start = time.perf_counter()
    out = specdec.generate(model, ids, mask, max_new_tokens=10**10, eos_token_id=eos, pad_token_id=0, **seeded)
    assert out[0, 5:].tolist() == text[: text.index(eos) + 1] and time.perf_counter() - start < 30
    assert 0 <= eos < VOCAB
