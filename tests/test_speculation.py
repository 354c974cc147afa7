"""Prompt-lookup speculative decoding (engine/speculation.py, decode.generate_one_speculative).

Greedy output is compared token for token with the plain loop and with independent references
(stories260k's llama2.c continuations, the numpy forward pass of engine/testing/reference.py);
sampled output with the analytic distribution of a plain session.run (chi-square on the first
drafted position) and, seed for seed, with the plain loop. Layouts that cannot drop rejected
positions without a KV copy are refused with the package's error.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import engine
from engine import decode
from engine.config import load_model_spec
from engine.errors import EngineError, InvalidRequestError, UnsupportedModelError
from engine.graph import slice_logits_to_last_token
from engine.speculation import PromptLookupDrafter, SpeculationConfig
from engine.testing.reference import reference_logits
from engine.testing.synthetic import SyntheticSpec, build_model, cached_model, phi4_mini_spec
from tests.conftest import load_reference

STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."


# ------------------------------------------------------------------------------------------------
# the drafter alone


def _drafts(d: PromptLookupDrafter, limit: int = 8) -> list[int]:
    out = np.zeros(16, np.int64)
    k = d.propose(out, limit)
    return out[1 : 1 + k].tolist()


def test_drafter_proposes_what_followed_the_longest_match():
    d = PromptLookupDrafter(SpeculationConfig(ngram=3, max_draft=4, draft_cost=0.01))  # cheap drafts: full width
    d.start([5, 6, 7, 8, 9, 10, 1, 6, 7, 2, 3, 5, 6, 7])
    # the 3-gram (5, 6, 7) occurred at the start: the tokens after it, not after the later (6, 7)
    assert _drafts(d) == [8, 9, 10, 1]
    assert _drafts(d, limit=2) == [8, 9]


def test_drafter_never_matches_the_end_of_the_text_itself():
    d = PromptLookupDrafter(SpeculationConfig())
    d.start([1, 2, 3])
    assert _drafts(d) == []  # (1, 2, 3), (2, 3), (3,) occur only at the end
    d.append(2)
    assert _drafts(d) == [3, 2]  # (2,) occurred before: what followed it, up to the end


def test_drafter_latest_occurrence_and_min_ngram():
    d = PromptLookupDrafter(SpeculationConfig(ngram=2, min_ngram=2, draft_cost=0.01))
    d.start([4, 1, 9, 4, 1, 8, 0, 4, 1])
    assert _drafts(d) == [8, 0, 4, 1]  # the latest earlier (4, 1) was followed by 8
    d.append(7)
    assert _drafts(d) == []  # (1, 7) never occurred and 1-grams are off


def test_drafter_width_follows_the_kept_rate_and_cools_down():
    cfg = SpeculationConfig(max_draft=4, max_cooldown=4, draft_cost=0.15)
    d = PromptLookupDrafter(cfg)
    assert d.best_width(0.95, 4) == 4  # drafts nearly always kept: as many as allowed
    assert d.best_width(0.6, 4) == 2
    assert d.best_width(0.05, 4) == 0  # no width pays for its pass
    assert d.best_width(0.95, 2) == 2
    d.start([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    assert _drafts(d) == [4, 5]  # the prior estimate (60% kept): two drafts
    for _ in range(3):
        d.feedback(4, 4)
    assert _drafts(d) == [4, 5, 6, 7]  # rounds that kept everything widen it
    d.feedback(4, 0)
    assert d.cooldown == 1  # the first miss: one plain step
    assert 0.6 < d.kept[3] / d.tried[3] < 0.9
    assert _drafts(d) == []
    assert len(_drafts(d)) == 4  # one miss after a run of kept drafts: still wide
    d.feedback(4, 0)
    assert d.cooldown == 2  # misses in a row: plain steps, doubling up to max_cooldown
    assert _drafts(d) == [] and _drafts(d) == []
    for _ in range(4):
        d.feedback(1, 0)
    assert d.cooldown == 4
    d.cooldown = 0
    assert _drafts(d) == [4]  # a poor estimate: one draft only, a probe
    assert (d.drafted, d.accepted) == (24, 12)


def test_drafter_width_follows_measured_pass_costs():
    """Once a plain step and a wide pass have been timed, their ratio replaces draft_cost: where a
    pass of several tokens costs much more than a step (a tiny model), drafts must be kept more
    often to pay for it."""
    d = PromptLookupDrafter(SpeculationConfig(max_draft=4, draft_cost=0.05))
    assert d.cost(2) == pytest.approx(1.10)  # nothing timed yet: the configured cost
    assert d.best_width(0.6, 4) == 4
    d.observe(1, 100e-6)
    for width, seconds in ((2, 130e-6), (3, 140e-6), (4, 150e-6), (5, 160e-6)):
        d.observe(width, seconds)
    assert d.cost(1) == pytest.approx(1.3) and d.cost(4) == pytest.approx(1.6)
    assert d.best_width(0.2, 4) == 0  # a 20 % keep rate does not pay for a 1.3x pass
    assert d.best_width(0.6, 4) >= 2
    d.observe(1, 5e-3)  # an outlier (a recomputed cache): left out
    assert d.cost(1) == pytest.approx(1.3)
    d.observe(1, 120e-6)  # ordinary samples move the mean
    assert d.pass_s[1] == pytest.approx(0.9 * 100e-6 + 0.1 * 120e-6)


def test_drafter_estimates_per_ngram_size():
    d = PromptLookupDrafter(SpeculationConfig(ngram=2, min_ngram=1))
    d.start([7, 8, 9, 7, 8, 5, 6, 8])
    assert _drafts(d) == [5, 6]  # only (8,) matches: its estimate
    assert d.last_n == 1
    for _ in range(4):
        d.feedback(2, 0)
        d.cooldown = 0
    d.append(5)
    assert _drafts(d) == [6, 8]  # (8, 5) matched: the 2-gram estimate, untouched by the 1-gram misses
    assert d.last_n == 2


def test_drafter_long_match_has_its_own_estimate():
    """A match of ``ngram`` ids that reaches further back is keyed by its length (up to ``ngram +
    LONG_MATCH``), whose estimate starts higher (the longer, the higher): wider drafts at once, and
    its misses leave the 3-gram estimate alone."""
    from engine.speculation import LONG_MATCH

    cfg = SpeculationConfig(ngram=3, max_draft=8)
    d = PromptLookupDrafter(cfg)
    story = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
    d.start([*story, 30, 31, 40, 13, 14, 15])  # (13, 14, 15) matches, and 12 before it does not
    short = _drafts(d)
    assert d.last_n == 3 and short == [16, 17]  # the 3-gram prior (60 % kept): two drafts
    d.start([*story, 30, 11, 12, 13, 14, 15])  # (11 .. 15) matches: five ids
    long = _drafts(d)
    assert d.last_n == 5 and long == story[5 : 5 + len(long)] and len(long) > len(short)
    d.start([*story, 30, *story[:9]])  # nine ids match: counted up to ngram + LONG_MATCH
    longest = _drafts(d)
    assert d.last_n == 3 + LONG_MATCH and len(longest) >= len(long)
    assert longest == [20, 21, 22, 30, 11, 12, 13, 14][: len(longest)]
    tried3 = d.tried[3]
    d.feedback(3, 0)
    assert d.tried[3] == tried3 and d.tried[3 + LONG_MATCH] > 1.0


def test_drafter_pass_costs_are_robust_to_noisy_means():
    """One line is fitted over every timed width, so a width timed on a busy moment does not get a
    cost of its own out of line with the others; a slow sample counts as at most twice the mean;
    the round's host time beyond its pass is added to every width."""
    d = PromptLookupDrafter(SpeculationConfig(max_draft=4))
    d.observe(1, 100e-6)
    for width, seconds in ((2, 120e-6), (3, 190e-6), (4, 140e-6), (5, 160e-6)):
        d.observe(width, seconds)
    costs = d.costs(4)
    assert costs[2] < 1.6  # 1.9 measured, in line with 1.2, 1.4, 1.6 around it
    assert costs == sorted(costs) and costs[0] == 1.0
    assert costs[4] == pytest.approx(costs[1] + 3 * (costs[2] - costs[1]))  # a line
    d.observe_round(20e-6)
    assert d.cost(1) == pytest.approx(costs[1] + 0.2)  # 20 us of host time per round: 0.2 steps
    d.observe(1, 350e-6)  # between 2x and 4x the mean: counts as 200 us
    assert d.pass_s[1] == pytest.approx(0.9 * 100e-6 + 0.1 * 200e-6)


def test_drafter_cost_table_refreshes_every_16_timed_passes():
    """The widths are chosen from a cost table rebuilt when a width is first timed and after every
    16 timed passes, not at every round."""
    from engine.speculation import _REFRESH

    d = PromptLookupDrafter(SpeculationConfig(max_draft=1))
    d.observe(1, 100e-6)
    d.observe(2, 110e-6)
    assert d.best_width(0.3, 1) == 1  # a cheap pass: even a 30 % keep rate pays
    for _ in range(_REFRESH - 1):
        d.observe(2, 199e-6)  # the 2-token pass turns dear (each sample under twice the mean)
    assert d.cost(1) > 1.5  # (the means themselves move at once)
    assert d.best_width(0.3, 1) == 1  # the table is not rebuilt yet
    d.observe(2, 199e-6)
    assert d.best_width(0.3, 1) == 0  # rebuilt from the new means


def test_wide_drafts_greedy_equals_plain(stories260k, plain, grounded):
    """Verify passes of up to 17 tokens (max_draft 16) keep greedy output the plain engine's."""
    eng = engine.Engine(stories260k, speculation="prompt_lookup", speculation_options={"max_draft": 16})
    want = plain.generate(grounded, 100)
    got = eng.generate(grounded, 100)
    assert got.token_ids == want.token_ids
    assert got.stats.accepted_tokens > 20
    assert got.stats.drafted_tokens > got.stats.accepted_tokens  # rejections exercised too


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ngram": 0},
        {"max_draft": 0},
        {"max_draft": 99},
        {"ngram": 2, "min_ngram": 3},
        {"max_cooldown": -1},
        {"draft_cost": 0},
        {"draft_cost": "1"},
    ],
)
def test_config_out_of_range_is_refused(kwargs):
    with pytest.raises(InvalidRequestError):
        SpeculationConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# stories260k (real model, GQA share buffer)


@pytest.fixture(scope="module")
def plain(stories260k):
    return engine.Engine(stories260k)


@pytest.fixture(scope="module")
def spec_eng(stories260k):
    return engine.Engine(stories260k, speculation="prompt_lookup")


@pytest.fixture(scope="module")
def grounded(plain) -> list[int]:
    """A prompt the output copies from: the model's own continuation fed back after the story."""
    cont = plain.generate(STORY, 60).text
    return plain._requests.prompt_ids(STORY + cont + " " + STORY).tolist()


def test_greedy_equals_llama2c_reference(stories260k, spec_eng):
    for case in load_reference(stories260k):
        res = spec_eng.generate(case["prompt_ids"], len(case["greedy_ids"]))
        assert res.token_ids == case["greedy_ids"]


def test_greedy_equals_plain_on_grounded_prompt_and_drafts_are_kept(plain, spec_eng, grounded):
    want = plain.generate(grounded, 120)
    got = spec_eng.generate(grounded, 120)
    assert got.token_ids == want.token_ids
    assert got.text == want.text and got.finish_reason == want.finish_reason
    assert got.stats.accepted_tokens > 20  # the grounded prompt really exercises kept drafts
    assert got.stats.drafted_tokens >= got.stats.accepted_tokens
    assert want.stats.drafted_tokens == 0


def test_text_that_copies_nothing_stops_drafting_and_stays_exact(plain, spec_eng):
    """Open-ended text whose drafts keep failing: after GIVE_UP_MISSES rounds with nothing kept the
    request takes plain steps (few drafts in all), and the tokens are the plain engine's."""
    from engine.speculation import GIVE_UP_MISSES

    prompt = plain._requests.prompt_ids("The sun was hot and the ").tolist()
    want = plain.generate(prompt, 200)
    got = spec_eng.generate(prompt, 200)
    assert got.token_ids == want.token_ids
    assert got.stats.accepted_tokens == 0  # this prompt's drafts all fail (checked: stories260k)
    assert spec_eng._ctx.drafter.exhausted
    assert got.stats.drafted_tokens <= GIVE_UP_MISSES * SpeculationConfig().max_draft


def test_drafter_gives_up_only_when_nothing_was_kept():
    from engine.speculation import GIVE_UP_MISSES

    d = PromptLookupDrafter(SpeculationConfig())
    d.start([1, 2, 3])
    for _ in range(GIVE_UP_MISSES - 1):
        d.feedback(1, 0)
    assert not d.exhausted
    d.feedback(1, 0)
    assert d.exhausted  # GIVE_UP_MISSES rounds in a row, nothing kept in the request
    d.start([1, 2, 3])
    d.feedback(2, 1)
    for _ in range(GIVE_UP_MISSES + 2):
        d.feedback(1, 0)
    assert not d.exhausted  # drafts were kept earlier: it keeps probing (with cooldowns)


def test_per_request_switch(plain, spec_eng, grounded):
    off = spec_eng.generate(grounded, 40, speculation=None)
    assert off.stats.drafted_tokens == 0
    assert off.token_ids == plain.generate(grounded, 40).token_ids
    with pytest.raises(InvalidRequestError, match="last_token_logits"):
        plain.generate(grounded, 4, speculation="prompt_lookup")  # its LM head runs on the last position only
    with pytest.raises(InvalidRequestError, match="prompt_lookup"):
        spec_eng.generate(grounded, 4, speculation="medusa")


def test_full_logits_engine_speculates_per_request(stories260k, plain, grounded):
    eng = engine.Engine(stories260k, last_token_logits=False)
    got = eng.generate(grounded, 80, speculation="prompt_lookup")
    assert got.stats.accepted_tokens > 0
    assert got.token_ids == plain.generate(grounded, 80).token_ids


@pytest.mark.parametrize("new", [1, 2, 3, 7, 33])
def test_max_new_tokens_exact(plain, spec_eng, grounded, new):
    got = spec_eng.generate(grounded, new)
    assert len(got.token_ids) == new
    assert got.token_ids == plain.generate(grounded, new).token_ids


def test_eos_inside_kept_drafts_ends_the_row_there(plain, spec_eng, grounded, monkeypatch):
    ref = spec_eng.generate(grounded, 120)
    # an id the speculative loop emitted from a kept draft somewhere in the middle
    eos = ref.token_ids[57]
    for eng in (plain, spec_eng):
        monkeypatch.setattr(eng._ctx, "eos", frozenset({eos}))
    want, got = plain.generate(grounded, 120), spec_eng.generate(grounded, 120)
    assert got.token_ids == want.token_ids
    assert got.finish_reason == want.finish_reason == "eos"
    assert got.token_ids[-1] == eos


def test_stop_string_and_stream_match_plain(plain, spec_eng, grounded):
    text = plain.generate(grounded, 120).text
    stop = text[70:80]
    want = plain.generate(grounded, 120, stop=stop)
    got = spec_eng.generate(grounded, 120, stop=stop)
    assert (got.text, got.finish_reason, got.token_ids) == (want.text, "stop", want.token_ids)
    with spec_eng.stream(grounded, 120) as s:
        chunks = list(s)
    assert [c.token_id for c in chunks] == plain.generate(grounded, 120).token_ids
    assert "".join(c.text for c in chunks) == text
    assert s.result is not None and s.result.stats.accepted_tokens > 0


def test_logprobs_match_plain(plain, spec_eng, grounded):
    want = plain.generate(grounded, 60, logprobs=3)
    got = spec_eng.generate(grounded, 60, logprobs=3)
    assert got.token_ids == want.token_ids and got.stats.accepted_tokens > 0
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-4)
    assert [list(t) for t in got.top_logprobs] == [list(t) for t in want.top_logprobs]


def test_sampled_seeded_same_tokens_as_plain(plain, spec_eng, grounded):
    """Each emitted token draws one number from the row's stream, as in the plain loop: a seed
    gives the same tokens with and without speculation (penalties counted the same way)."""
    kept = 0
    for seed in range(12):
        kw = {"do_sample": True, "temperature": 0.3, "seed": seed, "repetition_penalty": 1.05}
        want = plain.generate(grounded, 60, **kw)
        got = spec_eng.generate(grounded, 60, **kw)
        assert got.token_ids == want.token_ids, seed
        kept += got.stats.accepted_tokens
    assert kept > 0


@pytest.mark.parametrize("split", [3, 17, 18, 19, 20, 21])
def test_evicted_stream_resumes_exactly(plain, spec_eng, grounded, split):
    """A speculative stream left suspended (after a plain token or a kept draft) and evicted by
    another request on the same thread resumes with the tokens it gets alone, drafting again."""
    want = plain.generate(grounded, 80).token_ids
    s = spec_eng.stream(grounded, 80)
    first = [next(s).token_id for _ in range(split)]
    other = spec_eng.generate(STORY, 30)  # this thread's call evicts the suspended stream
    assert other.token_ids == plain.generate(STORY, 30).token_ids
    rest = [c.token_id for c in s]
    assert first + rest == want
    assert s.result is not None and s.result.stats.accepted_tokens > split // 4


def test_longrope_switch_is_not_crossed_by_a_verify_pass(spec_eng, plain, grounded, monkeypatch):
    import dataclasses

    switch = len(grounded) + 9
    calls: list[tuple[str, int]] = []
    st = spec_eng._state
    prefill, decode_tokens = st.prefill, st.decode_tokens

    def counting_prefill(ids):
        calls.append(("prefill", ids.shape[1]))
        return prefill(ids)

    def counting_verify(n):
        assert st.length + n <= switch or st.length > switch, "a verify pass crosses the switch"
        calls.append(("verify", n))
        return decode_tokens(n)

    for eng in (spec_eng, plain):
        monkeypatch.setattr(eng, "spec", dataclasses.replace(eng.spec, rope_switch_length=switch))
    monkeypatch.setattr(st, "prefill", counting_prefill)
    monkeypatch.setattr(st, "decode_tokens", counting_verify)
    got = spec_eng.generate(grounded, 60)
    assert ("prefill", switch + 1) in calls  # the cache was recomputed at the switch
    assert any(c[0] == "verify" for c in calls)
    assert got.token_ids == plain.generate(grounded, 60).token_ids


def test_batches_take_plain_steps(stories260k, grounded):
    eng = engine.Engine(stories260k, speculation="prompt_lookup", max_batch=2)
    alone = engine.Engine(stories260k)
    res = eng.generate([grounded, grounded[:50]], 30)
    assert all(r.stats.drafted_tokens == 0 for r in res)
    assert [r.token_ids for r in res] == [alone.generate(p, 30).token_ids for p in (grounded, grounded[:50])]
    single = eng.generate(grounded, 30)
    assert single.stats.drafted_tokens > 0  # a single request on the same engine still speculates


def test_engine_keeps_answering_after_bad_request(spec_eng, grounded):
    with pytest.raises(InvalidRequestError):
        spec_eng.generate(grounded, 10, speculation=3)
    assert spec_eng.generate(grounded, 10).token_ids


# ------------------------------------------------------------------------------------------------
# layouts that cannot drop rejected positions


@pytest.mark.parametrize("fixture", ["tiny_llama_fp16", "tiny_gpt2"])
def test_concat_fixtures_refused(request, fixture):
    model = request.getfixturevalue(fixture)
    with pytest.raises(InvalidRequestError, match="share-buffer GroupQueryAttention"):
        engine.Engine(model, speculation="prompt_lookup")
    eng = engine.Engine(model, last_token_logits=False)
    with pytest.raises(InvalidRequestError, match="share-buffer GroupQueryAttention"):
        eng.generate([1, 2, 3], 4, speculation="prompt_lookup")
    assert eng.generate([1, 2, 3], 4).token_ids  # still answering


def test_synthetic_concat_refused(tmp_path_factory):
    model = cached_model(SyntheticSpec(layout="concat", seed=5), tmp_path_factory.mktemp("concat"))
    with pytest.raises(InvalidRequestError, match="KV layout"):
        engine.Engine(model, speculation="prompt_lookup")


def test_pruned_lm_head_refused(tmp_path):
    """A graph whose logits cover the last position only cannot verify drafts: refused at load."""
    src = cached_model(SyntheticSpec(layout="gqa", seed=6), tmp_path / "cache")
    dst = build_model(tmp_path / "pruned", SyntheticSpec(layout="gqa", seed=6))
    model = onnx.load(str(src / "model.onnx"))
    assert slice_logits_to_last_token(model, "logits")
    onnx.save(model, str(dst / "model.onnx"))
    with pytest.raises(UnsupportedModelError, match="last position only"):
        engine.Engine(dst, speculation="prompt_lookup", last_token_logits=False)
    eng = engine.Engine(dst, last_token_logits=False)
    with pytest.raises(InvalidRequestError, match="last position only"):
        eng.generate([1, 2, 3], 4, speculation="prompt_lookup")


def test_engine_option_checks(tmp_path_factory):
    model = cached_model(SyntheticSpec(layout="gqa", seed=5), tmp_path_factory.mktemp("opts"))
    with pytest.raises(InvalidRequestError, match="speculation must be"):
        engine.Engine(model, speculation="ngram")
    with pytest.raises(InvalidRequestError, match="unknown speculation option"):
        engine.Engine(model, speculation="prompt_lookup", speculation_options={"width": 3})
    with pytest.raises(InvalidRequestError, match="max_draft"):
        engine.Engine(model, speculation="prompt_lookup", speculation_options={"max_draft": 0})


# ------------------------------------------------------------------------------------------------
# synthetic models: the numpy reference, INT4 Phi-4-mini shapes


class _EchoDrafter(PromptLookupDrafter):
    """Drafts ``table[last token]`` then more of the same rule: a drafter that guesses often right
    when ``table`` is the model's own argmax (drives verify passes on random-weight models)."""

    def __init__(self, config: SpeculationConfig, table: np.ndarray, depth: int) -> None:
        super().__init__(config)
        self.table, self.depth = table, depth

    def propose(self, out: np.ndarray, limit: int) -> int:
        k = min(limit, self.depth)
        tok = self.text[-1]
        for i in range(k):
            tok = int(self.table[tok])
            out[1 + i] = tok
        return max(k, 0)


def _bigram_argmax(eng: engine.Engine, prompt: list[int]) -> np.ndarray:
    """For every token t, the plain engine's greedy token after ``prompt + [t]``."""
    vocab = eng.spec.vocab_size
    table = np.zeros(vocab, np.int64)
    for t in range(vocab):
        table[t] = eng.generate([*prompt, t], 1).token_ids[0]
    return table


def test_fp32_synthetic_matches_numpy_reference(tmp_path_factory):
    model = cached_model(SyntheticSpec(layout="gqa", seed=7), tmp_path_factory.mktemp("fp32"))
    eng = engine.Engine(model, speculation="prompt_lookup", max_length=128)
    eng.eos_token_ids = frozenset()
    prompt = [1, 40, 41, 42, 43, 44, 45, 46, 47, 40, 41, 42]
    table = _bigram_argmax(engine.Engine(model, max_length=128), [1, 40])
    eng._ctx.drafter = _EchoDrafter(SpeculationConfig(), table, 3)
    res = eng.generate(prompt, 40)
    assert res.stats.drafted_tokens > 0
    seq = np.array([prompt + res.token_ids])
    logits = reference_logits(model, seq)[0]
    want = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert res.token_ids == want


@pytest.mark.slow
def test_int4_phi4_shaped_greedy_equals_plain(tmp_path_factory):
    """A 1-layer INT4 model with Phi-4-mini's layer shapes (GQA share buffer, partial rotary) and
    fp32 activations (accuracy_level 0: speculation drafts on it), verify passes driven by a drafter
    that often guesses right. Accuracy level 4 (int8 activations): tests/test_speculation_exact.py."""
    spec4 = dataclasses.replace(phi4_mini_spec(layers=1, vocab=4096), accuracy_level=0)
    model = cached_model(spec4, tmp_path_factory.mktemp("phi4"))
    plain = engine.Engine(model, max_length=256)
    spec = engine.Engine(model, max_length=256, speculation="prompt_lookup")
    plain.eos_token_ids = spec.eos_token_ids = frozenset()
    rng = np.random.default_rng(3)
    for _ in range(3):
        prompt = rng.integers(3, 4096, 24).tolist()
        want = plain.generate(prompt, 48).token_ids
        # drafts: the true continuation with every fourth token wrong, so passes keep and reject
        spec._ctx.drafter = _ScriptDrafter(SpeculationConfig(), prompt, want)
        got = spec.generate(prompt, 48)
        assert got.stats.accepted_tokens > 10
        assert got.token_ids == want


class _ScriptDrafter(PromptLookupDrafter):
    """Drafts the known continuation, with every fourth draft replaced by a wrong id."""

    def __init__(self, config: SpeculationConfig, prompt: list[int], continuation: list[int]) -> None:
        super().__init__(config)
        self.p, self.cont = len(prompt), continuation

    def propose(self, out: np.ndarray, limit: int) -> int:
        at = len(self.text) - self.p  # continuation tokens emitted so far
        k = max(0, min(limit, 4, len(self.cont) - at))
        for i in range(k):
            tok = self.cont[at + i]
            out[1 + i] = tok if (at + i) % 4 else (tok + 1) % 4096
        return k


# ------------------------------------------------------------------------------------------------
# sampled output keeps its distribution


PROMPT = [1, 44, 90, 17, 5]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _chi2_pvalue(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution (Wilson-Hilferty normal approximation)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def _pooled_chi2(groups: dict[int, np.ndarray], probs: np.ndarray) -> tuple[float, int]:
    """Chi-square of counts grouped by the first token against ``probs[first]`` (each group's
    total fixed), cells of expected count < 5 pooled into one."""
    obs, exp = [], []
    small_o = small_e = 0.0
    dof = 0
    for t1, counts in groups.items():
        n = counts.sum()
        e = probs[t1] * n
        assert counts[probs[t1] == 0].sum() == 0
        big = e >= 5
        obs += counts[big].tolist()
        exp += e[big].tolist()
        small_o += counts[~big].sum()
        small_e += e[~big].sum()
        dof += int(big.sum()) - 1 + (1 if (~big).any() else 0)
    obs.append(small_o)
    exp.append(small_e)
    o, e = np.array(obs, float), np.array(exp, float)
    keep = e > 0
    return float(((o[keep] - e[keep]) ** 2 / e[keep]).sum()), max(dof, 1)


@pytest.mark.slow
def test_first_drafted_position_keeps_the_distribution(tmp_path_factory):
    """The token at the first drafted position, sampled at temperature 0.25 with a drafter that
    proposes the most likely token (kept about half the time), follows the model's own
    distribution given the first token, computed by a plain session.run over every first token."""
    model = cached_model(SyntheticSpec(layout="gqa", vocab=260, seed=31), tmp_path_factory.mktemp("chi2"))
    vocab, temp = 260, 0.25
    sess = ort.InferenceSession(str(model / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[*PROMPT, t] for t in range(vocab)], np.int64)  # (vocab, P + 1): every first token
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feed[i.name] = np.zeros((vocab, i.shape[1], 0, i.shape[3]), np.float32)
    logits = sess.run(["logits"], feed)[0][:, -1].astype(np.float64)  # (vocab, vocab): after [t1]
    probs = _softmax(logits / temp)
    best = probs.argmax(-1)

    eng = engine.Engine(model, max_length=32, speculation="prompt_lookup")
    eng.eos_token_ids = frozenset()

    class Best(PromptLookupDrafter):
        def propose(self, out: np.ndarray, limit: int) -> int:
            if limit < 1:
                return 0
            out[1] = best[self.text[-1]]
            return 1

    eng._ctx.drafter = Best(SpeculationConfig())
    groups: dict[int, np.ndarray] = {}
    n, kept = 3000, 0
    for seed in range(n):
        res = eng.generate(PROMPT, 3, do_sample=True, temperature=temp, seed=seed)
        assert res.stats.drafted_tokens == 1
        kept += res.stats.accepted_tokens
        t1, t2 = res.token_ids[:2]
        groups.setdefault(t1, np.zeros(vocab, np.int64))[t2] += 1
    assert 0.2 * n < kept < 0.9 * n  # both branches (kept, rejected) are exercised
    stat, dof = _pooled_chi2(groups, probs)
    assert _chi2_pvalue(stat, dof) > 1e-3, (stat, dof)
    # the test has power: the same draws are rejected against a hotter distribution
    hot_stat, hot_dof = _pooled_chi2(groups, _softmax(logits / (temp * 1.3)))
    assert _chi2_pvalue(hot_stat, hot_dof) < 1e-3, (hot_stat, hot_dof)


# ------------------------------------------------------------------------------------------------
# the speculative loop allocates nothing per step


def test_speculative_loop_allocates_nothing(tmp_path_factory):
    from tests.test_decode_alloc import FORBIDDEN, _c_calls, _numpy_growth_and_peak

    model = cached_model(SyntheticSpec(layout="gqa", vocab=32000, seed=21), tmp_path_factory.mktemp("alloc"))
    eng = engine.Engine(model, max_length=256, speculation="prompt_lookup")
    eng.eos_token_ids = frozenset()

    class Always(PromptLookupDrafter):
        def propose(self, out: np.ndarray, limit: int) -> int:
            k = min(limit, 3)
            for i in range(k):
                out[1 + i] = 7 + i
            return max(k, 0)

    eng._ctx.drafter = Always(SpeculationConfig())

    def start():
        req = eng._requests.one([1, 2, 3, 4], 230, None, {}, text=False)
        loop = decode.generate_single(eng._ctx, req)
        for _ in range(3):
            next(loop)
        return loop

    run_to_end = decode.run_to_end
    run_to_end(start())  # warm-up
    loop = start()
    called = _c_calls(lambda: [next(loop) for _ in range(40)])
    assert not called & FORBIDDEN, called & FORBIDDEN
    grown, peak = _numpy_growth_and_peak(lambda: [next(loop) for _ in range(60)])
    assert not grown, grown
    assert peak < 32000 * 4 // 2, peak  # far below one logits row (128 KB)
    assert eng._ctx.drafter.drafted > 0


def test_cuda_refused_clearly():
    """Speculation runs on the CPU only; the refusal is the package's error (no GPU needed)."""
    from engine.generation import _multi_token_refusal

    spec = load_model_spec(cached_model(SyntheticSpec(layout="gqa", seed=5)))
    assert "CPU" in (_multi_token_refusal(spec, on_cuda=True) or "")
    assert _multi_token_refusal(spec, on_cuda=False) is None
    assert issubclass(InvalidRequestError, EngineError)
