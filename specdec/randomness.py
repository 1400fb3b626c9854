"""The uniforms a sampled generate() call draws from, indexed by (row, output position, use).

Uses: 0 the draft's draw, 1 the acceptance test, 2 the target's draw. Indexing by position
instead of drawing per step makes a seeded run reproducible whatever draft lengths the
adaptive controller picks. It stays lossless: a position's uniforms only matter once every
earlier position is final, so they are fresh then.

The table is drawn lazily, ``CHUNK`` positions at a time as the output grows, so memory
follows the tokens produced, not ``max_new_tokens``. Chunk c covers positions
[c * CHUNK, (c + 1) * CHUNK) and is one ``torch.rand((batch, positions, 3))`` from the
generator, drawn in order: the table's contents depend only on the generator's state at the
start, never on when (at which step, for which k) a chunk was needed. With one chunk
(``max_new_tokens < CHUNK``), or one row on a CPU generator, it equals the single
``torch.rand((batch, max_new_tokens + 1, 3))`` drawn up front.
"""

from __future__ import annotations

import torch

CHUNK = 256   # positions drawn at a time


class Uniforms:
    """Lazily drawn uniforms of shape (batch, max_new_tokens + 1, 3); see the module docstring."""

    def __init__(self, batch: int, max_new_tokens: int, generator: torch.Generator | None,
                 device: torch.device | str) -> None:
        self.batch, self.positions = batch, max_new_tokens + 1
        self.generator, self.device = generator, torch.device(device)
        self.filled = 0                                                  # positions drawn so far
        self._table = torch.empty(batch, 0, 3, device=self.device)      # capacity >= filled

    def at(self, rows: torch.Tensor, produced: torch.Tensor, offsets: int | torch.Tensor, use: int,
           most_produced: int) -> torch.Tensor:
        """Uniforms ``use`` of ``rows`` (b,) at table positions ``produced + offsets`` (past the end:
        the last), one per row for an int offset: (b,), or (b, n) for ``offsets = arange(n)``.
        ``most_produced``: a host-side bound on ``produced.max()``, so that what is read is drawn
        without reading ``produced`` back from the device."""
        span = offsets + 1 if isinstance(offsets, int) else offsets.numel()
        self.draw_until(most_produced + span)
        table = self._table
        offsets = torch.as_tensor(offsets, device=table.device)
        pos = (produced.to(table.device)[:, None] + offsets.view(1, -1)).clamp(max=self.positions - 1)
        out = table[rows.to(table.device)[:, None], pos, use]
        return out[:, 0] if offsets.dim() == 0 else out

    def draw_until(self, positions: int) -> None:
        """Make positions 0 .. ``positions - 1`` (at most the table's length) readable."""
        positions = min(positions, self.positions)
        if positions <= self.filled:
            return
        chunks = []
        end = self.filled
        while end < positions:
            n = min(CHUNK, self.positions - end)
            chunks.append(self._draw(n))
            end += n
        if end > self._table.shape[1]:                 # grow the capacity by doubling: O(total) copying
            grown = torch.empty(self.batch, min(max(end, 2 * self._table.shape[1]), self.positions), 3,
                                device=self.device)
            grown[:, : self.filled] = self._table[:, : self.filled]
            self._table = grown
        self._table[:, self.filled: end] = torch.cat(chunks, dim=1)
        self.filled = end

    def full(self) -> torch.Tensor:
        """The whole (batch, max_new_tokens + 1, 3) table (drawing what is left: for tests)."""
        self.draw_until(self.positions)
        return self._table[:, : self.positions]

    def _draw(self, n: int) -> torch.Tensor:
        shape = (self.batch, n, 3)
        if self.generator is not None:
            return torch.rand(shape, generator=self.generator, device=self.generator.device).to(self.device)
        return torch.rand(shape, device=self.device)
