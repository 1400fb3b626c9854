"""Train an EAGLE-style feature draft (``specdec.feature_draft``) on the target's own features.

The frozen target runs over each batch once (no grad, bf16 on GPU) and gives its features f
(final norm of the last layer's output) and teacher logits. The draft is trained on
``depths`` drafting steps at once, as it is used (a "training-time test", as in HASS and
EAGLE-3, where EAGLE-1 trained step 1 only):

- depth 1 reads the target's true features (plus uniform noise, as EAGLE-1) and the KV of
  every earlier slot is computed from true features, as in the decode loop;
- depth d reads the features depth d-1 predicted, and attends to the true keys up to its
  step's start plus its own step's keys of depths 2..d (:func:`depth_allowed`).

Loss per depth: SmoothL1(f̂, f) + ``kl_weight`` * KL(teacher || head(f̂)), weighted by
``depth_decay ** (d - 1)`` (a deeper guess only counts when the earlier ones were accepted).
Slots are weighted by the sampler's per-slot weights (:func:`step_weights`): the prompts of
the target's continuations, never drafted when decoding, count little.
Acceptance is replayed the same way (:func:`replay_feature_acceptance`): exact for greedy
decoding, since a depth-d guess only matters when depths 1..d-1 matched the target's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.adapter import ModelRunner
from specdec.distill.evaluate import EvalSet, left_pad, simulate_chains
from specdec.distill.train import TrainConfig, autocast_dtype, mean_parts, slot_weights, weighted_mean
from specdec.feature_draft import FeatureDraft, previous_features
from specdec.state import positions_from_mask


@dataclass
class FeatureTrainConfig(TrainConfig):
    depths: int = 3             # drafting steps trained at once (1: EAGLE-1's training)
    depth_decay: float = 0.8    # weight of depth d: depth_decay ** (d - 1)
    kl_weight: float = 1.0      # KL(teacher || draft) weight against SmoothL1 on features
    noise: float = 0.1          # uniform noise U(-noise, noise) on the true input features


def target_outputs(target, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None,
                   logits: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(last-layer outputs (B, T, H), logits (B, T, V) or None) of one no-grad target forward."""
    runner = ModelRunner(target)
    extra = {} if logits or not runner._has_logits_to_keep else {"logits_to_keep": 1}
    with torch.no_grad(), runner.watching_features():
        out = target(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, **extra)
        return runner.take_features(), (out.logits if logits else None)


@torch.no_grad()
def residual_scale(target, draft: FeatureDraft, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Median over real tokens of RMS(last-layer output) / RMS(feature): the scale at which
    ``init_from_last_layer`` feeds features to the copied layer (about 13 for SmolLM2-135M)."""
    hidden, _ = target_outputs(target, ids, mask, logits=False)
    ratio = hidden.float().pow(2).mean(-1).sqrt() / draft.features(hidden).float().pow(2).mean(-1).sqrt()
    return float(ratio[mask.bool()].median())


def depth_allowed(real: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, T, depth*T) bool: which keys a depth-``depth`` query at each slot reads.

    Keys are [true keys (T), depth-2 keys (T), ..., depth-``depth`` keys (T)]. The query at slot
    s belongs to the step that started at slot c = s - depth + 1: it reads real true keys at
    slots <= c and, of each depth j >= 2, the key of its own step (slot c + j - 1).
    """
    B, T = real.shape
    s = torch.arange(T, device=real.device)[:, None]
    t = torch.arange(T, device=real.device)[None]
    first = real.bool()[:, None, :] & (t <= s - depth + 1)
    if depth == 1:
        first = first | (t == s)  # a padding query reads itself: never an empty row
    blocks = [first] + [(t == s - (depth - j)).expand(B, T, T) for j in range(2, depth + 1)]
    return torch.cat(blocks, dim=-1)


def depth_features(draft: FeatureDraft, ids: torch.Tensor, features: torch.Tensor, real: torch.Tensor,
                   positions: torch.Tensor, depths: int, noise: float = 0.0) -> list[torch.Tensor]:
    """The draft's predicted features (B, T, H) at depths 1..``depths`` for every slot at once."""
    prev = previous_features(features, real)
    if noise:
        prev = prev + noise * (2 * torch.rand_like(prev) - 1)
    past, outs = None, []
    for d in range(1, depths + 1):
        f_hat, own = draft(ids, prev, positions, depth_allowed(real, d), past=past)
        past = own if past is None else (torch.cat([past[0], own[0]], 2), torch.cat([past[1], own[1]], 2))
        outs.append(f_hat)
        prev = previous_features(f_hat, real)
    return outs


def step_weights(weight: torch.Tensor, real: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, T) loss weight of the depth-``depth`` query at each slot s: the weight of slot
    c = s - depth + 1, where its step starts, on real slots s with c >= 1 (else 0).

    The query guesses token s+1, but decoding only asks it when the step's pending token (slot
    c) is one the target wrote, the prefill's token included: c, not s+1, tells whether the
    query is ever made (s+1 would also count the d queries at the end of the prompt).
    weight: (B, T) per-slot weights (``WindowSampler.sample_weighted``; a 0/1 mask for all).
    """
    out, T = torch.zeros_like(weight, dtype=torch.float32), weight.shape[1]
    if depth < T:
        out[:, depth:] = weight[:, 1:T - depth + 1].float()  # a step starts at slot >= 1
    return out * real.float()


def feature_loss(draft: FeatureDraft, f_hat: torch.Tensor, features: torch.Tensor, teacher_logp: torch.Tensor,
                 weight: torch.Tensor, kl_weight: float, top1_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """SmoothL1(f̂, f) + kl_weight * (KL(teacher || draft) + top1_weight * cross-entropy on the
    teacher's top-1 token), averaged over slots with ``weight`` (B, T; a bool mask or float
    weights, normalised by their sum), and its parts (detached 0-d tensors: smooth_l1, kl, top1 =
    argmax agreement, top1_ce when ``top1_weight``), weighted the same way.

    teacher_logp: (B, T, V) float32 log-probabilities of the target.
    """
    regress = weighted_mean(F.smooth_l1_loss(f_hat.float(), features.float(), reduction="none").mean(-1), weight)
    q_log = F.log_softmax(draft.logits(f_hat).float(), dim=-1)
    kl = weighted_mean((teacher_logp.exp() * (teacher_logp - q_log)).sum(-1), weight)
    best = teacher_logp.argmax(-1)
    top1 = weighted_mean((q_log.argmax(-1) == best).float(), weight)
    parts, token_loss = {"smooth_l1": regress.detach(), "kl": kl.detach(), "top1": top1}, kl
    if top1_weight:  # greedy acceptance asks only that the draft's top-1 be the target's
        ce = weighted_mean(-q_log.gather(-1, best[..., None]).squeeze(-1), weight)
        token_loss = kl + top1_weight * ce
        parts["top1_ce"] = ce.detach()
    return regress + kl_weight * token_loss, parts


class FeatureTask:
    """What ``specdec.distill.train.train`` optimizes for a feature draft (see the module docstring)."""

    def __init__(self, target, draft: FeatureDraft, config: FeatureTrainConfig):
        if config.top1_weight < 0:
            raise ValueError(f"top1_weight must be >= 0 (0: KL alone), got {config.top1_weight}")
        self.target, self.draft, self.config, self.amp = target, draft, config, autocast_dtype(target)
        self._parts: list[dict] = []

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.draft.parameters())

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Loss of a batch; ``weight`` (B, T) per slot (None: every real slot 1), see :func:`step_weights`."""
        c, real = self.config, mask.bool()
        w = slot_weights(mask, weight)
        positions = positions_from_mask(mask)
        with torch.autocast(ids.device.type, dtype=self.amp, enabled=self.amp is not None):
            hidden, teacher = target_outputs(self.target, ids, mask, positions)
            with torch.no_grad():
                feats = self.draft.features(hidden)
            teacher_logp = F.log_softmax(teacher.float(), dim=-1)
            outs = depth_features(self.draft, ids, feats, real, positions, c.depths, c.noise)
            total, parts = 0.0, {}
            for d, f_hat in enumerate(outs, start=1):
                loss, part = feature_loss(self.draft, f_hat, feats, teacher_logp, step_weights(w, real, d),
                                          c.kl_weight, c.top1_weight)
                total = total + c.depth_decay ** (d - 1) * loss
                parts.update({f"{k}_d{d}": v for k, v in part.items()})
        self._parts.append(parts)
        return total

    def detail(self) -> dict:
        """Mean loss parts (per depth) since the last call."""
        parts, self._parts = self._parts, []
        return mean_parts(parts)

    def acceptance(self, eval_set: EvalSet, k: int) -> float:
        return replay_feature_acceptance(self.target, self.draft, eval_set, k, autocast_dtype=self.amp)


@torch.no_grad()
def replay_feature_acceptance(target, draft: FeatureDraft, eval_set: EvalSet, k: int = 4, batch_size: int = 4,
                              autocast_dtype: torch.dtype | None = None) -> float:
    """Greedy acceptance (accepted / proposed) of a feature draft on ``eval_set``, replayed (no decode loop)."""
    device = draft.fc.weight.device
    accepted = proposed = 0
    rows = list(zip(eval_set.prompts, eval_set.continuations))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, mask = left_pad([p + c for p, c in chunk], 0, device)
        positions = positions_from_mask(mask)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hidden, _ = target_outputs(target, ids, mask, positions, logits=False)
            outs = depth_features(draft, ids, draft.features(hidden), mask.bool(), positions, k)
            guesses = torch.stack([draft.logits(f).argmax(-1) for f in outs], dim=1)  # (B, k, T)
        for i, (_, cont) in enumerate(chunk):
            a, p = simulate_chains(_hits(guesses[i], ids[i], len(cont)), k, eval_set.max_new_tokens)
            accepted, proposed = accepted + a, proposed + p
    return accepted / proposed if proposed else 0.0


def _hits(guesses: torch.Tensor, ids: torch.Tensor, n: int) -> list[list[bool]]:
    """hits[j][d-1]: the depth-d guess of the step whose pending token is new token j was right.

    guesses (k, W), ids (W,), the last n slots are new tokens. The step pending at slot c guesses
    slot c + d at depth d, from the query at slot c + d - 1.
    """
    k, W = guesses.shape
    guesses, ids = guesses.tolist(), ids.tolist()
    out = []
    for j in range(n):
        c = W - n + j
        out.append([guesses[d - 1][c + d - 1] == ids[c + d] for d in range(1, k + 1) if c + d < W])
    return out
