"""Lifecycle under interrupts, failed threads and shared or abandoned streams: nothing hangs, and
the engine answers the next request exactly as before.

The SIGINT storms run in a subprocess (a stray KeyboardInterrupt must not hit pytest itself), with
a hard time limit: a lock left held shows up as a timeout there, not as a hung test run.
"""

from __future__ import annotations

import ctypes
import gc
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import engine
from engine import scheduler
from engine.errors import EngineError
from engine.testing.synthetic import SyntheticSpec, cached_model

PROMPT = [1, 5, 9, 13]
OTHER = [1, 7, 3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("life"))


@pytest.fixture(scope="module")
def eng(model_dir):
    return engine.Engine(model_dir, max_length=96)


@pytest.fixture(scope="module")
def auto(model_dir):
    return engine.Engine(model_dir, max_length=96, max_batch=4, auto_batch=True)


@pytest.fixture(scope="module")
def want(eng):
    return {
        "prompt": eng.generate(PROMPT, max_new_tokens=30).token_ids,
        "other": eng.generate(OTHER, max_new_tokens=10).token_ids,
    }


# ------------------------------------------------------------------------------------------------
# SIGINT storms (subprocess)

_STORM = textwrap.dedent(
    """
    import os, random, signal, sys, threading, time
    import engine

    model_dir, auto, storms = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    kw = {"max_batch": 4, "auto_batch": True} if auto else {}
    eng = engine.Engine(model_dir, max_length=96, **kw)
    want = eng.generate([1, 5, 9, 13], max_new_tokens=12).token_ids
    stop = threading.Event()
    rng = random.Random(7)

    go = threading.Event()

    def storm():
        go.wait()  # started before the storm: an interrupt cannot land in Thread.start()
        while not stop.is_set():
            time.sleep(rng.uniform(0.0, 0.003))
            os.kill(os.getpid(), signal.SIGINT)

    others = []
    if auto:  # other callers keep the worker and its batches busy meanwhile
        def caller():
            while not stop.is_set():
                assert eng.generate([1, 7, 3], max_new_tokens=6).token_ids
        others = [threading.Thread(target=caller) for _ in range(2)]
        for t in others:
            t.start()
    interrupted = done = 0
    storm_thread = threading.Thread(target=storm, daemon=True)
    storm_thread.start()
    while True:  # an interrupt may land anywhere here, the loop's own bookkeeping included
        try:
            go.set()
            while interrupted < storms:
                try:
                    eng.generate([1, 5, 9, 13], max_new_tokens=12)
                    done += 1
                except KeyboardInterrupt:
                    interrupted += 1
            break
        except KeyboardInterrupt:
            interrupted += 1
    while True:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the storm is over for this thread
            break
        except KeyboardInterrupt:
            pass
    stop.set()
    storm_thread.join()
    for t in others:
        t.join()
    got = eng.generate([1, 5, 9, 13], max_new_tokens=12).token_ids
    assert got == want, (got, want)
    print("OK", interrupted, done)
    """
)


@pytest.mark.parametrize("auto_batch", [False, True], ids=["plain", "auto_batch"])
def test_sigint_storm_never_leaves_the_engine_locked(model_dir, auto_batch):
    """Hundreds of real SIGINTs during generate(): every one lands as a KeyboardInterrupt at some
    point of the call, and the next generate() in the same thread answers exactly as before."""
    proc = subprocess.run(
        [sys.executable, "-c", _STORM, str(model_dir), "1" if auto_batch else "0", "300"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout[-2000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# auto_batch worker that cannot start, or dies


def test_auto_batch_worker_that_cannot_start_runs_requests_in_the_callers(auto, want, monkeypatch):
    """Thread.start fails (thread limit): the caller runs its own request, with the same tokens,
    instead of waiting forever for a worker that never came."""

    def refuse(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(scheduler.threading.Thread, "start", refuse)
    assert auto.generate(PROMPT, max_new_tokens=30).token_ids == want["prompt"]
    assert auto.generate(OTHER, max_new_tokens=10).token_ids == want["other"]
    assert not auto._batcher._queue
    monkeypatch.undo()
    assert auto.generate(OTHER, max_new_tokens=10).token_ids == want["other"]  # with a worker again


def _kill(thread: threading.Thread) -> None:
    """Raise SystemExit inside ``thread`` (as an interrupt aimed at it would)."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(SystemExit))
    assert n == 1


def test_a_dead_auto_batch_worker_is_replaced_and_no_caller_waits_forever(auto, want, monkeypatch):
    """The worker dies in the middle of a batch: its callers get their result or a clear
    EngineError, never a hang, and the next requests run on a new worker."""
    inside = threading.Event()
    release = threading.Event()
    st = auto._state
    original = st.decode_rows
    steps = [0]

    def gated():
        steps[0] += 1
        if steps[0] == 3 and not inside.is_set():
            inside.set()
            release.wait(10)
            time.sleep(0.01)  # the async exception lands at the next bytecode of this frame
        return original()

    monkeypatch.setattr(st, "decode_rows", gated)
    outcome: list = []

    def call():
        try:
            outcome.append(auto.generate(PROMPT, max_new_tokens=30).token_ids)
        except EngineError as e:
            outcome.append(e)

    caller = threading.Thread(target=call)
    caller.start()
    assert inside.wait(10)
    worker = auto._batcher._worker
    assert worker is not None and worker.is_alive()
    _kill(worker)
    release.set()
    worker.join(10)
    assert not worker.is_alive()
    caller.join(15)
    assert not caller.is_alive(), "the caller of a dead worker's request hangs"
    assert outcome and (outcome[0] == want["prompt"] or isinstance(outcome[0], EngineError))
    monkeypatch.undo()
    assert auto.generate(OTHER, max_new_tokens=10).token_ids == want["other"]


# ------------------------------------------------------------------------------------------------
# streams shared by threads, left suspended, abandoned in exceptions


def test_a_stream_advanced_from_two_threads_while_its_first_thread_makes_another_request(eng, want):
    """Thread A opens a stream and takes the first chunk; thread B advances it to the end; A
    meanwhile makes an unrelated request. Nobody gets a spurious error or waits forever, and the
    stream's tokens equal an undisturbed run."""
    stream = eng.stream(PROMPT, max_new_tokens=30)
    first = next(stream)
    rest: list[int] = []
    b_started = threading.Event()

    def advance():
        b_started.set()
        rest.extend(c.token_id for c in stream)

    b = threading.Thread(target=advance)
    b.start()
    assert b_started.wait(5)
    assert eng.generate(OTHER, max_new_tokens=10).token_ids == want["other"]
    b.join(20)
    assert not b.is_alive()
    assert [first.token_id, *rest] == want["prompt"]
    assert stream.result is not None and stream.result.token_ids == want["prompt"]


def test_a_call_from_the_thread_of_a_suspended_stream_evicts_it_and_the_stream_resumes(eng, want):
    stream = eng.stream(PROMPT, max_new_tokens=30)
    head = [next(stream).token_id for _ in range(5)]
    assert eng.generate(OTHER, max_new_tokens=10).token_ids == want["other"]  # no hang, no error
    tail = [c.token_id for c in stream]  # recomputes its cache, then goes on
    assert head + tail == want["prompt"]


def test_an_evicted_sampled_stream_keeps_its_random_stream(eng):
    kw = {"max_new_tokens": 25, "do_sample": True, "temperature": 1.3, "seed": 11}
    alone = [c.token_id for c in eng.stream(PROMPT, **kw)]
    stream = eng.stream(PROMPT, **kw)
    head = [next(stream).token_id for _ in range(7)]
    eng.generate(OTHER, max_new_tokens=5, do_sample=True, seed=3)
    assert head + [c.token_id for c in stream] == alone


def _leave_stream_by_exception(eng):
    s = eng.stream(PROMPT, max_new_tokens=30)
    for _ in s:
        raise ValueError("caller failed mid-stream")


def test_a_stream_left_by_an_exception_that_is_kept_does_not_lock_the_engine(eng, want):
    try:
        _leave_stream_by_exception(eng)
    except ValueError as e:
        kept = e  # its traceback keeps the stream (and its generator) alive
    assert kept.__traceback__ is not None
    assert eng.generate(OTHER, max_new_tokens=10).token_ids == want["other"]
    assert eng.generate(PROMPT, max_new_tokens=30).token_ids == want["prompt"]


def test_a_stream_held_in_a_reference_cycle_on_another_thread_gives_way(eng, want):
    """Abandoned on another thread, in a cycle the collector has not reached: a caller waits at
    most about STREAM_IDLE_S, then runs."""
    gc.disable()
    try:

        def abandon():
            s = eng.stream(PROMPT, max_new_tokens=30)
            next(s)
            cycle: list = [s]
            cycle.append(cycle)

        t = threading.Thread(target=abandon)
        t.start()
        t.join(10)
        t0 = time.monotonic()
        assert eng.generate(OTHER, max_new_tokens=10).token_ids == want["other"]
        assert time.monotonic() - t0 < scheduler.STREAM_IDLE_S + 5
    finally:
        gc.enable()
        gc.collect()


def test_with_stream_closes_it_and_frees_the_engine(eng, want):
    with eng.stream(PROMPT, max_new_tokens=30) as s:
        next(s)
    assert s._done
    assert eng.generate(OTHER, max_new_tokens=10).token_ids == want["other"]


# ------------------------------------------------------------------------------------------------
# an interrupt while the packed mask views are extended


def test_an_interrupt_while_packed_mask_views_grow_does_not_break_later_batches(model_dir, monkeypatch):
    eng = engine.Engine(model_dir, max_length=96, max_batch=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]
    want = [r.token_ids for r in eng.generate(prompts, max_new_tokens=12)]
    st = eng._state
    st._packed.clear()
    calls = [0]
    real = st.bind.value

    def interrupted_once(v):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt  # between the view/value appends and the handle append
        return real(v)

    monkeypatch.setattr(st.bind, "value", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        eng.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in eng.generate(prompts, max_new_tokens=12)] == want
