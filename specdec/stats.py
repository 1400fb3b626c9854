"""What a generate() call measured about itself (``return_stats=True``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationStats:
    """Counters of one ``specdec.generate`` call. Per-row lists are in input row order."""

    batch_size: int
    drafter: str = "none"                  # "model", "prompt-lookup", "none"
    target_forwards: int = 0               # verify passes after prefill (prefill not counted)
    proposed: list[int] = field(default_factory=list)   # drafted tokens offered, per row
    accepted: list[int] = field(default_factory=list)   # drafted tokens kept, per row
    new_tokens: list[int] = field(default_factory=list)  # tokens emitted, per row
    steps: list[int] = field(default_factory=list)      # verify passes that row took part in
    k_history: list[int] = field(default_factory=list)  # draft length chosen at each step
    prefill_s: float = 0.0                 # time to first token
    draft_s: float = 0.0                   # time in the drafter
    verify_s: float = 0.0                  # time in target verify forwards
    total_s: float = 0.0
    cached_prompt_tokens: list[int] = field(default_factory=list)  # prefix-cache hits, per row

    def __post_init__(self):
        for name in ("proposed", "accepted", "new_tokens", "steps", "cached_prompt_tokens"):
            if not getattr(self, name):
                setattr(self, name, [0] * self.batch_size)

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens / proposed drafted tokens, over all rows."""
        proposed = sum(self.proposed)
        return sum(self.accepted) / proposed if proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target verify pass and row (1.0 = no gain)."""
        steps = sum(self.steps)
        decoded = sum(max(n - 1, 0) for n in self.new_tokens)  # the first token comes from prefill
        return decoded / steps if steps else 0.0

    @property
    def mean_k(self) -> float:
        return sum(self.k_history) / len(self.k_history) if self.k_history else 0.0

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(acceptance_rate=self.acceptance_rate, tokens_per_step=self.tokens_per_step,
                   mean_k=self.mean_k)
        return out

    def summary(self) -> str:
        tps = sum(self.new_tokens) / self.total_s if self.total_s else 0.0
        return (f"acceptance {self.acceptance_rate:.2f} | {self.tokens_per_step:.2f} tokens/step | "
                f"mean k {self.mean_k:.1f} | {tps:.1f} tokens/s | drafter {self.drafter}")
