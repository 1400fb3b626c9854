"""Drafts small enough to ship: only the draft's own weights, int8 or int4, in one safetensors file.

Two kinds share the format's machinery: layered drafts (``specdec-draft/1``, below) and
EAGLE-style feature drafts (``specdec-feature-draft/1``, :func:`export_feature`: an fc and one
decoder layer, see ``specdec.feature_draft``). ``draft_model="distilled"`` loads the one of them
that fits the target with the highest recorded held-out acceptance (:func:`load_named`).

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

from specdec.quant.int4 import dequantize_int4, quantize_int4
from specdec.quant.int8 import dequantize_int8, quantize_int8
from specdec.distill.model import build_draft, own_parameters, own_state_dict

FORMAT = "specdec-draft/1"
FEATURE_FORMAT = "specdec-feature-draft/1"
KINDS = {"layers": FORMAT, "feature": FEATURE_FORMAT}
FEATURE_FILE = "feature-draft.safetensors"  # in the --out directory of `specdec distill --kind feature`
LAYERS_FILE = "layers-draft.safetensors"    # a layered draft's own weights, float32, in --out (for --resume)
DRAFTS_DIR = Path(__file__).resolve().parent.parent / "drafts"
_SCALE = ".__scale__"
_ZERO = ".__zero__"          # int4 only
INT4_GROUP = 32
_PROBE_ROWS = (1, 100, 1000)  # embedding rows (clamped to the vocabulary) in the fingerprint
_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.nn.Module]]" = weakref.WeakKeyDictionary()


def target_fingerprint(target) -> dict:
    """Shape facts and a few embedding values: tells a model apart from others of its shape."""
    config = target.config.get_text_config()
    emb = target.get_input_embeddings().weight
    rows = sorted({min(r, emb.shape[0] - 1) for r in _PROBE_ROWS})
    return dict(model_type=config.model_type, hidden_size=emb.shape[1], vocab_size=emb.shape[0],
                num_hidden_layers=config.num_hidden_layers,
                probe=[round(float(v), 4) for v in emb[rows, :8].detach().float().flatten().cpu()])


def matches_fingerprint(saved: dict, target) -> bool:
    """Whether ``saved`` (a :func:`target_fingerprint`) describes ``target``."""
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

    tensors = pack(own_state_dict(draft, target), bits)
    meta = dict(format=FORMAT, name=name, layers=json.dumps(layers), fingerprint=json.dumps(target_fingerprint(target)),
                info=json.dumps(info or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)
    return path


def export_feature(draft, target, path: str | Path, name: str = "", info: dict | None = None,
                   bits: int | None = 8) -> Path:
    """Write a ``FeatureDraft``'s weights (int8/int4 matrices, or float32 with ``bits=None``) to ``path``."""
    from safetensors.torch import save_file

    meta = dict(format=FEATURE_FORMAT, name=name, config=json.dumps(draft.config.as_dict()),
                fingerprint=json.dumps(target_fingerprint(target)), info=json.dumps(info or {}))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(pack(draft.state_dict(), bits), str(path), metadata=meta)
    return path


def pack(state: dict[str, torch.Tensor], bits: int | None) -> dict[str, torch.Tensor]:
    """2-D tensors int8 (per channel) or int4 (group 32) with their scales; the rest float32 (on CPU)."""
    if bits not in (4, 8, None):
        raise ValueError(f"bits must be 8 or 4 (or None: float32), got {bits!r}")
    tensors = {}
    for key, value in state.items():
        for suffix, part in _quantize(value.detach().float(), bits).items():
            tensors[key + suffix] = part.cpu().contiguous()
    return tensors


def unpack(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack`: float32 tensors by name."""
    return {key: _dequantize({suffix: saved[key + suffix] for suffix in ("", _SCALE, _ZERO) if key + suffix in saved})
            for key in saved if not key.endswith((_SCALE, _ZERO))}


def roundtrip(value: torch.Tensor, bits: int | None) -> torch.Tensor:
    """What ``value`` reads back as from a file packed with ``bits`` (float32, on its own device):
    the rounding that quantization-aware training (``specdec.distill.qat``) trains through."""
    if bits not in (4, 8, None):
        raise ValueError(f"bits must be 8 or 4 (or None: float32), got {bits!r}")
    return _dequantize(_quantize(value.detach().float(), bits))


def _quantize(value: torch.Tensor, bits: int | None) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one float32 tensor as stored: "" (codes or the value), _SCALE, _ZERO."""
    if value.dim() == 2 and bits == 4:
        packed, scales, zeros = quantize_int4(value.half(), group_size=INT4_GROUP)
        return {"": packed, _SCALE: scales, _ZERO: zeros}
    if value.dim() == 2 and bits == 8:
        q, scales = quantize_int8(value)
        return {"": q, _SCALE: scales.float()}
    return {"": value}


def _dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    if _ZERO in parts:
        return dequantize_int4(parts[""], parts[_SCALE], parts[_ZERO], torch.float32)
    if _SCALE in parts:
        return dequantize_int8(parts[""], parts[_SCALE], torch.float32)
    return parts[""]


def read_metadata(path: str | Path) -> dict:
    """The file's metadata, JSON fields decoded (``layers``, ``config``, ``fingerprint``, ``info``),
    plus ``kind``: ``"layers"`` or ``"feature"``."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise ValueError(f"{path}: no such draft file (make one with `specdec distill --ship FILE`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors' own error type: a file of another format
        raise ValueError(f"{path} is not a safetensors file ({e}): a draft file is what `specdec distill --ship` "
                         "writes") from e
    kinds = {fmt: kind for kind, fmt in KINDS.items()}
    if meta.get("format") not in kinds:
        raise ValueError(f"{path} is not a specdec shipped draft (format {meta.get('format')!r}, expected one of "
                         f"{sorted(kinds)})")
    for key in ("layers", "config", "fingerprint", "info"):
        meta[key] = json.loads(meta.get(key) or "null")
    meta["kind"] = kinds[meta["format"]]
    return meta


def shipped_drafts() -> list[Path]:
    """The shipped draft files in the package (``specdec/drafts/*.safetensors``)."""
    return sorted(DRAFTS_DIR.glob("*.safetensors"))


def find_shipped(target, kind: str = "layers") -> Path | None:
    """The shipped draft file of ``kind`` (``"layers"`` or ``"feature"``) made for ``target``, or None."""
    for path in shipped_drafts():
        meta = read_metadata(path)
        if meta["kind"] == kind and matches_fingerprint(meta["fingerprint"], target):
            return path
    return None


def feature_draft_path(path: str | Path) -> Path | None:
    """``path`` if it is a feature-draft file, ``path``/feature-draft.safetensors (what ``specdec
    distill --kind feature --out DIR`` writes) if that exists, else None."""
    path = Path(path)
    path = path / FEATURE_FILE if path.is_dir() else path
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    return path if read_metadata(path)["kind"] == "feature" else None


def best_kind(target) -> str:
    """The kind of the shipped draft for ``target`` with the highest recorded held-out acceptance
    (``info["acceptance"]["mean"]``, greedy, k=4); ``"layers"`` when none fits (its loader then raises)."""
    scored = []
    for kind in KINDS:
        path = find_shipped(target, kind)
        if path is not None:
            acceptance = (read_metadata(path)["info"] or {}).get("acceptance") or {}
            scored.append((acceptance.get("mean", 0.0), kind))
    return max(scored)[1] if scored else "layers"


def load_named(target, name: str = "distilled") -> torch.nn.Module:
    """``"distilled"``: the shipped draft for ``target`` that accepts most (:func:`best_kind`);
    ``"distilled-feature"`` / ``"distilled-layers"``: that kind. Raises ValueError if none fits."""
    kinds = {"distilled": None, "distilled-feature": "feature", "distilled-layers": "layers"}
    if name not in kinds:
        raise ValueError(f"unknown shipped draft name {name!r}: use 'distilled', 'distilled-feature' or "
                         "'distilled-layers'")
    kind = kinds[name] or best_kind(target)
    return load_feature_draft(target) if kind == "feature" else load_shipped_draft(target)


def load_file(target, path: str | Path) -> torch.nn.Module:
    """A draft file of either kind (its metadata says which) around ``target``.

    Raises:
        ValueError: no such file, or not a draft file (``specdec distill --ship`` writes them).
    """
    if read_metadata(path)["kind"] == "feature":
        return load_feature_draft(target, path)
    return load_shipped_draft(target, path)


def load_feature_draft(target, path: str | Path | None = None) -> torch.nn.Module:
    """The feature draft (``specdec.feature_draft.FeatureDraft``) for ``target``, on its device and dtype.

    Args:
        target: the loaded target model.
        path: a file from ``export_feature`` (``specdec distill --kind feature``); default: the
            one in ``specdec/drafts`` made for ``target`` (cached per target).
    """
    from specdec.feature_draft import FeatureDraft, FeatureDraftConfig

    emb = target.get_input_embeddings().weight
    cached = _cache.get(target, {}).get("feature")
    if path is None and cached is not None and (cached.fc.weight.device, cached.fc.weight.dtype) == (emb.device, emb.dtype):
        return cached
    path = path or _shipped_or_raise(target, "feature")
    meta = read_metadata(path)
    if meta["kind"] != "feature" or not matches_fingerprint(meta["fingerprint"], target):
        raise ValueError(f"{path} is not a feature draft for this target ({meta['kind']}, {meta['fingerprint']}): "
                         "make one with `specdec distill --kind feature`")
    draft = FeatureDraft(FeatureDraftConfig(**meta["config"]), target)
    _load_state(draft, path)
    if Path(path).parent == DRAFTS_DIR:
        _cache.setdefault(target, {})["feature"] = draft
    return draft


def _load_state(module: torch.nn.Module, path) -> None:
    from safetensors.torch import load_file

    state = unpack(load_file(str(path)))
    wanted = set(module.state_dict())
    if wanted != set(state):
        raise ValueError(f"{path} does not fit this draft: missing {sorted(wanted - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - wanted)[:3]}")
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            tensor.copy_(state[key].to(tensor.dtype))
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def _shipped_or_raise(target, kind: str) -> Path:
    path = find_shipped(target, kind)
    if path is None:
        flag = "" if kind == "layers" else " --kind feature"
        raise ValueError(
            f"no shipped distilled {kind} draft fits this target (shipped: "
            f"{', '.join(p.name for p in shipped_drafts()) or 'none'}): make one with `specdec distill{flag} "
            "--target PATH --out DIR` and pass draft_model=AutoModelForCausalLM.from_pretrained(DIR)"
            + ("" if kind == "layers" else " (layers) or load_feature_draft(target, DIR/feature-draft.safetensors)"))
    return path


def load_shipped_draft(target, path: str | Path | None = None) -> torch.nn.Module:
    """The distilled draft for ``target``, sharing its embeddings and head (cached per target).

    Args:
        target: the loaded target model (any dtype and device: the draft follows it).
        path: a shipped draft file; default: the one in ``specdec/drafts`` made for ``target``.

    Raises:
        ValueError: no shipped draft fits ``target`` (make one with ``specdec distill``).
    """
    emb = target.get_input_embeddings().weight
    cached = _cache.get(target, {}).get("layers")
    if path is None and cached is not None and _own_placement(cached, target) == (emb.device, emb.dtype):
        return cached
    path = path or _shipped_or_raise(target, "layers")
    meta = read_metadata(path)
    if meta["kind"] != "layers":
        raise ValueError(f"{path} is a {meta['kind']} draft: load it with load_feature_draft")
    if not matches_fingerprint(meta["fingerprint"], target):
        raise ValueError(f"{path} was distilled for another model ({meta['fingerprint']}): "
                         "make a draft for this target with `specdec distill`")
    draft = build_draft(target, meta["layers"], dtype=emb.dtype)
    _load_own(draft, target, path)
    if Path(path).parent == DRAFTS_DIR:
        _cache.setdefault(target, {})["layers"] = draft
    return draft


def resume_draft(target, path: str | Path,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, list[int] | None]:
    """A draft file (``--ship``'s, any bits) as a trainable draft for ``target``, to train on:
    (draft, target layers it was built from, None for a feature draft).

    Raises:
        ValueError: the file was made for another target.
    """
    meta = read_metadata(path)
    if not matches_fingerprint(meta["fingerprint"], target):
        raise ValueError(f"{path} was distilled for another model ({meta['fingerprint']}): it cannot resume here")
    if meta["kind"] == "feature":
        from specdec.feature_draft import FeatureDraft, FeatureDraftConfig

        draft = FeatureDraft(FeatureDraftConfig(**meta["config"]), target).to(dtype)
        _load_state(draft, path)
        params, layers = list(draft.parameters()), None
    else:
        layers = meta["layers"]
        draft = build_draft(target, layers, dtype=dtype)
        _load_own(draft, target, path)
        params = own_parameters(draft, target)
    for p in params:
        p.requires_grad_(True)
    return draft, layers


def _load_own(draft, target, path) -> None:
    from safetensors.torch import load_file

    saved = unpack(load_file(str(path)))
    own = own_state_dict(draft, target)
    wanted = set(own)
    if wanted != set(saved):
        raise ValueError(f"{path} does not fit this target's draft: missing {sorted(wanted - set(saved))[:3]}, "
                         f"unexpected {sorted(set(saved) - wanted)[:3]}")
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(saved[key].to(tensor.dtype))
    for p in own_parameters(draft, target):
        p.requires_grad_(False)


def _own_placement(draft, target):
    p = own_parameters(draft, target)[0]
    return p.device, p.dtype
