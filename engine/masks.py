"""Attention mask and position ids of the decode loop: compiled kernels with a numpy reference of each.

Layout. A batch of prompts is left-padded into ``width`` columns: row ``b`` holds its ``lengths[b]``
tokens in the last ``lengths[b]`` columns. The mask is 0 on padding and 1 on tokens; positions count
from the row's first token (0, 1, ...) and are 0 on padding (those columns are masked, any in-range
value would do). Each decode step appends one column, marked 1 (0 for finished rows), writes the
new token's position and counts it: :func:`advance_packed` keeps the ``(batch, width)`` mask
gap-free at the start of a flat buffer (rows moved one place per row per step) so that it can be
bound as is for any batch size; the engine's batched decode uses it.

Arrays are int32 or int64 (each may differ), written in place, with contiguous rows; views of wider
buffers are fine. The compiled kernels (``engine._kernels.masks``) are used when built; otherwise
the numpy references below run, after one warning.
"""

from __future__ import annotations

import numpy as np

from engine._kernels import warn_not_built

try:
    from engine._kernels import masks as _ckernels
except ImportError:  # the extension is not built: the numpy reference takes over (with one warning)
    _ckernels = None

__all__ = [
    "advance_packed",
    "prepare_left_padded",
    "ref_advance_packed",
    "ref_prepare_left_padded",
]


def _int_array(a: np.ndarray, name: str, ndim: int) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if a.dtype not in (np.int32, np.int64):
        raise ValueError(f"{name} must be int32 or int64, got {a.dtype}")


def _check_rows(finished: np.ndarray, position_ids: np.ndarray | None, batch: int) -> None:
    """finished (batch,) uint8/bool and position_ids (batch, 1) int32/int64 or None."""
    if not isinstance(finished, np.ndarray) or finished.dtype not in (np.uint8, np.bool_):
        raise ValueError("finished must be a uint8 or bool numpy array")
    if finished.shape != (batch,):
        raise ValueError(f"finished has {finished.shape[0]} entries for {batch} rows")
    if position_ids is not None:
        _int_array(position_ids, "position_ids", 2)
        if position_ids.shape != (batch, 1):
            raise ValueError(f"position_ids must have shape ({batch}, 1), got {position_ids.shape}")


def _count_rows(position_ids: np.ndarray | None, lengths: np.ndarray, finished: np.ndarray) -> None:
    """Unfinished rows: position_ids[b, 0] = lengths[b], then lengths[b] += 1."""
    live = finished == 0
    if position_ids is not None:
        position_ids[live, 0] = lengths[live]
    lengths[live] += 1


def ref_prepare_left_padded(
    lengths: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None = None
) -> None:
    """numpy reference of :func:`prepare_left_padded`."""
    _int_array(lengths, "lengths", 1)
    _int_array(attention_mask, "attention_mask", 2)
    batch, width = attention_mask.shape
    if lengths.shape[0] != batch:
        raise ValueError(f"lengths has {lengths.shape[0]} rows, attention_mask {batch}")
    if position_ids is not None:
        _int_array(position_ids, "position_ids", 2)
        if position_ids.shape != attention_mask.shape:
            raise ValueError(
                f"position_ids shape {position_ids.shape} differs from attention_mask shape {attention_mask.shape}"
            )
    for b, n in enumerate(lengths.tolist()):
        if not 0 <= n <= width:
            raise ValueError(f"lengths[{b}] = {n} is outside [0, {width}] (the mask width)")
    cols = np.arange(width)
    pad = width - lengths.astype(np.int64)[:, None]  # (batch, 1)
    attention_mask[...] = cols >= pad
    if position_ids is not None:
        position_ids[...] = np.maximum(cols - pad, 0)


def ref_advance_packed(
    mask: np.ndarray,
    width: int,
    position_ids: np.ndarray | None,
    lengths: np.ndarray,
    finished: np.ndarray,
) -> None:
    """numpy reference of :func:`advance_packed`."""
    _int_array(mask, "mask", 1)
    _int_array(lengths, "lengths", 1)
    batch = lengths.shape[0]
    _check_rows(finished, position_ids, batch)
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    if mask.shape[0] < batch * (width + 1):
        raise ValueError(
            f"mask holds {mask.shape[0]} entries, fewer than batch * (width + 1) = {batch * (width + 1)} "
            "(the sequence would exceed max_length)"
        )
    old = mask[: batch * width].reshape(batch, width).copy()
    new = mask[: batch * (width + 1)].reshape(batch, width + 1)
    new[:, :width] = old
    new[:, width] = finished == 0
    _count_rows(position_ids, lengths, finished)


def _warn_fallback() -> None:
    warn_not_built("masks", "mask updates")


def _numpy_prepare_left_padded(
    lengths: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray | None = None
) -> None:
    """Fill the mask (0 padding, 1 tokens) and positions (0 on padding, then 0, 1, ...) in place.

    lengths: (batch,); attention_mask and position_ids: (batch, width); row b's prompt is in its last
    lengths[b] columns.
    """
    _warn_fallback()
    ref_prepare_left_padded(lengths, attention_mask, position_ids)


def _numpy_advance_packed(
    mask: np.ndarray,
    width: int,
    position_ids: np.ndarray | None,
    lengths: np.ndarray,
    finished: np.ndarray,
) -> None:
    """One decode step of a batch whose mask is bound as a gap-free (batch, width) array.

    mask: 1-D buffer holding the (batch, width) row-major mask, rewritten in place as
    (batch, width + 1): each row gains a last column, 1 (0 for finished rows). Rows not finished get
    position_ids[b, 0] = lengths[b] and lengths[b] += 1.
    """
    _warn_fallback()
    ref_advance_packed(mask, width, position_ids, lengths, finished)


if _ckernels is not None:
    # the compiled functions themselves, so the decode loop pays no extra Python call
    prepare_left_padded = _ckernels.prepare_left_padded
    advance_packed = _ckernels.advance_packed
else:
    prepare_left_padded = _numpy_prepare_left_padded
    advance_packed = _numpy_advance_packed
