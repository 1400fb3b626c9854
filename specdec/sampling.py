"""Logits -> probabilities with Hugging Face's meaning of the sampling keywords.

Pure tensor functions. Randomness is never drawn here: samplers take uniforms in
[0, 1) from the caller, so every function is deterministic and testable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen (HF `generate()` semantics)."""

    do_sample: bool = False     # False: greedy (argmax)
    temperature: float = 1.0    # logits / temperature, before top-k / top-p
    top_k: int | None = None    # keep the k most likely tokens (None or 0: off)
    top_p: float | None = None  # keep the smallest set with cumulative probability >= top_p
    min_p: float | None = None  # drop tokens below min_p * p(most likely token)

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                             "use do_sample=False for greedy decoding")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None turns it off), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Set ``logits[..., token_ids]`` to -inf at the positions where ``where`` is True.

    Used for ``min_new_tokens`` (EOS is forbidden until enough tokens exist).
    logits: (..., V); where: logits.shape[:-1] bool; token_ids: (n,) long.
    """
    if token_ids.numel() == 0 or not bool(where.any()):
        return logits
    logits = logits.clone()
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[token_ids] = True
    return logits.masked_fill(where.unsqueeze(-1) & banned, float("-inf"))


def warp_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p in HF's order; filtered entries become -inf."""
    logits = logits.float()
    if cfg.temperature != 1.0:
        logits = logits / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        logits = _top_p(logits, cfg.top_p)
    if cfg.min_p is not None:
        probs = logits.softmax(-1)
        threshold = cfg.min_p * probs.amax(-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    # HF: sort ascending, drop the prefix whose cumulative mass is <= 1 - top_p, keep >= 1 token.
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def probabilities(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution tokens are drawn from: softmax of the warped logits (float32)."""
    return warp_logits(logits, cfg).softmax(-1)


def sample(probs: torch.Tensor, uniforms: torch.Tensor, invalid: int | None = None) -> torch.Tensor:
    """Inverse-CDF draw: one token per row of ``probs`` (..., V) given ``uniforms`` (...).

    With ``invalid`` set, a row whose mass is not a finite positive number (NaN/inf logits
    from a broken model) gets that value instead of an arbitrary token; free, it reuses the CDF.
    """
    cdf = probs.cumsum(-1)
    total = cdf[..., -1:]
    target = uniforms.unsqueeze(-1) * total  # scale by the total: robust to rounding
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    index = _nearest_supported(probs, index.clamp_(max=probs.shape[-1] - 1))
    if invalid is None:
        return index
    ok = torch.isfinite(total.squeeze(-1)) & (total.squeeze(-1) > 0)
    return torch.where(ok, index, invalid)


def greedy(logits: torch.Tensor, invalid: int = -1) -> torch.Tensor:
    """argmax over the last dim (first maximum, as ``argmax``), ``invalid`` where a row's maximum
    is NaN or inf (a broken model). One reduction, like ``argmax``: ``max`` propagates NaN."""
    best, index = logits.max(-1)
    return torch.where(torch.isfinite(best), index, invalid)


def _nearest_supported(probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # A rounding edge can land on a zero-probability slot: move to the last supported token.
    ok = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1) > 0
    if bool(ok.all()):
        return index
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    return torch.where(ok, index, last)
