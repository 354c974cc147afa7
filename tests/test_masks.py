"""Attention mask and position ids: hand-computed cases for int32 and int64, on both implementations."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from engine import masks
from engine._kernels import warn_not_built

COMPILED = masks._ckernels is not None
NOT_BUILT = "engine._kernels.masks is not built (python setup.py build_ext --inplace)"
IMPLS = ["numpy", pytest.param("cython", marks=pytest.mark.skipif(not COMPILED, reason=NOT_BUILT))]
INTS = [np.int32, np.int64]


@pytest.fixture(params=IMPLS)
def impl(request):
    """(prepare_left_padded, advance) of one implementation."""
    if request.param == "numpy":
        return masks.ref_prepare_left_padded, masks.ref_advance
    return masks._ckernels.prepare_left_padded, masks._ckernels.advance


@pytest.mark.parametrize("mask_dtype", INTS)
@pytest.mark.parametrize("pos_dtype", INTS)
@pytest.mark.parametrize("len_dtype", INTS)
def test_prepare_left_padded(impl, mask_dtype, pos_dtype, len_dtype):
    prepare, _ = impl
    lengths = np.array([3, 5, 0, 1], len_dtype)
    mask = np.full((4, 5), 7, mask_dtype)
    pos = np.full((4, 5), 7, pos_dtype)
    prepare(lengths, mask, pos)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert lengths.tolist() == [3, 5, 0, 1]


@pytest.mark.parametrize("dtype", INTS)
def test_prepare_into_a_view_without_positions(impl, dtype):
    prepare, _ = impl
    static = np.full((2, 8), 9, dtype)  # the engine's (batch, max_length) buffer
    prepare(np.array([1, 2], dtype), static[:, :3])
    assert static.tolist() == [[0, 0, 1, 9, 9, 9, 9, 9], [0, 1, 1, 9, 9, 9, 9, 9]]


@pytest.mark.parametrize("mask_dtype", INTS)
@pytest.mark.parametrize("len_dtype", INTS)
@pytest.mark.parametrize("fin_dtype", [np.uint8, np.bool_])
def test_advance_left_padded_batch(impl, mask_dtype, len_dtype, fin_dtype):
    prepare, advance = impl
    mask = np.zeros((3, 6), mask_dtype)
    pos = np.full((3, 1), -1, mask_dtype)
    lengths = np.array([2, 3, 1], len_dtype)
    prepare(lengths, mask[:, :3])
    finished = np.array([0, 1, 0], fin_dtype)
    advance(mask, pos, lengths, finished, 3)  # the new token of every row goes to column 3
    assert mask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert pos.ravel().tolist() == [2, -1, 1]  # position of the new token: the tokens before it
    assert lengths.tolist() == [3, 3, 2]
    finished[2] = 1
    advance(mask, pos, lengths, finished, 4)
    assert mask[:, 4].tolist() == [1, 0, 0]
    assert pos.ravel().tolist() == [3, -1, 1] and lengths.tolist() == [4, 3, 2]


@pytest.mark.parametrize("dtype", INTS)
def test_advance_per_row_columns(impl, dtype):
    _, advance = impl
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], dtype)
    lengths = np.array([2, 1], dtype)
    advance(mask, None, lengths, np.zeros(2, np.uint8))  # column -1: each row's own length
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert lengths.tolist() == [3, 2]


@pytest.mark.parametrize("dtype", INTS)
def test_decode_loop_matches_a_mask_built_from_scratch(impl, dtype):
    prepare, advance = impl
    prompt = np.array([4, 1, 3], dtype)
    width, max_length = 4, 12
    mask = np.zeros((3, max_length), dtype)
    pos = np.zeros((3, 1), dtype)
    lengths = prompt.copy()
    prepare(lengths, mask[:, :width])
    finished = np.zeros(3, np.uint8)
    done_at = {1: 2, 2: 5}  # row -> step after which it finished
    generated = np.zeros(3, int)
    for step in range(6):
        advance(mask, pos, lengths, finished, width + step)
        generated += finished == 0
        for row, last in done_at.items():
            if step == last:
                finished[row] = 1
    expected = np.zeros((3, max_length), dtype)
    for row in range(3):
        expected[row, width - prompt[row] : width + generated[row]] = 1
    assert np.array_equal(mask, expected)
    assert lengths.tolist() == (prompt + generated).tolist()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p, a: p(np.array([6], np.int64), np.zeros((1, 5), np.int64)), "outside"),
        (lambda p, a: p(np.array([-1], np.int64), np.zeros((1, 5), np.int64)), "outside"),
        (lambda p, a: p(np.array([1], np.int64), np.zeros((1, 5), np.float32)), "int32 or int64"),
        (lambda p, a: p(np.array([1, 1], np.int64), np.zeros((1, 5), np.int64)), "rows"),
        (
            lambda p, a: p(np.array([1], np.int64), np.zeros((1, 5), np.int64), np.zeros((1, 4), np.int64)),
            "shape",
        ),
        (
            lambda p, a: a(np.zeros((1, 5), np.int64), None, np.array([5], np.int64), np.zeros(1, np.uint8)),
            "outside",
        ),
        (
            lambda p, a: a(np.zeros((1, 5), np.int64), None, np.array([1], np.int64), np.zeros(1, np.uint8), 5),
            "outside",
        ),
        (
            lambda p, a: a(np.zeros((1, 5), np.int64), None, np.array([1], np.int64), np.zeros(1, np.int8)),
            "finished",
        ),
        (
            lambda p, a: a(
                np.zeros((1, 5), np.int64),
                np.zeros((1, 2), np.int64),
                np.array([1], np.int64),
                np.zeros(1, np.uint8),
            ),
            "position_ids",
        ),
        (
            lambda p, a: a(np.zeros((2, 5), np.int64), None, np.array([1], np.int64), np.zeros(2, np.uint8)),
            "lengths",
        ),
    ],
)
def test_errors(impl, call, match):
    prepare, advance = impl
    with pytest.raises(ValueError, match=match):
        call(prepare, advance)


def test_failed_advance_writes_nothing(impl):
    _, advance = impl
    mask = np.zeros((2, 3), np.int64)
    pos = np.zeros((2, 1), np.int64)
    lengths = np.array([1, 3], np.int64)  # row 1 has no room left
    with pytest.raises(ValueError, match="row 1"):
        advance(mask, pos, lengths, np.zeros(2, np.uint8))
    assert not mask.any() and not pos.any() and lengths.tolist() == [1, 3]


def test_fallback_warns_once(monkeypatch):
    warn_not_built.cache_clear()
    mask, lengths = np.zeros((1, 4), np.int64), np.array([1], np.int64)
    with pytest.warns(RuntimeWarning, match="not built"):
        masks._numpy_prepare_left_padded(lengths, mask[:, :1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks._numpy_advance(mask, None, lengths, np.zeros(1, np.uint8))
    assert mask.tolist() == [[1, 1, 0, 0]] and lengths.tolist() == [2]


def test_front_uses_compiled_kernels_when_built():
    expected = masks._ckernels.advance if COMPILED else masks._numpy_advance
    assert masks.advance is expected


@pytest.fixture(params=IMPLS)
def packed(request):
    """advance_packed of one implementation."""
    return masks.ref_advance_packed if request.param == "numpy" else masks._ckernels.advance_packed


@pytest.mark.parametrize("mask_dtype", INTS)
@pytest.mark.parametrize("len_dtype", INTS)
def test_advance_packed_hand_case(packed, mask_dtype, len_dtype):
    flat = np.full(12, 9, mask_dtype)
    flat[:6] = [0, 1, 1, 1, 1, 1]  # (2, 3): row 0 holds 2 tokens, row 1 holds 3
    pos = np.full((2, 1), -1, mask_dtype)
    lengths = np.array([2, 3], len_dtype)
    packed(flat, 3, pos, lengths, np.array([0, 1], np.uint8))
    assert flat[:8].reshape(2, 4).tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    assert flat[8:].tolist() == [9, 9, 9, 9]
    assert pos.ravel().tolist() == [2, -1] and lengths.tolist() == [3, 3]


@pytest.mark.parametrize("dtype", INTS)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_advance_packed_matches_the_static_mask(impl, packed, dtype, batch):
    """Step by step, the packed (batch, width) mask equals the static buffer's first width columns."""
    prepare, advance = impl
    rng = np.random.default_rng(batch)
    max_length = 20
    prompt = rng.integers(1, 6, batch).astype(dtype)
    width = int(prompt.max())
    static = np.zeros((batch, max_length), dtype)
    prepare(prompt.copy(), static[:, :width])
    flat = np.full(batch * max_length, 7, dtype)
    flat[: batch * width] = static[:, :width].ravel()
    pos_a, pos_b = np.zeros((batch, 1), dtype), np.zeros((batch, 1), dtype)
    len_a, len_b = prompt.copy(), prompt.copy()
    finished = np.zeros(batch, np.uint8)
    for step in range(max_length - width):
        w = width + step
        advance(static, pos_a, len_a, finished, w)
        packed(flat, w, pos_b, len_b, finished)
        assert np.array_equal(flat[: batch * (w + 1)].reshape(batch, w + 1), static[:, : w + 1])
        assert np.array_equal(pos_a, pos_b) and np.array_equal(len_a, len_b)
        finished |= (rng.random(batch) < 0.2).astype(np.uint8)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.zeros(5, np.int64), 2, None, np.array([1, 1]), np.zeros(2, np.uint8)), "fewer than"),
        ((np.zeros(6, np.int64), -1, None, np.array([1, 1]), np.zeros(2, np.uint8)), "width"),
        ((np.zeros(6, np.float32), 2, None, np.array([1, 1]), np.zeros(2, np.uint8)), "int32 or int64"),
        ((np.zeros(6, np.int64), 2, None, np.array([1, 1]), np.zeros(3, np.uint8)), "finished"),
        ((np.zeros(6, np.int64), 2, None, np.array([1, 1]), np.zeros(2, np.int16)), "finished"),
        ((np.zeros(6, np.int64), 2, np.zeros((1, 1), np.int64), np.array([1, 1]), np.zeros(2, np.uint8)), "position"),
        ((np.zeros((2, 3), np.int64), 2, None, np.array([1, 1]), np.zeros(2, np.uint8)), "1-D"),
        # batch * (width + 1) wraps around in 64 bits: found by review, was an out-of-bounds write
        ((np.zeros(2, np.int64), (2**64 + 2) // 3 - 1, None, np.zeros(3, np.int64), np.zeros(3, np.uint8)), "fewer"),
    ],
)
def test_advance_packed_errors_write_nothing(packed, args, match):
    before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(ValueError, match=match):
        packed(*args)
    for a, b in zip(args, before, strict=True):
        if isinstance(a, np.ndarray):
            assert np.array_equal(a, b)
