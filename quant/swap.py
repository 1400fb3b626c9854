"""``quantize(model, ...)``: swap a model's linear layers for int8/int4 weight-only ones, in place."""

from __future__ import annotations

import fnmatch
import logging
from typing import Iterable

import torch
from torch import nn

from . import timing, triton_backend
from .int4 import GROUP_SIZES, Int4Linear, quantize_int4
from .int8 import Int8Linear
from .search import quantize_int4_search

logger = logging.getLogger(__name__)

FAST_BACKENDS = {8: ("torch", "triton"), 4: ("tinygemm", "triton")}   # what backend="auto" tries
METHODS = ("rtn", "search", "gptq")


def quantize(model: nn.Module, bits: int = 8, group_size: int = 64, backend: str = "auto",
             skip: Iterable[str] = ("lm_head",), method: str = "rtn", calibration=None) -> nn.Module:
    """Replace every ``nn.Linear`` (and HF ``Conv1D``) of ``model`` by an int8/int4 one; return ``model``.

    bits: 8 (per-channel symmetric) or 4 (group-wise asymmetric, ``group_size`` in 32/64/128/256).
    method (int4 only; int8 is always ``"rtn"``): ``"rtn"`` (default: min/max round-to-nearest),
    ``"search"`` (per group, the clipped range of lowest squared weight error; data-free, never
    worse than min/max, ~20x the time of rtn) or ``"gptq"`` (GPTQ plus least-squares grid refits:
    minimizes each layer's output error on ``calibration``; minutes on CPU for a 135M model).
    calibration: token ids for ``"gptq"``, a (N, T) LongTensor or a list of lists, e.g. 16-128
    sequences of 256-512 tokens of text like what the model will see; the model must be an HF
    causal LM (its decoder layers are calibrated one after the other).
    backend: ``"auto"`` (per weight device/dtype/shape: of the fused kernels that run and agree with
    ``"reference"``, the fastest on a batch-1 input, unless slower than ``"reference"``; on CUDA timed
    as a CUDA graph replays them), ``"torch"`` (int8) / ``"tinygemm"`` (int4), ``"triton"`` (our
    Triton kernels, CUDA), ``"reference"``, or ``"bnb"`` (bitsandbytes, CUDA).
    skip: names (or fnmatch patterns, or last name components) of layers to leave in full precision
    (a single string is one pattern). All layers are checked before any is replaced.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                        f"got {type(model).__name__}")
    _check_args(bits, group_size, backend, method, calibration)
    targets = _find_linears(model, (skip,) if isinstance(skip, str) else tuple(skip))
    for name, layer in targets:
        _check_layer(name, layer, bits, group_size)
    if backend == "bnb":
        return _quantize_bnb(model, targets, bits)
    precomputed = {}
    if method == "gptq":
        from .gptq import gptq_model

        precomputed = gptq_model(model, [name for name, _ in targets], group_size, calibration)
    chosen: dict[tuple, str] = {}
    for name, layer in targets:
        linear = _as_linear(layer)
        params = precomputed.get(name) or (_int4_params(linear, group_size, method) if bits == 4 else None)
        _set_submodule(model, name, _make_layer(linear, bits, group_size, backend, chosen, params))
    return model


def _check_args(bits: int, group_size: int, backend: str, method: str, calibration) -> None:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} for int4, got {group_size!r}")
    allowed = ("auto", "reference", "bnb", *FAST_BACKENDS[bits])
    if backend not in allowed:
        raise ValueError(f"backend for bits={bits} must be one of {allowed}, got {backend!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "rtn" and (bits == 8 or backend == "bnb"):
        raise ValueError(f"method={method!r} applies to int4 with our backends; use method='rtn' "
                         f"for bits={bits}, backend={backend!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("method='gptq' needs calibration=: token ids of representative text, a (N, T) "
                         "LongTensor or a list of lists (e.g. tokenizer(texts).input_ids, 16-128 sequences "
                         "of 256-512 tokens); or use method='search', which needs no data")
    if method != "gptq" and calibration is not None:
        raise ValueError(f"calibration is only used by method='gptq', got method={method!r}")


def _int4_params(linear: nn.Linear, group_size: int, method: str):
    """Canonical int4 (packed, scales, zeros) of a linear's weight, data-free."""
    quantize_fn = quantize_int4 if method == "rtn" else quantize_int4_search
    return quantize_fn(linear.weight.detach(), group_size)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) or fnmatch.fnmatchcase(name, s) for s in skip)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:  # transformers absent: plain nn.Linear only
        return None


def _find_linears(model: nn.Module, skip: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every layer to quantize; raises on linear-like layers we cannot handle."""
    conv1d = _conv1d_type()
    found, already = [], 0
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            already += 1
        if not name or _skipped(name, skip) or isinstance(module, (Int8Linear, Int4Linear)):
            continue
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            found.append((name, module))
        elif isinstance(module, nn.Linear):
            raise ValueError(f"layer {name!r} is a {type(module).__name__} (a subclass of nn.Linear), which "
                             f"quantize() does not support; add {name!r} to skip= to keep it in full precision")
    if not found and not already:
        kinds = sorted({type(m).__name__ for m in model.modules() if getattr(m, "weight", None) is not None})
        raise ValueError(f"no nn.Linear layers to quantize (skip={skip}); weighted layer types seen: {kinds}")
    return found


def _check_layer(name: str, layer: nn.Module, bits: int, group_size: int) -> None:
    in_f = _as_linear_shape(layer)[1]
    if bits == 4 and in_f % group_size:
        works = [g for g in GROUP_SIZES if in_f % g == 0]
        hint = f"group sizes that divide it: {works}" if works else "no supported group size divides it"
        raise ValueError(f"layer {name!r}: in_features={in_f} is not divisible by group_size={group_size} "
                         f"({hint}); or add {name!r} to skip=")
    if bits == 4 and in_f % 2:
        raise ValueError(f"layer {name!r}: in_features={in_f} must be even for int4 packing")


def _as_linear_shape(layer: nn.Module) -> tuple[int, int]:
    w = layer.weight
    return tuple(w.shape) if isinstance(layer, nn.Linear) else (w.shape[1], w.shape[0])


def _as_linear(layer: nn.Module) -> nn.Linear:
    """nn.Linear as is; HF Conv1D (weight stored (in, out)) as an equivalent nn.Linear view."""
    if isinstance(layer, nn.Linear):
        return layer
    lin = nn.Linear(layer.weight.shape[0], layer.weight.shape[1], bias=layer.bias is not None, device="meta")
    lin.weight = nn.Parameter(layer.weight.detach().t(), requires_grad=False)
    lin.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach(), requires_grad=False)
    return lin


def _build(linear: nn.Linear, bits: int, group_size: int, backend: str, params=None) -> nn.Module:
    """int8 layer, or int4 from canonical ``params`` (packed, scales, zeros); min/max RTN if None."""
    if bits == 8:
        return Int8Linear.from_linear(linear, backend)
    if params is None:
        return Int4Linear.from_linear(linear, group_size, backend)
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return Int4Linear(*params, group_size, bias, backend)


def _make_layer(linear: nn.Linear, bits: int, group_size: int, backend: str, chosen: dict,
                params=None) -> nn.Module:
    """The quantized layer; with backend="auto" the fast kernel if it works here, else reference."""
    if backend != "auto":
        return _build(linear, bits, group_size, backend, params)
    w = linear.weight
    key = (w.device, w.dtype, tuple(w.shape))
    if key not in chosen:
        chosen[key] = _probe(linear, bits, group_size)
        logger.info("quant: %d-bit %s on %s/%s uses backend %r", bits, tuple(w.shape), w.device, w.dtype,
                    chosen[key])
    return _build(linear, bits, group_size, chosen[key], params)


def _probe(linear: nn.Linear, bits: int, group_size: int) -> str:
    """The fastest fused backend that runs here and agrees with reference, unless slower than reference
    at batch-1 decode (more than 10%); else reference."""
    x = torch.randn(2, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
    reference = _build(linear, bits, group_size, "reference")
    with torch.no_grad():
        want = (reference(x).float(), reference(x[:1]).float())
    times = {}
    for name in _candidates(bits, x.device):
        seconds = _try_backend(linear, bits, group_size, name, x, want)
        if seconds is not None:
            times[name] = seconds
    if not times:
        return "reference"
    best = min(times, key=times.get)
    reference_seconds = _seconds(reference, x[:1])
    logger.info("quant: batch-1 us per call: %s, reference %.1f", ", ".join(f"{n} {1e6 * t:.1f}" for n, t in
                                                                            times.items()), 1e6 * reference_seconds)
    return best if times[best] <= 1.1 * reference_seconds else "reference"


def _candidates(bits: int, device: torch.device) -> tuple[str, ...]:
    """Fused backends worth trying on ``device`` (Triton on CUDA only: elsewhere it would interpret)."""
    return tuple(b for b in FAST_BACKENDS[bits] if b != "triton" or triton_backend.fast_on(device))


def _try_backend(linear: nn.Linear, bits: int, group_size: int, name: str, x: torch.Tensor,
                 want: tuple[torch.Tensor, torch.Tensor]) -> float | None:
    """Seconds per batch-1 call of backend ``name``, or None where it fails or disagrees with reference
    (on the 2-row and the 1-row input: kernels may differ by row count)."""
    try:
        layer = _build(linear, bits, group_size, name)
        with torch.no_grad():
            got = (layer(x).float(), layer(x[:1]).float())
        if any((g - w).abs().max().item() > 0.05 * w.abs().max().item() + 1e-3 for g, w in zip(got, want)):
            logger.info("quant: backend %r disagrees with reference on %s", name, x.device)
            return None
        return _seconds(layer, x[:1])
    except Exception as err:  # noqa: BLE001 - any failure of a candidate kernel (missing op, compile error): skip it
        logger.info("quant: backend %r unavailable (%s: %s)", name, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
    return None


def _seconds(layer: nn.Module, x: torch.Tensor) -> float:
    """Time of one ``layer(x)`` call (GPU time in a replayed CUDA graph on CUDA: ``quant.timing``)."""
    return timing.seconds(layer, x)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _quantize_bnb(model: nn.Module, targets: list[tuple[str, nn.Module]], bits: int) -> nn.Module:
    """bitsandbytes layers (LLM.int8() / NF4), quantized when moved to CUDA."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError("backend='bnb' needs bitsandbytes: pip install .[bnb]  (or pip install bitsandbytes)") from err
    for name, layer in targets:
        lin = _as_linear(layer)
        w, device = lin.weight.detach(), lin.weight.device
        if bits == 8:
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False, threshold=6.0)
            new.weight = bnb.nn.Int8Params(w.to("cpu").to(torch.float16), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    compute_dtype=w.dtype, quant_type="nf4")
            new.weight = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().to("cpu"), requires_grad=False)
        _set_submodule(model, name, new.to(device))
    return model
