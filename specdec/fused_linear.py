"""Sibling projections that read the same input, run as one matrix product.

At batch 1 a decode step is a chain of matrix-vector products, and the small ones cost more
than their bytes: q/k/v (and gate/up) read the same activation, so three launches over three
weights can be one launch over one contiguous weight (gpt-fast's ``wqkv``, vLLM's
``QKVParallelLinear``). We cannot rewrite an HF model's forward, so:

- :func:`join_projections` lays each sibling group's weights (and biases) out in one tensor and
  points every ``nn.Linear``'s parameter at its slice (``.data`` = a view: no extra memory, the
  same ``Parameter`` objects and names; ``state_dict()`` hands out copies, so ``save_pretrained``
  still sees separate tensors).
- inside :func:`fused_projections` (the static runner's forwards), the first sibling called
  computes the whole group and the next ones, called on the same input tensor in order, take
  their slice; a sibling called out of order, or on another input, computes its own slice, so
  the result is the same whatever the model does.

Groups are found by the names HF's Llama-family modules use (``_SIBLINGS``); a group is joined only
if its members are of one kind with no hooks (accelerate offload), their biases all present or all
absent, and tensors of one dtype and device: plain ``nn.Linear``, or ``quant`` layers of one backend,
whose codes and scales (and zeros) are per output row, so they join along the output dim too
(``Int4Linear`` of group size and backend alike, except tinygemm, whose tiled layout is not known to
survive a concatenation). A joined layer computes each output row as the member did, so the results
are the same; on CPU, bit for bit.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from specdec.quant import Int4Linear, Int8Linear

_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_JOINING = threading.Lock()   # two threads joining one model at once would each re-point the other's views
# the tensors of each kind of layer that hold one row (or entry) per output feature
_ROW_TENSORS = {nn.Linear: ("weight", "bias"), Int8Linear: ("weight", "scales", "bias"),
                Int4Linear: ("weight", "scales", "zeros", "bias")}


@dataclass(eq=False)
class ProjectionGroup:
    """Linears joined into one layer over their concatenated rows; ``_pending`` carries the first
    member's output to the rest."""

    members: tuple[nn.Module, ...]
    joined: nn.Module                       # same kind as the members, (sum of out_features, in_features)
    bounds: tuple[tuple[int, int], ...]     # each member's rows of the joined layer
    _pending: tuple | None = field(default=None, repr=False)  # (input, output, next member index)

    @property
    def weight(self) -> torch.Tensor:
        return self.joined.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.joined.bias

    def intact(self) -> bool:
        """Every member's tensors are still the views this group made (nothing replaced them)."""
        names = _ROW_TENSORS[_kind(self.joined)]
        return all(_is_view(getattr(member, name), getattr(self.joined, name), lo, hi)
                   for member, (lo, hi) in zip(self.members, self.bounds) for name in names)


def _kind(module: nn.Module) -> type:
    return next(kind for kind in (Int8Linear, Int4Linear, nn.Linear) if isinstance(module, kind))


def _is_view(mine: torch.Tensor | None, joined: torch.Tensor | None, lo: int, hi: int) -> bool:
    if mine is None or joined is None:
        return mine is None and joined is None
    part = joined[lo:hi]
    return mine.data_ptr() == part.data_ptr() and mine.shape == part.shape


class _Fused:
    """Forward of a joined group's member while :func:`fused_projections` is active."""

    _group: ProjectionGroup
    _index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, index = self._group, self._index
        pending, group._pending = group._pending, None
        if index == 0 and len(group.members) > 1:
            out = group.joined(x)
            group._pending = (x, out, 1)
        elif pending is not None and pending[0] is x and pending[2] == index:
            out = pending[1]
            if index + 1 < len(group.members):
                group._pending = (x, out, index + 1)
        else:  # out of order or another input: this member alone
            return super().forward(x)
        lo, hi = group.bounds[index]
        return out[..., lo:hi]


class _FusedLinear(_Fused, nn.Linear):
    pass


class _FusedInt8Linear(_Fused, Int8Linear):
    pass


class _FusedInt4Linear(_Fused, Int4Linear):
    pass


_FUSED = {nn.Linear: _FusedLinear, Int8Linear: _FusedInt8Linear, Int4Linear: _FusedInt4Linear}


def join_projections(model: nn.Module) -> list[ProjectionGroup]:
    """Join every sibling group of ``model`` that qualifies (see the module docstring); groups already
    joined are returned as they are. Returns the groups."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"join_projections needs a torch.nn.Module, got {type(model).__name__}")
    groups = []
    with _JOINING:
        for parent in model.modules():
            for names in _SIBLINGS:
                members = [getattr(parent, name, None) for name in names]
                if all(_joinable(m) for m in members) and _alike(members):
                    groups.append(_existing(members) or _join(members))
    return groups


def joined_groups(model: nn.Module) -> list[ProjectionGroup]:
    """The groups of ``model`` joined now (intact), each once."""
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "_joined", None)) is not None and g.intact()}
    return list(groups.values())


def _joinable(module) -> bool:
    if type(module) not in (*_FUSED, *_FUSED.values()) or hasattr(module, "_hf_hook") \
            or module._forward_hooks or module._forward_pre_hooks or module.weight.device.type == "meta":
        return False
    if isinstance(module, Int4Linear):
        return module.backend != "tinygemm"
    return isinstance(module, Int8Linear) or module.weight.dtype.is_floating_point


def _alike(members: list[nn.Module]) -> bool:
    """One kind, input size, backend and group size; tensors of one dtype and device, biases all or none."""
    def signature(m: nn.Module) -> tuple:
        tensors = (getattr(m, name) for name in _ROW_TENSORS[_kind(m)])
        return (_kind(m), m.in_features, getattr(m, "backend", None), getattr(m, "group_size", None),
                *((None, None) if t is None else (t.dtype, t.device) for t in tensors))

    first = signature(members[0])
    return all(signature(m) == first for m in members[1:])


def _existing(members: list[nn.Module]) -> ProjectionGroup | None:
    group = getattr(members[0], "_joined", None)
    return group if group is not None and group.intact() else None


@torch.no_grad()
def _join(members: list[nn.Module]) -> ProjectionGroup:
    names = _ROW_TENSORS[_kind(members[0])]
    joined = {name: None if getattr(members[0], name) is None else
              torch.cat([getattr(m, name).detach() for m in members]) for name in names}
    bounds, lo = [], 0
    for m in members:
        bounds.append((lo, lo + m.out_features))
        lo += m.out_features
    group = ProjectionGroup(tuple(members), _layer_over(members[0], joined), tuple(bounds))
    for m, (lo, hi) in zip(members, bounds):
        for name, tensor in joined.items():
            if tensor is not None:
                _point(m, name, tensor[lo:hi])
        if getattr(m, "_joined", None) is None:
            m._register_state_dict_hook(_separate_copies)
        m._joined = group
    return group


def _layer_over(like: nn.Module, t: dict[str, torch.Tensor | None]) -> nn.Module:
    """A layer of ``like``'s kind and settings over the joined tensors ``t`` (no copies)."""
    if isinstance(like, Int8Linear):
        return Int8Linear(t["weight"], t["scales"], t["bias"], like.backend)
    if isinstance(like, Int4Linear):
        return Int4Linear(t["weight"], t["scales"], t["zeros"], like.group_size, t["bias"], like.backend)
    layer = nn.Linear(t["weight"].shape[1], t["weight"].shape[0], bias=t["bias"] is not None, device="meta")
    layer.weight = nn.Parameter(t["weight"], requires_grad=False)
    if t["bias"] is not None:
        layer.bias = nn.Parameter(t["bias"], requires_grad=False)
    return layer


def _point(module: nn.Module, name: str, view: torch.Tensor) -> None:
    """Make ``module.<name>`` the view: a parameter keeps its object (its ``.data`` changes), a buffer is
    replaced."""
    current = getattr(module, name)
    if isinstance(current, nn.Parameter):
        current.data = view
    else:
        setattr(module, name, view)


def _separate_copies(module, state_dict, prefix, local_metadata):
    """state_dict() of a joined member: copies, not views sharing one storage (save_pretrained refuses those).
    A member no longer joined (its weights replaced, or a deep copy) hands out its own tensors as usual."""
    group = getattr(module, "_joined", None)
    if group is None or not group.intact():
        return state_dict
    for name in _ROW_TENSORS[_kind(module)]:
        key = prefix + name
        if key in state_dict and state_dict[key] is not None:
            state_dict[key] = state_dict[key].clone()
    return state_dict


@contextmanager
def fused_projections(groups: list[ProjectionGroup]):
    """Inside, each joined group runs as one product (the first member computes all; see ``_FusedLinear``)."""
    for group in groups:
        if not group.intact():
            raise RuntimeError("a joined projection's weights were replaced after compile=True set the model up "
                               "(model.to(), quantize(), load): call specdec.static.release(model), then generate again")
    swapped = []
    try:
        for group in groups:
            for index, member in enumerate(group.members):
                swapped.append((member, type(member)))
                fused = _FUSED.get(type(member), type(member))   # already fused: an enclosing call's
                member.__class__, member._group, member._index = fused, group, index
        yield
    finally:
        for member, kind in swapped:
            member.__class__ = kind
        for group in groups:
            group._pending = None
