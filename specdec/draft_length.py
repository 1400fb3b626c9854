"""Choosing the draft length k each step to maximise expected tokens per second.

With per-token acceptance a, a step that drafts k tokens yields on average
E(k) = (1 - a^(k+1)) / (1 - a) tokens per row (Leviathan et al. 2023) and costs
k * t_draft + t_verify(k). We estimate the three quantities online and pick
argmax_k E(k) / cost(k):

- a: maximum-likelihood estimate for i.i.d. acceptances truncated at k:
  accepted / (accepted + rejections), where a step that kept all its drafts counts
  no rejection. Exponential forgetting follows drift (code vs prose).
- t_draft: mean seconds per drafted token (forgetting average).
- t_verify(k) = alpha + beta * (k + 1): a weighted least-squares line through the
  verify times seen, since verifying more tokens costs more on CPUs and small GPUs.

One k per batch: rows share a verify pass, so the batch pools its acceptance
counts. k = 0 (plain decoding) is allowed when drafting does not pay, with a
probe of k = 1 every ``probe_every`` steps so a recovering draft is noticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdaptiveDraftLength:
    """Online controller for ``num_draft_tokens="auto"``."""

    k_max: int = 8
    k_init: int = 4
    decay: float = 0.95          # forgetting factor per step for all running sums
    probe_every: int = 16        # when at k = 0, try k = 1 this often
    allow_zero: bool = True
    _acc: float = field(default=3.0, init=False)    # prior: a = 0.75 until data arrive
    _rej: float = field(default=1.0, init=False)
    _draft_time: float = field(default=0.0, init=False)
    _draft_n: float = field(default=0.0, init=False)
    _fit: list = field(default_factory=lambda: [0.0] * 5, init=False)  # sw, sx, sy, sxx, sxy
    _steps: int = field(default=0, init=False)
    _k: int = field(default=0, init=False)

    def __post_init__(self):
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        self._k = min(self.k_init, self.k_max)

    @property
    def acceptance(self) -> float:
        return self._acc / (self._acc + self._rej)

    def choose(self) -> int:
        self._steps += 1
        if self._k == 0 and self._steps % self.probe_every == 0:
            return 1
        return self._k

    def update(self, k: int, accepted: list[int], proposed: list[int], draft_s: float, verify_s: float) -> None:
        """Record one step: per-row accepted/proposed counts and its timings."""
        if sum(proposed):  # a step without proposals says nothing about acceptance
            self._acc, self._rej = self._acc * self.decay, self._rej * self.decay
            self._acc += sum(accepted)
            self._rej += sum(1 for a, p in zip(accepted, proposed) if a < p)
        if k > 0:
            self._draft_time = self._draft_time * self.decay + draft_s
            self._draft_n = self._draft_n * self.decay + k
        self._add_verify_point(k + 1, verify_s)
        self._k = self._best_k()

    def _add_verify_point(self, x: float, y: float) -> None:
        f = [v * self.decay for v in self._fit]
        self._fit = [f[0] + 1, f[1] + x, f[2] + y, f[3] + x * x, f[4] + x * y]

    def verify_time(self, k: int) -> float:
        sw, sx, sy, sxx, sxy = self._fit
        if sw == 0:
            return 1.0
        denom = sw * sxx - sx * sx
        if denom <= 1e-12 * sw * sw:  # one k seen so far: assume cost grows 5% per extra token
            mean_x, mean_y = sx / sw, sy / sw
            return mean_y * (1 + 0.05 * (k + 1 - mean_x))
        beta = max((sw * sxy - sx * sy) / denom, 0.0)
        alpha = (sy - beta * sx) / sw
        return max(alpha + beta * (k + 1), 1e-9)

    def expected_rate(self, k: int) -> float:
        a = min(self.acceptance, 1 - 1e-6)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        per_token = self._draft_time / self._draft_n if self._draft_n else 0.0
        return tokens / (k * per_token + self.verify_time(k))

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
