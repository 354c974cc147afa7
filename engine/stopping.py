"""Stop strings over streamed text.

The detokenizer hands over text in arbitrary pieces; a stop string may arrive split over many of
them. :class:`StopStringMatcher` holds back any tail that could still grow into a stop string, so a
stream never shows part of a stop string that later completes, and the output never contains one.

Which stop wins: generation stops at the first point of the text where some stop string is
complete; of the stop strings that complete there, the one that starts earliest (the longest) is
cut. This depends only on the text, never on how it was split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidRequestError

__all__ = ["StopStringMatcher"]


class StopStringMatcher:
    """Finds stop strings in text fed piece by piece.

    Args:
        stop: the stop strings, each a non-empty ``str``. A single ``str`` is taken as one stop
            string. An empty sequence gives a matcher that never stops.

    Raises:
        InvalidRequestError: ``stop`` is not a sequence of non-empty strings.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, Sequence):
            raise InvalidRequestError(f"stop must be a list of strings, got {type(stop).__name__}")
        for s in stop:
            if not isinstance(s, str):
                raise InvalidRequestError(f"each stop string must be a str, got {type(s).__name__}: {s!r}")
            if not s:
                raise InvalidRequestError("stop strings must be non-empty")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stop))
        self._held = ""  # emitted nowhere yet: a tail that is a proper prefix of some stop string
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been found."""
        return self._stopped

    def push(self, text: str) -> tuple[str, bool]:
        """Feed newly decoded text; return ``(text safe to emit now, stopped)``.

        When a stop string completes, the text before it comes back with True, and the stop string
        and everything after it are dropped; later pushes return ``("", True)``.
        """
        if self._stopped:
            return "", True
        if not self.stop:
            return text, False
        buf = self._held + text
        cut = self._find(buf)
        if cut is not None:
            self._held = ""
            self._stopped = True
            return buf[:cut], True
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back text, released."""
        out, self._held = self._held, ""
        return "" if self._stopped else out

    def _find(self, buf: str) -> int | None:
        """Start of the stop string to cut in ``buf`` (earliest end, then earliest start), or None."""
        best_end = best_start = None
        for s in self.stop:
            i = buf.find(s)
            if i < 0:
                continue
            end = i + len(s)
            if best_end is None or end < best_end or (end == best_end and i < best_start):
                best_end, best_start = end, i
        return best_start

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
