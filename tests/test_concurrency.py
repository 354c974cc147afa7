"""One Engine shared by many threads: requests are serialised on the engine's lock and each gets
exactly the output it gets when run alone."""

from __future__ import annotations

import threading
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
