"""``specdec.generate``: HF ``generate()``'s contract, decoded speculatively.

One step, for all active rows at once:
  1. the drafter proposes k tokens per row (with the distribution it drew them from);
  2. the target scores pending token + k drafts in ONE forward over its cache;
  3. ``verify`` keeps each row's longest valid prefix and picks the next token;
  4. caches are cropped to the kept slots (nothing accepted is recomputed);
  5. the draft-length controller learns from what was accepted and what it cost.
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, replace

import torch

from specdec import hit_policy, learned, options
from specdec import verify as verify_mod
from specdec.adapter import ModelRunner, crop, select_rows
from specdec.config import Settings, resolve
from specdec.device_lock import DEVICE
from specdec.draft_length import AdaptiveDraftLength, FixedDraftLength, StepRecord
from specdec.drafters import ModelDrafter, PromptLookupDrafter, Proposal
from specdec.feature_draft import FeatureDraft, FeatureDrafter
from specdec.options import DISTILLED_NAMES  # noqa: F401 - re-exported for the CLI and benchmarks
from specdec.randomness import Uniforms
from specdec.sampling import greedy, probabilities, sample, suppress_tokens
from specdec.state import SlotBatch, positions_from_mask
from specdec.stats import GenerationStats
from specdec.stopping import StopChecker


@dataclass
class _Run:
    """Everything one generate() call carries between steps."""

    runner: ModelRunner
    cache: object
    settings: Settings
    batch: SlotBatch
    histories: list[list[int]]      # per input row: prompt (no padding) + emitted tokens
    outputs: list[list[int]]        # per input row: emitted tokens
    stop: StopChecker
    stats: GenerationStats
    uniforms: Uniforms | None       # per (row, output position, use) randomness, when sampling
    streamer: object = None
    drafter: object = None
    controller: object = None
    prefix_cache: object = None     # rows store prompt + output KV here when they finish
    namespace: str | None = None
    draft_namespace: str | None = None  # the draft model's K/V namespace in prefix_cache (None: not cached)
    target_identity: str | None = None  # the target's identity in prefix_cache (computed once per call)
    path: tuple = ()                # what a prefill's cost depends on besides the model (hit_policy)
    eos: torch.Tensor | None = None  # (n,) EOS ids inside the vocabulary (for min_new_tokens)
    room: int = 0                   # most tokens any active row may still emit (caps k: no wasted drafts)
    rows_host: list = None          # batch.rows as a list (read without a device sync)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             draft_model=None, num_draft_tokens: int | str = "auto", prompt_lookup_num_tokens: int | None = None,
             assistant_model=None, streamer=None, tokenizer=None, generator: torch.Generator | None = None,
             generation_config=None, prefix_cache=None, cache_namespace: str | None = None,
             kv_quant: str | None = None, return_stats: bool = False, compile: bool | str = False, **hf_kwargs):
    """Generate like ``model.generate(input_ids, ...)``, with speculative decoding.

    Greedy output is token-identical to the target's own greedy ``generate()`` (up to
    floating-point rounding of a (k+1)-token forward vs k+1 one-token forwards), and
    sampled output has the target's distribution.

    Args:
        model: a decoder-only HF causal LM (the target).
        input_ids: (B, P) prompt token ids, left-padded when rows differ in length.
        attention_mask: (B, P), 0 on padding. Defaults to all ones.
        draft_model: a causal LM sharing the target's vocabulary, a ``FeatureDraft`` built on
            this target (EAGLE-style: one layer reading the target's features), ``"self:N"`` for
            the target's own first N layers, or ``"distilled"`` for the best draft distilled for
            it and shipped in ``specdec/drafts`` (``"distilled-feature"`` / ``"distilled-layers"``
            pick one kind; see ``specdec.distill``). ``assistant_model`` is HF's name for it.
        num_draft_tokens: draft length k (int >= 1) or ``"auto"`` (adaptive; see
            ``specdec.draft_length``).
        prompt_lookup_num_tokens: use prompt lookup (n-gram) drafting, proposing up to this
            many tokens per step; no draft model needed.
        streamer: an HF streamer (batch 1), fed accepted tokens as soon as they are accepted.
        tokenizer: needed for ``stop_strings``.
        generator: torch.Generator for reproducible sampling (else the global RNG). Runs
            repeat exactly with a fixed ``num_draft_tokens``; ``"auto"`` picks k from measured
            timings, so only the distribution repeats.
        generation_config: an HF ``GenerationConfig``; keywords override it.
        prefix_cache: a ``prefix_cache.PrefixCache`` reused across calls. A hit skips the prefill
            of the shared prefix for the target and, for a draft model (a causal LM or ``"self:N"``,
            not a feature draft nor a ``compile`` static draft runner), for the draft too: its K/V is cached under a
            namespace of its own (turn that off with ``PrefixCache(..., cache_drafts=False)``).
            Blocks are keyed by each model's identity (``PrefixCache.set_model_key`` names one), so
            models sharing a cache never read each other's K/V. With ``kv_quant`` the cache keeps the
            prompt's full-precision K/V, stored after the prefill (outputs are not stored).
        cache_namespace: tenant key for the prefix cache (no cross-tenant hits).
        kv_quant: None, ``"int8"`` or ``"int4"`` quantized KV cache for the target.
        return_stats: also return a ``GenerationStats``.
        compile: ``True`` or ``"graphs"``: CUDA graphs over a static KV cache for the target
            and the draft model (seconds of warm-up); ``"inductor"``: the same, with the
            forwards first fused by ``torch.compile`` (a compile of tens of seconds once per
            model; fastest for large models). Works with batches (a finished row idles in
            the static cache until the call ends) and with ``prefix_cache`` (a hit's suffix
            runs as one graph), ``kv_quant``, and feature drafts (``True`` / ``"graphs"`` only). See
            ``specdec.static``.
        **hf_kwargs: HF generation keywords (max_new_tokens, do_sample, temperature, top_k,
            top_p, min_p, eos_token_id, pad_token_id, min_new_tokens, stop_strings,
            return_dict_in_generate, ...). Options we cannot honour exactly raise
            ``specdec.UnsupportedOption`` (a ValueError); so does ``return_dict_in_generate=True``
            unless ``use_cache=False``: HF's dict then carries ``past_key_values``, which this
            function does not return (a patched ``generate()`` falls back to HF's for it).

    Returns:
        (B, P + N) token ids like HF (finished rows padded with pad_token_id), a
        ``GenerateDecoderOnlyOutput`` holding only ``sequences`` if ``return_dict_in_generate``
        (with ``use_cache=False``, as HF's), and with
        ``return_stats`` a tuple ``(output, stats)``.
    """
    start = time.perf_counter()
    _check_model(model)
    input_ids, attention_mask = _check_inputs(model, input_ids, attention_mask)
    if draft_model is not None and assistant_model is not None:
        raise ValueError("pass draft_model= or assistant_model= (HF's name for it), not both")
    opts = options.check(options.Options(
        draft_model if draft_model is not None else assistant_model, num_draft_tokens, prompt_lookup_num_tokens,
        prefix_cache, cache_namespace, kv_quant, compile, generator, return_stats))
    options.check_streamer(streamer)
    settings = resolve(model, input_ids.shape[1], generation_config, **hf_kwargs)
    if opts.prompt_lookup_num_tokens is None and opts.draft_model is None and settings.prompt_lookup_num_tokens:
        opts = options.check(replace(opts, prompt_lookup_num_tokens=settings.prompt_lookup_num_tokens))
    draft = options.resolve_draft(opts.draft_model, model)
    _check_length(model, attention_mask, settings.max_new_tokens)
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer=: pass the tokenizer that made input_ids")
    runners = []  # static runners checked out for this call (compile): given back however it ends
    with DEVICE.shared():   # no CUDA graph capture of another thread while this call runs
        try:
            mode = options.compile_mode(compile)
            run = _start(model, input_ids, attention_mask, settings, streamer, tokenizer, generator, kv_quant,
                         eager=mode is None)
            run.drafter, run.controller = _make_drafter(run, draft, opts)
            run.stats.drafter = run.drafter.name if run.drafter is not None else "none"
            if mode is not None:
                runners = _use_static(run, mode, input_ids.shape[1], opts, kv_quant, prefix_cache)
            learned_key = _recall_controller(run, model, draft, opts, mode, input_ids.shape[0])
            run.prefix_cache, run.namespace = prefix_cache, cache_namespace
            if prefix_cache is not None:
                from specdec.prefill import draft_namespace, target_identity

                run.draft_namespace = draft_namespace(run.drafter, prefix_cache, cache_namespace)
                run.target_identity = target_identity(prefix_cache, model)
            run.path = hit_policy.path(mode, kv_quant, input_ids.shape[0], run.draft_namespace is not None)
            with _feature_tap(run):
                _prefill(run, input_ids, attention_mask, prefix_cache, cache_namespace)
                _decode(run)
            if learned_key is not None:
                learned.remember(model, draft, learned_key, run.controller)
        except torch.OutOfMemoryError as err:
            run = None  # noqa: F841 - this call's KV cache must not outlive it in the traceback
            raise _out_of_memory(err, input_ids, settings, prefix_cache) from err
        finally:
            if runners:
                from specdec.static import give_back

                give_back(*runners)
    if streamer is not None:
        streamer.end()
    run.stats.total_s = time.perf_counter() - start
    return _finish(run, input_ids, return_stats)


def _out_of_memory(err: BaseException, input_ids, settings: Settings, prefix_cache) -> torch.OutOfMemoryError:
    """The error to raise for an OOM inside a call: what ran, what to change; this call's tensors freed."""
    traceback.clear_frames(err.__traceback__)  # the failed call's KV cache (frames' locals) goes now
    cached = "" if prefix_cache is None else (
        f", or a smaller PrefixCache(max_bytes=...) (it holds {prefix_cache.nbytes} bytes now; "
        "prefix_cache.evict(nbytes) frees unused blocks)")
    B, P = input_ids.shape
    return torch.OutOfMemoryError(
        f"out of memory in specdec.generate (batch {B}, prompt {P} tokens, max_new_tokens "
        f"{settings.max_new_tokens}): lower the batch size or max_new_tokens, pass kv_quant='int8', a smaller "
        f"draft_model or num_draft_tokens{cached}. Nothing of this call is kept (the prefix cache is "
        f"consistent), so the next call can run. Cause: {str(err).splitlines()[0] if str(err) else 'OOM'}")


def _check_model(model) -> None:
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"model must be a Hugging Face causal LM (AutoModelForCausalLM), got "
                        f"{type(model).__name__}")
    if model.get_input_embeddings().weight.device.type == "meta":
        raise ValueError("model's weights are on the meta device (not loaded): load it with from_pretrained, "
                         "or materialize it (model.to_empty(device=...) then load a state dict)")


def _check_length(model, mask: torch.Tensor, max_new_tokens: int) -> None:
    """Models with learned positions (GPT-2, OPT) index a table: refuse what runs past its end.

    Rotary models have no table; like HF we let them run past max_position_embeddings.
    """
    config = model.config
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or getattr(config, "rope_parameters", None) is not None:
        return
    longest = int(mask.sum(-1).max())
    if longest + max_new_tokens > limit:
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{limit} positions (max_position_embeddings): shorten the prompt (keep its last "
                         f"{max(limit - max_new_tokens, 0)} tokens) or lower max_new_tokens")


def _check_inputs(model, input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.LongTensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids must be an integer (int64 or int32) tensor of shape (batch, length), got "
                         f"{tuple(input_ids.shape)} {input_ids.dtype}; tokenize with return_tensors='pt'")
    if input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError("input_ids is empty: give at least one prompt token (e.g. the BOS token)")
    vocab = model.get_input_embeddings().weight.shape[0]
    lo, hi = torch.stack([input_ids.min(), input_ids.max()]).tolist()      # one read-back (a sync on a GPU)
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids hold ids outside the model's vocabulary [0, {vocab}): "
                         f"min {lo}, max {hi}; was it tokenized for this model?")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        _check_mask(attention_mask, input_ids)
    device = model.get_input_embeddings().weight.device
    return input_ids.long().to(device), attention_mask.long().to(device)


def _check_mask(attention_mask, input_ids: torch.Tensor) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor like input_ids, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    not_binary, empty_row, right_padded = torch.stack([      # one read-back for the three checks
        ((attention_mask != 0) & (attention_mask != 1)).any(), (attention_mask.sum(-1) == 0).any(),
        (attention_mask[:, -1] == 0).any()]).tolist()
    if not_binary:
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    if empty_row:
        raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one real token")
    if right_padded:
        raise ValueError("attention_mask has right padding (a row ends with 0): decoder-only models continue "
                         "after the last slot, so pad on the left (tokenizer.padding_side = 'left')")


def _start(model, input_ids, mask, settings, streamer, tokenizer, generator, kv_quant, eager: bool = True) -> _Run:
    """The call's state before its prefill. ``eager=False``: no cache yet (``use_static`` gives the run a
    static one; an HF cache costs a pass over the config's layers to build)."""
    runner = ModelRunner(model, make_cache=_kv_cache_factory(kv_quant))
    B = input_ids.shape[0]
    if streamer is not None and B > 1:
        raise ValueError("streamers support batch size 1 (as in HF); stream rows one at a time")
    histories = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    empty = input_ids[:, :0]
    batch = SlotBatch(empty, mask[:, :0], input_ids[:, -1], torch.arange(B, device=input_ids.device),
                      torch.zeros(B, dtype=torch.long, device=input_ids.device))
    # an EOS id outside the vocabulary can never be generated: nothing to suppress (HF ignores it too)
    eos = torch.tensor([e for e in settings.eos_ids if 0 <= e < runner.vocab_size], dtype=torch.long,
                       device=input_ids.device)
    uniforms = Uniforms(B, settings.max_new_tokens, generator, input_ids.device) if settings.sampling.do_sample \
        else None
    return _Run(runner, runner.new_cache() if eager else None, settings, batch, histories, [[] for _ in range(B)],
                StopChecker(settings, tokenizer), GenerationStats(B), uniforms, streamer, eos=eos,
                rows_host=list(range(B)))


def _kv_cache_factory(kv_quant):
    if kv_quant is None:
        return None
    from specdec.quant.kv import QuantizedKVCache

    bits = 8 if kv_quant == "int8" else 4
    return lambda model: QuantizedKVCache(model.config, bits=bits)


def _make_drafter(run: _Run, draft, opts: options.Options):
    """The drafter and its draft-length controller (None, None: plain decoding)."""
    if isinstance(draft, FeatureDraft):
        drafter = FeatureDrafter(draft, run.runner.vocab_size)
    elif draft is not None:
        drafter = ModelDrafter(draft, run.runner.vocab_size)
    elif opts.prompt_lookup_num_tokens:
        drafter = PromptLookupDrafter(run.histories)
    else:
        return None, None
    k_max = options.max_draft_tokens(opts.num_draft_tokens, opts.prompt_lookup_num_tokens)
    if opts.num_draft_tokens == "auto":
        return drafter, AdaptiveDraftLength(k_max=k_max, per_forward=not isinstance(drafter, PromptLookupDrafter))
    return drafter, FixedDraftLength(int(opts.num_draft_tokens))


def _use_static(run: _Run, mode, prompt_len: int, opts: options.Options, kv_quant, prefix_cache) -> list:
    """Move the call onto static runners (``compile``); returns the runners to give back when it ends."""
    from specdec.static import use_static

    if run.drafter is not None and run.drafter.wants_features and mode == "inductor":
        raise ValueError("compile='inductor' does not support feature drafts yet: pass compile=True "
                         "(static cache + CUDA graphs), or draft_model='distilled-layers' with 'inductor'")
    k_max = options.max_draft_tokens(opts.num_draft_tokens, opts.prompt_lookup_num_tokens) if run.drafter else 0
    draft_model = run.drafter.runner.model if isinstance(run.drafter, ModelDrafter) else None
    setup = use_static(run.runner.model, draft_model, batch_size=run.batch.size, prompt_len=prompt_len,
                       max_new_tokens=run.settings.max_new_tokens, k_max=k_max, kv_quant=kv_quant,
                       prefix_cache=prefix_cache, fuse=mode == "inductor")
    run.runner, run.cache = setup.runner, setup.cache
    if draft_model is not None:
        run.drafter.use_runner(setup.draft_runner, setup.draft_cache)
    return setup.taken


def _recall_controller(run: _Run, model, draft, opts: options.Options, mode, batch_size: int):
    """Start an adaptive controller from what earlier calls on this model and draft learned
    (``specdec.learned``); returns the key to remember it under (None: nothing to remember)."""
    if not isinstance(run.controller, AdaptiveDraftLength):
        return None
    sampling = run.settings.sampling
    temperature = sampling.temperature if sampling.do_sample else 0.0
    key = learned.regime(mode, batch_size, temperature, run.controller.k_max, draft is None)
    run.controller = learned.recall(model, draft, key, run.controller)
    return key


def _prefill(run: _Run, input_ids, mask, prefix_cache, namespace) -> None:
    """Run the prompts (through the prefix cache if any) and emit each row's first token. The time to
    that token, read back here, is what ``hit_policy`` learns from (calls that captured a graph aside)."""
    from specdec import static

    t0, captures, model = time.perf_counter(), static.captures, run.runner.model
    start = 0                                          # first prompt slot run (> 0: a hit was used)
    if prefix_cache is not None:
        from specdec.prefill import prefill_with_prefix_cache

        min_tokens = hit_policy.threshold(model, run.path, prefix_cache)
        logits, start, run.cache = prefill_with_prefix_cache(run, input_ids, mask, prefix_cache, namespace,
                                                             run.target_identity, min_tokens)
    else:
        logits = run.runner.forward(input_ids, mask, positions_from_mask(mask), run.cache, last_only=True)
    run.batch.append(input_ids, mask.bool())
    _observe(run, input_ids.shape[1])
    first = _choose_target(run, logits[:, -1:], torch.zeros_like(run.batch.produced))[:, 0]
    run.batch.pending = first
    run.batch.produced += 1
    first_host = first.tolist()                        # waits for the prefill
    seconds = time.perf_counter() - t0
    if run.streamer is not None:
        run.streamer.put(input_ids.cpu())
    _emit(run, [[]] * len(first_host), [0] * len(first_host), first_host)
    run.stats.prefill_s = time.perf_counter() - t0
    if static.captures == captures:
        hit_policy.observe(model, run.path, start, input_ids.shape[1] - start, seconds)


def _decode(run: _Run) -> None:
    """Decode until every row is done: plain stretches (one step ahead of the host) wherever the
    controller finds speculation does not pay, speculative steps elsewhere."""
    if run.drafter is None:
        _plain_loop(run)
        return
    while run.batch.size:
        stretch = run.controller.plain_steps(run.drafter.lag(run.batch))
        if stretch:
            t0 = time.perf_counter()
            steps = _plain_loop(run, stretch)
            run.controller.observe_plain(steps, time.perf_counter() - t0)
        else:
            _step(run)


def _plain_loop(run: _Run, max_steps: int | None = None) -> int:
    """Plain decoding, one step ahead: step t+1 is launched before step t's token is read back,
    so the device does not sit idle while the host checks stops, streams and keeps stats (about a
    millisecond a step, much of a small model's step). A row that stops at step t has already run
    step t+1 (unless max_new_tokens ended it); that forward's result leaves with the row. Nothing
    else changes: the next token never depends on the host, and each token is emitted as ``_step``
    would emit it. Stops after ``max_steps`` steps (None: when every row is done); returns the
    number of steps run."""
    readback, inflight, launches = _Readback(run.batch.pending.device), None, 0
    while run.batch.size:
        launched = None
        more = max_steps is None or launches < max_steps
        if more and (inflight is None or run.room > 1):   # else the in-flight token is every row's last
            _plain_launch(run)
            launches += 1
            launched = (readback.start(run.batch.pending), list(run.rows_host))
        if inflight is not None:
            values = dict(zip(inflight[1], readback.finish(inflight[0])))
            nexts = [values[row] for row in run.rows_host]       # rows may have left since
            _emit(run, [[] for _ in nexts], [0] * len(nexts), nexts)
        inflight = launched
        if inflight is None and not more:
            break
    return launches


class _Readback:
    """Token ids copied to the host without waiting for work queued after them: a non-blocking
    copy into pinned memory and an event, double-buffered (the previous copy may be unread)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.slot = 0
        self.buffers: list = [None, None]

    def start(self, tokens: torch.Tensor):
        if not self.cuda:
            return tokens.tolist()
        buffer = self.buffers[self.slot]
        if buffer is None or buffer.shape[0] < tokens.shape[0]:
            buffer = self.buffers[self.slot] = torch.empty(tokens.shape[0], dtype=tokens.dtype, pin_memory=True)
        out = buffer[: tokens.shape[0]]
        out.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tokens.device))
        self.slot ^= 1
        return out, event

    @staticmethod
    def finish(handle) -> list[int]:
        if isinstance(handle, list):
            return handle
        out, event = handle
        event.synchronize()
        return out.tolist()


def _plain_launch(run: _Run) -> None:
    """Queue one plain step (forward, pick, advance) on the device, without waiting for it."""
    batch = run.batch
    positions = batch.next_positions()[:, None]
    # a NaN row's pending id is BROKEN (-1); emitting it raises, but this step is queued first
    tokens = batch.pending.clamp(min=0)[:, None]
    logits = run.runner.forward(tokens, batch.key_mask(1), positions, run.cache)
    proposal = Proposal(batch.pending.new_zeros(batch.size, 0), None, torch.zeros_like(batch.produced))
    verdict = _verify(run, logits, proposal)
    _observe(run, _advance(run, proposal, verdict))
    _count_step(run, 0, [0] * batch.size, [0] * batch.size)


def _step(run: _Run) -> None:
    """One speculative step: draft, verify the prefix the controller picks, keep what passes."""
    batch, controller = run.batch, run.controller
    # never draft past the budget: wasted work, and past a learned position table (GPT-2) an IndexError
    limit = min(controller.draft_limit(), run.room - 1)
    t0 = time.perf_counter()
    proposal = _propose(run, limit)
    draft_s = time.perf_counter() - t0 - proposal.catch_up_s
    proposal = proposal.first(controller.verify_length(proposal.confidence, proposal.host_counts(), draft_s))
    t1 = _sync_time(batch.pending)
    k = proposal.tokens.shape[1]
    tokens = torch.cat([batch.pending[:, None], proposal.tokens], dim=1)
    positions = batch.next_positions()[:, None] + torch.arange(k + 1, device=tokens.device)
    logits = run.runner.forward(tokens, batch.key_mask(k + 1), positions, run.cache)
    verdict = _verify(run, logits, proposal)
    t2 = _sync_time(batch.pending)
    _observe(run, _advance(run, proposal, verdict))
    accepted = verdict.num_accepted.tolist() if k else [0] * batch.size
    _count_step(run, k, accepted, proposal.host_counts())
    run.stats.draft_s += t1 - t0
    run.stats.verify_s += t2 - t1
    _emit(run, proposal.tokens, accepted, verdict.next_token)
    # a catch-up (the prompt, or slots decoded while speculation was off) is a cost of the past: it
    # must not make this step's k, or speculation itself, look dearer than it is
    past = proposal.catch_up_s
    controller.update(StepRecord(k, proposal.forwards - (past > 0), accepted, proposal.host_counts(),
                                 proposal.confidence, t1 - t0 - past, t2 - t1, time.perf_counter() - t0 - past,
                                 catch_up_s=past, catch_up_slots=proposal.catch_up_slots))


def _propose(run: _Run, k: int) -> Proposal:
    batch = run.batch
    if k <= 0:
        empty = batch.pending.new_zeros(batch.size, 0)
        return Proposal(empty, None, torch.zeros_like(batch.produced), [0] * batch.size)
    produced = batch.produced

    def choose(logits: torch.Tensor, j: int):
        logits = _suppress_eos(run, logits, (produced.to(logits.device) + j) < run.settings.min_new_tokens)
        if not run.settings.sampling.do_sample:
            return logits.argmax(-1), None
        probs = probabilities(logits, run.settings.sampling)
        return sample(probs, _uniforms_at(run, j, 0).to(probs.device)), probs

    keep = run.controller.keep_drafting if run.controller.stops_early else None
    proposal = run.drafter.propose(batch, k, choose, keep) if keep else run.drafter.propose(batch, k, choose)
    device = batch.pending.device
    probs = proposal.probs.to(device) if proposal.probs is not None else None
    return replace(proposal, tokens=proposal.tokens.to(device), probs=probs,
                   num_proposed=proposal.num_proposed.to(device))


def _verify(run: _Run, logits: torch.Tensor, proposal: Proposal) -> verify_mod.Verdict:
    k = proposal.tokens.shape[1]
    logits = logits[..., : run.runner.vocab_size]
    if not run.settings.sampling.do_sample:
        scores = _target_scores(run, logits)
        return verify_mod.verify_greedy(scores, proposal.tokens, proposal.num_proposed)
    p = probabilities(_target_scores(run, logits), run.settings.sampling)
    accept_u = _uniforms_at(run, torch.arange(k, device=p.device), 1)
    # the target's draw is for position produced + n: gather after verify knows n, so pass all
    draw_u = _uniforms_at(run, torch.arange(k + 1, device=p.device), 2)
    return verify_mod.verify(p, proposal.probs, proposal.tokens, proposal.num_proposed, accept_u, draw_u)


def _target_scores(run: _Run, logits: torch.Tensor) -> torch.Tensor:
    """(B, n, V) logits with EOS suppressed where min_new_tokens is not yet reached."""
    n = logits.shape[1]
    count = run.batch.produced[:, None] + torch.arange(n, device=logits.device)
    return _suppress_eos(run, logits, count < run.settings.min_new_tokens)


def _choose_target(run: _Run, logits: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
    scores = _suppress_eos(run, logits, (produced < run.settings.min_new_tokens)[:, None])
    if not run.settings.sampling.do_sample:
        return greedy(scores, verify_mod.BROKEN)
    probs = probabilities(scores, run.settings.sampling)
    return sample(probs, _uniforms_at(run, torch.zeros(1, dtype=torch.long), 2).to(probs.device),
                  invalid=verify_mod.BROKEN)


def _suppress_eos(run: _Run, logits: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return suppress_tokens(logits, run.eos.to(logits.device), where.to(logits.device))


def _uniforms_at(run: _Run, offsets, use: int) -> torch.Tensor:
    """Uniforms of each active row at output positions produced - 1 + offsets: (B,) or (B, n).
    A row's ``produced`` runs at most one step (one token, plain loop) ahead of its emitted output."""
    most = max(len(run.outputs[row]) for row in run.rows_host) + 1
    return run.uniforms.at(run.batch.rows, run.batch.produced, offsets, use, most)


def _sync_time(t: torch.Tensor) -> float:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def _count_step(run: _Run, k: int, accepted: list[int], proposed: list[int]) -> None:
    """Per-row stats of one target forward that checked k drafted tokens."""
    stats = run.stats
    for row, a, p in zip(run.rows_host, accepted, proposed):
        stats.accepted[row] += a
        stats.proposed[row] += p
        stats.steps[row] += 1
    stats.target_forwards += 1
    stats.k_history.append(k)


def _feature_tap(run: _Run):
    """Keep the target's last-layer outputs while decoding, if the drafter reads them."""
    if run.drafter is not None and run.drafter.wants_features:
        return run.runner.watching_features()
    return contextlib.nullcontext()


def _observe(run: _Run, num_slots: int) -> None:
    """Hand a feature drafter the target's last-layer outputs of the ``num_slots`` slots just cached."""
    if run.drafter is None or not run.drafter.wants_features:
        return
    hidden = run.runner.take_features()[:, :num_slots]
    if hidden.shape[1] < num_slots:  # a prefix-cache hit: cached slots were not run, so no features
        hidden = torch.nn.functional.pad(hidden, (0, 0, num_slots - hidden.shape[1], 0))
    run.drafter.observe(hidden)


def _advance(run: _Run, proposal: Proposal, verdict) -> int:
    """Keep each row's pending token + accepted drafts in the caches; holes elsewhere. Returns
    how many slots the step added."""
    batch, n = run.batch, verdict.num_accepted
    kept = int(n.max()) + 1 if proposal.tokens.shape[1] else 1     # no device sync for a plain step
    slots = batch.num_slots + kept
    step_tokens = torch.cat([batch.pending[:, None], proposal.tokens], dim=1)[:, :kept]
    valid = torch.arange(kept, device=n.device)[None] <= n[:, None]
    crop(run.cache, slots)
    if run.drafter is not None:
        run.drafter.rollback(slots)
    batch.append(step_tokens, valid)
    batch.pending = verdict.next_token
    batch.produced = batch.produced + n + 1
    return kept


def _emit(run: _Run, drafts: torch.Tensor, num_accepted: torch.Tensor, next_token: torch.Tensor) -> None:
    """Hand each row's new tokens (accepted drafts + next token) to the output, stop rows that are done."""
    finished = []
    rows, counts, nexts = run.rows_host, _as_list(num_accepted), _as_list(next_token)
    if verify_mod.BROKEN in nexts:  # checked on tensors synced anyway: no extra sync per step
        row = rows[nexts.index(verify_mod.BROKEN)]
        raise FloatingPointError(
            f"model produced NaN/inf logits (batch row {row}, after {len(run.outputs[row])} new tokens), so "
            "its tokens would be garbage: check the model's dtype (float16 overflows: load it in bfloat16 or "
            "float32), its weights, and attention_mask")
    drafts = _as_list(drafts)
    for i, (row, count, nxt) in enumerate(zip(rows, counts, nexts)):
        tokens, done = run.stop.take(run.outputs[row], drafts[i][:count] + [nxt])
        run.outputs[row].extend(tokens)
        run.histories[row].extend(tokens)
        run.stats.new_tokens[row] = len(run.outputs[row])
        if run.streamer is not None and tokens:
            run.streamer.put(torch.tensor(tokens))
        if done:
            finished.append(i)
    run.room = max((run.stop.max_new - len(run.outputs[r]) for i, r in enumerate(rows) if i not in finished),
                   default=0)
    if finished:
        _drop_rows(run, finished)


def _as_list(x) -> list:
    return x if isinstance(x, list) else x.tolist()


def _drop_rows(run: _Run, finished: list[int]) -> None:
    if run.prefix_cache is not None:
        from specdec.prefill import store_rows

        store_rows(run, finished, run.prefix_cache, run.namespace)
    keep = [i for i in range(run.batch.size) if i not in set(finished)]
    run.rows_host = [run.rows_host[i] for i in keep]
    keep_t = torch.tensor(keep, dtype=torch.long, device=run.batch.pending.device)
    run.batch.select(keep_t)
    if keep:
        select_rows(run.cache, keep_t)
        if run.drafter is not None:
            run.drafter.select_rows(keep_t)


def _finish(run: _Run, input_ids: torch.Tensor, return_stats: bool):
    width = max(len(o) for o in run.outputs)
    new = torch.full((len(run.outputs), width), run.settings.pad_id, dtype=torch.long)
    for i, tokens in enumerate(run.outputs):
        new[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
    output = sequences
    if run.settings.return_dict:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        output = GenerateDecoderOnlyOutput(sequences=sequences)
    return (output, run.stats) if return_stats else output
