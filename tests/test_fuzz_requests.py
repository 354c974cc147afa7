"""Hostile requests: any mix of valid and invalid arguments either works or raises an EngineError
(never another exception, a hang or a crash), and the engine then answers a canonical request
exactly as before."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.testing.synthetic import SyntheticSpec, cached_model

ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.just([1, 2]),
    st.just([0.5, 2.0, None]),  # a per-row list (3 entries) for a batch
    st.just([{3: 1.0}, None, {}]),
    st.just({"a": 1}),
    st.just({5: math.nan}),
    st.just({10**9: 1.0}),
    st.just({3: 2.0}),
)
PROMPTS = st.one_of(
    st.text(max_size=40),
    st.lists(st.integers(-5, 400), max_size=70),
    st.lists(st.one_of(st.integers(0, 300), st.floats(), st.booleans(), st.none()), max_size=5),
    st.just(np.array([1, 2, 3], dtype=np.int32)),
    st.just(np.array([[1, 2]])),
    st.just(np.array([1.5, 2.0])),
    st.none(),
    st.integers(),
    st.just(b"bytes"),
)
BATCHES = st.lists(st.one_of(PROMPTS, st.lists(st.integers(0, 300), min_size=1, max_size=30)), max_size=5)
KEYS = [f.name for f in dataclasses.fields(engine.SamplingParams)] + ["stop", "bogus_knob"]


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=61), tmp_path_factory.mktemp("fuzz"))
    return engine.Engine(model_dir, max_length=64, max_batch=3)


@pytest.fixture(scope="module")
def canonical(eng):
    return eng.generate([1, 5, 9], max_new_tokens=10).token_ids


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.one_of(PROMPTS, BATCHES),
    max_new=st.one_of(
        st.none(), st.integers(-3, 80), st.floats(), st.text(max_size=2), st.lists(st.integers(-1, 70), max_size=4)
    ),
    kwargs=st.dictionaries(st.sampled_from(KEYS), ANY_VALUE, max_size=4),
    mode=st.sampled_from(["generate", "stream", "stream_batch"]),
)
def test_any_request_succeeds_or_raises_engine_error(eng, canonical, prompt, max_new, kwargs, mode):
    try:
        if mode == "stream":
            for chunk in eng.stream(prompt, max_new, **kwargs):
                assert isinstance(chunk.token_id, int)
        elif mode == "stream_batch":
            for row, chunk in eng.stream_batch(prompt, max_new, **kwargs):
                assert 0 <= row < len(prompt) and isinstance(chunk.token_id, int)
        else:
            res = eng.generate(prompt, max_new, **kwargs)
            for r in res if isinstance(res, list) else [res]:
                assert all(0 <= t < eng.spec.vocab_size for t in r.token_ids)
                assert r.finish_reason in ("eos", "length", "stop")
    except engine.EngineError as e:
        assert str(e)  # a message that says what was wrong
    assert eng.generate([1, 5, 9], max_new_tokens=10).token_ids == canonical
