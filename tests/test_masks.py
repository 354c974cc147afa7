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
def prepare(request):
    """prepare_left_padded of one implementation."""
    return masks.ref_prepare_left_padded if request.param == "numpy" else masks._ckernels.prepare_left_padded


@pytest.mark.parametrize("mask_dtype", INTS)
@pytest.mark.parametrize("pos_dtype", INTS)
@pytest.mark.parametrize("len_dtype", INTS)
def test_prepare_left_padded(prepare, mask_dtype, pos_dtype, len_dtype):
    lengths = np.array([3, 5, 0, 1], len_dtype)
    mask = np.full((4, 5), 7, mask_dtype)
    pos = np.full((4, 5), 7, pos_dtype)
    prepare(lengths, mask, pos)
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]]
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert lengths.tolist() == [3, 5, 0, 1]


@pytest.mark.parametrize("dtype", INTS)
def test_prepare_into_a_view_without_positions(prepare, dtype):
    static = np.full((2, 8), 9, dtype)  # the engine's (batch, max_length) buffer
    prepare(np.array([1, 2], dtype), static[:, :3])
    assert static.tolist() == [[0, 0, 1, 9, 9, 9, 9, 9], [0, 1, 1, 9, 9, 9, 9, 9]]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((np.array([6], np.int64), np.zeros((1, 5), np.int64)), "outside"),
        ((np.array([-1], np.int64), np.zeros((1, 5), np.int64)), "outside"),
        ((np.array([1], np.int64), np.zeros((1, 5), np.float32)), "int32 or int64"),
        ((np.array([1, 1], np.int64), np.zeros((1, 5), np.int64)), "rows"),
        ((np.array([1], np.int64), np.zeros((1, 5), np.int64), np.zeros((1, 4), np.int64)), "shape"),
    ],
)
def test_prepare_errors(prepare, args, match):
    with pytest.raises(ValueError, match=match):
        prepare(*args)


def test_fallback_warns_once(monkeypatch):
    warn_not_built.cache_clear()
    mask, lengths = np.zeros((1, 4), np.int64), np.array([1], np.int64)
    with pytest.warns(RuntimeWarning, match="not built"):
        masks._numpy_prepare_left_padded(lengths, mask[:, :1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks._numpy_advance_packed(mask.ravel(), 1, None, lengths, np.zeros(1, np.uint8))
    assert mask.tolist() == [[1, 1, 0, 0]] and lengths.tolist() == [2]


def test_front_uses_compiled_kernels_when_built():
    if COMPILED:
        assert masks.advance_packed is masks._ckernels.advance_packed
        assert masks.prepare_left_padded is masks._ckernels.prepare_left_padded
    else:
        assert masks.advance_packed is masks._numpy_advance_packed
        assert masks.prepare_left_padded is masks._numpy_prepare_left_padded


@pytest.fixture(params=IMPLS)
def packed(request):
    """advance_packed of one implementation."""
    return masks.ref_advance_packed if request.param == "numpy" else masks._ckernels.advance_packed


@pytest.mark.parametrize("mask_dtype", INTS)
@pytest.mark.parametrize("len_dtype", INTS)
@pytest.mark.parametrize("fin_dtype", [np.uint8, np.bool_])
def test_advance_packed_hand_case(packed, mask_dtype, len_dtype, fin_dtype):
    flat = np.full(12, 9, mask_dtype)
    flat[:6] = [0, 1, 1, 1, 1, 1]  # (2, 3): row 0 holds 2 tokens, row 1 holds 3
    pos = np.full((2, 1), -1, mask_dtype)
    lengths = np.array([2, 3], len_dtype)
    packed(flat, 3, pos, lengths, np.array([0, 1], fin_dtype))
    assert flat[:8].reshape(2, 4).tolist() == [[0, 1, 1, 1], [1, 1, 1, 0]]
    assert flat[8:].tolist() == [9, 9, 9, 9]
    assert pos.ravel().tolist() == [2, -1] and lengths.tolist() == [3, 3]


@pytest.mark.parametrize("dtype", INTS)
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_advance_packed_matches_a_mask_built_from_scratch(prepare, packed, dtype, batch):
    """A left-padded batch decoded step by step, rows finishing at random: after each step the packed
    (batch, width + 1) mask is 1 exactly from each row's first prompt token to its last new token."""
    rng = np.random.default_rng(batch)
    max_length = 20
    prompt = rng.integers(1, 6, batch).astype(dtype)
    width = int(prompt.max())
    flat = np.full(batch * max_length, 7, dtype)
    prepare(prompt.copy(), flat[: batch * width].reshape(batch, width))
    pos = np.full((batch, 1), -1, dtype)
    lengths = prompt.copy()
    finished = np.zeros(batch, np.uint8)
    generated = np.zeros(batch, np.int64)
    for step in range(max_length - width):
        w = width + step
        before = lengths.copy()
        packed(flat, w, pos, lengths, finished)
        live = finished == 0
        generated += live
        assert np.array_equal(pos[live, 0], before[live])  # the new token's position: the tokens before it
        expected = np.zeros((batch, w + 1), dtype)
        for row in range(batch):
            expected[row, width - prompt[row] : width + generated[row]] = 1
        assert np.array_equal(flat[: batch * (w + 1)].reshape(batch, w + 1), expected)
        assert np.array_equal(lengths, prompt + generated)
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
