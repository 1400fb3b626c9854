"""Drafts small enough to ship: only the draft's own weights, int8 or int4, in one safetensors file.

A distilled draft shares its embeddings and head with the target, so what it adds is its
decoder layers and norms. :func:`export_shipped` stores those (2-D weights int8 with one
scale per output channel, ``quant.int8``, or int4 with a float16 scale and zero per group of
32, ``quant.int4``, about half the bytes; 1-D tensors float32) plus metadata naming the
target layers it was built on and a fingerprint of the target. :func:`load_shipped_draft`
rebuilds the full draft around a loaded target, sharing the target's tensors, so it costs
the target nothing but those layers. Files for the bundled default model live in
``specdec/drafts/`` and are what ``draft_model="distilled"`` loads.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch

from quant.int4 import dequantize_int4, quantize_int4
from quant.int8 import dequantize_int8, quantize_int8
from specdec.distill.model import build_draft, own_parameters, own_state_dict

FORMAT = "specdec-draft/1"
DRAFTS_DIR = Path(__file__).resolve().parent.parent / "drafts"
_SCALE = ".__scale__"
_ZERO = ".__zero__"          # int4 only
INT4_GROUP = 32
_PROBE_ROWS = (1, 100, 1000)  # embedding rows (clamped to the vocabulary) in the fingerprint
_cache: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def target_fingerprint(target) -> dict:
    """Shape facts and a few embedding values: tells a model apart from others of its shape."""
    config = target.config.get_text_config()
    emb = target.get_input_embeddings().weight
    rows = sorted({min(r, emb.shape[0] - 1) for r in _PROBE_ROWS})
    return dict(model_type=config.model_type, hidden_size=emb.shape[1], vocab_size=emb.shape[0],
                num_hidden_layers=config.num_hidden_layers,
                probe=[round(float(v), 4) for v in emb[rows, :8].detach().float().flatten().cpu()])


def _matches(saved: dict, target) -> bool:
    now = target_fingerprint(target)
    if any(saved.get(k) != now[k] for k in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")):
        return False
    a, b = torch.tensor(saved.get("probe", [])), torch.tensor(now["probe"])
    # GGUF Q4_1 vs float checkpoints and bf16 rounding differ by ~1e-2 of the embedding scale
    return a.shape == b.shape and bool(((a - b).abs() <= 0.02 * b.abs().max().clamp(min=1e-6) + 1e-3).all())


def export_shipped(draft, target, path: str | Path, layers: list[int], name: str = "",
                   info: dict | None = None, bits: int = 8) -> Path:
    """Write ``draft``'s own weights (int8 or int4 matrices, float32 vectors) to ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    tensors = {}
    for key, value in own_state_dict(draft, target).items():
        value = value.detach().float().cpu()
        if value.dim() == 2 and bits == 4:
            packed, scales, zeros = quantize_int4(value.half(), group_size=INT4_GROUP)
            tensors[key], tensors[key + _SCALE], tensors[key + _ZERO] = packed.contiguous(), scales, zeros
        elif value.dim() == 2:
            q, scales = quantize_int8(value)
            tensors[key], tensors[key + _SCALE] = q.contiguous(), scales.float()
        else:
            tensors[key] = value.contiguous()
    meta = dict(format=FORMAT, name=name, layers=json.dumps(layers), fingerprint=json.dumps(target_fingerprint(target)),
                info=json.dumps(info or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict:
    """The file's metadata, JSON fields decoded (``layers``, ``fingerprint``, ``info``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a specdec shipped draft (format {meta.get('format')!r}, expected {FORMAT!r})")
    for key in ("layers", "fingerprint", "info"):
        meta[key] = json.loads(meta.get(key) or "null")
    return meta


def shipped_drafts() -> list[Path]:
    """The shipped draft files in the package (``specdec/drafts/*.safetensors``)."""
    return sorted(DRAFTS_DIR.glob("*.safetensors"))


def find_shipped(target) -> Path | None:
    """The shipped draft file distilled for ``target`` (by fingerprint), or None."""
    for path in shipped_drafts():
        if _matches(read_metadata(path)["fingerprint"], target):
            return path
    return None


def load_shipped_draft(target, path: str | Path | None = None) -> torch.nn.Module:
    """The distilled draft for ``target``, sharing its embeddings and head (cached per target).

    Args:
        target: the loaded target model (any dtype and device: the draft follows it).
        path: a shipped draft file; default: the one in ``specdec/drafts`` made for ``target``.

    Raises:
        ValueError: no shipped draft fits ``target`` (make one with ``specdec distill``).
    """
    emb = target.get_input_embeddings().weight
    cached = _cache.get(target)
    if path is None and cached is not None and _own_placement(cached, target) == (emb.device, emb.dtype):
        return cached
    if path is None:
        path = find_shipped(target)
        if path is None:
            raise ValueError(
                "no shipped distilled draft fits this target (shipped: "
                f"{', '.join(p.name for p in shipped_drafts()) or 'none'}): make one with `specdec distill "
                "--target PATH --out DIR` and pass draft_model=AutoModelForCausalLM.from_pretrained(DIR)")
    meta = read_metadata(path)
    if not _matches(meta["fingerprint"], target):
        raise ValueError(f"{path} was distilled for another model ({meta['fingerprint']}): "
                         "make a draft for this target with `specdec distill`")
    draft = build_draft(target, meta["layers"], dtype=emb.dtype)
    _load_own(draft, target, path)
    if Path(path).parent == DRAFTS_DIR:
        _cache[target] = draft
    return draft


def _load_own(draft, target, path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = own_state_dict(draft, target)
    wanted = set(own)
    stored = {k for k in saved if not k.endswith((_SCALE, _ZERO))}
    if wanted != stored:
        raise ValueError(f"{path} does not fit this target's draft: missing {sorted(wanted - stored)[:3]}, "
                         f"unexpected {sorted(stored - wanted)[:3]}")
    with torch.no_grad():
        for key, tensor in own.items():
            value = saved[key]
            if key + _ZERO in saved:
                value = dequantize_int4(value, saved[key + _SCALE], saved[key + _ZERO], torch.float32)
            elif key + _SCALE in saved:
                value = dequantize_int8(value, saved[key + _SCALE], torch.float32)
            tensor.copy_(value.to(tensor.dtype))
    for p in own_parameters(draft, target):
        p.requires_grad_(False)


def _own_placement(draft, target):
    p = own_parameters(draft, target)[0]
    return p.device, p.dtype
