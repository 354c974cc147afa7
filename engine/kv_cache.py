"""KV cache strategies, one per layout (see docs/architecture.md).

* :class:`StaticKVCache` (GroupQueryAttention share-buffer models): one buffer per layer and K/V,
  ``(batch, kv_heads, max_length, head_size)``, allocated once per Engine and bound as BOTH the
  ``past_key_values.*`` input and the ``present.*`` output. ORT's GQA kernel writes the new
  token's K/V in place at position ``seqlens_k``; nothing is copied between steps.
* :class:`GrowingKVCache` (concat and combined layouts): the graph returns ``present`` =
  concat(past, new), one token longer each step. Present outputs are bound to memory ORT
  allocates on the device and handed to the next step as past with ``bind_ortvalue_input``;
  they never pass through numpy. The CUDA path uses it as is with ``device="cuda"``.

The share-buffer cache on a GPU is :class:`engine.cuda.DeviceKVCache` (same interface, cupy-owned
buffers bound by pointer).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from .config import KVLayout, ModelSpec

if TYPE_CHECKING:
    from .binding import FastBinding


class StaticKVCache:
    """Preallocated share-buffer KV cache for GroupQueryAttention models."""

    def __init__(self, spec: ModelSpec, batch: int, max_length: int, device: str = "cpu") -> None:
        if device != "cpu":
            raise ValueError(
                f"StaticKVCache holds host buffers; the {device} cache is engine.cuda.DeviceKVCache (cupy-owned)"
            )
        shape = spec.kv_shape(batch, max_length)
        self.names = list(zip(spec.past_names, spec.present_names, strict=True))
        # (batch, kv_heads, max_length, head_size) kv_dtype, cpu: one per layer and K/V
        self.buffers = [np.zeros(shape, dtype=spec.kv_dtype) for _ in self.names]
        self.values = [ort.OrtValue.ortvalue_from_numpy(b) for b in self.buffers]
        self.nbytes = len(self.names) * int(np.prod(shape)) * spec.kv_dtype.itemsize

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind every buffer as both past input and present output (done once)."""
        for (past, present), value in zip(self.names, self.values, strict=True):
            bind.bind_input(past, bind.value(value))
            bind.bind_output(present, bind.value(value))

    def start(self, bind: FastBinding) -> None:
        """Nothing to reset: the attention mask, not the buffer contents, says which rows are valid."""

    def advance(self, bind: FastBinding) -> None:
        """Nothing to do: the kernel wrote the new rows in place."""


class GrowingKVCache:
    """Concat-layout KV: present outputs (ORT-allocated on the device) become the next step's past."""

    def __init__(self, spec: ModelSpec, batch: int, device: str = "cpu") -> None:
        self.past_names = spec.past_names
        self.present_names = spec.present_names
        self.device = device
        empty_shape = spec.kv_shape(batch, 0)
        # (batch, kv_heads, 0, head_size) kv_dtype, or (2, batch, heads, 0, head_size) combined: the empty past
        self._empty = np.zeros(empty_shape, dtype=spec.kv_dtype)
        self._empty_values = [ort.OrtValue.ortvalue_from_numpy(self._empty) for _ in self.past_names]
        self.bytes_per_token = spec.kv_bytes_per_token * batch  # the cache grows by this per token

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind the empty past and let ORT allocate the presents; ``outputs_before`` outputs are bound already."""
        self._pairs = list(enumerate(self.past_names, start=outputs_before))
        self._empty_handles = [bind.value(v) for v in self._empty_values]
        self.start(bind)

    def start(self, bind: FastBinding) -> None:
        """Start a new sequence: empty past, presents allocated by ORT."""
        for name, handle in zip(self.past_names, self._empty_handles, strict=True):
            bind.bind_input(name, handle)
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
