"""pytest-benchmark microbenchmarks of one decode step (``make bench``; skipped by ``make test``).

A step is what the engine's loop does per token: ``StepState.decode_one_token()`` (bind the mask
view of the new width, ``run_with_iobinding``) and the sampler writing the next id into the bound
input buffer. The step and its two halves are timed on the tiny real model (stories260k from
../shared; skipped with the reason when absent) and the whole step on a small synthetic INT4
model built into perf/models/. Each round is one step; when the KV cache is about to fill, the
untimed setup of the next round starts the request again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .common import MODELS_DIR, STORIES, prompt_ids

PROMPT = 16


def _engine(path: Path):
    from engine import Engine

    eng = Engine(path, max_length=min(512, _context(path)))
    eng.eos_token_ids = frozenset()  # benchmark steps never end a request early
    return eng


def _context(path: Path) -> int:
    from engine.config import load_model_spec

    return load_model_spec(path).context_length


@pytest.fixture(scope="module")
def stories_engine():
    """Engine on ../shared/models/stories260k (1 thread: the engine's default for tiny models)."""
    if not (STORIES / "genai_config.json").is_file():
        pytest.skip(f"{STORIES} is absent: the real fixtures in ../shared are not beside this checkout")
    return _engine(STORIES)


@pytest.fixture(scope="module")
def synthetic_engine():
    """Engine on a small synthetic GQA INT4 model (2 layers, hidden 512, vocab 4096), built once."""
    from engine.testing.synthetic import SyntheticSpec, cached_model

    spec = SyntheticSpec(
        layout="gqa", quant="int4", layers=2, hidden=512, heads=8, kv_heads=4, head_size=64,
        intermediate=1536, vocab=4096, context_length=1024,
    )  # fmt: skip
    return _engine(cached_model(spec, MODELS_DIR))


def _restart(eng):
    """Start a request (prefill + first token) so the next steps have KV room."""
    eng.generate(prompt_ids(PROMPT, eng.spec.vocab_size), max_new_tokens=1)


def _bench(benchmark, eng, target, rounds: int) -> None:
    st = eng._state
    _restart(eng)

    def setup():
        if st.length + 2 >= eng.max_length:
            _restart(eng)

    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=50)


def test_step_stories260k(benchmark, stories_engine):
    eng = stories_engine
    st, sampler = eng._state, eng._sampler

    def step():
        sampler.sample(st.decode_one_token(), st.next_ids)

    _bench(benchmark, eng, step, rounds=3000)


def test_decode_one_token_stories260k(benchmark, stories_engine):
    """The model half of a step: mask bind + run_with_iobinding (no sampling)."""
    st = stories_engine._state
    _bench(benchmark, stories_engine, st.decode_one_token, rounds=3000)


def test_sample_stories260k(benchmark, stories_engine):
    """The sampler half of a step: greedy over the logits buffer into the bound input ids."""
    eng = stories_engine
    st, sampler = eng._state, eng._sampler
    _restart(eng)
    benchmark.pedantic(lambda: sampler.sample(st.logits_2d, st.next_ids), rounds=3000, iterations=1)


def test_step_synthetic_int4(benchmark, synthetic_engine):
    eng = synthetic_engine
    st, sampler = eng._state, eng._sampler

    def step():
        sampler.sample(st.decode_one_token(), st.next_ids)

    _bench(benchmark, eng, step, rounds=300)
