"""The decode loop allocates no numpy arrays and no OrtValues, and copies nothing per step.

Three independent checks over the real decode loops of engine/decode.py (``generate_single``,
driven token by token as a stream drives it) on a model with a 32k vocabulary, where one stray copy of
the logits would be 128 KB:

1. an audit with ``sys.setprofile`` of every C function called during the steps: none of the
   array/OrtValue constructors or host copies may appear;
2. tracemalloc over numpy's own allocation domain: no numpy data buffer is allocated;
3. tracemalloc's peak over 200 steps stays far below the size of one logits row.

The same checks cover the batched step and the CUDA path's one-step-ahead step (DeviceStepState and
DeviceSampler over NumpyOps, the code a GPU runs with CupyOps).
"""

from __future__ import annotations

import sys
import tracemalloc

import numpy as np
import pytest

import engine
from engine import decode
from engine.testing.synthetic import SyntheticSpec, cached_model

VOCAB = 32000
# C functions that create arrays or OrtValues, or copy between host buffers
FORBIDDEN = {
    "array",
    "asarray",
    "ascontiguousarray",
    "zeros",
    "empty",
    "ones",
    "full",
    "copy",
    "astype",
    "concatenate",
    "ortvalue_from_numpy",
    "ortvalue_from_shape_and_type",
    "copy_outputs_to_cpu",
    "bind_cpu_input",
    "numpy",
    "run",
}


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    spec = SyntheticSpec(layout="gqa", vocab=VOCAB, seed=21)
    model_dir = cached_model(spec, tmp_path_factory.mktemp("alloc"))
    e = engine.Engine(model_dir, max_length=256)
    e.generate([1, 2, 3], max_new_tokens=8)  # warm-up
    _numpy_growth_and_peak(lambda: e.generate([1, 2, 3], max_new_tokens=8))  # tracemalloc's first session is noisier
    return e


def _start(eng, prompt, new=230):
    """The real single-request loop, past its prefill and first steps: next(loop) is one token."""
    eng.eos_token_ids = frozenset()  # the loop must not end early
    req = eng._requests.one(prompt, new, None, {}, text=False)
    loop = decode.generate_single(eng._ctx, req)
    for _ in range(3):
        next(loop)
    return loop


def _steps(loop, n):
    for _ in range(n):
        next(loop)


def _c_calls(fn) -> set[str]:
    """Names of the C functions ``fn()`` calls (sys.setprofile audit)."""
    called: set[str] = set()

    def audit(frame, event, arg):
        if event == "c_call":
            called.add(getattr(arg, "__name__", repr(arg)))

    sys.setprofile(audit)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return called


def _numpy_growth_and_peak(fn) -> tuple[list, int]:
    """(numpy allocations that ``fn()`` left behind, tracemalloc peak growth in bytes during it)."""
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        fn()
        _, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    numpy_domain = tracemalloc.DomainFilter(inclusive=True, domain=np.lib.tracemalloc_domain)
    grown = [
        s
        for s in after.filter_traces([numpy_domain]).compare_to(before.filter_traces([numpy_domain]), "lineno")
        if s.count_diff > 0
    ]
    return grown, peak - base


def test_no_allocating_calls_in_decode_step(eng):
    st = eng._state
    loop = _start(eng, [1, 2, 3, 4])
    called = _c_calls(lambda: _steps(loop, 50))
    assert "bind_ortvalue_input" in called  # the audit does see the step's C calls
    # the run itself is a functools.partial straight onto ORT's C-level run_with_iobinding, which
    # setprofile cannot look into: check that it is nothing else
    run = st.bind.run
    assert getattr(run, "func", run).__name__ == "run_with_iobinding"
    assert not (called & FORBIDDEN), sorted(called & FORBIDDEN)


def test_no_numpy_buffers_and_flat_peak(eng):
    loop = _start(eng, [1, 9, 8, 7])
    grown, peak = _numpy_growth_and_peak(lambda: _steps(loop, 200))
    assert not grown, grown[:3]
    logits_row = VOCAB * 4
    assert peak < logits_row // 8, f"peak grew by {peak} bytes over 200 steps"


def test_whole_request_memory_does_not_scale_with_tokens(eng):
    eng.generate([1, 2, 3], max_new_tokens=10)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        eng.generate([1, 2, 3], max_new_tokens=10)
        _, short_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        base2, _ = tracemalloc.get_traced_memory()
        eng.generate([1, 2, 3], max_new_tokens=200)
        _, long_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 190 more tokens may only cost their ids in the result (ints in a list), never a buffer per step
    assert (long_peak - base2) - (short_peak - base) < 190 * 64 + 4096


# ------------------------------------------------------------------------------------------------
# the batched step (decode_rows: packed-mask kernel, bind, run; the sampler over the rows)


@pytest.fixture(scope="module")
def batch_eng(tmp_path_factory):
    spec = SyntheticSpec(layout="gqa", vocab=VOCAB, seed=21)
    model_dir = cached_model(spec, tmp_path_factory.mktemp("alloc-batch"))
    return engine.Engine(model_dir, max_length=256, max_batch=4)


def _batch_steps(st, sampler, n):
    for _ in range(n):
        logits = st.decode_rows()
        sampler.sample(logits, st.next_ids, 3)


def test_batch_decode_step_allocates_nothing(batch_eng):
    st, sampler = batch_eng._state, batch_eng._sampler
    prompts = [np.array(p, np.int64) for p in ([1, 2, 3], [4, 5, 6, 7, 8], [9])]
    sampler.reset(engine.SamplingParams(), prompts)
    logits = st.prefill_rows(prompts, 220)
    sampler.sample(logits, st.next_ids, 3)
    _batch_steps(st, sampler, 2)
    st.finished[1] = 1  # a finished row is masked from here on: still no allocation
    called = _c_calls(lambda: _batch_steps(st, sampler, 20))
    assert "bind_ortvalue_input" in called  # the audit sees the step's C calls
    assert not (called & FORBIDDEN), sorted(called & FORBIDDEN)
    grown, peak = _numpy_growth_and_peak(lambda: _batch_steps(st, sampler, 150))
    assert not grown, grown[:3]
    assert peak < VOCAB * 4 // 8, f"peak grew by {peak} bytes over 150 steps"
    # the finished row stopped growing; the others count every step
    assert st.lengths[:3].tolist() == [3 + 172, 5 + 2, 1 + 172]


# ------------------------------------------------------------------------------------------------
# the CUDA path's step, one step ahead (Engine._steps_ahead), over NumpyOps: the same state and
# sampler code as on a GPU, where the per-step copy is the ids' download into a page-locked slot


@pytest.fixture(scope="module")
def device_eng(tmp_path_factory):
    from engine.cuda import DeviceSampler, DeviceStepState, NumpyOps

    spec = SyntheticSpec(layout="gqa", vocab=VOCAB, seed=21)
    model_dir = cached_model(spec, tmp_path_factory.mktemp("alloc-device"))
    e = engine.Engine(model_dir, max_length=256)
    ops = NumpyOps()
    # without graphs: the step binds the mask view of its width, a call the audit below can see
    st = DeviceStepState(e.session, e.spec, ops, max_length=256, last_token_logits=e.last_token_logits, graph=False)
    e._state = st
    e._sampler = DeviceSampler(ops, batch=1, vocab_size=VOCAB, logits_dtype=e.spec.logits.dtype, host_ids=st.host_ids)
    e.generate([1, 2, 3], max_new_tokens=8)  # warm-up, through the one-step-ahead loop
    return e


def test_device_step_ahead_allocates_nothing(device_eng):
    loop = _start(device_eng, [1, 2, 3, 4])  # greedy: the one-step-ahead loop (generate_one_ahead)
    assert device_eng._sampler.on_device
    called = _c_calls(lambda: _steps(loop, 20))
    assert "bind_input" in called  # the audit sees the step's C calls (the mask view's binding)
    assert not (called & FORBIDDEN), sorted(called & FORBIDDEN)
    grown, peak = _numpy_growth_and_peak(lambda: _steps(loop, 150))
    assert not grown, grown[:3]
    assert peak < VOCAB * 4 // 8, f"peak grew by {peak} bytes over 150 steps"
