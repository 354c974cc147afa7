"""One Engine shared by many threads: requests are serialised on the engine's lock and each gets
exactly the output it gets when run alone."""

from __future__ import annotations

import ctypes
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import engine
from engine.testing.synthetic import SyntheticSpec, cached_model


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc"))
    return engine.Engine(model_dir, max_length=96, max_batch=3)


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


def test_open_stream_blocks_others_until_closed(eng):
    want = eng.generate([1, 2, 3], max_new_tokens=6).token_ids
    it = eng.stream([1, 9, 9], max_new_tokens=30)
    next(it)  # the stream now holds the engine
    done = threading.Event()
    result: list[list[int]] = []

    def other():
        result.append(eng.generate([1, 2, 3], max_new_tokens=6).token_ids)
        done.set()

    t = threading.Thread(target=other)
    t.start()
    assert not done.wait(0.3)  # waiting for the stream
    it.close()  # leaving the stream frees the engine at once
    assert done.wait(10)
    t.join()
    assert result == [want]


# ------------------------------------------------------------------------------------------------
# auto_batch: concurrent single requests coalesced into batches


@pytest.fixture(scope="module")
def auto(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-auto"))
    return engine.Engine(model_dir, max_length=96, max_batch=4, auto_batch=True)


def _single_requests() -> list[dict]:
    return [dict(r, stream=False) for r in _requests() if isinstance(r["prompt"][0], int)]


def test_auto_batch_coalesces_waiting_requests_and_each_gets_its_own_output(eng, auto, monkeypatch):
    """Requests queued while the engine is held (by an open stream) run together once it is free,
    in batches of up to max_batch, and each gets exactly what it gets alone (fp32 model)."""
    reqs = _single_requests()[:24]
    want = [_run(eng, r) for r in reqs]
    sizes: list[int] = []
    original = auto._batch_steps

    def recording(group, stream=False, joining=False):
        yield from original(group, stream, joining)
        sizes.append(len(group))  # after the run: the requests that joined it included

    monkeypatch.setattr(auto, "_batch_steps", recording)
    it = auto.stream([1, 2, 3], max_new_tokens=40)
    next(it)  # the stream holds the engine: the requests below queue up
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(_run, auto, r) for r in reqs]
        deadline = time.monotonic() + 10
        while len(auto._queue) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(auto._queue) == 8  # every worker is waiting
        it.close()
        got = [f.result(timeout=60) for f in futures]
    assert got == want
    assert sizes and max(sizes) > 1  # batches did form (requests also joined running ones)
    assert not auto._queue


def test_auto_batch_under_threads_equals_sequential(eng, auto):
    reqs = _single_requests()
    want = [_run(eng, r) for r in reqs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: _run(auto, r), reqs))
    assert got == want


def _interrupt(thread: threading.Thread) -> None:
    """Raise KeyboardInterrupt in ``thread`` (as Ctrl-C does in the main thread)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt))


def test_auto_batch_caller_interrupted_while_waiting_is_dropped(auto, monkeypatch):
    """A caller interrupted while its request waits (or runs) leaves: its request is dropped or its
    row stopped, and the other requests get their normal outputs."""
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
        deadline = time.monotonic() + 10
        while len(auto._queue) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        _interrupt(threads[1])
        threads[1].join(10)
        assert isinstance(results[1], KeyboardInterrupt)
        assert len(auto._queue) == 3  # its request left the queue with it
    finally:
        it.close()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert [results[i] for i in (0, 2, 3)] == [want[i] for i in (0, 2, 3)]
    assert not auto._queue


def test_a_failed_group_gives_its_callers_an_engine_error_and_the_worker_goes_on(auto, monkeypatch):
    st = auto._state
    original = st.decode_rows
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return original()

    monkeypatch.setattr(st, "decode_rows", failing_once)
    with pytest.raises(engine.EngineError, match="device lost"):
        auto.generate([1, 2, 3], max_new_tokens=10)
    monkeypatch.undo()
    again = auto.generate([1, 2, 3], max_new_tokens=10).token_ids
    assert again == auto.generate([1, 2, 3], max_new_tokens=10).token_ids


def test_auto_batch_needs_max_batch(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-bad"))
    with pytest.raises(engine.InvalidRequestError, match="max_batch >= 2"):
        engine.Engine(model_dir, auto_batch=True)
    with pytest.raises(engine.InvalidRequestError, match="auto_batch must be"):
        engine.Engine(model_dir, max_batch=2, auto_batch="yes")


@pytest.mark.parametrize("fixture", ["eng", "auto"])
def test_a_request_inside_an_open_stream_of_the_same_thread_raises_instead_of_hanging(fixture, request):
    e = request.getfixturevalue(fixture)
    want = e.generate([1, 2, 3], max_new_tokens=10).token_ids
    it = e.stream([1, 2, 3], max_new_tokens=10)
    first = next(it)  # this thread now holds the engine
    with pytest.raises(engine.InvalidRequestError, match="already holds the engine"):
        e.generate([4, 5], max_new_tokens=3)
    with pytest.raises(engine.InvalidRequestError, match="already holds the engine"):
        e.generate([[4, 5], [6]], max_new_tokens=3)
    with pytest.raises(engine.InvalidRequestError, match="already holds the engine"):
        next(e.stream([4, 5], max_new_tokens=3))
    assert [first.token_id] + [c.token_id for c in it] == want  # the open stream was not disturbed
    assert not e._queue
    assert e.generate([1, 2, 3], max_new_tokens=10).token_ids == want


def test_close_waits_for_the_running_request_then_refuses_new_ones(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close"))
    with engine.Engine(model_dir, max_length=96) as e:
        want = e.generate([1, 2, 3], max_new_tokens=30).token_ids
        it = e.stream([1, 2, 3], max_new_tokens=30)
        first = next(it)  # a running request
        closer = threading.Thread(target=e.close)
        closer.start()
        closer.join(0.3)
        assert closer.is_alive()  # close() waits for the stream
        assert [first.token_id] + [c.token_id for c in it] == want
        closer.join(10)
        assert not closer.is_alive()
        assert e.kv_cache_bytes == 0
        with pytest.raises(engine.InvalidRequestError, match="closed"):
            e.generate([1, 2, 3], max_new_tokens=3)
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
    assert not e2._queue


# ------------------------------------------------------------------------------------------------
# auto_batch and close(): cases found by review


def test_auto_batch_callers_never_take_the_engine(auto, monkeypatch):
    """Only the worker thread holds the engine; callers wait on a condition and return as soon as
    their own request has run (never behind other work or a stream)."""
    entries = []
    original = auto._engine

    def counting():
        entries.append(threading.current_thread().name)
        return original()

    groups = []
    run_group = auto._run_group

    def recording(group):
        run_group(group)
        groups.append(len(group))  # after the run: the requests that joined it included

    monkeypatch.setattr(auto, "_engine", counting)
    monkeypatch.setattr(auto, "_run_group", recording)
    reqs = _single_requests()[:40]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda r: _run(auto, r), reqs))
    assert sum(groups) == len(reqs)
    assert entries and set(entries) == {"engine-auto-batch"}


def test_next_group_takes_the_oldest_and_the_later_requests_that_fit_with_it(auto):
    def req(n, new):
        return auto._prepare(list(range(3, 3 + n)), new, None, {}, False)

    a, b, c, d = req(5, 20), req(80, 10), req(7, 12), req(4, 92)  # max_length 96: b, d fit with nobody
    auto._queue[:] = [a, b, c, d]
    try:
        assert auto._next_group() == [a, c]
        assert auto._queue == [b, d]
        assert auto._next_group() == [b]
        assert auto._next_group() == [d]
        assert auto._next_group() == []
    finally:
        auto._queue.clear()


def test_close_keeps_the_results_of_requests_that_ran(tmp_path_factory, monkeypatch):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close2"))
    e = engine.Engine(model_dir, max_length=96, max_batch=2, auto_batch=True)
    ran: list[int] = []
    run_group = e._run_group

    def recording(group):
        run_group(group)
        ran.extend(r.prompt_ids[1] for r in group if r.result is not None)

    monkeypatch.setattr(e, "_run_group", recording)
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
    deadline = time.monotonic() + 10
    while len(e._queue) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    closer = threading.Thread(target=e.close)
    closer.start()
    it.close()
    for t in [*callers, closer]:
        t.join(30)
        assert not t.is_alive()
    for k, got in outcome.items():
        if k in ran:
            assert isinstance(got, list) and len(got) == 6  # a request that ran returns its result
        else:
            assert isinstance(got, engine.InvalidRequestError) and "closed" in str(got)


def test_two_concurrent_closes_and_close_from_the_stream_thread(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-close3"))
    e = engine.Engine(model_dir, max_length=96)
    it = e.stream([1, 2, 3], max_new_tokens=20)
    next(it)
    errors: list[BaseException] = []

    def close():
        try:
            e.close()
        except BaseException as err:  # any error is a failure of this test
            errors.append(err)

    closers = [threading.Thread(target=close) for _ in range(2)]
    for t in closers:
        t.start()
    it.close()
    for t in closers:
        t.join(10)
    assert not errors and e.kv_cache_bytes == 0
    # close() from the thread that holds an open stream: refused at once, freed when the stream ends
    e2 = engine.Engine(model_dir, max_length=96)
    with e2:
        it2 = e2.stream([1, 2, 3], max_new_tokens=20)
        next(it2)
    with pytest.raises(engine.InvalidRequestError, match="closed"):
        e2.generate([1, 2], max_new_tokens=2)
    assert e2.kv_cache_bytes > 0  # the stream still runs on the buffers
    assert len(list(it2)) == 19
    assert e2.kv_cache_bytes == 0


def test_mixed_calls_from_many_threads_on_an_auto_batch_engine(eng, auto):
    """Single generate (coalesced), lists, stream, stream_batch and streams left early, from 6
    threads at once: every completed call equals the same call on an engine used sequentially."""
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
    assert not auto._queue


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
    original = st.decode_rows
    steps = {"n": 0}

    def gated():
        steps["n"] += 1
        if steps["n"] == 3:  # the leader's batch is running: let the others queue up now
            gate.set()
            deadline = time.monotonic() + 10
            while len(auto._queue) < len(later) and time.monotonic() < deadline:
                time.sleep(0.005)
        return original()

    joins = []
    join_row = st.join_row

    def recording(row, prompt, max_steps):
        joins.append(row)
        return join_row(row, prompt, max_steps)

    gate = threading.Event()
    monkeypatch.setattr(st, "decode_rows", gated)
    monkeypatch.setattr(st, "join_row", recording)
    results: dict = {}
    leader = threading.Thread(target=lambda: results.update(leader=auto.generate(leader_prompt, max_new_tokens=40)))
    leader.start()
    assert gate.wait(10)
    threads = [
        threading.Thread(target=lambda i=i, p=p, kw=kw: results.update({i: auto.generate(p, **kw)}))
        for i, (p, kw) in enumerate(later)
    ]
    for t in threads:
        t.start()
    for t in [leader, *threads]:
        t.join(30)
        assert not t.is_alive()
    assert results["leader"].token_ids == want_leader
    for i, w in enumerate(want):
        got = results[i]
        assert (got.token_ids, got.finish_reason, got.text) == (w.token_ids, w.finish_reason, w.text)
        if w.logprobs is not None:
            np.testing.assert_allclose(got.logprobs, w.logprobs, rtol=1e-5, atol=1e-6)
    # all five joined the leader's batch: three on new rows 1-3, two on rows that had stopped
    assert sorted(joins[:3]) == [1, 2, 3] and len(joins) == 5 and set(joins[3:]) <= {1, 2, 3}
    assert not auto._queue


def _gate_decode(monkeypatch, e, step: int, queued: int):
    """Make the step-th decode step of ``e`` wait until ``queued`` requests are waiting; returns
    an Event set when that step is reached."""
    st = e._state
    original = st.decode_rows
    count = {"n": 0}
    reached = threading.Event()

    def gated():
        count["n"] += 1
        if count["n"] == step:
            reached.set()
            deadline = time.monotonic() + 10
            while len(e._queue) < queued and time.monotonic() < deadline:
                time.sleep(0.005)
        return original()

    monkeypatch.setattr(st, "decode_rows", gated)
    return reached


@pytest.mark.parametrize("joiner_new", [3, 60])
def test_a_short_or_long_joiner_that_grows_the_batch(eng, auto, monkeypatch, joiner_new):
    """Found by review: a joiner that grows the batch while another row runs longer than it left
    the mask views of the new row count too short (IndexError at a later step)."""
    auto._state._packed.clear()  # no views cached from earlier batches
    leader_prompt, joiner = [1, *[7] * 11], [1, 5, 9]
    want = (eng.generate(leader_prompt, max_new_tokens=40).token_ids, eng.generate(joiner, max_new_tokens=joiner_new))
    reached = _gate_decode(monkeypatch, auto, 3, 1)
    out: dict = {}
    first = threading.Thread(target=lambda: out.update(a=auto.generate(leader_prompt, max_new_tokens=40)))
    first.start()
    assert reached.wait(10)
    second = threading.Thread(target=lambda: out.update(b=auto.generate(joiner, max_new_tokens=joiner_new)))
    second.start()
    for t in (first, second):
        t.join(30)
        assert not t.is_alive()
    assert out["a"].token_ids == want[0]
    assert out["b"].token_ids == want[1].token_ids


def test_a_caller_interrupted_while_its_row_runs_stops_the_row(eng, auto, monkeypatch):
    """The interrupted caller's row stops at the next step; the other rows are unaffected."""
    st = auto._state
    a_prompt, b_prompt = [1, *[7] * 11], [1, 5, 9]
    want_a = eng.generate(a_prompt, max_new_tokens=40).token_ids
    reached = _gate_decode(monkeypatch, auto, 3, 1)
    stopped = []
    original_join = st.join_row

    def join_then_note(row, prompt, max_steps):
        original_join(row, prompt, max_steps)
        stopped.append(row)

    monkeypatch.setattr(st, "join_row", join_then_note)
    out: dict = {}

    def call_b():
        try:
            out["b"] = auto.generate(b_prompt, max_new_tokens=30)
        except BaseException as e:  # the interrupted caller
            out["b"] = e

    a = threading.Thread(target=lambda: out.update(a=auto.generate(a_prompt, max_new_tokens=40)))
    a.start()
    assert reached.wait(10)
    b = threading.Thread(target=call_b)
    b.start()
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:  # b's request has joined the batch
        time.sleep(0.002)
    _interrupt(b)
    for t in (a, b):
        t.join(30)
        assert not t.is_alive()
    assert isinstance(out["b"], KeyboardInterrupt)
    assert out["a"].token_ids == want_a
    assert not auto._queue


def test_a_busy_auto_batch_worker_makes_way_for_other_calls_and_close(tmp_path_factory):
    """Found by review: under steady auto_batch load the worker kept the engine, so an explicit
    list, a stream and close() waited as long as requests kept coming. They now get it after the
    batch running then."""
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("conc-busy"))
    e = engine.Engine(model_dir, max_length=96, max_batch=4, auto_batch=True)
    alone = engine.Engine(model_dir, max_length=96)
    stop = threading.Event()

    def client():
        while not stop.is_set():
            try:
                e.generate([5, 6, 7], max_new_tokens=30)
            except engine.InvalidRequestError:  # closed
                return

    clients = [threading.Thread(target=client) for _ in range(10)]
    for t in clients:
        t.start()
    try:
        time.sleep(0.3)
        out: dict = {}
        other = threading.Thread(
            target=lambda: out.update(
                batch=[r.token_ids for r in e.generate([[1, 2], [3, 4]], max_new_tokens=8)],
                stream=[c.token_id for c in e.stream([1, 2, 3], max_new_tokens=8)],
            )
        )
        other.start()
        other.join(10)
        assert not other.is_alive()  # served while the clients kept sending requests
        assert out["batch"] == [r.token_ids for r in alone.generate([[1, 2], [3, 4]], max_new_tokens=8)]
        assert out["stream"] == alone.generate([1, 2, 3], max_new_tokens=8).token_ids
        closer = threading.Thread(target=e.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    assert not any(t.is_alive() for t in clients)
