"""One Engine shared by many threads: requests are serialised on the engine's lock and each gets
exactly the output it gets when run alone.

Every wait here is on an event or a condition (a queue length, a flag), never on elapsed time;
tests that need an open stream to keep the engine raise ``STREAM_IDLE_S`` so that a stall of a
loaded machine cannot turn into an idle eviction."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engine
import engine.scheduler as scheduler
from engine.testing.synthetic import SyntheticSpec, cached_model

PATIENT_S = 600.0  # STREAM_IDLE_S while a test relies on a suspended stream keeping the engine


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc"))
    return engine.Engine(model_dir, max_length=96, max_batch=3)


@pytest.fixture
def patient(monkeypatch):
    """A suspended stream gives the engine to another thread only when closed (no idle eviction)."""
    monkeypatch.setattr(scheduler, "STREAM_IDLE_S", PATIENT_S)


def _until(cond: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Wait until ``cond()`` holds (a condition poll, bounded only so that a bug fails the test)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _requests() -> list[dict]:
    """8 threads x 20 requests: greedy, sampled, streamed and batched (every fifth is a batch)."""
    reqs = []
    for i in range(160):
        prompt = [1] + [(7 * i + 3 * j) % 250 + 3 for j in range(1 + i % 9)]
        kw: dict = {"max_new_tokens": 5 + i % 17}
        if i % 3 == 1:
            kw.update(do_sample=True, temperature=0.8 + (i % 4) / 10, top_p=0.9, seed=i)
        elif i % 3 == 2:
            kw.update(do_sample=True, top_k=8, repetition_penalty=1.3, seed=100 + i)
        if i % 5 == 3:  # a batch of 3 rows, sampled rows seeded per row
            prompt = [prompt, prompt[: 1 + i % 3], [2, 4, 6, 8][: 1 + i % 4]]
            if "seed" in kw:
                kw["seed"] = [i, i + 1, i + 2]
        reqs.append({"prompt": prompt, "stream": i % 4 == 0 and i % 5 != 3, **kw})
    return reqs


def _run(eng: engine.Engine, req: dict) -> list[int] | list[list[int]]:
    req = dict(req)
    stream = req.pop("stream")
    prompt = req.pop("prompt")
    if stream:
        return [c.token_id for c in eng.stream(prompt, **req)]
    res = eng.generate(prompt, **req)
    return [r.token_ids for r in res] if isinstance(res, list) else res.token_ids


def test_threads_get_the_same_outputs_as_sequential_runs(eng):
    reqs = _requests()
    want = [_run(eng, r) for r in reqs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: _run(eng, r), reqs))
    assert got == want


def test_open_stream_blocks_others_while_its_thread_advances_it_until_closed(eng, patient):
    """A stream advanced by its own thread keeps the engine between chunks: another thread's call
    waits (for as long as the stream is not idle for STREAM_IDLE_S) and runs once it is closed."""
    want = eng.generate([1, 2, 3], max_new_tokens=6).token_ids
    want_stream = eng.generate([1, 9, 9], max_new_tokens=30).token_ids
    it = eng.stream([1, 9, 9], max_new_tokens=30)
    got_stream = [next(it).token_id]  # the stream now holds a lease on the engine
    done = threading.Event()
    result: list[list[int]] = []

    def other():
        result.append(eng.generate([1, 2, 3], max_new_tokens=6).token_ids)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    assert _until(lambda: len(eng._lock._waiting) == 1)  # the other call waits for the engine
    for _ in range(5):  # the stream goes on meanwhile, undisturbed
        got_stream.append(next(it).token_id)
    assert not done.is_set()  # still waiting: the lease is neither idle nor its thread's
    assert got_stream == want_stream[:6]
    it.close()  # leaving the stream frees the engine at once
    assert done.wait(30)
    t.join()
    assert result == [want]
    assert eng._lock._lease is None


@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 3, "top_k": 20, "repetition_penalty": 1.2}])
def test_a_stream_left_idle_gives_way_and_resumes_with_the_same_tokens(eng, monkeypatch, sampling):
    """New (leases): a suspended stream idle for STREAM_IDLE_S is evicted by a waiting caller, which
    runs at once; advanced later, the stream recomputes its cache and goes on exactly as it would
    have undisturbed (a sampled row resumes its random stream)."""
    monkeypatch.setattr(scheduler, "STREAM_IDLE_S", 0.0)  # every suspended stream counts as idle
    want_other = eng.generate([1, 2, 3], max_new_tokens=6).token_ids
    want = eng.generate([1, 9, 9, 4], max_new_tokens=20, **sampling).token_ids
    it = eng.stream([1, 9, 9, 4], max_new_tokens=20, **sampling)
    got = [next(it).token_id, next(it).token_id]
    result: list[list[int]] = []
    other = threading.Thread(target=lambda: result.append(eng.generate([1, 2, 3], max_new_tokens=6).token_ids))
    other.start()
    other.join(30)
    assert not other.is_alive() and result == [want_other]
    assert eng._lock._lease is None  # the stream was evicted
    got += [c.token_id for c in it]
    assert got == want
    assert it.result is not None and it.result.token_ids == want


# ------------------------------------------------------------------------------------------------
# auto_batch: concurrent single requests coalesced into batches


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-auto"))
    return engine.Engine(model_dir, max_length=96, max_batch=4, auto_batch=True)


def _queue(e: engine.Engine) -> list:
    """The auto_batch queue of ``e`` (Tickets; ``.request`` is each one's Request)."""
    return e._batcher._queue


def _single_requests() -> list[dict]:
    return [dict(r, stream=False) for r in _requests() if isinstance(r["prompt"][0], int)]


def test_auto_batch_coalesces_waiting_requests_and_each_gets_its_own_output(eng, auto, monkeypatch, patient):
    """Requests queued while the engine is held (by an open stream) run together once it is free,
    in batches of up to max_batch, and each gets exactly what it gets alone (fp32 model)."""
    reqs = _single_requests()[:24]
    want = [_run(eng, r) for r in reqs]
    sizes: list[int] = []
    original = scheduler.generate_batch

    def recording(ctx, group, joins=None):
        yield from original(ctx, group, joins)
        sizes.append(len(group))  # after the run: the requests that joined it included

    monkeypatch.setattr(scheduler, "generate_batch", recording)
    it = auto.stream([1, 2, 3], max_new_tokens=40)
    next(it)  # the stream holds the engine: the requests below queue up
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_run, auto, r) for r in reqs]
        assert _until(lambda: len(_queue(auto)) == 8)  # every pool thread is waiting
        it.close()
        got = [f.result(timeout=60) for f in futures]
    assert got == want
    assert sizes and max(sizes) > 1  # batches did form (requests also joined running ones)
    assert sum(sizes) == len(reqs)
    assert not _queue(auto)


def test_auto_batch_under_threads_equals_sequential(eng, auto):
    reqs = _single_requests()
    want = [_run(eng, r) for r in reqs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: _run(auto, r), reqs))
    assert got == want


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` (as Ctrl-C does in the main thread)."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))
    assert n == 1


def test_auto_batch_caller_interrupted_while_waiting_is_dropped(auto, patient):
    """A caller interrupted while its request waits leaves: its request is dropped from the queue,
    and the other requests get their normal outputs."""
    prompts = [[1, 5 + i, 9] for i in range(4)]
    want = [auto.generate(p, max_new_tokens=12).token_ids for p in prompts]
    it = auto.stream([1, 2, 3], max_new_tokens=40)
    next(it)  # the engine is held: the requests below wait in the queue
    results: dict[int, object] = {}

    def call(i):
        try:
            results[i] = auto.generate(prompts[i], max_new_tokens=12).token_ids
        except BaseException as e:  # the interrupted caller
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        assert _until(lambda: len(_queue(auto)) == 4)
        _interrupt(threads[1])
        threads[1].join(30)
        assert not threads[1].is_alive()
        assert isinstance(results[1], KeyboardInterrupt)
        assert len(_queue(auto)) == 3  # its request left the queue with it
        assert all(t.request.prompt_ids[1] != 6 for t in _queue(auto))
    finally:
        it.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert [results[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert not _queue(auto)


def _two_queued_callers(auto, prompts, max_new_tokens):
    """Start one caller per prompt while a stream holds ``auto``; once both are queued the stream
    closes, so that the worker takes them as one group. Returns the threads and their outcomes."""
    it = auto.stream([1, 2, 3], max_new_tokens=40)
    next(it)
    out: dict[int, object] = {}

    def call(i):
        try:
            out[i] = auto.generate(prompts[i], max_new_tokens=max_new_tokens).token_ids
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    assert _until(lambda: len(_queue(auto)) == len(prompts))
    it.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    return out


def test_a_failed_group_reruns_its_requests_alone_and_the_worker_goes_on(auto, monkeypatch, patient):
    """Changed with the scheduler split: a group's failure no longer fails all its callers; each
    unfinished request runs again alone, so a caller gets an EngineError only when its own request
    fails alone too. Either way the worker goes on with the next requests."""
    st = auto._state
    prompts = [[1, 2, 3], [1, 4, 4, 4]]
    want = [auto.generate(p, max_new_tokens=10).token_ids for p in prompts]
    decode_rows, decode_one_token = st.decode_rows, st.decode_one_token
    calls = {"rows": 0, "one": 0}

    def rows_failing_once():
        calls["rows"] += 1
        if calls["rows"] == 3:
            raise RuntimeError("device lost")
        return decode_rows()

    # a transient failure of the batch: both callers get their own outputs from the solo reruns
    def one_counted():
        calls["one"] += 1
        return decode_one_token()

    monkeypatch.setattr(st, "decode_rows", rows_failing_once)
    monkeypatch.setattr(st, "decode_one_token", one_counted)
    out = _two_queued_callers(auto, prompts, 10)
    assert calls["rows"] == 3  # the batch failed at its third step
    assert calls["one"] == sum(len(w) - 1 for w in want)  # then both requests ran alone, to their ends
    assert [out[0], out[1]] == want

    # a failure that the solo reruns hit too: each caller gets an EngineError naming it
    def failing():
        raise RuntimeError("device lost")

    monkeypatch.setattr(st, "decode_rows", failing)
    monkeypatch.setattr(st, "decode_one_token", failing)
    out = _two_queued_callers(auto, prompts, 10)
    for i in (0, 1):
        assert isinstance(out[i], engine.EngineError) and "device lost" in str(out[i])
        assert isinstance(out[i].__cause__, RuntimeError)
    monkeypatch.undo()
    # the worker goes on
    assert [auto.generate(p, max_new_tokens=10).token_ids for p in prompts] == want
    assert not _queue(auto)


def test_auto_batch_needs_max_batch(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-bad"))
    with pytest.raises(engine.InvalidRequestError, match="max_batch >= 2"):
        engine.Engine(model_dir, auto_batch=True)
    with pytest.raises(engine.InvalidRequestError, match="auto_batch must be"):
        engine.Engine(model_dir, max_batch=2, auto_batch="yes")


@pytest.mark.parametrize("fixture", ["eng", "auto"])
def test_a_request_inside_an_open_stream_of_the_same_thread_evicts_the_stream_which_resumes(fixture, request):
    """Changed with stream leases: this used to raise InvalidRequestError ("already holds the
    engine"). A call from the thread that holds a suspended stream now evicts the stream and
    succeeds (no hang, no error); advanced afterwards, the stream recomputes its cache and its
    tokens equal an undisturbed run (greedy)."""
    e = request.getfixturevalue(fixture)
    want = e.generate([1, 2, 3], max_new_tokens=10).token_ids
    want_single = e.generate([4, 5], max_new_tokens=3).token_ids
    want_list = [r.token_ids for r in e.generate([[4, 5], [6]], max_new_tokens=3)]
    it = e.stream([1, 2, 3], max_new_tokens=10)
    first = next(it)  # this thread now holds a lease on the engine
    # (auto: the caller evicts its own stream before queueing: the worker cannot tell it is this thread)
    assert e.generate([4, 5], max_new_tokens=3).token_ids == want_single
    first_again = next(it)  # resumes, then is evicted again by the next call
    assert [r.token_ids for r in e.generate([[4, 5], [6]], max_new_tokens=3)] == want_list
    other = e.stream([4, 5], max_new_tokens=3)
    assert next(other).token_id == want_single[0]  # a second stream of this thread evicts the first
    rest = [c.token_id for c in it]  # ... which evicts the second in turn, and resumes
    assert [first.token_id, first_again.token_id, *rest] == want
    assert it.result is not None and it.result.token_ids == want
    other.close()
    assert e._batcher is None or not _queue(e)
    assert e.generate([1, 2, 3], max_new_tokens=10).token_ids == want


def test_auto_batch_call_from_the_stream_thread_evicts_without_waiting_for_idle(auto, monkeypatch, patient):
    waited: list[str] = []
    take = auto._lock._take

    def watching(mine):
        lease = take(mine)
        if lease is not None:  # someone waits for the caller's own suspended stream
            waited.append(threading.current_thread().name)
            lease.since = float("-inf")  # let it give way now: the assertion below reports the wait
        return lease

    monkeypatch.setattr(auto._lock, "_take", watching)
    it = auto.stream([1, 2, 3], max_new_tokens=10)
    next(it)
    auto.generate([4, 5], max_new_tokens=3)
    it.close()
    assert waited == []


def _block_decode_step(monkeypatch, e, step: int):
    """Make the ``step``-th decode_one_token of ``e`` (a request in the middle of its run) wait
    until the returned ``go`` event is set; ``reached`` is set when it gets there."""
    st = e._state
    original = st.decode_one_token
    count = {"n": 0}
    reached, go = threading.Event(), threading.Event()

    def gated():
        count["n"] += 1
        if count["n"] == step:
            reached.set()
            assert go.wait(60)
        return original()

    monkeypatch.setattr(st, "decode_one_token", gated)
    return reached, go


def test_close_waits_for_the_running_request_then_refuses_new_ones(tmp_path_factory, monkeypatch):
    """close() takes effect after the request running then, which keeps its result; later calls
    raise InvalidRequestError; closing again does nothing."""
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close"))
    with engine.Engine(model_dir, max_length=96) as e:
        want = e.generate([1, 2, 3], max_new_tokens=30).token_ids
        reached, go = _block_decode_step(monkeypatch, e, 5)
        out: dict = {}
        runner = threading.Thread(target=lambda: out.update(r=e.generate([1, 2, 3], max_new_tokens=30)))
        runner.start()
        assert reached.wait(30)  # the request is running (held at its 5th step)
        closer = threading.Thread(target=e.close)
        closer.start()
        assert _until(lambda: e._lock.closing)  # close() was called ...
        assert closer.is_alive() and not e._lock.closed  # ... and waits for the running request
        assert e.kv_cache_bytes > 0
        go.set()
        for t in (runner, closer):
            t.join(30)
            assert not t.is_alive()
        assert out["r"].token_ids == want  # the request that ran keeps its result
        assert e.kv_cache_bytes == 0
        with pytest.raises(engine.InvalidRequestError, match="closed"):
            e.generate([1, 2, 3], max_new_tokens=3)
        with pytest.raises(engine.InvalidRequestError, match="closed"):
            e.generate([[1, 2, 3], [4]], max_new_tokens=3)
        with pytest.raises(engine.InvalidRequestError, match="closed"):
            next(e.stream([1, 2, 3], max_new_tokens=3))
        e.close()  # again: nothing happens
    # the context manager closes at the end of the block
    with engine.Engine(model_dir, max_length=96, max_batch=2, auto_batch=True) as e2:
        assert e2.generate([1, 2, 3], max_new_tokens=30).token_ids == want
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        e2.generate([[1, 2, 3], [4]], max_new_tokens=3)
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        e2.generate([1, 2, 3], max_new_tokens=3)
    assert not _queue(e2)


# ------------------------------------------------------------------------------------------------
# auto_batch and close(): cases found by review


def test_auto_batch_callers_never_take_the_engine(auto, monkeypatch):
    """Only the worker thread holds the engine; callers wait for their own ticket and return as
    soon as their own request has run (never behind other work or a stream)."""
    entries = []
    lock = auto._lock
    run, step = lock.run, lock.step

    def counting_run(fn, **kw):
        entries.append(threading.current_thread().name)
        return run(fn, **kw)

    def counting_step(*args):
        entries.append(threading.current_thread().name)
        return step(*args)

    groups = []
    run_group = auto._batcher._run_group

    def recording(group):
        run_group(group)
        groups.append(len(group))  # after the run: the requests that joined it included

    monkeypatch.setattr(lock, "run", counting_run)
    monkeypatch.setattr(lock, "step", counting_step)
    monkeypatch.setattr(auto._batcher, "_run_group", recording)
    reqs = _single_requests()[:40]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda r: _run(auto, r), reqs))
    assert sum(groups) == len(reqs)
    assert entries and set(entries) == {"engine-auto-batch"}


def test_next_group_takes_the_oldest_and_the_later_requests_that_fit_with_it(auto):
    batcher = auto._batcher
    worker = batcher._worker
    if worker is not None:  # an earlier test's worker, about to leave: it must not take these
        worker.join(30)
        assert not worker.is_alive()

    def ticket(n, new):
        return scheduler.Ticket(auto._requests.one(list(range(3, 3 + n)), new, None, {}, text=False))

    a, b, c, d = ticket(5, 20), ticket(80, 10), ticket(7, 12), ticket(4, 92)  # max_length 96: b, d fit with nobody
    batcher._queue[:] = [a, b, c, d]
    try:
        assert batcher._next_group() == [a, c]
        assert batcher._queue == [b, d]
        assert batcher._next_group() == [b]
        assert batcher._next_group() == [d]
        assert batcher._next_group() == []
    finally:
        batcher._queue.clear()


def test_close_keeps_the_results_of_requests_that_ran(tmp_path_factory, monkeypatch, patient):
    """close() while the worker runs a group: that group's requests keep their results, the
    requests still queued end with InvalidRequestError ("closed")."""
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close2"))
    e = engine.Engine(model_dir, max_length=96, max_batch=2, auto_batch=True)
    ran: list[int] = []
    run_group = e._batcher._run_group
    first = threading.Event()

    def recording(group):
        if not first.is_set():
            first.set()
            assert _until(lambda: e._lock.closing)  # the first group runs while close() waits
        run_group(group)
        ran.extend(int(t.request.prompt_ids[1]) for t in group if t.result is not None)

    monkeypatch.setattr(e._batcher, "_run_group", recording)
    it = e.stream([1, 2, 3], max_new_tokens=20)
    next(it)
    outcome: dict[int, object] = {}

    def call(k):
        try:
            outcome[k] = e.generate([1, k, 9], max_new_tokens=6).token_ids
        except engine.InvalidRequestError as err:
            outcome[k] = err

    callers = [threading.Thread(target=call, args=(k,)) for k in (10, 11, 12, 13)]
    for t in callers:
        t.start()
    assert _until(lambda: len(_queue(e)) == 4)
    it.close()  # the worker takes the engine and its first group
    assert first.wait(30)
    closer = threading.Thread(target=e.close)
    closer.start()
    for t in [*callers, closer]:
        t.join(30)
        assert not t.is_alive()
    assert len(ran) == 2  # one group of max_batch ran; close() came before the next
    assert sorted(outcome) == [10, 11, 12, 13]
    for k, got in outcome.items():
        if k in ran:
            assert isinstance(got, list) and len(got) == 6  # a request that ran returns its result
        else:
            assert isinstance(got, engine.InvalidRequestError) and "closed" in str(got)
    assert e.kv_cache_bytes == 0


def test_two_concurrent_closes_and_a_stream_suspended_at_close(tmp_path_factory):
    """Changed with stream leases: close() no longer waits for a suspended stream (nor, from the
    stream's own thread, frees only when the stream ends): it frees at once and the stream's next
    chunk raises InvalidRequestError. Two concurrent closes raise nothing."""
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close3"))
    e = engine.Engine(model_dir, max_length=96)
    it = e.stream([1, 2, 3], max_new_tokens=20)
    next(it)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def close():
        try:
            start.wait(30)
            e.close()
        except BaseException as err:  # any error is a failure of this test
            errors.append(err)

    closers = [threading.Thread(target=close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(30)
        assert not t.is_alive()  # neither waited for the suspended stream
    assert not errors and e.kv_cache_bytes == 0
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        next(it)
    it.close()  # leaving the dead stream is fine
    # close() from the thread that holds the suspended stream (the with block): the same
    e2 = engine.Engine(model_dir, max_length=96)
    with e2:
        it2 = e2.stream([1, 2, 3], max_new_tokens=20)
        next(it2)
    assert e2.kv_cache_bytes == 0
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        e2.generate([1, 2], max_new_tokens=2)
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        next(it2)


def test_mixed_calls_from_many_threads_on_an_auto_batch_engine(eng, auto, patient):
    """Single generate (coalesced), lists, stream, stream_batch and streams left early, from 6
    threads at once: every completed call equals the same call on an engine used sequentially.
    (``patient``: a stream_batch evicted after a long stall of a loaded machine would end.)"""
    rng = np.random.default_rng(5)
    calls = []
    for i in range(60):
        prompt = [1, *rng.integers(3, 250, int(rng.integers(1, 9))).tolist()]
        kind = ["generate", "list", "stream", "stream_batch", "stream_left"][i % 5]
        calls.append((kind, prompt, int(rng.integers(2, 14)), i))

    def run(e, call):
        kind, prompt, n, i = call
        kw = {"do_sample": True, "seed": i, "top_k": 20} if i % 2 else {}
        rows = [prompt, prompt[:2], [7, 8, 9]]
        if kind == "generate":
            return e.generate(prompt, max_new_tokens=n, **kw).token_ids
        if kind == "list":
            return [r.token_ids for r in e.generate(rows, max_new_tokens=n, **kw)]
        if kind == "stream":
            return [c.token_id for c in e.stream(prompt, max_new_tokens=n, **kw)]
        if kind == "stream_batch":
            got: list[list[int]] = [[], [], []]
            for row, c in e.stream_batch(rows, max_new_tokens=n, **kw):
                got[row].append(c.token_id)
            return got
        it = e.stream(prompt, max_new_tokens=n, **kw)
        first = next(it).token_id
        it.close()
        return [first]

    want = [run(eng, c) for c in calls]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda c: run(auto, c), calls))
    assert got == want
    assert not _queue(auto)


def test_waiting_requests_join_a_running_batch(eng, auto, monkeypatch):
    """Requests that arrive while a batch runs join it between steps (on stopped rows or new ones)
    instead of waiting for it to end, and each still gets exactly its output alone."""
    st = auto._state
    leader_prompt = [1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]  # 12 tokens: later prompts up to the width fit
    later = [
        ([1, 5, 9], {"max_new_tokens": 30}),
        ([1, 2], {"max_new_tokens": 4, "logprobs": 2}),
        ([1, 3, 3, 3, 3], {"max_new_tokens": 25, "do_sample": True, "seed": 4, "top_p": 0.9}),
        ([1, 8, 8], {"max_new_tokens": 12, "stop": ["x"]}),
        ([1, 6], {"max_new_tokens": 20}),
    ]
    want_leader = eng.generate(leader_prompt, max_new_tokens=40).token_ids
    want = [eng.generate(p, **kw) for p, kw in later]
    reached = _gate_decode(monkeypatch, auto, 3, len(later))
    joins = []
    join_row = st.join_row

    def recording(row, prompt, max_steps, start=0):
        joins.append(row)
        return join_row(row, prompt, max_steps, start)

    monkeypatch.setattr(st, "join_row", recording)
    reruns = _solo_reruns(monkeypatch)
    results: dict = {}
    leader = threading.Thread(target=lambda: results.update(leader=auto.generate(leader_prompt, max_new_tokens=40)))
    leader.start()
    assert reached.wait(30)  # the leader's batch is running: the others queue up now
    threads = [
        threading.Thread(target=lambda i=i, p=p, kw=kw: results.update({i: auto.generate(p, **kw)}))
        for i, (p, kw) in enumerate(later)
    ]
    for t in threads:
        t.start()
    for t in [leader, *threads]:
        t.join(60)
        assert not t.is_alive()
    assert results["leader"].token_ids == want_leader
    for i, w in enumerate(want):
        got = results[i]
        assert (got.token_ids, got.finish_reason, got.text) == (w.token_ids, w.finish_reason, w.text)
        if w.logprobs is not None:
            np.testing.assert_allclose(got.logprobs, w.logprobs, rtol=1e-5, atol=1e-6)
    # all five joined the leader's batch: three on new rows 1-3, two on rows that had stopped
    assert sorted(joins[:3]) == [1, 2, 3] and len(joins) == 5 and set(joins[3:]) <= {1, 2, 3}
    assert not reruns  # the batch did not fail
    assert not _queue(auto)


def _solo_reruns(monkeypatch) -> list:
    """Record the requests the auto_batch worker runs alone: after a failed batch it reruns them
    one by one, which would hide the failure from a test that only compares outputs."""
    reruns: list = []
    original = scheduler.generate_single

    def recording(ctx, req):
        reruns.append(req)
        return original(ctx, req)

    monkeypatch.setattr(scheduler, "generate_single", recording)
    return reruns


def _gate_decode(monkeypatch, e, step: int, queued: int):
    """Make the step-th batched decode step of ``e`` wait until ``queued`` requests are waiting
    in the auto_batch queue (they join right after that step); returns an Event set when that
    step is reached."""
    st = e._state
    original = st.decode_rows
    count = {"n": 0}
    reached = threading.Event()

    def gated():
        count["n"] += 1
        if count["n"] == step:
            reached.set()
            assert _until(lambda: len(_queue(e)) >= queued)
        return original()

    monkeypatch.setattr(st, "decode_rows", gated)
    return reached


@pytest.mark.parametrize("joiner_new", [3, 60])
def test_a_short_or_long_joiner_that_grows_the_batch(eng, auto, monkeypatch, joiner_new):
    """Found by review: a joiner that grows the batch while another row runs longer than it left
    the mask views of the new row count too short (IndexError at a later step)."""
    st = auto._state
    st._packed.clear()  # no views cached from earlier batches
    leader_prompt, joiner = [1, *[7] * 11], [1, 5, 9]
    want = (eng.generate(leader_prompt, max_new_tokens=40).token_ids, eng.generate(joiner, max_new_tokens=joiner_new))
    reached = _gate_decode(monkeypatch, auto, 3, 1)
    joins = []
    join_row = st.join_row
    monkeypatch.setattr(st, "join_row", lambda row, *a: (joins.append(row), join_row(row, *a))[1])
    reruns = _solo_reruns(monkeypatch)
    out: dict = {}
    first = threading.Thread(target=lambda: out.update(a=auto.generate(leader_prompt, max_new_tokens=40)))
    first.start()
    assert reached.wait(30)
    second = threading.Thread(target=lambda: out.update(b=auto.generate(joiner, max_new_tokens=joiner_new)))
    second.start()
    for t in (first, second):
        t.join(60)
        assert not t.is_alive()
    assert not reruns  # the batch did not fail
    assert joins == [1]  # the joiner grew the batch to two rows
    assert out["a"].token_ids == want[0]
    assert out["b"].token_ids == want[1].token_ids


def test_a_caller_interrupted_while_its_row_runs_stops_the_row(eng, auto, monkeypatch):
    """The interrupted caller's row stops at the next step; the other rows are unaffected.

    Deterministic: the batch is held inside the decode step after the caller's row joined (its
    first token out) until the interrupt has been delivered and the caller has left."""
    st = auto._state
    a_prompt, b_prompt = [1, *[7] * 11], [1, 5, 9]
    want_a = eng.generate(a_prompt, max_new_tokens=40).token_ids
    original = st.decode_rows
    count = {"n": 0}
    reached, running, b_left = threading.Event(), threading.Event(), threading.Event()
    joined: list[int] = []
    finished_after: list[int] = []

    def gated():
        count["n"] += 1
        if count["n"] == 3:  # a's batch runs: b queues, and joins right after this step
            reached.set()
            assert _until(lambda: len(_queue(auto)) == 1)
        elif count["n"] == 4:  # b's row runs (its first token is out): hold it until b has left
            running.set()
            assert b_left.wait(60)
        elif count["n"] == 5:  # the step after b left: its row is masked
            finished_after.append(int(st.finished[joined[0]]))
        return original()

    join_row = st.join_row

    def recording(row, prompt, max_steps, start=0):
        joined.append(row)
        return join_row(row, prompt, max_steps, start)

    monkeypatch.setattr(st, "decode_rows", gated)
    monkeypatch.setattr(st, "join_row", recording)
    reruns = _solo_reruns(monkeypatch)
    out: dict = {}

    def call_b():
        try:
            out["b"] = auto.generate(b_prompt, max_new_tokens=30)
        except BaseException as e:  # the interrupted caller
            out["b"] = e

    a = threading.Thread(target=lambda: out.update(a=auto.generate(a_prompt, max_new_tokens=40)))
    a.start()
    assert reached.wait(30)
    b = threading.Thread(target=call_b)
    b.start()
    assert running.wait(30)
    assert joined == [1]  # b's request is a row of a's batch
    _interrupt(b)
    b.join(30)
    assert not b.is_alive()
    b_left.set()
    a.join(60)
    assert not a.is_alive()
    assert isinstance(out["b"], KeyboardInterrupt)
    assert finished_after == [1]  # b's row stopped at the next step (30 tokens were asked for)
    assert count["n"] == 39  # a's 40 tokens: the batch did not run on for b's row
    assert out["a"].token_ids == want_a
    assert not reruns  # the batch did not fail
    assert not _queue(auto)


def test_a_busy_auto_batch_worker_makes_way_for_other_calls_and_close(tmp_path_factory):
    """Found by review: under steady auto_batch load the worker kept the engine, so an explicit
    list, a stream and close() waited as long as requests kept coming. They now get it after the
    batch running then."""
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-busy"))
    e = engine.Engine(model_dir, max_length=96, max_batch=4, auto_batch=True)
    alone = engine.Engine(model_dir, max_length=96)
    want_batch = [r.token_ids for r in alone.generate([[1, 2], [3, 4]], max_new_tokens=8)]
    want_stream = alone.generate([1, 2, 3], max_new_tokens=8).token_ids
    stop = threading.Event()
    served = {"n": 0}
    busy = threading.Event()
    count_lock = threading.Lock()

    def client():
        while not stop.is_set():
            try:
                e.generate([5, 6, 7], max_new_tokens=30)
            except engine.InvalidRequestError:  # closed
                return
            with count_lock:
                served["n"] += 1
                if served["n"] >= 20:
                    busy.set()

    clients = [threading.Thread(target=client) for _ in range(10)]
    for t in clients:
        t.start()
    try:
        assert busy.wait(60)  # the worker is serving a steady load
        out: dict = {}
        other = threading.Thread(
            target=lambda: out.update(
                batch=[r.token_ids for r in e.generate([[1, 2], [3, 4]], max_new_tokens=8)],
                stream=[c.token_id for c in e.stream([1, 2, 3], max_new_tokens=8)],
            )
        )
        other.start()
        other.join(30)
        assert not other.is_alive()  # served while the clients kept sending requests
        assert not stop.is_set() and e._batcher._worker is not None
        assert out["batch"] == want_batch
        assert out["stream"] == want_stream
        closer = threading.Thread(target=e.close)
        closer.start()
        closer.join(30)
        assert not closer.is_alive()
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert not any(t.is_alive() for t in clients)
    assert e.kv_cache_bytes == 0
