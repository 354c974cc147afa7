"""``Engine.submit`` / ``AutoBatcher.enqueue``: the non-blocking path the HTTP server runs on
(no HTTP here, no serve extra needed). Chunks and ends arrive through callbacks on the worker
thread; a cancelled request stops at the next step; a batch that fails after some chunks went out
fails those requests instead of rerunning them (their consumers would see tokens twice)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import engine
from engine.errors import EngineError, InvalidRequestError
from engine.testing.synthetic import SyntheticSpec, cached_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cached_model(SyntheticSpec(layout="gqa", seed=54), tmp_path_factory.mktemp("submit-models"))


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> Any:
    with engine.Engine(model_dir, max_length=96) as eng:
        yield eng


class Consumer:
    """Collects one ticket's callbacks."""

    def __init__(self) -> None:
        self.chunks: list[Any] = []
        self.ended: list[Any] = []
        self.done = threading.Event()

    def on_chunk(self, chunk: Any) -> None:
        self.chunks.append(chunk)

    def on_done(self, ticket: Any) -> None:
        self.ended.append(ticket)
        self.done.set()


def test_submit_streams_chunks_and_ends_once(model_dir: Path, ref: Any) -> None:
    prompts = ["alpha", "beta gamma", [5, 6, 7]]
    with engine.Engine(model_dir, max_length=96, max_batch=3, auto_batch=True) as eng:
        consumers = [Consumer() for _ in prompts]
        tickets = [
            eng.submit(p, 20, on_chunk=c.on_chunk, on_done=c.on_done) for p, c in zip(prompts, consumers, strict=True)
        ]
        plain = Consumer()
        quiet = eng.submit("alpha", 20, on_done=plain.on_done)  # no chunk callback: no text per token
        for c in [*consumers, plain]:
            assert c.done.wait(30)
        for p, c, t in zip(prompts, consumers, tickets, strict=True):
            want = ref.generate(p, 20)
            assert c.ended == [t] and t.error is None
            assert [ch.token_id for ch in c.chunks] == want.token_ids == t.result.token_ids
            assert "".join(ch.text for ch in c.chunks) == want.text
            assert c.chunks[-1].finish_reason == want.finish_reason
        assert plain.ended == [quiet] and quiet.result.token_ids == ref.generate("alpha", 20).token_ids
        with pytest.raises(InvalidRequestError):
            eng.submit("x", 10_000)
        with pytest.raises(InvalidRequestError):
            eng.submit(["a", "b"], 5)
    with engine.Engine(model_dir, max_length=96) as plain_engine, pytest.raises(InvalidRequestError):
        plain_engine.submit("x", 5)


def test_cancel_stops_the_row_and_others_run_on(model_dir: Path, ref: Any) -> None:
    with engine.Engine(model_dir, max_length=96, max_batch=2, auto_batch=True) as eng:
        state = eng._state
        step = state.decode_rows

        def slow() -> Any:
            time.sleep(0.003)
            return step()

        state.decode_rows = slow
        gone, stay = Consumer(), Consumer()
        t_gone = eng.submit([9, 10, 11], 80, on_chunk=gone.on_chunk, on_done=gone.on_done)
        eng.submit([9, 12], 60, on_chunk=stay.on_chunk, on_done=stay.on_done)
        while len(gone.chunks) < 3:
            time.sleep(0.001)
        t_gone.request.cancel()
        assert stay.done.wait(30)
        n = len(gone.chunks)
        time.sleep(0.05)
        assert len(gone.chunks) == n < 80 and not gone.done.is_set()  # stopped, no result
        assert [c.token_id for c in stay.chunks] == ref.generate([9, 12], 60).token_ids


def test_a_failed_batch_fails_streamed_requests_and_reruns_quiet_ones(model_dir: Path, ref: Any) -> None:
    with engine.Engine(model_dir, max_length=96, max_batch=3, auto_batch=True) as eng:
        state = eng._state
        step = state.decode_rows
        calls = {"n": 0}

        def failing() -> Any:
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("injected step failure")
            return step()

        state.decode_rows = failing
        streamed, quiet = Consumer(), Consumer()
        gate = threading.Event()
        orig_run_group = eng._batcher._run_group

        def run_group(group: Any) -> None:  # both requests in one group
            gate.wait(10)
            orig_run_group(group)

        eng._batcher._run_group = run_group
        t1 = eng.submit([7, 8], 20, on_chunk=streamed.on_chunk, on_done=streamed.on_done)
        t2 = eng.submit([7, 9], 20, on_done=quiet.on_done)
        gate.set()
        assert streamed.done.wait(30) and quiet.done.wait(30)
        assert isinstance(t1.error, EngineError) and "injected step failure" in str(t1.error)
        assert streamed.chunks and t1.result is None
        assert t2.error is None and t2.result.token_ids == ref.generate([7, 9], 20).token_ids
