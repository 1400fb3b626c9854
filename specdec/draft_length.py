"""Deciding, each step, whether to speculate and how far (``num_draft_tokens="auto"``).

Everything is measured online, on this device, during this call and the earlier calls on the
same model and draft:

- **The switch** between plain decoding and speculation. The loop's realized throughput in each
  mode (tokens emitted per second of wall time, host work included) is tracked. When
  speculation falls behind plain decoding, the loop decodes plainly for a stretch and then
  probes again; the stretch doubles while probes keep losing (8 up to 128 steps) and shrinks
  back when one wins. A draft that does not match costs a probe now and then, not a slowdown.
  Repeated losing probes are priced: a dear draft (one whose catch-up on the prompt and on the
  plain stretch costs seconds) stays off long enough that its probes take at most
  ``probe_share`` of the time. After a loss, a probe is also priced before it is paid: the
  draft's catch-up (slots it has not seen, times its measured cost per slot) may be at most
  ``probe_share`` of the plain time since the last speculative step, so a new call's long
  prompt does not buy a probe that the last one showed would lose.
- **Memory across calls.** ``resume()`` hands the next generate() call on the same model and
  draft what this one learned (costs, calibration, the switch): a draft that lost stays off for
  the rest of its stretch instead of paying a warm-up and a losing probe on every short call.
- **How far, within a step.** Every drafted token carries a confidence (a model draft's top
  probability; prompt lookup's matched n-gram length), and a calibration table maps confidence
  to the chance that the target accepts the token (decayed counts per confidence bin, from what
  verifies accepted and rejected). A draft model stops drafting once the chance that every token
  drafted so far is accepted falls below the break-even value of one more token (what a draft
  forward plus one more verified token cost, at the current rate); the verify then checks the
  prefix that maximises the step's expected tokens per second (0 tokens: a plain step).

Costs: a draft forward (draft time / forwards; prompt lookup: per step), a verify of n drafted
tokens as a line V(n) = v0 + v1 n (weighted least squares, slope >= 0: a launch-bound GPU
verifies 8 tokens for the price of 1, a CPU does not), and the step's remaining host work.
"""

from __future__ import annotations

import bisect
import copy
import math
from dataclasses import dataclass, field

import torch

_BIN_EDGES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)   # upper edges; the last bin ends at 1
_BIN_CENTRES = (0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.925, 0.975)


@dataclass
class StepRecord:
    """What one speculative step did and cost (per-row lists are over the step's active rows)."""

    verified: int                   # drafted tokens the target checked (the verify ran verified + 1)
    forwards: int                   # draft forwards run (0 for prompt lookup)
    accepted: list[int]             # per row: drafted tokens accepted
    proposed: list[int]             # per row: drafted tokens checked (<= verified)
    confidence: torch.Tensor | None  # (B, >= verified) each drafted token's confidence, on the host
    draft_s: float
    verify_s: float
    step_s: float                   # the whole step, host work included (the catch-up excluded)
    catch_up_s: float = 0.0         # the draft catching up first (the prompt, or a plain stretch)
    catch_up_slots: int = 0         # how many slots that catch-up ran


class Calibration:
    """P(the target accepts a drafted token | the token's confidence), per confidence bin.

    Counts decay by ``decay`` per update so the table follows drift (code, then prose). Each bin
    starts from ``prior`` pseudo-counts centred on the bin's confidence.
    """

    def __init__(self, decay: float = 0.98, prior: float = 2.0):
        self.decay = decay
        self.accepted = [prior * c for c in _BIN_CENTRES]
        self.rejected = [prior * (1 - c) for c in _BIN_CENTRES]

    @staticmethod
    def bin(confidence: float) -> int:
        return bisect.bisect_left(_BIN_EDGES, confidence)

    def chance(self, confidence: float) -> float:
        b = self.bin(confidence)
        return self.accepted[b] / (self.accepted[b] + self.rejected[b])

    def chances(self, confidence: list[float]) -> list[float]:
        """Cumulative: entry j is the chance that tokens 0..j are all accepted."""
        out, p = [], 1.0
        for c in confidence:
            p *= self.chance(c)
            out.append(p)
        return out

    def update(self, confidence: list[float], accepted: int, judged: int) -> None:
        """Tokens 0..accepted-1 were accepted; token ``accepted`` was rejected if < ``judged``."""
        self.accepted = [a * self.decay for a in self.accepted]
        self.rejected = [r * self.decay for r in self.rejected]
        for c in confidence[:accepted]:
            self.accepted[self.bin(c)] += 1
        if accepted < judged:
            self.rejected[self.bin(confidence[accepted])] += 1


class _Mean:
    """Exponentially weighted mean (None until the first sample)."""

    def __init__(self, decay: float):
        self.decay, self.weight, self.total = decay, 0.0, 0.0

    def add(self, value: float, weight: float = 1.0) -> None:
        self.weight = self.weight * self.decay + weight
        self.total = self.total * self.decay + value * weight

    @property
    def value(self) -> float | None:
        return self.total / self.weight if self.weight else None


class _LineFit:
    """Exponentially weighted least-squares line y = alpha + beta * x (beta >= 0)."""

    def __init__(self, decay: float):
        self.decay, self.sums = decay, [0.0] * 5  # sw, sx, sy, sxx, sxy

    def add(self, x: float, y: float) -> None:
        sw, sx, sy, sxx, sxy = (v * self.decay for v in self.sums)
        self.sums = [sw + 1, sx + x, sy + y, sxx + x * x, sxy + x * y]

    def slope(self) -> float | None:
        sw, sx, sy, sxx, sxy = self.sums
        denom = sw * sxx - sx * sx
        if sw == 0 or denom <= 1e-9 * sw * sw:
            return None
        return max((sw * sxy - sx * sy) / denom, 0.0)

    def predict(self, x: float, default_slope: float = 0.0) -> float | None:
        sw, sx, sy, _, _ = self.sums
        if sw == 0:
            return None
        beta = self.slope()
        beta = default_slope * sy / sw if beta is None else beta
        return max(sy / sw + beta * (x - sx / sw), 1e-9)


@dataclass
class AdaptiveDraftLength:
    """The controller for ``num_draft_tokens="auto"`` (see the module docstring).

    The loop asks ``plain_steps()`` before each step (> 0: decode that many tokens plainly and
    report them with ``observe_plain``), drafts up to ``draft_limit()`` tokens asking
    ``keep_drafting`` after each, verifies ``verify_length(...)`` of them and reports the step
    with ``update``.
    """

    k_max: int = 12
    per_forward: bool = True         # a draft model (cost per drafted token), not prompt lookup
    min_stretch: int = 8             # plain steps after a losing probe, doubling up to max_stretch
    max_stretch: int = 128
    probe_share: float = 0.03        # a losing probe's cost may be this share of the plain stretch after it
    max_priced_stretch: int = 1024   # the longest stretch a dear probe buys
    margin: float = 0.03             # speculation must beat plain by this fraction to stay on
    hopeless: float = 0.5            # one step below this share of plain switches off at once
    warmup_plain: int = 3            # plain steps first, to know what speculation must beat
    first_limit: int = 4             # drafted tokens in a step before a draft forward's cost is known
    forward_prior: float = 0.25      # a draft forward's cost, as a share of a plain step, until measured
    decay: float = 0.9               # forgetting per step for rates and costs
    calibration: Calibration = field(default_factory=Calibration)
    _plain_s: _Mean = field(default=None, init=False)       # seconds per plain step
    _spec_tokens: _Mean = field(default=None, init=False)   # tokens a speculative step emits (per row)
    _spec_s: _Mean = field(default=None, init=False)        # seconds per speculative step
    _forward_s: _Mean = field(default=None, init=False)     # one draft forward (or a lookup)
    _verify: _LineFit = field(default=None, init=False)     # verify seconds over drafted tokens checked
    _host_s: _Mean = field(default=None, init=False)        # the rest of a step
    _stretch: int = field(default=0, init=False)
    _off_for: int = field(default=0, init=False)
    _run_steps: int = field(default=0, init=False)          # speculative steps since the last switch
    _run_cost: float = field(default=0.0, init=False)       # their catch-up plus net time lost against plain
    _catch_up_s: _Mean = field(default=None, init=False)    # seconds per slot the draft catches up on
    _plain_since_spec: int = field(default=0, init=False)   # plain steps since the last speculative step

    def __post_init__(self):
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        for name in ("probe_share", "margin", "hopeless"):
            if not 0 <= getattr(self, name) < 1 or (name == "probe_share" and self.probe_share == 0):
                raise ValueError(f"{name} must be a share in [0, 1) (probe_share: > 0), got {getattr(self, name)}")
        if not 1 <= self.min_stretch <= self.max_stretch <= self.max_priced_stretch:
            raise ValueError("stretches must satisfy 1 <= min_stretch <= max_stretch <= max_priced_stretch, got "
                             f"{self.min_stretch}, {self.max_stretch}, {self.max_priced_stretch}")
        self._plain_s, self._spec_s, self._spec_tokens = _Mean(self.decay), _Mean(self.decay), _Mean(self.decay)
        self._forward_s, self._host_s, self._catch_up_s = _Mean(self.decay), _Mean(self.decay), _Mean(self.decay)
        self._verify = _LineFit(self.decay)
        self._stretch = self.min_stretch

    # -- the switch ---------------------------------------------------------------------------

    def plain_steps(self, lag: int = 0) -> int:
        """Plain steps to run before the next speculative one (0: speculate now). ``lag``: the slots
        the draft would catch up on first (the prompt on a new call, the plain stretch since)."""
        if self._plain_s.value is None:
            return self.warmup_plain
        if self._off_for:
            return self._off_for
        return self._catch_up_wait(lag)

    def _catch_up_wait(self, lag: int) -> int:
        """After a losing probe: plain steps until a probe's catch-up costs at most ``probe_share`` of
        the plain time since the last speculative step (never past ``max_priced_stretch``). A draft
        that has not lost since it last won probes at once."""
        per_slot = self._catch_up_s.value
        if not lag or not per_slot or self._stretch == self.min_stretch:
            return 0
        needed = math.ceil(lag * per_slot / (self.probe_share * self._plain_s.value))
        return max(min(needed, self.max_priced_stretch) - self._plain_since_spec, 0)

    def observe_plain(self, steps: int, seconds: float) -> None:
        """``steps`` plain steps took ``seconds`` of wall time (host work included)."""
        if steps:
            self._plain_s.add(seconds / steps, weight=steps)
        self._off_for = max(self._off_for - steps, 0)    # a call may end inside a stretch: the next resumes it
        self._plain_since_spec += steps
        self._run_steps, self._run_cost = 0, 0.0

    def resume(self) -> AdaptiveDraftLength:
        """A controller for the next call: this one's costs, calibration and switch, a fresh run."""
        nxt = copy.deepcopy(self)
        nxt._run_steps, nxt._run_cost = 0, 0.0
        return nxt

    @property
    def plain_rate(self) -> float | None:
        """Tokens per second per row of plain decoding, as measured."""
        s = self._plain_s.value
        return 1 / s if s else None

    @property
    def spec_rate(self) -> float | None:
        s, tokens = self._spec_s.value, self._spec_tokens.value
        return tokens / s if s else None

    def _switch(self) -> None:
        """After a speculative step: turn speculation off for a stretch if it loses to plain."""
        plain, spec = self.plain_rate, self.spec_rate
        if plain is None or spec is None:
            return
        # one step that lost badly is evidence enough; otherwise a probe gets a second step (its
        # first may be one unlucky token, and its catch-up is paid already)
        if (self._run_steps >= 2 and spec < plain * (1 - self.margin)) or spec < plain * self.hopeless:
            # off for the stretch; after a second losing probe in a row, longer where probing is dear
            # (a draft model's catch-up on a new prompt): its cost <= probe_share of the stretch. A
            # first loss may be bad luck, and a short stretch costs a good draft little to re-probe.
            repeated = self._stretch > self.min_stretch
            priced = math.ceil(max(self._run_cost, 0.0) * plain / self.probe_share) if repeated else 0
            self._off_for = min(max(self._stretch, priced), self.max_priced_stretch)
            self._stretch = min(2 * self._stretch, self.max_stretch)
            self._spec_s, self._spec_tokens = _Mean(self.decay), _Mean(self.decay)   # a probe starts fresh
        elif self._run_steps >= 8:
            self._stretch = self.min_stretch

    # -- within a step ------------------------------------------------------------------------

    def draft_limit(self) -> int:
        """At most ``k_max``; at most ``first_limit`` in the first step after plain decoding (a probe)
        and until a draft forward's cost has been measured."""
        if self.per_forward and (self._forward_s.value is None or self._run_steps == 0):
            return min(self.k_max, self.first_limit)
        return self.k_max

    @property
    def stops_early(self) -> bool:
        """Whether a draft model should ask ``keep_drafting`` after each token (costs a host sync)."""
        return self.per_forward

    def keep_drafting(self, confidence: torch.Tensor) -> bool:
        """Draft another token? ``confidence``: (B, j) the confidences drafted so far (host)."""
        best = max(self.calibration.chances(row)[-1] for row in confidence.tolist())
        return best >= self.threshold()

    def threshold(self) -> float:
        """Break-even chance for one more drafted token: its cost over the time of one token."""
        per_token = 0.0
        if self.per_forward:
            per_token = self._forward_s.value
            if per_token is None:
                per_token = self.forward_prior * (self._plain_s.value or 0.0)
        marginal = per_token + (self._verify.slope() or 0.0)
        rate = max(self.plain_rate or 0.0, self.spec_rate or 0.0)
        return min(marginal * rate, 0.9) if rate else 0.0

    def verify_length(self, confidence: torch.Tensor | None, proposed: list[int], draft_s: float) -> int:
        """How many drafted tokens to verify: the prefix maximising expected tokens per second.

        ``confidence``: (B, k) host confidences (None: verify everything proposed); ``proposed``:
        per row, how many of the k are real.
        """
        longest = max(proposed, default=0)
        if confidence is None or longest == 0:
            return longest
        chances = [self.calibration.chances(row[:p]) for row, p in zip(confidence.tolist(), proposed)]
        best, best_rate = 0, None
        for n in range(longest + 1):
            tokens = sum(1 + sum(c[:n]) for c in chances) / len(chances)
            rate = tokens / (draft_s + self._verify_s(n) + (self._host_s.value or 0.0))
            if best_rate is None or rate > best_rate:
                best, best_rate = n, rate
        return best

    def _verify_s(self, n: int) -> float:
        predicted = self._verify.predict(n, default_slope=0.05)
        if predicted is not None:
            return predicted
        plain = self._plain_s.value or 1.0
        return plain * (1 + 0.05 * n)

    def update(self, step: StepRecord) -> None:
        """Learn from one speculative step."""
        if step.confidence is not None:
            for row, (a, p) in enumerate(zip(step.accepted, step.proposed)):
                if p:
                    self.calibration.update(step.confidence[row, :p].tolist(), a, p)
        if step.forwards or not self.per_forward:
            self._forward_s.add(step.draft_s / max(step.forwards, 1))
        self._verify.add(step.verified, step.verify_s)
        if step.catch_up_slots:
            self._catch_up_s.add(step.catch_up_s / step.catch_up_slots, weight=step.catch_up_slots)
        self._plain_since_spec = 0
        self._host_s.add(max(step.step_s - step.draft_s - step.verify_s, 0.0))
        tokens = sum(a + 1 for a in step.accepted) / max(len(step.accepted), 1)
        if self._plain_s.value is not None:
            # net: a step that beat plain pays back part of the run's catch-up and losses
            self._run_cost += step.catch_up_s + step.step_s - tokens * self._plain_s.value
        self._spec_tokens.add(tokens)
        self._spec_s.add(step.step_s)
        self._run_steps += 1
        self._switch()

    @property
    def acceptance(self) -> float:
        """The calibration's overall acceptance (all bins pooled)."""
        acc, rej = sum(self.calibration.accepted), sum(self.calibration.rejected)
        return acc / (acc + rej)


@dataclass
class FixedDraftLength:
    """A constant k (``num_draft_tokens=int``): always speculate, verify whatever was proposed."""

    k: int
    stops_early = False

    def plain_steps(self, lag: int = 0) -> int:
        return 0

    def draft_limit(self) -> int:
        return self.k

    def verify_length(self, confidence, proposed: list[int], draft_s: float) -> int:
        return max(proposed, default=0)

    def observe_plain(self, steps: int, seconds: float) -> None:
        pass

    def update(self, step: StepRecord) -> None:
        pass
