"""Conv states of hybrid models (LFM2): fixed-size per-row state carried from step to step.

A conv layer of onnxruntime-genai's LFM2 export takes ``past_conv.N`` and returns
``present_conv.N``, both ``(batch, channels, width)``: the last ``width`` inputs of its causal
depthwise convolution. Unlike KV they do not grow, so :class:`ConvStateCache` allocates two
buffers per layer once and alternates them as past and present (ORT does not promise that an
output bound to an input's memory is written only after that input was read). A row's state is
zeroed when a request starts on that row (a prompt, a joiner, a recomputed cache); the other rows
of a running batch keep theirs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .config import ModelSpec
from .iobinding import FastBinding

_MAX_RANGES = 64  # (parity, rows) ranges whose OrtValues are kept for reuse


class ConvStateCache:
    """Double-buffered conv states of every conv layer, for up to ``batch`` rows."""

    def __init__(self, spec: ModelSpec, batch: int) -> None:
        channels, width = spec.conv_shape
        self.names = spec.conv_names  # ((past, present), ...) one per conv layer
        # [parity][layer]: (batch, channels, width) conv_dtype, cpu; buffers[live] hold the states
        self.buffers = [
            [np.zeros((batch, channels, width), dtype=spec.conv_dtype) for _ in self.names] for _ in range(2)
        ]
        self.live = 0
        self.nbytes = 2 * len(self.names) * batch * channels * width * spec.conv_dtype.itemsize
        self._handles: dict[tuple[int, int, int], list] = {}

    def _rows(self, bind: FastBinding, parity: int, start: int, stop: int) -> list:
        """Handles of rows ``start:stop`` of every buffer of ``parity`` (contiguous views, made once)."""
        key = (parity, start, stop)
        handles = self._handles.get(key)
        if handles is None:
            if len(self._handles) >= _MAX_RANGES:
                self._handles.clear()  # bounded: the ranges a workload uses are few
            values = [ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers[parity]]
            handles = self._handles[key] = [(v, bind.value(v)) for v in values]
        return handles

    def _bind(self, bind: FastBinding, past: list, present: list) -> None:
        for (past_name, present_name), (_, p), (_, q) in zip(self.names, past, present, strict=True):
            bind.bind_input(past_name, p)
            bind.bind_output(present_name, q)

    def start_rows(self, bind: FastBinding, start: int, stop: int) -> None:
        """Bind for a prompt on rows ``start:stop``: a zero past, the present into the live buffers
        (the other rows' live states are untouched)."""
        spare = 1 - self.live
        for b in self.buffers[spare]:
            b[start:stop] = 0
        self._bind(bind, self._rows(bind, spare, start, stop), self._rows(bind, self.live, start, stop))

    def step(self, bind: FastBinding, rows: int) -> None:
        """Bind for the next step of rows ``0:rows`` (live states as past, the spare buffers as
        present) and make the spare buffers the live ones: call right before the run."""
        spare = 1 - self.live
        self._bind(bind, self._rows(bind, self.live, 0, rows), self._rows(bind, spare, 0, rows))
        self.live = spare
