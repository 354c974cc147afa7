"""One Engine shared by many threads: requests are serialised on the engine's lock and each gets
exactly the output it gets when run alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

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

    def recording(group, stream=False):
        sizes.append(len(group))
        return original(group, stream)

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
    assert sizes and max(sizes) == 4  # batches did form, none larger than max_batch
    assert not auto._queue


def test_auto_batch_under_threads_equals_sequential(eng, auto):
    reqs = _single_requests()
    want = [_run(eng, r) for r in reqs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: _run(auto, r), reqs))
    assert got == want


def test_auto_batch_interrupt_requeues_the_others(auto, monkeypatch):
    """The caller running a coalesced batch is interrupted: its request raises, the others run again
    from the start in a later batch and get their normal outputs."""
    reqs = [{"prompt": [1, 5 + i, 9], "max_new_tokens": 12, "stream": False} for i in range(4)]
    want = [auto.generate(r["prompt"], max_new_tokens=12).token_ids for r in reqs]
    st = auto._state
    original = st.decode_rows
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(st, "decode_rows", failing)
    it = auto.stream([1, 2, 3], max_new_tokens=40)
    next(it)
    results: dict[int, list[int] | BaseException] = {}

    def call(i):
        try:
            results[i] = auto.generate(reqs[i]["prompt"], max_new_tokens=12).token_ids
        except BaseException as e:  # the interrupted caller
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(auto._queue) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    it.close()
    for t in threads:
        t.join(60)
    interrupted = [i for i, r in results.items() if isinstance(r, KeyboardInterrupt)]
    assert len(interrupted) == 1
    for i, r in results.items():
        if i not in interrupted:
            assert r == want[i]
    assert not auto._queue
    monkeypatch.undo()
    assert auto.generate(reqs[0]["prompt"], max_new_tokens=12).token_ids == want[0]


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
