"""What an Engine will hold in host memory, estimated from the model's spec before anything is
allocated, so that a load which cannot fit is refused up front (and ``engine info`` can say why).

The parts, for ``max_batch`` rows of ``max_length`` tokens:

* the KV cache (:func:`engine.kv_cache.kv_cache_bytes_needed`: the peak, twice the cache for
  layouts whose present is a new buffer each step);
* the weights ORT holds once the session is created (the initializers' bytes);
* the preallocated step buffers: the attention mask (single and packed batch forms), the output
  ids, the logits rows and the sampler's per-row tables (token counts, ranked scratch);
* the per-width bindable views: on the CPU a decode step binds a precreated OrtValue view of the
  mask at the current width (see engine/binding.py), one per width for a single request and, per
  batch row count kept (``_PACKED_ROW_COUNTS``), one per width for batches. Each costs
  :data:`VIEW_BYTES` (a numpy view, an OrtValue and its binding handle; measured in resident
  memory, 640 bytes on CPython 3.11 / onnxruntime 1.2x) -- about 1 GB at 128k tokens and 8
  row counts, more than a small model's KV cache.

What is not counted: ORT's activation arena of a prefill (it grows with the prompt length, and is
the same for any engine on ORT) and the Python interpreter itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .binding import _PACKED_ROW_COUNTS
from .config import ModelSpec
from .kv_cache import kv_cache_bytes_needed

VIEW_BYTES = 640  # resident bytes of one (numpy view, OrtValue, binding handle) triple, measured
_SAMPLER_BYTES_PER_ENTRY = 12  # per row and vocab entry: int32 counts, float32 scores, int32 ranks


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes an Engine of ``max_batch`` rows x ``max_length`` tokens will hold, by part."""

    max_length: int
    max_batch: int
    kv_cache: int
    weights: int
    buffers: int  # mask, output ids, logits, sampler tables
    views: int  # per-width OrtValue views of the mask

    @property
    def total(self) -> int:
        """Everything counted: what the check before allocation compares with available memory."""
        return self.kv_cache + self.weights + self.buffers + self.views

    def describe(self) -> str:
        """One line: the total and its parts, in MiB."""
        parts = ", ".join(
            f"{name} {value / 2**20:.1f}"
            for name, value in (
                ("KV cache", self.kv_cache),
                ("weights", self.weights),
                ("buffers", self.buffers),
                ("mask views", self.views),
            )
        )
        return f"{self.total / 2**20:.1f} MiB ({parts} MiB)"


def estimate_memory(spec: ModelSpec, max_length: int, max_batch: int = 1, *, on_cpu: bool = True) -> MemoryEstimate:
    """Host bytes an Engine on ``spec`` will hold (see the module docstring for what is counted).

    ``on_cpu=False`` (a CUDA engine): the KV cache, the weights and the step buffers live on the
    device, so only the host-side ids and the views count here; the device's own check runs after
    the weights are loaded."""
    mask_itemsize = spec.attention_mask.dtype.itemsize if spec.attention_mask is not None else 0
    logits_itemsize = np.dtype(spec.logits.dtype).itemsize
    out_ids = max_batch * max_length * 8
    if not on_cpu:
        return MemoryEstimate(max_length, max_batch, 0, 0, out_ids, 0)
    mask = max_length * mask_itemsize + (max_batch * max_length * mask_itemsize if max_batch > 1 else 0)
    logits = max_batch * spec.vocab_size * logits_itemsize
    sampler = max_batch * spec.vocab_size * _SAMPLER_BYTES_PER_ENTRY
    widths = max_length + 1
    views = 0
    if spec.attention_mask is not None:
        views = widths * (1 + (min(_PACKED_ROW_COUNTS, max_batch) if max_batch > 1 else 0)) * VIEW_BYTES
    return MemoryEstimate(
        max_length=max_length,
        max_batch=max_batch,
        kv_cache=kv_cache_bytes_needed(spec, max_length, max_batch),
        weights=spec.weight_bytes,
        buffers=mask + out_ids + logits + sampler,
        views=views,
    )
