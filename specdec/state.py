"""The batch being decoded, laid out in shared cache slots.

Every row of the batch writes the same cache slots at every step; a row whose
draft was cut short leaves the extra slots masked out ("holes") instead of forcing
the other rows to recompute. So rows accept different numbers of tokens per step
with no recomputation, and batch 1 (never any holes) is the plain fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SlotBatch:
    """Decoding state of the active rows.

    slot_tokens: (B, S) token in each cache slot (a hole's token is ignored)
    slot_mask:   (B, S) 1 where the slot is a real token of that row
    pending:     (B,)   each row's newest token: emitted, not yet in any cache
    rows:        (B,)   index of each active row in the caller's batch
    produced:    (B,)   new tokens emitted so far (pending included)
    """

    slot_tokens: torch.Tensor
    slot_mask: torch.Tensor
    pending: torch.Tensor
    rows: torch.Tensor
    produced: torch.Tensor

    @property
    def size(self) -> int:
        return self.slot_tokens.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_tokens.shape[1]

    def next_positions(self) -> torch.Tensor:
        """(B,) position of ``pending`` within its row (= real tokens before it)."""
        return self.slot_mask.sum(-1)

    def key_mask(self, extra: int) -> torch.Tensor:
        """(B, S + extra) key mask for a forward that appends ``extra`` real tokens."""
        ones = self.slot_mask.new_ones(self.size, extra)
        return torch.cat([self.slot_mask, ones], dim=1)

    def append(self, tokens: torch.Tensor, valid: torch.Tensor) -> None:
        """Add slots: tokens (B, n) and valid (B, n) bool."""
        self.slot_tokens = torch.cat([self.slot_tokens, tokens], dim=1)
        self.slot_mask = torch.cat([self.slot_mask, valid.to(self.slot_mask.dtype)], dim=1)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows at indices ``keep`` (B',)."""
        for name in ("slot_tokens", "slot_mask", "pending", "rows", "produced"):
            setattr(self, name, getattr(self, name)[keep])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions of each slot given a (B, S) key mask (holes get any value)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
