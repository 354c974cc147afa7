"""KV reuse across requests: for every row of the cache, the ids whose keys and values it holds.

A chat turn re-sends the whole conversation. With a share-buffer GQA cache a request's keys and
values stay in its row after it ends, so when a later prompt starts with the same ids only the
rest of it needs a forward pass, on that row (``StepState.prefill_from`` on row 0 for a single
request; ``prefill_rows``/``join_row`` with a cached offset for a batch's rows); the slots past
the shared prefix are overwritten. Which ids those are is bookkeeping, kept here per row.

Every row holds its own tokens contiguously from position 0: the single-request path uses row 0,
and a batch's row ``b`` (``StepState.prefill_rows``, ``join_row``) writes its prompt at positions
``0 .. P-1`` and each decoded token at the next one (the batch's left padding lives in the mask
only). A batch row that has ended is still run by the batch's later steps, masked, and each of
them rewrites the row's last slot; so a batch row's record leaves its last position out.

Invalidation: every loop takes a row's record before it writes the row and puts it back only
when that row's request ends normally (a single request when it ends; a batch row as it ends, the
batch still running); an error mid-request or mid-batch, a closed stream, a resumed stream (which
recomputes row 0), anything else that writes a row leaves it without a record. A LongRoPE
model's cache is not reused across its short/long switch: keys rotated with the short factors
never serve a prompt that runs with the long ones, or the reverse. ``Engine.close()`` drops the
records with the buffers; an Engine of another ``max_length`` has a cache of its own.

Routing (the auto_batch worker): :meth:`PrefixCache.route` matches requests to the free rows
holding their longest cached prefixes; :meth:`PrefixCache.swap_rows` swaps two rows' KV
(``StepState.swap_rows``, a copy of their cached positions) and records, which brings a record to
a row a batch can start or grow on. A single request runs on row 0: :meth:`PrefixCache.bring`
swaps in the row holding more of its prompt first.

Models whose matmuls round activations coarsely (``ModelSpec.coarse_activations``: MatMulNBits at
accuracy_level 4 and the like) get the same keys and values for a position from any pass of two
or more tokens, but slightly different ones from a one-token decode step (ONNX Runtime sums in
another order for one row, and the int8 rounding that follows magnifies it). A cold engine runs
the whole prompt in one pass, so on such a model only positions computed by passes of two or more
tokens are reused — the previous prompt, not the tokens generated after it — and the new suffix
always runs as a pass of at least two tokens. Greedy output then equals a cold engine's exactly.
This holds for every row: a batch's one-token steps are one-token passes too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class RowSwapper(Protocol):
    """What :meth:`PrefixCache.swap_rows` needs of a step state (``engine.binding.StepState``)."""

    def swap_rows(self, a: int, b: int, length: int) -> None: ...


class PrefixCache:
    """The ids of each cache row's cached positions (row 0: the single-request path)."""

    def __init__(self, max_length: int, multi_token_only: bool = False, rows: int = 1) -> None:
        """``multi_token_only``: reuse only positions that passes of two or more tokens computed
        (models with coarse activation rounding; see the module's docstring). ``rows``: records
        made at once (more are added when a row beyond them is stored)."""
        if max_length < 1 or rows < 1:
            raise ValueError(f"a prefix cache needs max_length >= 1 and rows >= 1, got {max_length} and {rows}")
        self.max_length = max_length
        self.ids = np.zeros((rows, max_length), np.int64)  # (rows, max_length) ids of each row's cached positions
        self.lengths = np.zeros(rows, np.int64)  # (rows,) cached positions per row; 0: nothing reusable
        self.stamps = np.zeros(rows, np.int64)  # (rows,) when each row's record was stored (a counter)
        self._clock = 0
        self.multi_token_only = multi_token_only

    @property
    def length(self) -> int:
        """Row 0's cached positions (the single-request path's)."""
        return int(self.lengths[0])

    def held(self, row: int) -> int:
        """Cached positions of ``row`` (0 for a row never stored)."""
        return int(self.lengths[row]) if 0 <= row < self.lengths.size else 0

    def recency(self, row: int) -> int:
        """When ``row``'s record was stored, as a counter that grows with every store (0: the row
        holds nothing): the row of least recency is the first a new conversation may take."""
        return int(self.stamps[row]) if self.held(row) else 0

    def clear(self, row: int = 0) -> None:
        """``row`` is about to hold something else."""
        if 0 <= row < self.lengths.size:
            self.lengths[row] = 0

    def clear_all(self) -> None:
        """Every row is about to hold something else."""
        self.lengths[:] = 0

    def take(self, prompt: np.ndarray, rope_switch: int | None, reuse: bool = True, row: int = 0) -> int:
        """How many leading positions of ``prompt`` can be reused from ``row`` (0 when ``reuse`` is
        False), always fewer than its length (the last one is run for its logits). Clears the
        row's record: it is put back by :meth:`store` when the request ends normally."""
        cached = self.peek(prompt, rope_switch, row) if reuse else 0
        self.clear(row)
        return cached

    def peek(self, prompt: np.ndarray, rope_switch: int | None, row: int = 0) -> int:
        """What :meth:`take` would reuse for ``prompt`` from ``row``, leaving the record as it is."""
        length, n = self.held(row), int(prompt.size)
        if length == 0 or n < 2:
            return 0
        if rope_switch is not None and (length > rope_switch) != (n > rope_switch):
            return 0  # cached with the other LongRoPE factors
        # the last prompt position runs for its logits; a coarse model's suffix pass runs two or more
        m = min(length, n - (2 if self.multi_token_only else 1))
        if m <= 0:
            return 0
        differ = np.flatnonzero(self.ids[row, :m] != prompt[:m])
        return int(differ[0]) if differ.size else m

    def store(self, prompt: np.ndarray, new_ids: Sequence[int] | np.ndarray, length: int, row: int = 0) -> None:
        """``row`` holds ``length`` positions: the first of ``prompt`` then of ``new_ids`` (with
        ``multi_token_only``, the prompt's alone are kept: one-token steps computed the rest)."""
        if row < 0:
            raise ValueError(f"row must be >= 0, got {row}")
        self._grow(row)
        p = int(prompt.size)
        if not 0 <= length <= p + len(new_ids) or length > self.max_length:
            self.lengths[row] = 0  # not a state this record can describe: reuse nothing
            return
        if self.multi_token_only:
            if p < 2:  # a one-token prompt ran as a one-token pass
                self.lengths[row] = 0
                return
            length = min(length, p)
        ids = self.ids[row]
        k = min(length, p)
        ids[:k] = prompt[:k]
        ids[k:length] = new_ids[: length - k]
        self.lengths[row] = length
        self._clock += 1
        self.stamps[row] = self._clock

    def swap(self, a: int, b: int) -> None:
        """Rows ``a`` and ``b`` swapped their KV (``StepState.swap_rows``): their records follow."""
        self._grow(max(a, b))
        self.ids[[a, b]] = self.ids[[b, a]]
        self.lengths[[a, b]] = self.lengths[[b, a]]
        self.stamps[[a, b]] = self.stamps[[b, a]]

    def swap_rows(self, state: RowSwapper, a: int, b: int) -> None:
        """Swap rows ``a`` and ``b`` of ``state``'s KV cache (their cached positions) and their
        records. Neither row may be in a running batch."""
        if a != b:
            state.swap_rows(a, b, max(self.held(a), self.held(b)))
            self.swap(a, b)

    def bring(self, state: RowSwapper, prompt: np.ndarray, rope_switch: int | None, row: int = 0) -> None:
        """Before a request runs alone on ``row`` (the single-request path's row 0): when another
        row holds a longer prefix of ``prompt`` (offered as :meth:`route` offers rows), swap it
        in; ``row``'s record moves to that row."""
        chosen = self.route([prompt], range(self.lengths.size), rope_switch)
        if chosen and chosen[0][0] != row and chosen[0][1] > self.peek(prompt, rope_switch, row):
            self.swap_rows(state, row, chosen[0][0])

    def route(
        self, prompts: Sequence[np.ndarray | None], free: Sequence[int], rope_switch: int | None
    ) -> dict[int, tuple[int, int]]:
        """Match requests to free rows by their cached prefixes: ``{request index: (row, cached
        positions)}`` for the requests that get a row holding part of their prompt. The longest
        matches are taken first (ties: the row holding less, then the earlier request, then the
        earlier row); each row serves one request. A row is offered to a request only when the
        request reuses at least half of what the row holds: a new conversation that shares a BOS
        or a short system prompt with a held one does not take its row. ``prompts[i]`` is None
        for a request without the prefix cache."""
        pairs = []
        for i, prompt in enumerate(prompts):
            if prompt is None:
                continue
            for row in free:
                cached = self.peek(prompt, rope_switch, row)
                if cached > 0 and 2 * cached >= self.held(row):
                    pairs.append((-cached, self.held(row), i, row))
        pairs.sort()
        chosen: dict[int, tuple[int, int]] = {}
        used: set[int] = set()
        for neg, _, i, row in pairs:
            if i not in chosen and row not in used:
                chosen[i] = (row, -neg)
                used.add(row)
        return chosen

    def _grow(self, row: int) -> None:
        """Records for rows up to ``row`` (none held)."""
        have = self.lengths.size
        if row >= have:
            more = row + 1 - have
            self.ids = np.concatenate((self.ids, np.zeros((more, self.max_length), np.int64)))
            self.lengths = np.concatenate((self.lengths, np.zeros(more, np.int64)))
            self.stamps = np.concatenate((self.stamps, np.zeros(more, np.int64)))
