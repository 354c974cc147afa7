# Attention-mask and position-id kernels for the decode loop, int32 or int64 arrays (fused types).
#
# engine/masks.py documents the layout and holds the numpy reference of each kernel. The def wrappers
# check shapes, dtypes and ranges with the GIL (nothing is written when a check fails), then run the
# loops without it. Directives are set once in setup.py.

from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memmove

cimport numpy as cnp

cnp.import_array()

ctypedef fused index_t:
    int32_t
    int64_t


# ----------------------------------------------------------------------------------------------------
# checks

cdef inline bint _is_int64(cnp.ndarray a, str name) except -1:
    """True for int64, False for int32; ValueError for anything else."""
    if cnp.PyArray_ISSIGNED(a) and cnp.PyArray_ITEMSIZE(a) in (4, 8):
        return cnp.PyArray_ITEMSIZE(a) == 8
    raise ValueError(f"{name} must be int32 or int64, got {a.dtype}")


cdef inline cnp.ndarray _array(object obj, str name, int ndim, bint writeable):
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{name} must be a numpy array, got {type(obj).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>obj
    if cnp.PyArray_NDIM(a) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {(<object>a).shape}")
    if (not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISNOTSWAPPED(a)
            or (cnp.PyArray_DIMS(a)[ndim - 1] > 1
                and cnp.PyArray_STRIDES(a)[ndim - 1] != cnp.PyArray_ITEMSIZE(a))):
        raise ValueError(f"{name} must be aligned, in native byte order, with contiguous rows")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name} must be writeable")
    return a


cdef inline Py_ssize_t _row_stride(cnp.ndarray a) noexcept:
    """Distance between rows in elements (a is 2-D with contiguous rows)."""
    return cnp.PyArray_STRIDES(a)[0] // cnp.PyArray_ITEMSIZE(a)


cdef inline int64_t _get(const void* p, bint is64, Py_ssize_t i) noexcept nogil:
    return (<const int64_t*>p)[i] if is64 else (<const int32_t*>p)[i]


# ----------------------------------------------------------------------------------------------------
# prepare_left_padded

cdef void _left_padded_mask(index_t* mask, Py_ssize_t stride, Py_ssize_t batch, Py_ssize_t width,
                            const void* lengths, bint len64) noexcept nogil:
    cdef Py_ssize_t b, j, pad
    cdef index_t* row
    for b in range(batch):
        row = mask + b * stride
        pad = width - _get(lengths, len64, b)
        for j in range(pad):
            row[j] = 0
        for j in range(pad, width):
            row[j] = 1


cdef void _left_padded_positions(index_t* pos, Py_ssize_t stride, Py_ssize_t batch, Py_ssize_t width,
                                 const void* lengths, bint len64) noexcept nogil:
    cdef Py_ssize_t b, j, pad
    cdef index_t* row
    for b in range(batch):
        row = pos + b * stride
        pad = width - _get(lengths, len64, b)
        for j in range(pad):
            row[j] = 0
        for j in range(pad, width):
            row[j] = <index_t>(j - pad)


def prepare_left_padded(lengths, attention_mask, position_ids=None):
    """Fill the mask and positions of a left-padded batch of prompts, in place.

    lengths: (batch,) int32/int64, row b's prompt has lengths[b] tokens in the last lengths[b] of the
    `width` columns (0 <= lengths[b] <= width). attention_mask: (batch, width) int32/int64 with
    contiguous rows (a view of a wider buffer is fine): 0 on padding, 1 on tokens. position_ids:
    (batch, width) int32/int64 or None: 0 on padding, 0, 1, ... from the first token on.
    """
    cdef cnp.ndarray ln = _array(lengths, "lengths", 1, False)
    cdef cnp.ndarray mk = _array(attention_mask, "attention_mask", 2, True)
    cdef cnp.ndarray ps
    cdef bint len64 = _is_int64(ln, "lengths")
    cdef bint mask64 = _is_int64(mk, "attention_mask")
    cdef bint pos64 = False
    cdef Py_ssize_t batch = cnp.PyArray_DIMS(mk)[0], width = cnp.PyArray_DIMS(mk)[1]
    cdef Py_ssize_t b
    cdef int64_t n
    if cnp.PyArray_DIMS(ln)[0] != batch:
        raise ValueError(f"lengths has {ln.shape[0]} rows, attention_mask {batch}")
    if position_ids is not None:
        ps = _array(position_ids, "position_ids", 2, True)
        pos64 = _is_int64(ps, "position_ids")
        if cnp.PyArray_DIMS(ps)[0] != batch or cnp.PyArray_DIMS(ps)[1] != width:
            raise ValueError(f"position_ids shape {(<object>ps).shape} differs from attention_mask "
                             f"shape {(<object>mk).shape}")
    cdef const void* lp = cnp.PyArray_DATA(ln)
    for b in range(batch):
        n = _get(lp, len64, b)
        if n < 0 or n > width:
            raise ValueError(f"lengths[{b}] = {n} is outside [0, {width}] (the mask width)")
    cdef void* mp = cnp.PyArray_DATA(mk)
    cdef Py_ssize_t ms = _row_stride(mk)
    cdef void* pp = NULL
    cdef Py_ssize_t pst = 0
    if position_ids is not None:
        pp = cnp.PyArray_DATA(ps)
        pst = _row_stride(ps)
    with nogil:
        if mask64:
            _left_padded_mask(<int64_t*>mp, ms, batch, width, lp, len64)
        else:
            _left_padded_mask(<int32_t*>mp, ms, batch, width, lp, len64)
        if pp != NULL:
            if pos64:
                _left_padded_positions(<int64_t*>pp, pst, batch, width, lp, len64)
            else:
                _left_padded_positions(<int32_t*>pp, pst, batch, width, lp, len64)


# ----------------------------------------------------------------------------------------------------
# advance_packed: the per-row part (positions and lengths of unfinished rows)

cdef struct _Rows:
    void* lengths
    bint len64
    void* positions  # NULL for models without position_ids
    Py_ssize_t pos_stride
    bint pos64
    const uint8_t* finished


cdef _Rows _rows(cnp.ndarray ln, object finished, object position_ids, Py_ssize_t batch) except *:
    """Check finished (batch,) uint8/bool and position_ids (batch, 1) int32/int64 or None."""
    cdef cnp.ndarray fin = _array(finished, "finished", 1, False)
    cdef cnp.ndarray ps
    cdef _Rows r
    if cnp.PyArray_TYPE(fin) != cnp.NPY_UINT8 and cnp.PyArray_TYPE(fin) != cnp.NPY_BOOL:
        raise ValueError(f"finished must be uint8 or bool, got {fin.dtype}")
    if cnp.PyArray_DIMS(fin)[0] != batch:
        raise ValueError(f"finished has {fin.shape[0]} entries for {batch} rows")
    r.lengths = cnp.PyArray_DATA(ln)
    r.len64 = _is_int64(ln, "lengths")
    r.finished = <const uint8_t*>cnp.PyArray_DATA(fin)
    r.positions = NULL
    r.pos_stride = 0
    r.pos64 = False
    if position_ids is not None:
        ps = _array(position_ids, "position_ids", 2, True)
        r.pos64 = _is_int64(ps, "position_ids")
        if cnp.PyArray_DIMS(ps)[0] != batch or cnp.PyArray_DIMS(ps)[1] != 1:
            raise ValueError(f"position_ids must have shape ({batch}, 1), got {(<object>ps).shape}")
        r.positions = cnp.PyArray_DATA(ps)
        r.pos_stride = _row_stride(ps)
    return r


cdef void _count_rows(_Rows r, Py_ssize_t batch) noexcept nogil:
    """Unfinished rows: position_ids[b, 0] = lengths[b], then lengths[b] += 1."""
    if r.positions != NULL:
        if r.pos64:
            _advance_positions(<int64_t*>r.positions, r.pos_stride, batch, r.lengths, r.len64, r.finished)
        else:
            _advance_positions(<int32_t*>r.positions, r.pos_stride, batch, r.lengths, r.len64, r.finished)
    if r.len64:
        _advance_lengths(<int64_t*>r.lengths, batch, r.finished)
    else:
        _advance_lengths(<int32_t*>r.lengths, batch, r.finished)


cdef void _advance_positions(index_t* pos, Py_ssize_t stride, Py_ssize_t batch, const void* lengths,
                             bint len64, const uint8_t* finished) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(batch):
        if not finished[b]:
            pos[b * stride] = <index_t>_get(lengths, len64, b)


cdef void _advance_lengths(index_t* lengths, Py_ssize_t batch, const uint8_t* finished) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(batch):
        if not finished[b]:
            lengths[b] += 1


# ----------------------------------------------------------------------------------------------------
# advance_packed: the mask

cdef void _relayout_append(index_t* mask, Py_ssize_t batch, Py_ssize_t width,
                           const uint8_t* finished) noexcept nogil:
    """(batch, width) row-major -> (batch, width + 1) in place, new column 1 (0 for finished rows)."""
    cdef Py_ssize_t b
    cdef size_t row_bytes = <size_t>width * sizeof(index_t)
    for b in range(batch - 1, -1, -1):
        # destinations lie at or after the sources, and later rows moved out first: memmove is safe
        if b > 0 and width > 0:
            memmove(mask + b * (width + 1), mask + b * width, row_bytes)
        mask[b * (width + 1) + width] = 0 if finished[b] else 1


def advance_packed(mask, Py_ssize_t width, position_ids, lengths, finished):
    """One decode step of a batch whose mask is packed: bound as a (batch, width) array with no gaps.

    mask: 1-D int32/int64, contiguous, holding the (batch, width) row-major mask in its first
    batch * width entries and room for batch * (width + 1). It is rewritten in place as the
    (batch, width + 1) mask: every row keeps its columns and gains a last one, 1 for rows not
    finished and 0 for finished rows. position_ids: (batch, 1) int32/int64 or None; lengths:
    (batch,) int32/int64; finished: (batch,) uint8 or bool. Rows not finished also get
    position_ids[b, 0] = lengths[b] and lengths[b] += 1.
    Raises ValueError, writing nothing, on a bad argument.
    """
    cdef cnp.ndarray mk = _array(mask, "mask", 1, True)
    cdef cnp.ndarray ln = _array(lengths, "lengths", 1, True)
    cdef bint mask64 = _is_int64(mk, "mask")
    cdef Py_ssize_t batch = cnp.PyArray_DIMS(ln)[0]
    cdef _Rows r = _rows(ln, finished, position_ids, batch)
    if width < 0:
        raise ValueError(f"width must be >= 0, got {width}")
    # width + 1 > entries // batch, written so that nothing can overflow
    if batch > 0 and width >= cnp.PyArray_DIMS(mk)[0] // batch:
        raise ValueError(f"mask holds {mk.shape[0]} entries, fewer than batch * (width + 1) = "
                         f"{batch * (width + 1)} (the sequence would exceed max_length)")
    cdef void* mp = cnp.PyArray_DATA(mk)
    with nogil:
        if mask64:
            _relayout_append(<int64_t*>mp, batch, width, r.finished)
        else:
            _relayout_append(<int32_t*>mp, batch, width, r.finished)
        _count_rows(r, batch)
