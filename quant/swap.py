"""``quantize(model, ...)``: swap a model's linear layers for int8/int4 weight-only ones, in place."""

from __future__ import annotations

import fnmatch
import logging
import time
from typing import Iterable

import torch
from torch import nn

from .int4 import GROUP_SIZES, Int4Linear, quantize_int4
from .int8 import Int8Linear
from .search import quantize_int4_search

logger = logging.getLogger(__name__)

FAST_BACKEND = {8: "torch", 4: "tinygemm"}
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
    backend: ``"auto"`` (per weight device/dtype/shape: the fused kernel if it runs, agrees with
    ``"reference"`` and is not slower on a batch-1 input, else ``"reference"``), ``"torch"`` (int8) / ``"tinygemm"`` (int4), ``"reference"``, or
    ``"bnb"`` (bitsandbytes, CUDA). skip: names (or fnmatch patterns, or last name components)
    of layers to leave in full precision (a single string is one pattern). All layers are checked
    before any is replaced.
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
    allowed = ("auto", "reference", "bnb", FAST_BACKEND[bits])
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
    """The fast backend if it runs here, agrees with reference and is not slower at batch-1 decode."""
    fast = FAST_BACKEND[bits]
    try:
        x = torch.randn(2, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        layers = {name: _build(linear, bits, group_size, name) for name in (fast, "reference")}
        with torch.no_grad():
            got, want = (layers[n](x).float() for n in (fast, "reference"))
        if (got - want).abs().max().item() > 0.05 * want.abs().max().item() + 1e-3:
            logger.info("quant: backend %r disagrees with reference on %s; using reference", fast, x.device)
            return "reference"
        times = {n: _seconds(layer, x[:1]) for n, layer in layers.items()}
        logger.info("quant: %s %.1f us vs reference %.1f us per batch-1 call", fast, 1e6 * times[fast],
                    1e6 * times["reference"])
        return fast if times[fast] <= 1.1 * times["reference"] else "reference"
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as err:
        logger.info("quant: backend %r unavailable (%s: %s); using reference", fast, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
    return "reference"


@torch.no_grad()
def _seconds(layer: nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of ``layer(x)``, synchronized on CUDA."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    layer(x)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        layer(x)
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
