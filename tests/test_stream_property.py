"""Through the engine: streamed chunks join to exactly the non-streamed text, for random prompts,
sampling seeds and stop strings, on real tokenizers (sentencepiece and HF byte-fallback)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine

TEXT = st.lists(
    st.sampled_from([*"abc xyz,.!\n", "é", "日本", "🙂", "  ", "Lily", "the"]), min_size=1, max_size=12
).map("".join)


@pytest.fixture(scope="module")
def engines(stories260k, tiny_llama_fp16):
    return [engine.Engine(stories260k, max_length=256), engine.Engine(tiny_llama_fp16, max_length=256)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    which=st.integers(0, 1),
    prompt=TEXT,
    seed=st.integers(0, 2**32 - 1),
    temperature=st.floats(0.5, 1.5),
    stop=st.sampled_from([None, ".", " the", "\n"]),
)
def test_stream_joins_to_generate_text(engines, which, prompt, seed, temperature, stop):
    eng = engines[which]
    kw = {"max_new_tokens": 24, "do_sample": True, "seed": seed, "temperature": temperature, "stop": stop}
    res = eng.generate(prompt, **kw)
    chunks = list(eng.stream(prompt, **kw))
    assert "".join(c.text for c in chunks) == res.text
    assert [c.token_id for c in chunks] == res.token_ids
    assert chunks[-1].finish_reason == res.finish_reason
    if stop is not None:
        assert stop not in res.text
    if res.finish_reason != "stop" and eng.tokenizer is not None:
        # without a stop, the text is the decoded continuation
        full = eng.tokenizer.decode(res.prompt_ids + res.token_ids)
        assert full.endswith(res.text)
