"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for int4 group-wise weights, plus grid refits.

- ``gptq_int4(w, H, group_size)``: pure tensor function. Quantizes the columns of ``w`` one by
  one; each column's rounding error is spread over the columns not yet quantized through the
  Cholesky factor of ``H^-1`` (``H = 2 X^T X`` of the layer's inputs, damped by 1% of its mean
  diagonal), so the layer's *output* error ``||X W^T - X Ŵ^T||`` is what gets minimized, not the
  weight error. Lazy updates in blocks of 128 columns; a group's (scale, zero) is chosen when its
  first column comes up, from the error-updated weights. No act-order (it would scramble groups).
  Then, beyond the paper, for the same objective: every group's (scale, zero) is refitted to the
  codes by least squares (``refit_scales_zeros``) and the codes improved by coordinate descent
  (``polish_codes``), twice by default; neither step can raise the output error.
- ``gptq_model(model, names, group_size, calibration)``: collects each ``H`` with forward hooks,
  block by block through the model's stack of decoder layers, so that every block is calibrated
  on the outputs of the already-quantized blocks before it (layers of one block share a pass).

Output is ``quant.int4``'s canonical format (packed, scales, zeros).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn

from .int4 import dequantize_int4, pack_int4
from .search import LEVELS, quantize_int4_search, search_scale_zero

logger = logging.getLogger(__name__)

Int4Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # packed, scales, zeros


@torch.no_grad()
def gptq_int4(w: torch.Tensor, H: torch.Tensor, group_size: int = 64, block_size: int = 128,
              damp: float = 0.01, grid: int = 1, sweeps: int = 2) -> Int4Params:
    """(out, in) weight and (in, in) Hessian ``2 X^T X`` (any positive scale) -> canonical int4.

    damp: added to H's diagonal, as a fraction of its mean. grid: ``quant.search`` grid for each
    group's range when its first column comes up (1: least-squares refit of min/max only).
    sweeps: after the GPTQ pass, every group's (scale, zero) is refitted to the codes
    (:func:`refit_scales_zeros`), then ``sweeps`` times the codes are improved one column at a
    time (:func:`polish_codes`) and the grids refitted again; each step lowers the output error.
    sweeps=-1 is plain GPTQ (no refit).
    """
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"in_features={in_f} is not divisible by group_size={group_size}")
    if H.shape != (in_f, in_f):
        raise ValueError(f"H must be ({in_f}, {in_f}) for a weight of shape {tuple(w.shape)}, got {tuple(H.shape)}")
    block_size = max(block_size, group_size) // group_size * group_size  # groups never straddle blocks
    Hd = _damped(H.float(), damp)
    q, scales, zeros = _gptq_pass(w, _inverse_cholesky(Hd, damp), torch.diagonal(H) == 0, group_size,
                                  block_size, grid)
    for sweep in range(sweeps + 1):
        if sweep:
            q = polish_codes(w, q, scales, zeros, Hd)
        scales, zeros = refit_scales_zeros(w, q, Hd, scales, zeros)
    return pack_int4(q), scales, zeros


def _damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H + damp * mean(diag H) * I, with a unit diagonal for dead (always-zero) inputs first."""
    H = H.clone()
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    diag += damp * diag.mean()
    return H


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (H damped already; damped more if it is still singular)."""
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        H = _damped(H, damp)
    raise ValueError("GPTQ: H is not positive definite even with extra damping; pass more calibration "
                     "tokens (more rows than the layer has inputs) or a larger damp")


@torch.no_grad()
def polish_codes(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 H: torch.Tensor) -> torch.Tensor:
    """One coordinate-descent sweep over the columns of the codes ``q`` (out, in), grids fixed.

    Each column moves to the code nearest the exact minimizer of ``(w - ŵ) H (w - ŵ)^T`` given
    all other columns, so the error never increases. Returns new codes (float, like ``q``).
    """
    G = w.shape[1] // scales.shape[1]
    S, Z = scales.float().repeat_interleave(G, 1), zeros.float().repeat_interleave(G, 1)  # (out, in)
    q = q.float().clone()
    grad = (q * S + Z - w.float()) @ H  # (out, in): half the gradient of the error
    d = torch.diagonal(H)
    for i in range(w.shape[1]):
        best = q[:, i] - grad[:, i] / (d[i] * S[:, i])  # continuous optimum, in code units
        new = torch.round(best).clamp(0, LEVELS)
        grad += ((new - q[:, i]) * S[:, i])[:, None] * H[i][None, :]
        q[:, i] = new
    return q


def _gptq_pass(w: torch.Tensor, U: torch.Tensor, dead: torch.Tensor, group_size: int, block_size: int,
               grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ sweep -> (codes (out, in) as float, scales, zeros). ``U``: upper Cholesky factor
    of H^-1; ``dead``: inputs that are always zero. A group's (scale, zero) is searched when its
    first column comes up, from the error-updated weights."""
    out_f, in_f = w.shape
    W = w.float().clone()
    W[:, dead] = 0  # any code will do for an input that is always zero
    scales = torch.empty(out_f, in_f // group_size, dtype=w.dtype, device=w.device)
    zeros = torch.empty_like(scales)
    Q = torch.empty(out_f, in_f, device=w.device)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        W1, Ub, err = W[:, b0:b1].clone(), U[b0:b1, b0:b1], torch.empty(out_f, b1 - b0, device=w.device)
        for i in range(b1 - b0):
            col, g = b0 + i, (b0 + i) // group_size
            if col % group_size == 0:
                s, z = search_scale_zero(W1[:, i:i + group_size], grid=grid)
                scales[:, g], zeros[:, g] = s.to(w.dtype), z.to(w.dtype)
            s, z = scales[:, g].float(), zeros[:, g].float()
            Q[:, col] = torch.round((W1[:, i] - z) / s).clamp(0, LEVELS)
            err[:, i] = (W1[:, i] - (Q[:, col] * s + z)) / Ub[i, i]
            W1[:, i:] -= err[:, i:i + 1] * Ub[i:i + 1, i:]  # (out, 1) * (1, rest)
        W[:, b1:] -= err @ U[b0:b1, b1:]
    return Q, scales, zeros


@torch.no_grad()
def refit_scales_zeros(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For fixed codes ``q`` (out, in), the (scale, zero) of every group that minimize the output
    error ``(w - ŵ) H (w - ŵ)^T`` of each row jointly (a (2 n_groups)-unknown least squares per row;
    pass H damped, see :func:`gptq_int4`).

    Rows whose solution has a non-positive scale keep their ``scales``/``zeros``.
    """
    out_f, in_f = w.shape
    n = scales.shape[1]
    G = in_f // n
    H = H.float()
    qg = q.float().reshape(out_f, n, G)  # (out, n, G)
    Hb = H.reshape(n, G, n, G)  # (group a, i, group h, j)
    hq = torch.einsum("aihj,rhj->raih", Hb, qg)  # (out, n, G, n): sum_j H[a i, h j] q[h j]
    ss = torch.einsum("rai,raih->rah", qg, hq)  # (out, n, n)
    hsum = Hb.sum(dim=3)  # (n, G, n): sum_j H[a i, h j]
    sz = torch.einsum("rai,aih->rah", qg, hsum)  # (out, n, n): q on the scale side
    zz = hsum.sum(dim=1)  # (n, n)
    lhs = torch.cat([torch.cat([ss, sz], 2), torch.cat([sz.transpose(1, 2), zz.expand(out_f, n, n)], 2)], 1)
    hw = (w.float() @ H).reshape(out_f, n, G)  # (out, n, G)
    rhs = torch.cat([(qg * hw).sum(-1), hw.sum(-1)], 1)  # (out, 2n)
    ridge = 1e-6 * torch.diagonal(lhs, dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(2 * n, device=w.device)
    sol = torch.linalg.solve(lhs + ridge, rhs)  # (out, 2n)
    ok = (sol[:, :n] > 0).all(dim=1, keepdim=True) & torch.isfinite(sol).all(dim=1, keepdim=True)
    new_s = torch.where(ok, sol[:, :n], scales.float()).to(scales.dtype)
    new_z = torch.where(ok, sol[:, n:], zeros.float()).to(zeros.dtype)
    return new_s, new_z


@torch.no_grad()
def gptq_model(model: nn.Module, names: Sequence[str], group_size: int, calibration,
               batch_size: int = 8, **gptq) -> dict[str, Int4Params]:
    """GPTQ int4 params for the named linear layers of ``model``, calibrated on token ids.

    calibration: LongTensor (N, T) or a list of token-id lists. The layers' weights are replaced
    by their dequantized values as each block is done (the model stays a float model; the caller
    swaps in ``Int4Linear`` s). Layers outside the decoder stack (or all layers, for a model without
    one) are quantized data-free with ``quant.search``. ``gptq`` goes to :func:`gptq_int4`.
    """
    batches = _batches(calibration, batch_size, _device(model))
    blocks = _decoder_stack(model, names)
    inside = {n for n in names if blocks is not None and any(n.startswith(p + ".") for p, _ in blocks)}
    params = {}
    for name in names:
        if name not in inside:
            logger.warning("gptq: %r is outside the decoder stack; quantized data-free (search)", name)
            params[name] = quantize_int4_search(_weight(model.get_submodule(name)), group_size)
    if not inside:
        return params
    inputs = _block_inputs(model, blocks[0][1], batches)
    for prefix, block in blocks:
        mine = [n for n in names if n.startswith(prefix + ".")]
        hessians = _hessians(block, {n[len(prefix) + 1:]: n for n in mine}, inputs)
        for name in mine:
            layer = model.get_submodule(name)
            params[name] = gptq_int4(_weight(layer), hessians[name], group_size, **gptq)
            _set_weight(layer, dequantize_int4(*params[name], dtype=layer.weight.dtype))
        inputs = [_replace_hidden(a, k, _first(block(*a, **k))) for a, k in inputs]
        logger.info("gptq: block %s done (%d layers)", prefix, len(mine))
    return params


def _batches(calibration, batch_size: int, device) -> list[torch.Tensor]:
    """Token-id batches: rows of equal length stacked, ``batch_size`` at a time."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"calibration must be token ids, a (N, T) integer tensor or a list of lists; "
                             f"got a {tuple(calibration.shape)} {calibration.dtype} tensor")
        rows = list(calibration.long())
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in calibration]
    rows = [r for r in rows if r.numel() > 1]
    if not rows:
        raise ValueError("calibration has no sequence of 2+ tokens; pass e.g. tokenizer(texts).input_ids")
    out, run = [], []
    for r in rows:
        if run and (len(run) == batch_size or r.numel() != run[0].numel()):
            out.append(torch.stack(run).to(device))
            run = []
        run.append(r)
    return out + [torch.stack(run).to(device)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _decoder_stack(model: nn.Module, names: Sequence[str]) -> list[tuple[str, nn.Module]] | None:
    """(prefix, block) of the ``nn.ModuleList`` holding most of the named layers, or None."""
    best, count = None, 0
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module):
            n = sum(1 for name in names if name.startswith(prefix + "."))
            if n > count:
                best, count = [(f"{prefix}.{i}", block) for i, block in enumerate(module)], n
    return best


class _Stop(Exception):
    pass


def _block_inputs(model: nn.Module, first: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block is called with, one per batch (the model stops there)."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _hessians(block: nn.Module, local: dict[str, str], inputs: list) -> dict[str, torch.Tensor]:
    """``2 X^T X / rows`` of every named layer of ``block`` (local name -> full name) over ``inputs``."""
    sums, rows, last = {}, {}, {}

    def hook(full):
        def accumulate(module, args, output):
            x = args[0]
            if last.get("x") is not x:  # q/k/v (and gate/up) share one input tensor: one X^T X
                x2d = x.detach().reshape(-1, x.shape[-1]).float()  # (rows, in)
                last.update(x=x, xtx=x2d.T @ x2d, rows=x2d.shape[0])
            sums[full] = sums.get(full, 0) + last["xtx"]
            rows[full] = rows.get(full, 0) + last["rows"]
        return accumulate

    handles = [block.get_submodule(loc).register_forward_hook(hook(full)) for loc, full in local.items()]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        last.clear()
    return {full: 2 * sums[full] / rows[full] for full in local.values()}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _weight(layer: nn.Module) -> torch.Tensor:
    """(out, in) weight of an nn.Linear or HF Conv1D (stored (in, out))."""
    w = layer.weight.detach()
    return w if isinstance(layer, nn.Linear) else w.t()


def _set_weight(layer: nn.Module, w: torch.Tensor) -> None:
    layer.weight.data.copy_(w if isinstance(layer, nn.Linear) else w.t())
