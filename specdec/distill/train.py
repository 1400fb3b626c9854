"""Train a draft on the target's next-token distributions.

:func:`train` is the loop (AdamW, linear warm-up then cosine decay, a time budget, an
acceptance curve); a *task* says what it optimizes and how acceptance is replayed:

- :class:`LayeredTask` (the default): a layered draft (``specdec.distill.model``). Loss:
  KL(p || q) per position, p = target (teacher), q = draft (student), summed over the whole
  vocabulary and averaged over real (unpadded) positions with the sampler's per-slot weights
  (``WindowSampler.sample_weighted``: prompts of the target's continuations count less), bf16
  autocast when the target is not float32; acceptance by
  :func:`specdec.distill.evaluate.replay_acceptance`.
- ``specdec.distill.feature_train.FeatureTask``: an EAGLE-style feature draft.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from specdec.distill.evaluate import EvalSet, replay_acceptance
from specdec.distill.model import own_parameters
from specdec.distill.qat import fake_quantized

log_ = logging.getLogger("specdec.distill")
# With a time budget the step count is fitted at step 13 to the pace of steps 3..13 (after warm-up), and
# again at 113 to that of steps 13..113: the first steps run slow while the allocator grows (fitted to
# them alone, a 230 s budget on an H100 trained only 100 s).
_PACE_POINTS = (3, 13, 113)


@dataclass
class TrainConfig:
    steps: int = 1000                   # optimizer steps (the most, when time_budget_s is set)
    batch_size: int = 16                # sequences per step
    lr: float = 5e-4                    # peak AdamW learning rate
    warmup: float = 0.05                # fraction of steps spent warming the learning rate up
    min_lr_ratio: float = 0.1           # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0              # max global gradient norm (0: off)
    eval_every: int = 100               # steps between acceptance replays (0: start and end only)
    k: int = 4                          # draft length of the acceptance replay
    time_budget_s: float | None = None  # fit the step count to this many seconds (measured over early steps)
    log_every: int = 10                 # steps per loss-curve point
    quant_bits: int | None = None       # train the last quant_fraction of steps through this rounding (qat.py)
    quant_fraction: float = 0.0         # 0: float throughout; 1: quantization-aware from the first step
    top1_weight: float = 0.0            # + this x cross-entropy on the target's top-1 token (both kinds)


@dataclass
class TrainLog:
    """What a training run did, JSON-ready (``asdict``)."""

    config: dict
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0                                          # real (unpadded) tokens trained on
    loss: list = field(default_factory=list)                 # [step, mean KL over the last log_every steps]
    acceptance: list = field(default_factory=list)           # [step, {eval set: replayed acceptance, "mean": ...}]
    lr: list = field(default_factory=list)                   # [step, learning rate]
    detail: list = field(default_factory=list)               # [step, the task's loss parts], if it has any

    def as_dict(self) -> dict:
        return asdict(self)


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions, weighted by ``mask``, of KL(softmax(teacher) || softmax(student)), in float32.

    teacher_logits, student_logits: (B, T, V); mask: (B, T) 1 on real tokens, 0 on padding, or
    float per-position weights (the mean is normalised by their sum).
    """
    return weighted_mean(_per_position(teacher_logits, student_logits)[0], mask)


def kl_and_top1_ce(teacher_logits: torch.Tensor, student_logits: torch.Tensor, weight: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(KL as :func:`kl_loss`, cross-entropy of the student on the teacher's top-1 token, the
    student's top-1 agreement), each a ``weight``-ed mean over positions, from one log-softmax
    of each side (the (B, T, V) float32 tensors are what a step's time goes to)."""
    kl, q_log, best = _per_position(teacher_logits, student_logits)
    ce = -q_log.gather(-1, best[..., None]).squeeze(-1)
    with torch.no_grad():
        agree = (student_logits.argmax(-1) == best).float()
    return weighted_mean(kl, weight), weighted_mean(ce, weight), weighted_mean(agree, weight)


def _per_position(teacher_logits: torch.Tensor, student_logits: torch.Tensor):
    """(B, T) KL(p || q) in float32, the student's log-probabilities q_log and the teacher's top-1."""
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} must have one shape (B, T, vocabulary): do the two "
                         "models share the tokenizer, and did they read the same batch?")
    p_log = F.log_softmax(teacher_logits.float(), dim=-1)
    q_log = F.log_softmax(student_logits.float(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1), q_log, teacher_logits.argmax(-1)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(values * weight) / sum(weight), 0 when every weight is 0; values and weight (B, T)."""
    if values.shape != weight.shape:  # broadcasting would weigh the wrong slots without a word
        raise ValueError(f"values {tuple(values.shape)} and weight {tuple(weight.shape)} must have one shape")
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1e-6)


def slot_weights(mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """(B, T) float32 loss weight of each slot: ``weight`` (a sampler's, e.g. low on prompt slots)
    on real slots, 0 on padding; ``weight=None``: the mask itself (every real slot counts 1)."""
    real = mask.float()
    return real if weight is None else real * weight.float()


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warm-up to ``config.lr``, then cosine decay to ``lr * min_lr_ratio`` at ``total``."""
    warmup = max(1, int(config.warmup * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class LayeredTask:
    """A layered draft: KL of its logits to the target's (plus ``top1_weight`` x cross-entropy on
    the target's top-1 token: greedy acceptance asks only for that one), acceptance replayed
    teacher-forced."""

    def __init__(self, target, draft, top1_weight: float = 0.0):
        if top1_weight < 0:
            raise ValueError(f"top1_weight must be >= 0 (0: KL alone), got {top1_weight}")
        self.target, self.draft, self.amp = target, draft, autocast_dtype(target)
        self.top1_weight = top1_weight
        self._parts: list[dict] = []

    def parameters(self) -> list[torch.nn.Parameter]:
        return own_parameters(self.draft, self.target)

    def loss(self, ids: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted KL; ``weight`` (B, T) per slot (None: every real slot 1).

        The logits at slot s guess token s+1, and decoding asks for them only once the target
        has written the token at slot s (from the prefill's token on): so slot s's own weight
        counts, not slot s+1's. The last prompt slot guesses the prefill's token, never drafted.
        """
        with torch.autocast(ids.device.type, dtype=self.amp, enabled=self.amp is not None):
            with torch.no_grad():
                teacher = self.target(input_ids=ids, attention_mask=mask, use_cache=False).logits
            student = self.draft(input_ids=ids, attention_mask=mask, use_cache=False).logits
        kl, ce, top1 = kl_and_top1_ce(teacher, student, slot_weights(mask, weight))
        parts = {"kl": kl.detach(), "top1": top1}
        loss = kl
        if self.top1_weight:  # cross-entropy read off the KL's own log-softmax (one pass over the vocabulary)
            loss = kl + self.top1_weight * ce
            parts["top1_ce"] = ce.detach()
        self._parts.append(parts)
        return loss

    def detail(self) -> dict:
        """Mean loss parts (weighted KL and top-1 agreement) since the last call."""
        parts, self._parts = self._parts, []
        return mean_parts(parts)

    def acceptance(self, eval_set: EvalSet, k: int) -> float:
        return replay_acceptance(self.draft, eval_set, k, autocast_dtype=self.amp)


def train(target, draft, sampler, config: TrainConfig, eval_sets: list[EvalSet] = (),
          progress: bool = True, task=None) -> TrainLog:
    """Distil ``target`` into ``draft`` (built by :func:`specdec.distill.model.build_draft`, or the
    draft of ``task``).

    ``sampler.sample_weighted(batch_size)`` gives (ids, mask, per-slot loss weight) batches (see
    ``WindowSampler``); a sampler with only ``sample(batch_size)`` -> (ids, mask) weighs every
    real slot 1. ``task``: what to optimize (``parameters()``, ``loss(ids, mask, weight)``,
    ``acceptance(eval_set, k)``, optionally ``detail()``); default :class:`LayeredTask`. The
    target is only read.
    Returns the log; ``draft`` is trained in place, its own tensors still in their training dtype.
    """
    from tqdm.auto import tqdm

    if config.quant_bits not in (None, 4, 8) or not 0 <= config.quant_fraction <= 1:
        raise ValueError(f"quant_bits must be 4, 8 or None and quant_fraction in [0, 1], got {config.quant_bits!r} "
                         f"and {config.quant_fraction!r}")
    device = target.get_input_embeddings().weight.device
    task = task or LayeredTask(target, draft, config.top1_weight)
    params = task.parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95),
                                  **({"fused": True} if device.type == "cuda" else {}))
    log, total, start = TrainLog(config=asdict(config)), config.steps, _now(device)
    _evaluate(task, eval_sets, config, log, 0)
    bar = tqdm(total=total, desc="distill", unit="step", disable=not progress)
    losses, step, paced = [], 0, None
    while step < total:  # draft stays in eval mode: no dropout (the shared modules are the target's)
        lr = lr_at(step, total, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        ids, mask, weight = _batch(sampler, config.batch_size, device)
        bits = _rounding(step, total, config)
        loss = _step(task, ids, mask, weight, params, optimizer, config, bits)
        losses.append(loss)
        log.tokens += int(mask.sum())
        step += 1
        if config.time_budget_s and step in _PACE_POINTS:
            now = _now(device)
            if paced:  # (step, time) of the last pace point
                per_step = (now - paced[1]) / (step - paced[0])
                total = bar.total = _fit_steps(config.steps, step, per_step, now - start, config)
            paced = (step, now)
        if step % config.log_every == 0 or step == total:
            log.loss.append([step, sum(losses) / len(losses)])
            log.lr.append([step, lr])
            if callable(getattr(task, "detail", None)):
                log.detail.append([step, task.detail()])
            losses = []
        if (config.eval_every and step % config.eval_every == 0) or step == total:
            with fake_quantized(params, bits):  # once rounding, the draft is replayed as it will ship
                _evaluate(task, eval_sets, config, log, step)
            if not progress:  # no bar: one line per evaluation
                log_.info("step %d/%d  loss %.3f  acceptance %s  (%.0f s)", step, total, loss, _last_rates(log),
                          _now(device) - start)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=_last_mean(log))
    bar.close()
    log.steps, log.seconds = step, _now(device) - start
    return log


def _batch(sampler, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(ids, mask, weight or None) on ``device``: the sampler's per-slot weights where it gives them."""
    if callable(getattr(sampler, "sample_weighted", None)):
        ids, mask, weight = sampler.sample_weighted(batch_size)
        return ids.to(device), mask.to(device), weight.to(device)
    ids, mask = sampler.sample(batch_size)
    return ids.to(device), mask.to(device), None


def _rounding(step: int, total: int, config: TrainConfig) -> int | None:
    """The bits a step trains through: ``config.quant_bits`` over the last ``quant_fraction`` of the steps."""
    if config.quant_bits is None or config.quant_fraction <= 0:
        return None
    return config.quant_bits if step >= total - math.ceil(config.quant_fraction * total) else None


def _step(task, ids, mask, weight, params, optimizer, config: TrainConfig, bits: int | None = None) -> float:
    optimizer.zero_grad(set_to_none=True)
    with fake_quantized(params, bits):  # straight-through: the rounded weights' gradient updates the float ones
        loss = task.loss(ids, mask, weight)
        loss.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return float(loss.detach())


def _fit_steps(total: int, done: int, per_step: float, elapsed: float, config: TrainConfig) -> int:
    """Steps that fit what is left of the time budget at ``per_step`` seconds (5% kept for evals)."""
    left = config.time_budget_s * 0.95 - elapsed
    return max(done, min(total, done + int(left / per_step)))


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _evaluate(task, eval_sets, config: TrainConfig, log: TrainLog, step: int) -> None:
    if not eval_sets:
        return
    rates = {e.name: task.acceptance(e, config.k) for e in eval_sets}
    rates["mean"] = sum(rates.values()) / len(rates)
    log.acceptance.append([step, rates])


def mean_parts(parts: list[dict]) -> dict:
    """Per-key means of a task's loss parts (0-d tensors) over steps; {} for none."""
    return {k: float(sum(p[k] for p in parts)) / len(parts) for k in parts[0]} if parts else {}


def _last_rates(log: TrainLog) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in log.acceptance[-1][1].items()) if log.acceptance else "-"


def _last_mean(log: TrainLog) -> str:
    return f"{log.acceptance[-1][1]['mean']:.3f}" if log.acceptance else "-"


def autocast_dtype(target) -> torch.dtype | None:
    """The dtype to autocast training steps to: the target's (None for a float32 target)."""
    dtype = target.get_input_embeddings().weight.dtype
    return None if dtype == torch.float32 else dtype
