"""When a row is done: EOS, max_new_tokens, stop strings (HF semantics)."""

from __future__ import annotations

from specdec.config import Settings


class StopChecker:
    """Cuts a row's candidate tokens at the first stopping point.

    A stop string stops generation at the token that completes it, as HF's
    ``StopStringCriteria`` does; the token is kept, like an EOS token.
    """

    def __init__(self, settings: Settings, tokenizer=None):
        self.max_new = settings.max_new_tokens
        self.eos = set(settings.eos_ids)
        self.stops = settings.stop_strings
        self.tokenizer = tokenizer
        self._window = 2 + max((len(s) for s in self.stops), default=0)

    def take(self, emitted: list[int], candidates: list[int]) -> tuple[list[int], bool]:
        """Tokens of ``candidates`` to append after ``emitted``, and whether the row is done."""
        room = self.max_new - len(emitted)
        taken = []
        for token in candidates[: max(room, 0)]:
            taken.append(token)
            if token in self.eos or self._hits_stop_string(emitted + taken):
                return taken, True
        return taken, len(emitted) + len(taken) >= self.max_new

    def _hits_stop_string(self, tokens: list[int]) -> bool:
        if not self.stops:
            return False
        tail = tokens[-self._window:]
        before = self.tokenizer.decode(tail[:-1])
        text = self.tokenizer.decode(tail)
        return any(text.find(s, max(len(before) - len(s) + 1, 0)) != -1 for s in self.stops)
