"""Choosing the draft length k each step to maximise expected tokens per second.

With per-token acceptance a, a step that drafts k tokens yields on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens per row (Leviathan et al. 2023) and costs
T(k). We estimate both online and pick argmax_k E(k) / T(k):

- a: maximum-likelihood estimate for i.i.d. acceptances truncated at k:
  accepted / (accepted + rejections), where a step that kept all its drafts counts
  no rejection. Exponential forgetting follows drift (code vs prose).
- T(k) = alpha + beta * k: a weighted least-squares line through the measured wall
  time of whole steps (drafting, verifying, bookkeeping), since verifying more tokens
  costs more on CPUs and in eager GPU mode, and a draft model costs per token.

One k per batch: rows share a verify pass, so the batch pools its acceptance
counts. k = 0 (plain decoding) is allowed when drafting does not pay; exploration
probes k = 1 regularly so a recovering draft is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class _LineFit:
    """Exponentially weighted least-squares line y = alpha + beta * x (beta >= 0)."""

    def __init__(self, decay: float):
        self.decay, self.sums = decay, [0.0] * 5  # sw, sx, sy, sxx, sxy

    def add(self, x: float, y: float) -> None:
        sw, sx, sy, sxx, sxy = (v * self.decay for v in self.sums)
        self.sums = [sw + 1, sx + x, sy + y, sxx + x * x, sxy + x * y]

    def predict(self, x: float) -> float:
        sw, sx, sy, sxx, sxy = self.sums
        if sw == 0:
            return 1.0
        denom = sw * sxx - sx * sx
        if denom <= 1e-9 * sw * sw:  # one x seen so far: assume +5% per unit of x
            return (sy / sw) * (1 + 0.05 * (x - sx / sw))
        beta = max((sw * sxy - sx * sy) / denom, 0.0)
        return max((sy - beta * sx) / sw + beta * x, 1e-9)


@dataclass
class AdaptiveDraftLength:
    """Online controller for ``num_draft_tokens="auto"``.

    Step cost is fitted as one line over k from the measured wall time of whole steps
    (draft + verify + bookkeeping), so a drafter whose cost is per step (prompt lookup)
    and one whose cost is per token (a draft model) are both modelled right. Every
    ``explore_every`` steps it tries a neighbour of the best k, so the line has slope
    information; at k = 0 that probe is k = 1.
    """

    k_max: int = 8
    k_init: int = 4
    decay: float = 0.95          # forgetting factor per step for all running sums
    explore_every: int = 8
    allow_zero: bool = True
    _acc: float = field(default=3.0, init=False)    # prior: a = 0.75 until data arrive
    _rej: float = field(default=1.0, init=False)
    _cost: _LineFit = field(default=None, init=False)
    _steps: int = field(default=0, init=False)
    _k: int = field(default=0, init=False)

    def __post_init__(self):
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        self._k = min(self.k_init, self.k_max)
        self._cost = _LineFit(self.decay)

    @property
    def acceptance(self) -> float:
        return self._acc / (self._acc + self._rej)

    def choose(self) -> int:
        self._steps += 1
        if self._steps % self.explore_every == 0:
            up = (self._steps // self.explore_every) % 2 == 1 or self._k == 0
            return min(self._k + 1, self.k_max) if up else max(self._k - 1, 0 if self.allow_zero else 1)
        return self._k

    def update(self, k: int, accepted: list[int], proposed: list[int], draft_s: float, verify_s: float,
               step_s: float | None = None) -> None:
        """Record one step: per-row accepted/proposed counts and its timings (step_s: whole step)."""
        if sum(proposed):  # a step without proposals says nothing about acceptance
            self._acc, self._rej = self._acc * self.decay, self._rej * self.decay
            self._acc += sum(accepted)
            self._rej += sum(1 for a, p in zip(accepted, proposed) if a < p)
        self._cost.add(k, step_s if step_s is not None else draft_s + verify_s)
        self._k = self._best_k()

    def step_time(self, k: int) -> float:
        return self._cost.predict(k)

    def expected_rate(self, k: int) -> float:
        a = min(self.acceptance, 1 - 1e-6)
        return (1 - a ** (k + 1)) / (1 - a) / self.step_time(k)

    def _best_k(self) -> int:
        lowest = 0 if self.allow_zero else 1
        return max(range(lowest, self.k_max + 1), key=self.expected_rate)


@dataclass
class FixedDraftLength:
    """A constant k (``num_draft_tokens=int``)."""

    k: int

    def choose(self) -> int:
        return self.k

    def update(self, *args, **kwargs) -> None:
        pass
