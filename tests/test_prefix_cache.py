"""KV reuse across requests (engine/prefix_cache.py, StepState.prefill_from).

Every output is compared with a fresh (cold) engine's and, where one exists, with an independent
reference: stories260k's llama2.c continuations and the numpy forward pass of the synthetic
models. The invalidation cases (batches, evicted and closed streams, errors, the LongRoPE
switch) each check that nothing stale is reused.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

import engine
from engine.errors import InvalidRequestError
from engine.prefix_cache import PrefixCache
from engine.testing.reference import reference_logits
from engine.testing.synthetic import SyntheticSpec, cached_model
from tests.conftest import load_reference

TURNS = [
    "Tell me a story about a cat.",
    "What was the cat's name?",
    "And where did it live?",
    "Make it shorter.",
    "Thank you!",
]


@pytest.fixture(scope="module")
def cold(stories260k):
    return engine.Engine(stories260k)


@pytest.fixture
def warm(stories260k):
    return engine.Engine(stories260k, prefix_cache=True)


def _chat(eng: engine.Engine, cold: engine.Engine, turns: list[str], new: int = 24) -> list:
    """Five chat turns, each re-sending the whole conversation; every answer checked against the
    cold engine's for the same conversation. Returns the warm results."""
    messages: list[dict[str, str]] = []
    results = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        got = eng.chat(messages, new)
        want = cold.chat(messages, new)
        assert got.token_ids == want.token_ids
        assert want.stats.cached_prompt_tokens == 0
        results.append(got)
        messages.append({"role": "assistant", "content": got.text})
    return results


def test_chat_turns_reuse_the_conversation_and_match_a_cold_engine(warm, cold):
    res = _chat(warm, cold, TURNS)
    assert res[0].stats.cached_prompt_tokens == 0
    for prev, r in itertools.pairwise(res):
        # at least the previous prompt is reused (its answer too, up to where the text re-tokenizes alike)
        assert r.stats.cached_prompt_tokens >= prev.stats.prompt_tokens - 1
        assert r.stats.cached_prompt_tokens < r.stats.prompt_tokens


def test_reference_continuations_after_a_shared_prefix(stories260k, warm):
    for case in load_reference(stories260k):
        prompt, want = case["prompt_ids"], case["greedy_ids"]
        warm.generate([*prompt[: max(1, len(prompt) // 2)], 5, 6, 7], 4)  # leaves a partly shared prefix
        got = warm.generate(prompt, len(want))
        assert got.token_ids == want
        assert got.stats.cached_prompt_tokens == max(1, len(prompt) // 2) or len(prompt) < 3


def test_cached_count_is_the_common_prefix(warm, cold):
    a = warm.generate("Once upon a time there was a dog", 10)
    ids = a.prompt_ids + a.token_ids
    b = warm.generate([*ids, 5, 9], 12)
    assert b.stats.cached_prompt_tokens == len(ids) - 1  # the last generated token was never run
    assert b.token_ids == cold.generate([*ids, 5, 9], 12).token_ids
    # an identical prompt: all but its last position
    c = warm.generate([*ids, 5, 9], 12)
    assert c.stats.cached_prompt_tokens == len(ids) + 1
    assert c.token_ids == b.token_ids
    # a prompt that differs at once reuses nothing
    d = warm.generate([1, 77, *ids[2:]], 5)
    assert d.stats.cached_prompt_tokens == 1 and d.token_ids == cold.generate([1, 77, *ids[2:]], 5).token_ids


def test_per_request_switch(stories260k, warm, cold):
    warm.generate("Once upon a time", 8)
    off = warm.generate("Once upon a time there", 8, prefix_cache=False)
    assert off.stats.cached_prompt_tokens == 0
    plain = engine.Engine(stories260k)
    plain.generate("Once upon a time", 8)
    on = plain.generate("Once upon a time there", 8, prefix_cache=True)
    assert on.stats.cached_prompt_tokens > 0
    assert on.token_ids == cold.generate("Once upon a time there", 8).token_ids
    with pytest.raises(InvalidRequestError, match="prefix_cache must be"):
        plain.generate("x", 2, prefix_cache="yes")


def test_with_speculation(stories260k, cold):
    eng = engine.Engine(stories260k, prefix_cache=True, speculation="prompt_lookup")
    res = _chat(eng, cold, TURNS[:3], new=40)
    assert res[-1].stats.cached_prompt_tokens > 0


# ------------------------------------------------------------------------------------------------
# invalidation


def test_batch_in_between_invalidates(stories260k, cold):
    eng = engine.Engine(stories260k, prefix_cache=True, max_batch=2)
    eng.generate("Once upon a time", 8)
    eng.generate(["The dog ran", "A bird sang in the tree"], 8)  # rows 0 and 1 rewritten
    got = eng.generate("Once upon a time there", 8)
    # row 0 holds the batch's "The dog ran" now (per-row records): only the BOS they share is reused
    assert got.stats.cached_prompt_tokens == 1
    assert got.token_ids == cold.generate("Once upon a time there", 8).token_ids


def test_closed_stream_and_error_leave_nothing_stale(warm, cold):
    warm.generate("Once upon a time", 8)
    with warm.stream("The dog ran to the park and", 30) as s:
        next(s)
        next(s)  # closed midway: its request never stored what row 0 holds
    got = warm.generate("Once upon a time there", 8)
    assert got.stats.cached_prompt_tokens == 0
    assert got.token_ids == cold.generate("Once upon a time there", 8).token_ids
    with pytest.raises(InvalidRequestError):
        warm.generate("Once upon a time there", 8, temperature=-1.0)  # refused before any state is touched
    again = warm.generate("Once upon a time there was", 8)
    assert again.stats.cached_prompt_tokens > 0
    assert again.token_ids == cold.generate("Once upon a time there was", 8).token_ids


def test_failure_mid_request_invalidates(warm, cold, monkeypatch):
    warm.generate("Once upon a time", 8)
    st = warm._state

    def broken():
        raise RuntimeError("step failed")

    monkeypatch.setattr(st, "decode_one_token", broken)
    with pytest.raises(RuntimeError):
        warm.generate("Once upon a time there", 8)
    monkeypatch.undo()
    got = warm.generate("Once upon a time there", 8)
    assert got.stats.cached_prompt_tokens == 0
    assert got.token_ids == cold.generate("Once upon a time there", 8).token_ids


def test_evicted_stream_resumes_and_the_next_request_is_cold(warm, cold):
    warm.generate("Once upon a time", 8)
    s = warm.stream("The dog ran to the park and", 20)
    first = [next(s).token_id for _ in range(3)]
    mid = warm.generate("Once upon a time there", 8)  # this thread's call evicts the suspended stream
    assert mid.token_ids == cold.generate("Once upon a time there", 8).token_ids
    rest = [c.token_id for c in s]
    assert first + rest == cold.generate("The dog ran to the park and", 20).token_ids
    after = warm.generate("Once upon a time there", 8)
    assert after.token_ids == mid.token_ids  # the resumed stream rewrote row 0 and stored its own ids
    assert after.stats.cached_prompt_tokens <= 1


def test_longrope_switch_is_not_crossed(stories260k, monkeypatch):
    """Keys cached with one set of LongRoPE factors never serve a prompt run with the other."""
    eng = engine.Engine(stories260k, prefix_cache=True)
    ref = engine.Engine(stories260k)
    prompt = ref._requests.prompt_ids("Once upon a time there was a little dog").tolist()
    switch = len(prompt) + 5
    for e in (eng, ref):
        monkeypatch.setattr(e, "spec", dataclasses.replace(e.spec, rope_switch_length=switch))
    long = eng.generate(prompt, 12)  # crosses the switch: row 0 ends with long-factor keys
    short = eng.generate(prompt + long.token_ids[:2], 2)  # <= switch: must not reuse them
    assert short.stats.cached_prompt_tokens == 0
    assert short.token_ids == ref.generate(prompt + long.token_ids[:2], 2).token_ids
    eng.generate(prompt + long.token_ids, 3)  # > switch, cold (row 0 held short keys)
    longer = eng.generate(prompt + long.token_ids + [5], 3)  # > switch over a long-factor row: reused
    assert longer.stats.cached_prompt_tokens > switch
    assert longer.token_ids == ref.generate(prompt + long.token_ids + [5], 3).token_ids


def test_record_rules():
    cache = PrefixCache(16)
    assert cache.take(np.array([1, 2, 3]), None) == 0
    cache.store(np.array([1, 2, 3]), [4, 5], 4)
    assert cache.take(np.array([1, 2, 3, 4, 9]), None) == 4
    assert cache.take(np.array([1, 2, 3, 4, 9]), None) == 0  # taken: cleared until stored again
    cache.store(np.array([1, 2, 3]), [4, 5], 4)
    assert cache.take(np.array([1, 2]), None) == 1  # never the last position
    cache.store(np.array([1, 2, 3]), [4, 5], 9)  # an impossible length: nothing reusable
    assert cache.take(np.array([1, 2, 3, 4]), None) == 0
    cache.store(np.array([1, 2, 3]), [4, 5], 4)
    assert cache.take(np.array([1, 2, 3, 4, 9]), None, reuse=False) == 0


# ------------------------------------------------------------------------------------------------
# refused where the cache cannot be reused by bookkeeping


@pytest.mark.parametrize("fixture", ["tiny_llama_fp16", "tiny_gpt2"])
def test_concat_layouts_refused(request, fixture):
    model = request.getfixturevalue(fixture)
    with pytest.raises(InvalidRequestError, match="prefix_cache"):
        engine.Engine(model, prefix_cache=True)
    eng = engine.Engine(model)
    with pytest.raises(InvalidRequestError, match="prefix_cache"):
        eng.generate([1, 2, 3], 2, prefix_cache=True)
    assert eng.generate([1, 2, 3], 2).token_ids


def test_synthetic_matches_numpy_reference(tmp_path_factory):
    model = cached_model(SyntheticSpec(layout="gqa", seed=9), tmp_path_factory.mktemp("prefix"))
    eng = engine.Engine(model, max_length=128, prefix_cache=True)
    eng.eos_token_ids = frozenset()
    first = eng.generate([1, 10, 11, 12, 13, 14], 10)
    prompt = first.prompt_ids + first.token_ids + [20, 21]
    res = eng.generate(prompt, 16)
    assert res.stats.cached_prompt_tokens == 15
    logits = reference_logits(model, np.array([prompt + res.token_ids]))[0]
    assert res.token_ids == logits[len(prompt) - 1 : -1].argmax(-1).tolist()


def test_auto_batch_routes_a_lone_conversation_to_row_zero(stories260k, cold):
    """With auto_batch, a prefix-cache request alone in the queue takes the row where its
    conversation's prefix is (row 0 here): turns 2.. reuse it, exactly; a batch of other prompts
    in between rewrites the row and the conversation starts afresh (still exact)."""
    eng = engine.Engine(stories260k, max_batch=4, auto_batch=True, prefix_cache=True)
    try:
        res = _chat(eng, cold, TURNS[:3])
        assert res[0].stats.cached_prompt_tokens == 0
        assert all(r.stats.cached_prompt_tokens >= p.stats.prompt_tokens - 1 for p, r in itertools.pairwise(res))
        batch = eng.generate(["Once upon a time", "The dog"], 8)  # a batch: rows rewritten
        assert [r.token_ids for r in batch] == [r.token_ids for r in cold.generate(["Once upon a time", "The dog"], 8)]
        again = _chat(eng, cold, TURNS[:2])
        assert again[0].stats.cached_prompt_tokens == 0
        # requests without the prefix cache still open batches others may join
        plain = eng.generate("Once upon a time", 8, prefix_cache=False)
        assert plain.token_ids == cold.generate("Once upon a time", 8).token_ids
    finally:
        eng.close()


# ------------------------------------------------------------------------------------------------
# coarse activation rounding (MatMulNBits accuracy_level 4): only multi-token passes' KV is reused


@pytest.mark.slow
def test_int8_activation_model_matches_a_cold_engine_over_turns(int4_acc4):
    """On an accuracy-level-4 INT4 model a one-token step's KV differs from a prefill's by the
    int8 rounding of a ~1e-7 difference; reusing it swapped greedy tokens against a cold engine.
    Only the previous prompt is reused, and every turn still equals the cold engine's answer."""
    warm = engine.Engine(int4_acc4, max_length=512, prefix_cache=True)
    cold = engine.Engine(int4_acc4, max_length=512)
    assert warm.spec.coarse_activations is not None and "accuracy_level 4" in warm.spec.coarse_activations
    warm.eos_token_ids = cold.eos_token_ids = frozenset()
    rng = np.random.default_rng(11)
    ids: list[int] = []
    for turn in range(5):
        prev = len(ids)
        ids = ids + rng.integers(3, 4096, 12).tolist()
        got = warm.generate(ids, 32)
        want = cold.generate(ids, 32)
        assert got.token_ids == want.token_ids, f"turn {turn}"
        if turn:
            # the previous prompt is reused; the previous answer (one-token steps) is run again
            assert got.stats.cached_prompt_tokens == prev - 32
        ids = ids + got.token_ids


def test_multi_token_only_record_rules():
    rec = PrefixCache(64, multi_token_only=True)
    prompt = np.arange(10, 20, dtype=np.int64)
    rec.store(prompt, [7, 8, 9], 12)  # prompt + 2 generated positions: only the prompt is kept
    assert rec.length == 10
    longer = np.concatenate((prompt, [7, 8, 9, 5]))
    assert rec.peek(longer, None) == 10
    # the suffix pass runs at least two tokens: one new id reuses one position fewer
    assert rec.peek(np.concatenate((prompt, [7])), None) == 9
    rec.store(np.array([3], np.int64), [4, 5], 2)  # a one-token prompt ran as a one-token pass
    assert rec.length == 0
