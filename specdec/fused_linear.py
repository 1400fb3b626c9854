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
if its members are plain ``nn.Linear`` (not quantized) with weights of one dtype and device and
no hooks (accelerate offload), and its biases all present or all absent.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_JOINING = threading.Lock()   # two threads joining one model at once would each re-point the other's views


@dataclass(eq=False)
class ProjectionGroup:
    """Linears joined over one weight; ``_pending`` carries the first member's output to the rest."""

    members: tuple[nn.Linear, ...]
    weight: torch.Tensor                    # (sum of out_features, in_features)
    bias: torch.Tensor | None
    bounds: tuple[tuple[int, int], ...]     # each member's rows of ``weight``
    _pending: tuple | None = field(default=None, repr=False)  # (input, output, next member index)

    def intact(self) -> bool:
        """Every member's parameters are still the views this group made (nothing replaced them)."""
        return all(_is_view(member.weight, self.weight[lo:hi])
                   and (self.bias is None or (member.bias is not None and _is_view(member.bias, self.bias[lo:hi])))
                   for member, (lo, hi) in zip(self.members, self.bounds))


def _is_view(param: torch.Tensor, part: torch.Tensor) -> bool:
    return param.data_ptr() == part.data_ptr() and param.shape == part.shape


class _FusedLinear(nn.Linear):
    """An ``nn.Linear`` of a joined group, while :func:`fused_projections` is active."""

    _group: ProjectionGroup
    _index: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, index = self._group, self._index
        pending, group._pending = group._pending, None
        if index == 0 and len(group.members) > 1:
            out = F.linear(x, group.weight, group.bias)
            group._pending = (x, out, 1)
        elif pending is not None and pending[0] is x and pending[2] == index:
            out = pending[1]
            if index + 1 < len(group.members):
                group._pending = (x, out, index + 1)
        else:  # out of order or another input: this member alone
            return F.linear(x, self.weight, self.bias)
        lo, hi = group.bounds[index]
        return out[..., lo:hi]


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


def _joinable(module) -> bool:
    return (type(module) in (nn.Linear, _FusedLinear) and module.weight.dtype.is_floating_point
            and module.weight.device.type != "meta" and not hasattr(module, "_hf_hook")
            and not module._forward_hooks and not module._forward_pre_hooks)


def _alike(members: list[nn.Linear]) -> bool:
    first = members[0].weight
    same_bias = len({m.bias is None for m in members}) == 1
    return same_bias and all(m.weight.dtype == first.dtype and m.weight.device == first.device
                             and m.in_features == members[0].in_features for m in members)


def _existing(members: list[nn.Linear]) -> ProjectionGroup | None:
    group = getattr(members[0], "_joined", None)
    return group if group is not None and group.intact() else None


@torch.no_grad()
def _join(members: list[nn.Linear]) -> ProjectionGroup:
    weight = torch.cat([m.weight.detach() for m in members])
    bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
    bounds, lo = [], 0
    for m in members:
        bounds.append((lo, lo + m.out_features))
        lo += m.out_features
    group = ProjectionGroup(tuple(members), weight, bias, tuple(bounds))
    for m, (lo, hi) in zip(members, bounds):
        m.weight.data = weight[lo:hi]
        if bias is not None:
            m.bias.data = bias[lo:hi]
        if getattr(m, "_joined", None) is None:
            m._register_state_dict_hook(_separate_copies)
        m._joined = group
    return group


def _separate_copies(module, state_dict, prefix, local_metadata):
    """state_dict() of a joined member: copies, not views sharing one storage (save_pretrained refuses those).
    A member no longer joined (its weights replaced, or a deep copy) hands out its own tensors as usual."""
    group = getattr(module, "_joined", None)
    if group is None or not group.intact():
        return state_dict
    for name in ("weight", "bias"):
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
                member.__class__, member._group, member._index = _FusedLinear, group, index
                swapped.append(member)
        yield
    finally:
        for member in swapped:
            member.__class__ = nn.Linear
        for group in groups:
            group._pending = None
