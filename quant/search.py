"""Error-minimizing int4 (scale, zero) per group: a clip-range search with least-squares refits.

Round-to-nearest from a group's [min, max] spends levels on outliers and ignores where the
weights actually lie. Here each group tries ``grid`` narrower ranges (both ends moved inward by
the same fraction, like AWQ's clip search); for each, the codes are rounded, then (scale, zero)
are refitted to those codes by least squares (which also shifts the zero, as llama.cpp's
``make_qkx`` does) and the codes rounded again. The candidate with the lowest (optionally
weighted) squared error wins. The unclipped min/max grid is the starting best and neither a
refit nor a re-rounding can raise an error, so the result is never worse than min/max RTN (up to
the rounding of the stored dtype).

Output is ``quant.int4``'s canonical format, so every ``Int4Linear`` backend takes it unchanged.
"""

from __future__ import annotations

import torch

from .int4 import pack_int4

LEVELS = 15  # codes 0..15


def search_scale_zero(g: torch.Tensor, weights: torch.Tensor | None = None, grid: int = 20,
                      max_shrink: float = 0.3, refits: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale, zero) per group of ``g`` (..., G), float32, each of shape (...).

    weights: non-negative importance broadcastable to ``g``, or None for plain squared error.
    grid: candidate ranges, each end moved inward by 0 .. ``max_shrink`` of the span (grid=1:
    min/max only). refits: least-squares refit + re-round rounds per candidate.
    """
    if grid < 1 or not 0.0 <= max_shrink < 0.5:
        raise ValueError(f"need grid >= 1 and 0 <= max_shrink < 0.5, got grid={grid}, max_shrink={max_shrink}")
    g = g.float()
    w = None if weights is None else weights.float().expand_as(g)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    span = hi - lo
    best_s, best_z = (span / LEVELS).clamp(min=1e-10), lo
    best_err = _error(g, w, best_s, best_z)
    for shrink in torch.linspace(0.0, max_shrink, grid).tolist():
        s, z = (span * (1 - 2 * shrink) / LEVELS).clamp(min=1e-10), lo + shrink * span
        for _ in range(refits):
            s, z = _refit(g, w, _codes(g, s, z), s, z)
        err = _error(g, w, s, z)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.minimum(err, best_err)
    return best_s, best_z


def quantize_int4_search(w: torch.Tensor, group_size: int = 64, weights: torch.Tensor | None = None,
                         **search) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> canonical (packed, scales, zeros) with searched per-group ranges.

    weights: optional (in,) or (out, in) importance of each weight in the squared error.
    ``search`` goes to :func:`search_scale_zero` (grid, max_shrink, refits).
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_size}")
    g = w.float().reshape(out_f, in_f // group_size, group_size)  # (out, n_groups, G)
    gw = None if weights is None else weights.float().expand(out_f, in_f).reshape(g.shape)
    s, z = search_scale_zero(g, gw, **search)
    return encode_int4(w, s.to(w.dtype), z.to(w.dtype))


def encode_int4(w: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) weight and given (out, n_groups) scales/zeros -> canonical (packed, scales, zeros).

    Codes are the nearest level of each group's grid ``q * scale + zero``, q in [0, 15].
    """
    out_f, in_f = w.shape
    g = w.float().reshape(out_f, scales.shape[1], -1)
    q = _codes(g, scales.float(), zeros.float())
    return pack_int4(q.reshape(out_f, in_f)), scales, zeros


def _codes(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.round((g - z[..., None]) / s[..., None]).clamp(0, LEVELS)


def _wsum(w: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of x, weighted by w (None: unweighted)."""
    return x.sum(-1) if w is None else (w * x).sum(-1)


def _error(g: torch.Tensor, w: torch.Tensor | None, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    q = _codes(g, s, z)
    return _wsum(w, (q * s[..., None] + z[..., None] - g).square())


def _refit(g: torch.Tensor, w: torch.Tensor | None, q: torch.Tensor, s: torch.Tensor,
           z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares (scale, zero) for fixed codes; keeps (s, z) where that is degenerate."""
    sw = torch.full_like(s, g.shape[-1]) if w is None else w.sum(-1)
    sq, sx, sqq, sqx = _wsum(w, q), _wsum(w, g), _wsum(w, q * q), _wsum(w, q * g)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * sw * sqq.clamp(min=1e-30)
    safe = torch.where(ok, det, torch.ones_like(det))
    new_s = (sw * sqx - sq * sx) / safe
    new_z = (sqq * sx - sq * sqx) / safe
    ok = ok & (new_s > 1e-10)
    return torch.where(ok, new_s, s), torch.where(ok, new_z, z)
