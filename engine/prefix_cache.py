"""KV reuse across requests: the ids whose keys and values row 0 of the cache holds.

A chat turn re-sends the whole conversation. With a share-buffer GQA cache the previous
request's keys and values are still in row 0 after it ends, so when the next prompt starts
with the same ids only the rest of it needs a forward pass (``StepState.prefill_from``); the
slots past the shared prefix are overwritten. Which ids those are is bookkeeping, kept here.

Invalidation: every loop that writes row 0 other than through the prefix-aware single-request
path clears the record first (a batch, a resumed stream, an error mid-request: the record is
taken at a request's start and put back only when it ends normally). A LongRoPE model's cache
is not reused across its short/long switch: keys rotated with the short factors never serve a
prompt that runs with the long ones, or the reverse. ``Engine.close()`` drops the record with
the buffers; an Engine of another ``max_length`` has a cache of its own.

Models whose matmuls round activations coarsely (``ModelSpec.coarse_activations``: MatMulNBits at
accuracy_level 4 and the like) get the same keys and values for a position from any pass of two
or more tokens, but slightly different ones from a one-token decode step (ONNX Runtime sums in
another order for one row, and the int8 rounding that follows magnifies it). A cold engine runs
the whole prompt in one pass, so on such a model only positions computed by passes of two or more
tokens are reused — the previous prompt, not the tokens generated after it — and the new suffix
always runs as a pass of at least two tokens. Greedy output then equals a cold engine's exactly.
"""

from __future__ import annotations

import numpy as np


class PrefixCache:
    """The ids of row 0's cached positions (one row: the single-request path)."""

    def __init__(self, max_length: int, multi_token_only: bool = False) -> None:
        """``multi_token_only``: reuse only positions that passes of two or more tokens computed
        (models with coarse activation rounding; see the module's docstring)."""
        self.ids = np.zeros(max_length, np.int64)  # (max_length,) ids of the cached positions
        self.length = 0  # cached positions; 0: nothing reusable
        self.multi_token_only = multi_token_only

    def clear(self) -> None:
        """Row 0 is about to hold something else."""
        self.length = 0

    def take(self, prompt: np.ndarray, rope_switch: int | None, reuse: bool = True) -> int:
        """How many leading positions of ``prompt`` can be reused (0 when ``reuse`` is False),
        always fewer than its length (the last one is run for its logits). Clears the record: it
        is put back by :meth:`store` when the request ends normally."""
        cached = self.peek(prompt, rope_switch) if reuse else 0
        self.length = 0
        return cached

    def peek(self, prompt: np.ndarray, rope_switch: int | None) -> int:
        """What :meth:`take` would reuse for ``prompt``, leaving the record as it is."""
        length, n = self.length, int(prompt.size)
        if length == 0 or n < 2:
            return 0
        if rope_switch is not None and (length > rope_switch) != (n > rope_switch):
            return 0  # cached with the other LongRoPE factors
        # the last prompt position runs for its logits; a coarse model's suffix pass runs two or more
        m = min(length, n - (2 if self.multi_token_only else 1))
        if m <= 0:
            return 0
        differ = np.flatnonzero(self.ids[:m] != prompt[:m])
        return int(differ[0]) if differ.size else m

    def store(self, prompt: np.ndarray, new_ids: list[int], length: int) -> None:
        """Row 0 holds ``length`` positions: ``prompt`` then the first of ``new_ids`` (with
        ``multi_token_only``, the prompt's alone are kept: one-token steps computed the rest)."""
        p = int(prompt.size)
        if not p <= length <= p + len(new_ids) or length > self.ids.size:
            self.length = 0  # not a state this record can describe: reuse nothing
            return
        if self.multi_token_only:
            if p < 2:  # a one-token prompt ran as a one-token pass
                self.length = 0
                return
            length = p
        self.ids[:p] = prompt
        self.ids[p:length] = new_ids[: length - p]
        self.length = length
