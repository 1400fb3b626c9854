"""Drafters: cheap guesses of the target's next k tokens.

All share one small interface::

    propose(batch, k, choose) -> Proposal   # k tokens per row (+ the draft distribution)
    rollback(num_slots)                     # forget slots the target rejected
    select_rows(keep)                       # drop finished rows

- ``ModelDrafter``: a small causal LM with the target's tokenizer (or the target's own
  first layers, see ``early_exit_model``).
- ``PromptLookupDrafter``: copies what followed the latest earlier occurrence of the
  row's trailing n-gram (no model at all).
"""

from __future__ import annotations

import copy
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from specdec.adapter import ModelRunner, cache_length, crop, select_rows
from specdec.layers import find_layer_list, shallow_copy, truncate_config
from specdec.state import SlotBatch, positions_from_mask


@dataclass
class Proposal:
    tokens: torch.Tensor             # (B, k) drafted tokens
    probs: torch.Tensor | None       # (B, k, V) distribution each was drawn from; None = deterministic
    num_proposed: torch.Tensor       # (B,) how many of the k are real
    counts: list[int] | None = None  # num_proposed on the host (None: every row proposed all k)
    confidence: torch.Tensor | None = None  # (B, k) on the host: each token's confidence (see draft_length)
    forwards: int = 0                # draft forwards this proposal ran
    catch_up_s: float = 0.0          # of the drafting time: catching up on slots (the prompt, or tokens
                                     # decoded while speculation was off), a cost of the past, not of k
    catch_up_slots: int = 0          # how many slots that catch-up ran

    def host_counts(self) -> list[int]:
        return self.counts if self.counts is not None else [self.tokens.shape[1]] * self.tokens.shape[0]

    def first(self, n: int) -> "Proposal":
        """The first n drafted tokens of every row."""
        if n == self.tokens.shape[1]:
            return self
        probs = self.probs[:, :n] if self.probs is not None else None
        counts = [min(c, n) for c in self.host_counts()]
        confidence = self.confidence[:, :n] if self.confidence is not None else None
        return Proposal(self.tokens[:, :n], probs, self.num_proposed.clamp(max=n), counts, confidence, self.forwards,
                        self.catch_up_s, self.catch_up_slots)


# choose(logits (B, V), step j) -> (tokens (B,), probs (B, V) or None)
Chooser = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor | None]]
# keep_drafting(confidence (B, j) on the host) -> whether to draft token j + 1
KeepDrafting = Callable[[torch.Tensor], bool]


class Drafter(Protocol):
    """What the decode loop asks of a draft: :class:`ModelDrafter`, :class:`PromptLookupDrafter`,
    ``specdec.feature_draft.FeatureDrafter``. Capabilities are declared, not probed."""

    name: str
    wants_features: bool    # the loop hands it the target's last-layer outputs (``observe``)
    reusable_cache: bool    # a prefix cache may load and store its K/V (``load_prefix``, ``row_kv``)

    def propose(self, batch: SlotBatch, k: int, choose: Chooser,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        """Up to k tokens per row after the pending token, catching up first on unseen slots."""

    def lag(self, batch: SlotBatch) -> int:
        """Slots the next ``propose`` must catch up on before drafting (0: none, or free)."""

    def rollback(self, num_slots: int) -> None:
        """Forget everything after the target's first ``num_slots`` slots."""

    def select_rows(self, keep: torch.Tensor) -> None:
        """Keep only these batch rows (the others finished)."""


def _clock(t: torch.Tensor) -> float:
    """The host clock once the device has finished the work queued so far on ``t``'s device."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


def top_probability(logits: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
    """(B,) a draft's confidence in its token: the top probability of the distribution it drew from."""
    return (probs if probs is not None else torch.softmax(logits.float(), dim=-1)).max(-1).values


class ModelDrafter:
    """Draft with a causal LM that shares the target's vocabulary.

    Its cache uses the target's slot layout. It lags the target by at most one slot
    (after a step that accepted every draft), which the next ``propose`` feeds along
    with the pending token in the same forward: no extra draft pass per step.
    """

    name = "model"
    wants_features = False

    def __init__(self, model: torch.nn.Module, target_vocab: int):
        self.runner = ModelRunner(model)
        self.target_vocab = target_vocab
        self.cache = self.runner.new_cache()

    def propose(self, batch: SlotBatch, k: int, choose: Chooser,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        """Up to k tokens per row; with ``keep_drafting``, stop once it says so (one host sync a token)."""
        have = cache_length(self.cache)
        tokens = torch.cat([batch.slot_tokens[:, have:], batch.pending[:, None]], dim=1)
        mask = batch.key_mask(1)
        positions = positions_from_mask(mask)[:, have:]
        drafted, probs, confidence, catch_up_s = [], [], [], 0.0
        catch_up_slots = tokens.shape[1] - 1 if tokens.shape[1] > 2 else 0
        for j in range(k):
            catching_up = j == 0 and catch_up_slots > 0
            start = _clock(batch.pending) if catching_up else 0.0
            logits = self._forward(tokens, mask, positions, have if j == 0 else 0)
            if catching_up:
                catch_up_s = _clock(logits) - start
            logits = self._fit_vocab(logits)
            token, prob = choose(logits, j)
            drafted.append(token)
            probs.append(prob)
            tokens, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(batch.size, 1)], dim=1)
            if keep_drafting is not None:
                confidence.append(top_probability(logits, prob).cpu())
                if j + 1 < k and not keep_drafting(torch.stack(confidence, 1)):
                    break
        stacked = torch.stack(probs, 1) if probs and probs[0] is not None else None
        out = torch.stack(drafted, 1) if drafted else batch.pending.new_zeros(batch.size, 0)
        n = out.shape[1]
        return Proposal(out, stacked, torch.full((batch.size,), n, device=out.device), None,
                        torch.stack(confidence, 1) if confidence else None, forwards=n, catch_up_s=catch_up_s,
                        catch_up_slots=catch_up_slots)

    def use_runner(self, runner, cache) -> None:
        """Draft with ``runner`` (e.g. a static runner of the same model) from ``cache``, one of its own."""
        self.runner, self.cache = runner, cache

    def lag(self, batch: SlotBatch) -> int:
        """Slots the next ``propose`` runs before drafting (the prompt, or a plain stretch), beyond the pending token."""
        return max(batch.num_slots - cache_length(self.cache), 0)

    def _forward(self, tokens, mask, positions, have: int) -> torch.Tensor:
        """(B, V) logits after ``tokens``; a long catch-up (after plain steps) runs in chunks the
        static runner has graphs for."""
        chunk = getattr(self.runner, "graph_max_tokens", 0) if have else 0
        while chunk and tokens.shape[1] > chunk:
            self.runner.forward(tokens[:, :chunk], mask[:, : have + chunk], positions[:, :chunk], self.cache)
            tokens, positions, have = tokens[:, chunk:], positions[:, chunk:], have + chunk
        return self.runner.forward(tokens, mask, positions, self.cache, last_only=True)[:, -1]

    @property
    def reusable_cache(self) -> bool:
        """Whether a prefix cache may load and store this drafter's K/V (``specdec.prefill``).

        Only an eager runner's plain DynamicCache of full-attention layers: a static runner
        (``compile=True``) keeps prefilling its draft over the whole prompt, and so does a draft
        whose layers cannot be cut into blocks (sliding window, recurrent).
        """
        if not isinstance(self.runner, ModelRunner) or self.runner.make_cache is not None:
            return False
        from specdec.prefix_cache.hf_cache import check_supported

        try:
            check_supported(self.runner.model.config)
        except ValueError:       # reusing the draft's K/V is only a speed-up: prefill it instead of refusing
            return False
        return True

    def load_prefix(self, kv_layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Start from a prefix-cache hit: per layer (key, value) (B, heads, n, head_dim) for slots
        0..n-1. The next ``propose`` forwards only the slots after them (its usual catch-up)."""
        from specdec.prefix_cache.hf_cache import cache_with_kv

        self.cache = cache_with_kv(kv_layers, self.runner.model.config, cache=self.cache)   # filled if still empty

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value) (1, heads, T, head_dim) of batch row ``row`` (views), T the slots this
        drafter has run so far (it may lag the target by a slot or two); [] before its first forward."""
        if not cache_length(self.cache):
            return []
        from specdec.prefix_cache.hf_cache import kv_from_cache

        return kv_from_cache(self.cache, row=row)

    def _fit_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        # A draft head wider than the target's vocabulary must never propose those ids.
        return logits[:, : self.target_vocab]

    def rollback(self, num_slots: int) -> None:
        crop(self.cache, num_slots)

    def select_rows(self, keep: torch.Tensor) -> None:
        select_rows(self.cache, keep.to(self.runner.device))


class PromptLookupDrafter:
    """Prompt lookup decoding (Saxena 2023; HF ``prompt_lookup_num_tokens``).

    For each row, find the most recent earlier occurrence of its last n tokens
    (n from ``max_ngram`` down to ``min_ngram``) in prompt + output and propose the
    tokens that followed it. Deterministic, so its distribution is one-hot.
    """

    name = "prompt-lookup"
    wants_features = False
    reusable_cache = False    # nothing to cache: it reads the token history

    def __init__(self, histories: list[list[int]], max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.histories = histories  # shared with the loop, which appends emitted tokens
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, batch: SlotBatch, k: int, choose: Chooser, keep_drafting=None) -> Proposal:
        found = [lookup_with_size(np.asarray(self.histories[r], dtype=np.int64), k, self.max_ngram, self.min_ngram)
                 for r in batch.rows.tolist()]
        tokens = torch.zeros(batch.size, k, dtype=torch.long)
        confidence = torch.zeros(batch.size, k)
        for i, (cont, size) in enumerate(found):
            tokens[i, : len(cont)] = torch.as_tensor(cont, dtype=torch.long)
            confidence[i, : len(cont)] = ngram_confidence(size)
        counts = [len(c) for c, _ in found]
        device = batch.pending.device
        return Proposal(tokens.to(device), None, torch.tensor(counts).to(device), counts, confidence)

    def lag(self, batch: SlotBatch) -> int:
        return 0    # its "catch-up" is the loop appending tokens to the history

    def rollback(self, num_slots: int) -> None:
        pass

    def select_rows(self, keep: torch.Tensor) -> None:
        pass


def lookup(history: np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1) -> np.ndarray:
    """Tokens that followed the latest earlier match of ``history``'s last n-gram (longest n first)."""
    return lookup_with_size(history, k, max_ngram, min_ngram)[0]


def lookup_with_size(history: np.ndarray, k: int, max_ngram: int = 3, min_ngram: int = 1) -> tuple[np.ndarray, int]:
    """``lookup`` and the length of the n-gram that matched (0: no match)."""
    length = len(history)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(history[: length - 1], n)
        hits = np.flatnonzero((windows == history[length - n:]).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return history[start: start + k], n
    return history[:0], 0


def ngram_confidence(size: int) -> float:
    """A lookup token's confidence key for the calibration table: longer matches, higher bins.
    (The table learns the real acceptance per bin; these are only its starting guesses.)"""
    return min(0.15 + 0.2 * size, 0.95)


_EARLY_EXIT_LOCK = threading.Lock()
_EARLY_EXIT: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def cached_early_exit_model(target: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """``early_exit_model``, the same object on every call for a (target, num_layers) while the
    target lives, so the fast path's graphs and compiled kernels (keyed by model) are reused."""
    with _EARLY_EXIT_LOCK:   # threads asking at once get one draft (and so share its static runners)
        per_target = _EARLY_EXIT.setdefault(target, {})
        if num_layers not in per_target:
            per_target[num_layers] = early_exit_model(target, num_layers)
        return per_target[num_layers]


def early_exit_model(target: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """The target's first ``num_layers`` decoder layers + its final norm and head, as a draft.

    Shares every weight with the target (no extra memory). The module tree is copied
    shallowly along the path to the decoder-layer list, which is shortened.
    """
    path, layers = find_layer_list(target)
    if not 1 <= num_layers < len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers) - 1} for a {len(layers)}-layer target, "
                         f"got {num_layers}")
    config = copy.deepcopy(target.config)
    truncate_config(config, num_layers)
    root = shallow_copy(target, config)
    parent = root
    for name in path[:-1]:
        child = shallow_copy(parent._modules[name], config)
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = torch.nn.ModuleList(list(layers)[:num_layers])
    return root
