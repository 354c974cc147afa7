"""The text side of a request: generated ids to streamed text, and stop strings over that text.

:class:`IncrementalDetokenizer` turns ids into text as they come, with constant work per token;
:class:`StopStringMatcher` finds stop strings in that text however it was split into pieces.

Stop strings: the detokenizer hands over text in arbitrary pieces; a stop string may arrive split
over many of them. :class:`StopStringMatcher` holds back any tail that could still grow into a stop
string, so a stream never shows part of a stop string that later completes, and the output never
contains one. Which stop wins: generation stops at the first point of the text where some stop
string is complete; of the stop strings that complete there, the one that starts earliest (the
longest) is cut. This depends only on the text, never on how it was split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidRequestError
from .tokenizer import _REPLACEMENT, Tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringMatcher"]


# ------------------------------------------------------------------------------------------------
# streaming detokenization


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _unsettled_tail(text: str) -> int:
    """How many trailing U+FFFD may still turn into a character when more bytes arrive.

    An incomplete UTF-8 sequence is at most 3 bytes, and decoders write at most one U+FFFD per byte.
    """
    k = 0
    while k < 3 and k < len(text) and text[-1 - k] == _REPLACEMENT:
        k += 1
    return k


class IncrementalDetokenizer:
    """Turns generated ids into text as they come, with constant work per token.

    What it emits, exactly: the pushes and the flush, joined, equal ``decode(prompt_ids + new_ids)``
    minus its longest common prefix with ``decode(prompt_ids)`` (:meth:`continuation`). When the
    prompt's text is a prefix of the full text (the usual case) that is simply the text after the
    prompt, leading space included: ``", there was"`` after ``"Once upon a time"``. The common-prefix
    rule covers a prompt ending in an unfinished character, whose U+FFFD the full text replaces.

    How: it keeps a window of the last few visible ids (skipped special ids never enter it, since
    decode drops them before the decoder anyway) and re-decodes only that window. Text is emitted up
    to the end of the window's decode except

    * a trailing U+FFFD (at most 3): bytes of a character that has not finished yet;
    * the text of a trailing run of byte-fallback pieces, for tokenizers whose decoder validates the
      run as a whole (HF ``ByteFallback``): one later invalid byte turns the whole run into U+FFFD.

    So a stream never shows a broken character that later becomes a real one. Decoders only change
    the start of a window's text (the first-word space rule, bytes of a character cut by the window),
    and the window keeps enough ids that this never reaches text not yet emitted.

    Most tokens skip even that decode: once everything so far is emitted, a token whose text does
    not depend on its neighbours (a plain piece under a Llama/Metaspace or sentencepiece decoder, a
    whole-character token under ByteLevel) adds its known text. Cost: ~2 µs per token on the
    fixtures here, ~10-20 µs when a decode is needed.

    Latency: a character spelled in byte-fallback pieces comes out when it is complete; with an HF
    ``ByteFallback`` decoder, a run of byte pieces comes out when the run ends (next other token).

    Attributes:
        text: everything emitted so far.
    """

    _KEEP = 8  # ids of context kept when the window is cut
    _MAX = 24  # cut the window when it grows past this many ids

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hidden = tokenizer.special_ids if skip_special_tokens else frozenset()
        self._run_ids: frozenset[int] = getattr(tokenizer, "_run_ids", frozenset())
        literal_texts = getattr(tokenizer, "_literal_texts", None)
        self._literals: dict[int, str] = literal_texts() if literal_texts is not None else {}
        self._chunks: list[str] = []
        self._text: str | None = ""
        self._finished = False
        self._n = tokenizer.vocab_size
        visible = [int(i) for i in prompt_ids if 0 <= i < self._n and i not in self._hidden]
        # Start the window a few ids back, before any trailing byte run, and not inside a run.
        start = max(len(visible) - self._KEEP, 0)
        run_start = self._trailing_run_start(visible)
        if run_start < len(visible):
            start = min(start, max(run_start - 1, 0))
        while 0 < start < len(visible) and visible[start] in self._run_ids:
            start -= 1
        self._ids = visible[start:]
        text = self._decode(self._ids)
        settled = len(text)
        if run_start < len(visible):  # the trailing run's text may still change
            settled = len(self._decode(visible[start:run_start]))
        settled = min(settled, len(text) - _unsettled_tail(text))
        self._done = settled  # chars of the window's text already accounted for (emitted or prompt)
        self._prompt_tail = text[settled:]  # prompt text that new ids may still rewrite
        self._ready = self._settled(settled == len(text))

    # -- public API ---------------------------------------------------------------------------

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became final with it (often ``""``)."""
        token_id = int(token_id)
        if token_id in self._hidden or not 0 <= token_id < self._n:
            return ""  # decode drops it before the decoder runs: it cannot change any text
        ids = self._ids
        literal = self._literals.get(token_id) if self._ready else None
        ids.append(token_id)
        if literal is not None:  # fast path: the token's text is known without a decode
            self._done += len(literal)
            out = self._emit(literal) if literal else ""
            if len(ids) > self._MAX:
                self._cut(self._done)
            return out
        if token_id in self._run_ids:
            self._ready = False
            return ""  # inside a byte run: its text is known only when the run ends
        text = self._decode(ids)
        end = len(text) - _unsettled_tail(text)
        out = ""
        if end > self._done:
            out = self._emit(text[self._done : end])
            self._done = end
        self._ready = self._settled(end == len(text))
        if len(ids) > self._MAX:
            self._cut(len(text))
        return out

    def flush(self) -> str:
        """What is still held back, as ``decode`` of the whole sequence gives it. Call once, at the end."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._ids)
        out = self._emit(text[self._done :]) if len(text) > self._done else ""
        self._done = len(text)
        return out

    @staticmethod
    def continuation(
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        new_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> str:
        """The non-streamed text that the pushes of ``new_ids`` and the flush add up to.

        ``decode(prompt_ids + new_ids)`` minus its longest common prefix with ``decode(prompt_ids)``.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        full = tokenizer.decode(prompt_ids + [int(i) for i in new_ids], skip_special_tokens)
        prompt = tokenizer.decode(prompt_ids, skip_special_tokens)
        return full[_common_prefix_len(prompt, full) :]

    # -- internals ----------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _settled(self, all_emitted: bool) -> bool:
        """Whether the next token's text may come from the literal table: the window holds text,
        all of it is emitted, and no byte run or prompt tail is waiting."""
        ids = self._ids
        return all_emitted and bool(ids) and ids[-1] not in self._run_ids and not self._prompt_tail

    def _trailing_run_start(self, ids: list[int]) -> int:
        k = len(ids)
        while k > 0 and ids[k - 1] in self._run_ids:
            k -= 1
        return k

    def _emit(self, new: str) -> str:
        """Record newly settled text, dropping what merely repeats the prompt's unsettled tail."""
        tail = self._prompt_tail
        if tail:
            k = _common_prefix_len(new, tail)
            if k == len(new):
                self._prompt_tail = tail[k:]
                return ""
            self._prompt_tail = ""
            new = new[k:]
        self._chunks.append(new)
        self._text = None
        return new

    def _cut(self, text_len: int) -> None:
        """Drop old ids from the window, keeping the char offset of what is already emitted."""
        ids = self._ids
        start = len(ids) - self._KEEP
        while start < len(ids) and ids[start] in self._run_ids:
            start += 1  # never start the window inside a byte run
        pending = text_len - self._done
        if start >= len(ids) - (4 if pending else 1):
            return  # too little context left to keep the pending text intact; cut later
        del ids[:start]
        self._done = len(self._decode(ids)) - pending


# ------------------------------------------------------------------------------------------------
# stop strings


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
