"""KV cache strategies, one per layout (see docs/architecture.md).

* :class:`StaticKVCache` (GroupQueryAttention share-buffer models): one buffer per layer and K/V,
  ``(batch, kv_heads, max_length, head_size)``, allocated once per Engine and bound as BOTH the
  ``past_key_values.*`` input and the ``present.*`` output. ORT's GQA kernel writes the new
  token's K/V in place at position ``seqlens_k``; nothing is copied between steps. A sliding
  layer whose GroupQueryAttention has ``sliding_window_cache=1`` gets a window-sized buffer
  (``ModelSpec.kv_length``: window + 16 positions, as onnxruntime-genai sizes it on the CPU); the
  kernel then addresses it relative to the cache and evicts the oldest positions itself.
* :class:`GrowingKVCache` (concat and combined layouts): the graph returns ``present`` =
  concat(past, new), one token longer each step. Present outputs are bound to memory ORT
  allocates on the device and handed to the next step as past with ``bind_ortvalue_input``;
  they never pass through numpy. The CUDA path uses it as is with ``device="cuda"``.

The share-buffer cache on a GPU is :class:`engine.cuda.DeviceKVCache` (same interface, cupy-owned
buffers bound by pointer).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .config import KVLayout, ModelSpec
from .iobinding import FastBinding

_MAX_ROW_RANGES = 64  # row ranges whose OrtValues are kept for reuse


class StaticKVCache:
    """Preallocated share-buffer KV cache for GroupQueryAttention models."""

    def __init__(self, spec: ModelSpec, batch: int, max_length: int, device: str = "cpu") -> None:
        if device != "cpu":
            raise ValueError(
                f"StaticKVCache holds host buffers; the {device} cache is engine.cuda.DeviceKVCache (cupy-owned)"
            )
        self.names = list(zip(spec.past_names, spec.present_names, strict=True))
        # (batch, kv_heads, max_length or the window's length, head_size) kv_dtype, cpu: one per layer and K/V
        self.buffers = [
            np.zeros(spec.kv_shape(batch, spec.kv_length(past, max_length)), dtype=spec.kv_dtype)
            for past, _ in self.names
        ]
        self.batch = batch
        self.nbytes = sum(b.nbytes for b in self.buffers)
        # (rows start, rows stop) -> handles of the buffers' views of those rows, made on first use
        self._row_handles: dict[tuple[int, int], list] = {}

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind row 0 of every buffer (a single request) as both past input and present output."""
        self.bind_rows(bind, 0, 1)

    def bind_rows(self, bind: FastBinding, start: int, stop: int) -> None:
        """Bind rows ``start:stop`` of every buffer as past and present (a contiguous view: no copy).

        A batch of ``n`` rows decodes on rows ``0:n``; a row's own prompt is prefilled on ``b:b+1``.
        """
        handles = self._row_handles.get((start, stop))
        if handles is None:
            if len(self._row_handles) >= _MAX_ROW_RANGES:
                self._row_handles.clear()  # bounded: the ranges a workload uses are few
            # OrtValues over views of the buffers (views of leading rows are contiguous), kept alive here
            values = [ort.OrtValue.ortvalue_from_numpy(b[start:stop]) for b in self.buffers]
            handles = self._row_handles[start, stop] = [(v, bind.value(v)) for v in values]
        for (past, present), (_, handle) in zip(self.names, handles, strict=True):
            bind.bind_input(past, handle)
            bind.bind_output(present, handle)

    def start(self, bind: FastBinding, rows: int | None = None) -> None:
        """Nothing to reset: the attention mask, not the buffer contents, says which rows are valid."""

    def advance(self, bind: FastBinding) -> None:
        """Nothing to do: the kernel wrote the new rows in place."""


class GrowingKVCache:
    """Concat-layout KV: present outputs (ORT-allocated on the device) become the next step's past."""

    def __init__(self, spec: ModelSpec, batch: int, device: str = "cpu") -> None:
        self.past_names = spec.past_names
        self.present_names = spec.present_names
        self.device = device
        self.spec = spec
        self.batch = batch
        self.bytes_per_token = spec.kv_bytes_per_token * batch  # the cache grows by this per token (all rows)
        # rows -> (empty past array, its OrtValue, its handle), made on first use
        self._empty: dict[int, tuple] = {}

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind the empty past and let ORT allocate the presents; ``outputs_before`` outputs are bound already."""
        self._pairs = list(enumerate(self.past_names, start=outputs_before))
        self.start(bind, self.batch)

    def start(self, bind: FastBinding, rows: int | None = None) -> None:
        """Start new sequences of ``rows`` rows (default: the cache's batch): empty past, presents by ORT."""
        rows = self.batch if rows is None else rows
        entry = self._empty.get(rows)
        if entry is None:
            # (rows, kv_heads, 0, head_size) kv_dtype, or (2, rows, heads, 0, head_size) combined: the empty past
            empty = np.zeros(self.spec.kv_shape(rows, 0), dtype=self.spec.kv_dtype)
            value = ort.OrtValue.ortvalue_from_numpy(empty)
            entry = self._empty[rows] = (empty, value, bind.value(value))
        for name in self.past_names:
            bind.bind_input(name, entry[2])
        self._bind_presents(bind)

    def copy_presents_into(self, bind: FastBinding, pasts: list[np.ndarray], row: int, width: int) -> None:
        """After a prefill of ``r`` rows: copy its presents into rows ``row:row + r`` of ``pasts``
        (one ``kv_shape(n, width)`` array per past input), right-aligned on the sequence axis."""
        outputs = bind.outputs()
        batch_axis, seq_axis = (1, 3) if self.spec.layout is KVLayout.COMBINED else (0, 2)
        for (index, _), past in zip(self._pairs, pasts, strict=True):
            present = outputs[index].numpy()  # (..., r, ..., P, ...) a copy: prefill may copy
            rows, length = present.shape[batch_axis], present.shape[seq_axis]
            where = [slice(None)] * past.ndim
            where[batch_axis] = slice(row, row + rows)
            where[seq_axis] = slice(width - length, width)
            past[tuple(where)] = present

    def start_from(self, bind: FastBinding, pasts: list[np.ndarray]) -> None:
        """Continue from ``pasts`` (host arrays, one per past input; kept alive here until the next
        start), presents allocated by ORT."""
        self._start_values = [ort.OrtValue.ortvalue_from_numpy(p) for p in pasts]
        for name, value in zip(self.past_names, self._start_values, strict=True):
            bind.bind_input(name, bind.value(value))
        self._bind_presents(bind)

    def _bind_presents(self, bind: FastBinding) -> None:
        for name in self.present_names:
            bind.bind_output_device(name, self.device)

    def advance(self, bind: FastBinding) -> None:
        """Hand this step's presents to the next step as past (device OrtValues, no copy)."""
        outputs = bind.outputs()
        for index, name in self._pairs:
            bind.bind_input(name, outputs[index])
        self._bind_presents(bind)


def make_kv_cache(spec: ModelSpec, batch: int, max_length: int, device: str = "cpu"):
    """The KV strategy for ``spec.layout``."""
    if spec.layout is KVLayout.GQA_SHARED:
        return StaticKVCache(spec, batch, max_length, device)
    return GrowingKVCache(spec, batch, device)


def kv_cache_bytes_needed(spec: ModelSpec, max_length: int, batch: int = 1) -> int:
    """Bytes of KV cache (and conv state) an Engine of ``batch`` rows and ``max_length`` tokens
    needs at its peak.

    Share-buffer GQA: exactly the buffers allocated at load (window-sized ones for layers with a
    window cache). Growing layouts: a full-length step holds the past and the one-token-longer
    present at once, so twice the full cache. Hybrid models add their double-buffered conv states.
    """
    channels, width = spec.conv_shape
    conv = 2 * len(spec.conv_names) * batch * channels * width * spec.conv_dtype.itemsize
    if spec.layout is KVLayout.GQA_SHARED:
        per_position = spec.kv_bytes_per_token // (2 * spec.num_kv_layers)  # one K or V buffer, one row
        lengths = sum(spec.kv_length(name, max_length) for name in spec.past_names)
        return per_position * lengths * batch + conv
    return 2 * spec.kv_bytes_per_token * max_length * batch + conv
