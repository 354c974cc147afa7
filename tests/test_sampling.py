"""Sampling: one suite over both implementations (numpy reference and compiled kernels).

Every test taking ``impl`` runs on both with the same expectations. Tests named ``*_compiled_*``
check what only the compiled path promises: bit-equality with the reference on the code paths small
tests do not reach (200k vocabulary, radix select, AVX2 vs SSE2) and no allocation per call.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import sampling
from engine._kernels import warn_not_built
from engine.errors import InvalidRequestError
from engine.sampling import (
    MAX_LOGPROBS,
    Sampler,
    SamplingParams,
    argmax,
    ref_apply_logit_bias,
    ref_apply_penalties,
    ref_apply_temperature,
    ref_argmax,
    ref_exp_rel,
    ref_log_softmax,
    ref_min_p_filter,
    ref_top_k_filter,
    ref_top_p_filter,
    splitmix64_next,
)

ROOT = Path(__file__).resolve().parents[1]
COMPILED = sampling._ckernels is not None
NOT_BUILT = "engine._kernels.sampling is not built (python setup.py build_ext --inplace)"
needs_compiled = pytest.mark.skipif(not COMPILED, reason=NOT_BUILT)
IMPLS = ["numpy", pytest.param("cython", marks=needs_compiled)]

# a small distribution with distinct probabilities, its tokens shuffled so that rank order and id
# order differ (the draw walks ids in increasing order)
PROBS = np.array([0.30, 0.22, 0.15, 0.11, 0.09, 0.07, 0.04, 0.02])
PERM = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # token PERM[i] has probability PROBS[i]
SMALL = np.empty(8, np.float32)
SMALL[PERM] = np.log(PROBS).astype(np.float32)


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


def sampler(impl: str, params, prompts, vocab: int, batch: int | None = None) -> Sampler:
    s = Sampler(batch or len(prompts), vocab, impl=impl)
    s.reset(params, prompts)
    return s


def run_steps(s: Sampler, logits: np.ndarray, steps: int) -> np.ndarray:
    """Sample `steps` times from the same (batch, vocab) logits; (steps, batch) tokens."""
    out = np.empty(logits.shape[0], np.int64)
    toks = []
    for _ in range(steps):
        s.sample(logits, out)
        toks.append(out.copy())
    return np.array(toks)


def random_logits(rng: np.random.Generator, rows: int, vocab: int, scale: float = 3.0) -> np.ndarray:
    return (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# greedy


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ([0.1, 2.0, -1.0, 2.0], 1),  # ties: lowest id
        ([np.nan, 1.0, 2.0, np.nan], 2),  # NaN reads as -inf
        ([np.nan, np.nan, np.nan], 0),  # nothing above -inf: token 0
        ([-np.inf, -np.inf], 0),
        ([1.0, np.inf, 3.0, np.inf], 1),  # +inf wins, first one
        ([-5.0, -np.inf, -4.0], 2),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_argmax(impl, row, expected, dtype):
    logits = np.array([row], dtype=dtype)
    s = sampler(impl, SamplingParams(), [[0]], len(row))
    out = np.full(1, -1, np.int64)
    s.sample(logits, out)
    assert out[0] == expected
    assert ref_argmax(logits[0]) == expected


def test_greedy_ignores_temperature_unless_sampling(impl):
    logits = np.array([[1.0, 3.0, 2.0]], np.float32)
    for p in (
        SamplingParams(temperature=0.3),
        SamplingParams(do_sample=True, temperature=0.0),
        SamplingParams(do_sample=True, top_k=1, temperature=2.0, seed=1),
    ):
        assert run_steps(sampler(impl, p, [[0]], 3), logits, 3).ravel().tolist() == [1, 1, 1]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_module_argmax(dtype):
    rng = np.random.default_rng(0)
    big = random_logits(rng, 4, 1000).astype(dtype)
    big[1, 7] = np.nan
    big[2, :] = -np.inf
    big[3, [10, 500]] = 100  # tie between two maxima
    logits = big[:, :999]  # a view: rows contiguous, row stride 1000
    out = np.empty(4, np.int64)
    argmax(logits, out)
    assert out.tolist() == [ref_argmax(r) for r in logits]
    assert out[2] == 0 and out[3] == 10
    out32 = np.empty(4, np.int32)
    argmax(logits, out32)
    assert out32.tolist() == out.tolist()


# ---------------------------------------------------------------------------------------------------
# distributions: chi-square over many seeded draws on a small known distribution


def chi2_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square(df) (Wilson-Hilferty; z = the normal 0.999 quantile)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def expected_probs(params: SamplingParams) -> np.ndarray:
    """The target distribution over SMALL's tokens, in float64, written from the definitions."""
    p = softmax(SMALL.astype(np.float64) / params.temperature)
    keep = np.ones(p.size, bool)
    order = np.argsort(-p, kind="stable")
    if params.top_k:
        keep[order[params.top_k :]] = False
    q = np.where(keep, p, 0)
    q /= q.sum()
    if params.top_p < 1:
        cum = np.cumsum(q[order])
        n = int(np.searchsorted(cum, params.top_p)) + 1
        keep[order[n:]] = False
    keep &= p >= params.min_p * p.max()
    q = np.where(keep, p, 0)
    return q / q.sum()


# (draws, rows per call): the reference costs ~0.3 ms per row, so it draws fewer; equality of the two
# implementations to the bit is checked separately
DRAWS = {"cython": (20_000, 1000), "numpy": (10_000, 500)}


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=0.7, seed=11),
        SamplingParams(do_sample=True, top_k=3, seed=12),
        SamplingParams(do_sample=True, top_p=0.8, seed=13),  # nucleus: 5 tokens (0.78 < 0.8 <= 0.87)
        SamplingParams(do_sample=True, min_p=0.25, seed=14),  # keeps p >= 0.075: 5 tokens
        pytest.param(
            SamplingParams(do_sample=True, temperature=1.5, top_k=6, top_p=0.9, min_p=0.1, seed=15),
            marks=pytest.mark.slow,  # ~1.5 s with the numpy reference
        ),
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "combined"],
)
def test_distribution(impl, params):
    n, rows = DRAWS[impl]
    expected = expected_probs(params)
    s = sampler(impl, params, [[]] * rows, SMALL.size)
    toks = run_steps(s, np.tile(SMALL, (rows, 1)), n // rows).ravel()
    counts = np.bincount(toks, minlength=SMALL.size)
    assert not counts[expected == 0].any(), f"drew excluded tokens: {counts} vs {expected}"
    live = expected > 0
    stat = float((((counts - n * expected) ** 2)[live] / (n * expected[live])).sum())
    assert stat < chi2_critical(int(live.sum()) - 1), f"chi2 {stat:.1f}: {counts} vs {np.round(n * expected)}"


def test_expected_probs_sets():
    # the hand-derived candidate sets the distribution test relies on
    assert (expected_probs(SamplingParams(top_p=0.8)) > 0).sum() == 5
    assert (expected_probs(SamplingParams(min_p=0.25)) > 0).sum() == 5
    assert (expected_probs(SamplingParams(top_k=3)) > 0).sum() == 3


# ---------------------------------------------------------------------------------------------------
# seeds and reproducibility


def test_seed_reproducible(impl):
    rng = np.random.default_rng(1)
    logits = random_logits(rng, 3, 500)
    p = SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=1234)
    a = run_steps(sampler(impl, p, [[1], [2], [3]], 500), logits, 30)
    b = run_steps(sampler(impl, p, [[1], [2], [3]], 500), logits, 30)
    c = run_steps(
        sampler(impl, SamplingParams(do_sample=True, temperature=0.9, top_p=0.95, seed=99), [[1]] * 3, 500),
        logits,
        30,
    )
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # one shared seed: row i draws from stream (seed, i), so rows with equal logits still differ
    same = np.tile(logits[:1], (3, 1))
    d = run_steps(sampler(impl, p, [[1]] * 3, 500), same, 30)
    assert not np.array_equal(d[:, 0], d[:, 1])
    # per-row params: a row's tokens do not depend on its position in the batch
    per_row = [p, SamplingParams(do_sample=True, seed=5), p]
    e = run_steps(sampler(impl, per_row, [[1]] * 3, 500), same, 30)
    assert np.array_equal(e[:, 0], e[:, 2])
    assert np.array_equal(e[:, 0], run_steps(sampler(impl, [p], [[1]], 500), same[:1], 30)[:, 0])


def test_unseeded_requests_differ(impl):
    logits = np.zeros((1, 1000), np.float32)  # uniform: 30 draws collide with probability ~1e-90
    p = SamplingParams(do_sample=True)
    assert not np.array_equal(
        run_steps(sampler(impl, p, [[1]], 1000), logits, 30),
        run_steps(sampler(impl, p, [[1]], 1000), logits, 30),
    )


def test_splitmix64_reference_vector():
    # splitmix64 from state 0 starts with 0xE220A8397B1DCDAF (Vigna's published reference output)
    state, u = splitmix64_next(0)
    assert state == 0x9E3779B97F4A7C15
    assert int(u * 2**53) == 0xE220A8397B1DCDAF >> 11


CROSS_PROCESS = """
import numpy as np
from engine.sampling import Sampler, SamplingParams
logits = (np.random.default_rng(7).standard_normal((2, 300)) * 2).astype(np.float32)
s = Sampler(2, 300, impl="{impl}")
s.reset(SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=2024), [[1, 2], [3]])
out = np.empty(2, np.int64)
toks = []
for _ in range(25):
    s.sample(logits, out)
    toks += out.tolist()
print(" ".join(map(str, toks)))
"""


@pytest.mark.slow
def test_seed_same_tokens_in_another_process(impl):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", CROSS_PROCESS.format(impl=impl)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    there = [int(t) for t in proc.stdout.split()]
    logits = (np.random.default_rng(7).standard_normal((2, 300)) * 2).astype(np.float32)
    p = SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9, seed=2024)
    here = run_steps(sampler(impl, p, [[1, 2], [3]], 300), logits, 25).ravel().tolist()
    assert here == there


# ---------------------------------------------------------------------------------------------------
# penalties and logit bias


def test_penalties_hand_computed():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0], np.float32)
    counts = np.array([1, 2, 0, 0, 1])
    got = ref_apply_penalties(logits, counts, repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # 2/2 - (0.5 + 0.25); -1*2 - (0.5 + 0.5); untouched; untouched; -2*2 - (0.5 + 0.25)
    assert got.tolist() == [0.25, -3.0, 0.5, 3.0, -4.75]
    assert ref_apply_logit_bias(logits, {1: 4.0, 3: -3.0}).tolist() == [2.0, 3.0, 0.5, 0.0, -2.0]
    assert ref_apply_temperature(logits, 0.5).tolist() == [4.0, -2.0, 1.0, 6.0, -4.0]


@pytest.mark.parametrize(
    ("params", "prompt", "logits", "expected"),
    [
        # prompt token 0 is penalised: 3/1.5 = 2 < 2.9; then 1 is generated and penalised too
        (SamplingParams(repetition_penalty=1.5), [0], [3.0, 2.9, 0.0], [1, 0, 0]),
        # frequency grows with each repetition: 1.0-0.15k0, 0.9-0.15k1, 0.8-0.15k2
        (SamplingParams(frequency_penalty=0.15), [], [1.0, 0.9, 0.8], [0, 1, 0, 2, 1, 0]),
        # presence is paid once
        (SamplingParams(presence_penalty=0.2), [], [1.0, 0.9, 0.0], [0, 1, 0, 0]),
        # negative logits are multiplied by the repetition penalty
        # [-2, -1.5, -1.8] -> 1; then 1 is penalised too: [-2, -3, -1.8] -> 2
        (SamplingParams(repetition_penalty=2.0), [0, 2], [-1.0, -1.5, -0.9], [1, 2, 2]),
        (SamplingParams(logit_bias={0: 5.0}), [], [1.0, 2.0, 3.0], [0, 0]),
        (SamplingParams(logit_bias={2: -10.0}), [], [1.0, 2.0, 3.0], [1, 1]),
    ],
)
def test_penalties_and_bias_greedy_sequences(impl, params, prompt, logits, expected):
    s = sampler(impl, params, [prompt], len(logits))
    toks = run_steps(s, np.array([logits], np.float32), len(expected)).ravel().tolist()
    assert toks == expected


def test_counts_restart_with_each_request(impl):
    s = sampler(impl, SamplingParams(repetition_penalty=10.0), [[0]], 3)
    logits = np.array([[3.0, 2.0, 1.0]], np.float32)
    assert run_steps(s, logits, 2).ravel().tolist() == [1, 2]
    s.reset(SamplingParams(repetition_penalty=10.0), [[2]])  # only the new prompt counts now
    assert run_steps(s, logits, 1).ravel().tolist() == [0]


def test_bias_excludes_token_when_sampling(impl):
    logits = np.zeros((200, 4), np.float32)
    p = SamplingParams(do_sample=True, logit_bias={1: -100.0}, seed=3)
    toks = run_steps(sampler(impl, p, [[]] * 200, 4), logits, 5)
    assert 1 not in toks and set(np.unique(toks)) == {0, 2, 3}


# ---------------------------------------------------------------------------------------------------
# float16, NaN, inf


def test_float16_same_as_float32(impl):
    rng = np.random.default_rng(2)
    half = random_logits(rng, 2, 700).astype(np.float16)
    half[0, 3] = np.nan
    for p in (
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, seed=4, logprobs=3),
        SamplingParams(do_sample=True, top_k=20, repetition_penalty=1.3, logit_bias={5: 2.0}, seed=4),
    ):
        a = sampler(impl, p, [[1, 5], [2]], 700)
        b = sampler(impl, p, [[1, 5], [2]], 700)
        assert np.array_equal(run_steps(a, half, 10), run_steps(b, half.astype(np.float32), 10))
        assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.top_ids, b.top_ids)


def test_nan_and_inf_rows(impl):
    v = 6
    logits = np.array(
        [
            [np.nan, 1.0, np.nan, 0.5, 0.2, np.nan],  # NaN never drawn
            [0.0, np.inf, 5.0, np.inf, -np.inf, 1.0],  # only the +inf tokens, evenly
            [np.nan, -np.inf, np.nan, -np.inf, np.nan, -np.inf],  # nothing possible: token 0
            [-np.inf, 2.0, -np.inf, 2.0, -np.inf, 1.0],  # -inf never drawn
        ],
        np.float32,
    )
    for p in (
        SamplingParams(do_sample=True, seed=8, logprobs=2),
        SamplingParams(do_sample=True, top_k=3, top_p=0.9, seed=8, logprobs=2),
        SamplingParams(do_sample=True, min_p=0.01, temperature=3.0, seed=8, logprobs=2),
    ):
        s = sampler(impl, p, [[]] * 4, v)
        toks = run_steps(s, logits, 400)
        assert set(np.unique(toks[:, 0])) <= {1, 3, 4}
        assert set(np.unique(toks[:, 1])) == {1, 3} and 150 < (toks[:, 1] == 1).sum() < 250
        assert set(np.unique(toks[:, 2])) == {0}
        assert set(np.unique(toks[:, 3])) <= {1, 3, 5}
        assert s.logprobs[2] == -np.inf and s.top_ids[2, :2].tolist() == [0, 1]
        assert s.logprobs[1] == pytest.approx(math.log(0.5), abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# log-probabilities


def test_logprobs(impl):
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 2, 50)
    p = SamplingParams(do_sample=True, temperature=0.8, top_k=10, seed=6, logprobs=5)
    s = sampler(impl, [p, SamplingParams(logprobs=0)], [[1], [2]], 50)
    out = np.empty(2, np.int64)
    s.sample(logits, out)
    for row, temp, n in ((0, 0.8, 5), (1, 1.0, 0)):  # greedy rows use temperature 1
        z = logits[row].astype(np.float64) / temp
        lsm = z - z.max() - np.log(np.exp(z - z.max()).sum())
        assert s.logprobs[row] == pytest.approx(lsm[out[row]], abs=2e-5)
        top = np.argsort(-lsm, kind="stable")[:n]
        assert s.top_ids[row, :n].tolist() == top.tolist()
        np.testing.assert_allclose(s.top_logprobs[row, :n], lsm[top], atol=2e-5)
        assert (s.top_ids[row, n:] == -1).all() and (s.top_logprobs[row, n:] == -np.inf).all()
    assert out[1] == np.argmax(logits[1])
    lp = ref_log_softmax(logits[0] / np.float32(0.8))
    assert math.fsum(np.exp(lp.astype(np.float64))) == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------
# the call contract


def test_rows_and_out_views(impl):
    rng = np.random.default_rng(4)
    logits = random_logits(rng, 3, 100)
    p = SamplingParams(do_sample=True, seed=9)
    s = sampler(impl, p, [[1], [2], [3]], 100, batch=4)
    out = np.full(4, -7, np.int64)
    s.sample(logits, out, rows=2)
    assert out[2:].tolist() == [-7, -7] and (out[:2] >= 0).all()
    input_ids = np.zeros((3, 1), np.int32)  # the engine writes into a column of its input_ids
    t = sampler(impl, p, [[1], [2], [3]], 100, batch=4)
    t.sample(logits[:2], input_ids[:2, 0])
    assert input_ids[:2, 0].tolist() == out[:2].tolist()
    # the third row's stream did not move: its next token equals a fresh sampler's first one
    s.sample(logits, out, rows=3)
    fresh = sampler(impl, p, [[1], [2], [3]], 100, batch=4)
    first = np.empty(4, np.int64)
    fresh.sample(logits, first, rows=3)
    assert out[2] == first[2]


@pytest.mark.parametrize(
    ("logits", "out", "rows", "match"),
    [
        (np.zeros((1, 10), np.float64), np.zeros(1, np.int64), None, "float32 or float16"),
        (np.zeros(10, np.float32), np.zeros(1, np.int64), None, "2-D"),
        (np.zeros((1, 11), np.float32), np.zeros(1, np.int64), None, "vocab 10"),
        (np.zeros((1, 20), np.float32)[:, ::2], np.zeros(1, np.int64), None, "contiguous"),
        (np.zeros((1, 10), np.float32), np.zeros(1, np.float32), None, "int64 or int32"),
        (np.zeros((2, 10), np.float32), np.zeros(1, np.int64), None, "fewer than"),
        (np.zeros((3, 10), np.float32), np.zeros(3, np.int64), None, "rows"),
        (np.zeros((2, 10), np.float32), np.zeros(2, np.int64), 3, "rows"),
    ],
)
def test_sample_argument_errors(impl, logits, out, rows, match):
    s = sampler(impl, SamplingParams(), [[0], [0]], 10)
    with pytest.raises(ValueError, match=match):
        s.sample(logits, out, rows)


BAD_PARAMS = [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": 1.5}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": "0.9"}, "top_p"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {10: 1.0}}, "logit_bias"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias"),
    ({"logit_bias": {1: float("inf")}}, "logit_bias"),
    ({"logit_bias": {1.0: 1.0}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"do_sample": 1}, "do_sample"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_PARAMS)
def test_validation_names_the_parameter(impl, kwargs, name):
    p = SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError, match=name) as err:
        p.validate(10)
    assert isinstance(err.value, ValueError)
    assert "must be" in str(err.value) and "got" in str(err.value)  # the allowed range and the value
    s = sampler(impl, SamplingParams(do_sample=True, seed=1), [[1]], 10)
    logits = np.arange(10, dtype=np.float32)[None]
    before = run_steps(sampler(impl, SamplingParams(do_sample=True, seed=1), [[1]], 10), logits, 3)
    with pytest.raises(InvalidRequestError, match=name):
        s.reset(p, [[1]])
    assert np.array_equal(run_steps(s, logits, 3), before)  # the failed reset changed nothing


def test_reset_errors(impl):
    s = Sampler(2, 10, impl=impl)
    with pytest.raises(InvalidRequestError, match="prompt_ids"):
        s.reset(SamplingParams(), [[1], [2], [3]])
    with pytest.raises(InvalidRequestError, match="prompt_ids"):
        s.reset(SamplingParams(), [[10]])
    with pytest.raises(InvalidRequestError, match="params"):
        s.reset([SamplingParams()], [[1], [2]])
    with pytest.raises(ValueError, match="impl"):
        Sampler(1, 10, impl="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        Sampler(0, 10, impl=impl)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(sampling, "_ckernels", None)
    warn_not_built.cache_clear()
    with pytest.warns(RuntimeWarning, match="not built"):
        assert Sampler(1, 10).impl == "numpy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Sampler(1, 10).impl == "numpy"
    with pytest.raises(ImportError, match="not built"):
        Sampler(1, 10, impl="cython")


# ---------------------------------------------------------------------------------------------------
# parameters from genai_config.json


def test_from_search_config():
    greedy_cfg = {
        "do_sample": False,
        "top_k": 1,
        "top_p": 1.0,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "max_length": 4096,
        "num_beams": 1,
    }
    p = SamplingParams.from_search_config(greedy_cfg)
    assert p.top_k == 0 and not p.do_sample
    q = SamplingParams.from_search_config(greedy_cfg, do_sample=True, temperature=0.7)
    assert q.do_sample and q.top_k == 0 and q.temperature == 0.7
    r = SamplingParams.from_search_config({"do_sample": True, "top_k": 50, "top_p": 0.9, "temperature": 1}, top_p=0.5)
    assert (r.do_sample, r.top_k, r.top_p, r.temperature) == (True, 50, 0.5, 1.0)
    assert isinstance(r.temperature, float)
    assert SamplingParams.from_search_config({}) == SamplingParams()


# ---------------------------------------------------------------------------------------------------
# properties over random parameter combinations

VOCAB = st.integers(1, 40)


@st.composite
def request(draw):
    vocab = draw(VOCAB)
    special = st.sampled_from([np.nan, np.inf, -np.inf])
    values = st.one_of(st.floats(-30, 30, width=32), special) if draw(st.booleans()) else st.floats(-30, 30, width=32)
    row = np.array(draw(st.lists(values, min_size=vocab, max_size=vocab)), np.float32)
    params = SamplingParams(
        do_sample=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.0, 0.3, 1.0, 2.5])),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.sampled_from([1.0, 0.95, 0.5, 0.1, 1e-6])),
        min_p=draw(st.sampled_from([0.0, 0.05, 0.5, 1.0])),
        repetition_penalty=draw(st.sampled_from([1.0, 0.7, 1.3])),
        presence_penalty=draw(st.sampled_from([0.0, -1.0, 1.5])),
        frequency_penalty=draw(st.sampled_from([0.0, 0.5, -2.0])),
        logit_bias=draw(st.none() | st.dictionaries(st.integers(0, vocab - 1), st.floats(-50, 50), max_size=3)),
        seed=draw(st.integers(0, 2**64 - 1)),
        logprobs=draw(st.none() | st.integers(0, MAX_LOGPROBS)),
    )
    prompt = draw(st.lists(st.integers(0, vocab - 1), max_size=6))
    return row, params, prompt


def allowed_tokens(z: np.ndarray, p: SamplingParams) -> set[int]:
    """Tokens the definition may return for prepared logits z (nothing possible: {0})."""
    if not (z > -np.inf).any():
        return {0}
    if not p.do_sample or p.temperature < sampling.GREEDY_TEMPERATURE or p.top_k == 1:
        return {ref_argmax(z)}
    z = ref_min_p_filter(ref_top_p_filter(ref_top_k_filter(z, p.top_k), p.top_p), p.min_p)
    return set(np.flatnonzero(z > -np.inf).tolist())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=request())
def test_property_valid_requests(req):
    row, p, prompt = req
    p.validate(row.size)
    impls = ["numpy", "cython"] if COMPILED else ["numpy"]
    results = []
    for impl in impls:
        s = sampler(impl, p, [prompt], row.size)
        out = np.empty(1, np.int64)
        counts = np.bincount(np.array(prompt, dtype=np.int64), minlength=row.size)
        cfg = sampling._RowConfig.from_params(p, row.size)
        z = sampling.ref_prepare_logits(row, counts, cfg)
        s.sample(row[None], out)
        tok = int(out[0])
        assert tok in allowed_tokens(z, p)
        if p.do_sample and p.top_k and z.max() > -np.inf:
            assert (z > z[tok]).sum() < p.top_k  # inside the top-k set, checked without the reference
        results.append((tok, s.logprobs.copy(), s.top_ids.copy(), s.top_logprobs.copy()))
    if len(results) == 2:  # the two implementations agree to the bit
        for a, b in zip(results[0], results[1], strict=True):
            assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# the compiled kernels: bit-equality on the paths small tests do not reach, and no allocation


def _agree(params, logits, steps, prompts):
    a = sampler("numpy", params, prompts, logits.shape[1])
    b = sampler("cython", params, prompts, logits.shape[1])
    ta, tb = run_steps(a, logits, steps), run_steps(b, logits, steps)
    assert np.array_equal(ta, tb)
    assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.top_ids, b.top_ids)
    assert np.array_equal(a.top_logprobs, b.top_logprobs)
    return ta


@needs_compiled
def test_compiled_matches_reference_flat_rows():
    # row 0 is flat: the nucleus outgrows the 1,024-candidate heap (radix select paths); row 1 has
    # ~500 likely tokens: the nucleus fits the 1,024 heap but not the first 64
    rng = np.random.default_rng(5)
    logits = random_logits(rng, 2, 5000, scale=1.0)
    logits[1, rng.choice(5000, 500, replace=False)] += 8.0
    for p in (
        SamplingParams(do_sample=True, top_p=0.95, seed=1),
        SamplingParams(do_sample=True, top_k=2000, seed=2, logprobs=4),
        SamplingParams(do_sample=True, top_k=3000, top_p=0.5, min_p=0.2, seed=3),
        SamplingParams(do_sample=True, top_p=0.3, seed=4),
        SamplingParams(do_sample=True, min_p=0.3, temperature=1.7, seed=5),
        SamplingParams(do_sample=True, repetition_penalty=1.2, frequency_penalty=0.3, top_p=0.99, seed=6),
    ):
        _agree(p, logits, 6, [list(range(50)), [7, 7, 7]])


@needs_compiled
def test_compiled_matches_reference_phi4_vocab():
    rng = np.random.default_rng(6)
    vocab = 200_064
    logits = random_logits(rng, 1, vocab, scale=2.0)
    logits[0, rng.choice(vocab, 40, replace=False)] += rng.uniform(4, 14, 40).astype(np.float32)
    _agree(SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=7, logprobs=5), logits, 3, [[1]])
    _agree(SamplingParams(do_sample=True, temperature=0.8, seed=8), logits, 2, [[1]])


@needs_compiled
def test_compiled_simd_levels_agree():
    kernels = sampling._ckernels
    rng = np.random.default_rng(7)
    logits = random_logits(rng, 2, 3001).astype(np.float16)
    p = SamplingParams(do_sample=True, temperature=0.9, top_p=0.97, repetition_penalty=1.1, seed=10, logprobs=3)
    levels = ["sse2", "avx2"] if kernels.set_simd("auto") == "avx2" else ["sse2"]
    try:
        runs = []
        for level in levels:
            kernels.set_simd(level)
            s = sampler("cython", p, [[1, 2], [3]], 3001)
            runs.append((run_steps(s, logits, 20), s.logprobs.copy()))
        for other in runs[1:]:
            assert np.array_equal(runs[0][0], other[0]) and np.array_equal(runs[0][1], other[1])
    finally:
        kernels.set_simd("auto")


@needs_compiled
def test_compiled_exp_and_rng_match_reference():
    kernels = sampling._ckernels
    rng = np.random.default_rng(8)
    d = -rng.exponential(8.0, 50_000).astype(np.float32)
    d[:6] = [0.0, -87.0, -87.00001, -np.inf, -1e-30, -0.0]
    out = np.empty_like(d)
    kernels.exp_rel(d, out)
    ref = ref_exp_rel(d)
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))
    assert out[0] == 1.0 and out[2] == 0.0 and out[3] == 0.0
    live = d >= -80
    rel = np.abs(ref[live] / np.exp(d[live].astype(np.float64)) - 1)
    assert rel.max() < 2e-7
    states = rng.integers(0, 2**63, 100, dtype=np.uint64)
    got = np.empty(100, np.uint64)
    kernels.next53(states.copy(), got)
    assert [int(g) for g in got] == [int(splitmix64_next(int(s))[1] * 2**53) for s in states]
    for u53, total in ((0, 5), (2**53 - 1, 2**62 - 1), (123456789, 987654321987), (2**52, 3)):
        assert kernels.scale53(u53, total) == (u53 * total) >> 53


def _traced(fn, calls: int, warmup: int = 1) -> tuple[int, int]:
    """(bytes still held after `calls` calls, numpy data buffers allocated meanwhile)."""
    for _ in range(warmup):
        fn()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(calls):
            fn()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # only what the sampler's frames (and this file's calls into it) allocated: a C-level allocation
    # is charged to the Python line that called it. Threads that other tests left running (an
    # auto_batch worker lingering, a server's loop) allocate meanwhile too and must not count.
    keep = [tracemalloc.Filter(True, "*engine/sampling.py"), tracemalloc.Filter(True, __file__)]
    growth = sum(s.size_diff for s in after.filter_traces(keep).compare_to(before.filter_traces(keep), "filename"))
    domain = np.lib.tracemalloc_domain
    numpy_new = len([t for t in after.traces if t.domain == domain]) - len(
        [t for t in before.traces if t.domain == domain]
    )
    return growth, numpy_new


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(do_sample=True, temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(do_sample=True, top_k=50, repetition_penalty=1.1, logit_bias={3: 1.0}, seed=1, logprobs=5),
    ],
    ids=["greedy", "top_p", "top_k_penalties_logprobs"],
)
def test_no_allocation_per_call(impl, params):
    rng = np.random.default_rng(9)
    logits = random_logits(rng, 2, 4000)
    s = sampler(impl, params, [[1, 2], [3]], 4000)
    out = np.empty(2, np.int64)
    # the reference allocates temporaries by design (numpy keeps a bounded cache of small buffers, hence
    # its warm-up and looser bound); the kernels allocate nothing at all
    calls, warmup, bound = (1000, 1, 1024) if impl == "cython" else (100, 100, 8192)
    growth, numpy_new = _traced(lambda: s.sample(logits, out), calls, warmup)
    assert growth < bound, f"{growth} bytes kept after {calls} calls"
    if impl == "cython":
        assert numpy_new == 0
        peak_free = _peak(lambda: s.sample(logits, out), calls)
        assert peak_free < 1024, f"{peak_free} bytes allocated transiently"


def _peak(fn, calls: int) -> int:
    fn()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(calls):
            fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@needs_compiled
def test_compiled_module_argmax_allocates_nothing():
    logits = random_logits(np.random.default_rng(10), 2, 4000)
    out = np.empty(2, np.int64)
    growth, numpy_new = _traced(lambda: argmax(logits, out), 1000)
    assert growth < 1024 and numpy_new == 0


def test_reset_row_starts_one_row_and_leaves_the_others(impl):
    """A row joining a running batch draws what a request alone draws; the other rows go on."""
    rng = np.random.default_rng(3)
    logits = random_logits(rng, 3, 200)
    base = [SamplingParams(do_sample=True, seed=s, temperature=1.2, repetition_penalty=1.2) for s in (1, 2, 3)]
    joined = SamplingParams(do_sample=True, seed=9, top_p=0.8, presence_penalty=0.5)
    prompts = [[4, 5], [6], [7, 8, 9]]
    # reference: the batch without the change, and the joining request alone
    plain = run_steps(sampler(impl, base, prompts, 200), logits, 12)
    alone = run_steps(sampler(impl, [joined], [[10, 11]], 200), logits[1:2], 6)
    s = sampler(impl, base, prompts, 200)
    first = run_steps(s, logits, 6)
    s.reset_row(1, joined, [10, 11])
    second = run_steps(s, logits, 6)
    assert np.array_equal(first, plain[:6])
    assert np.array_equal(second[:, [0, 2]], plain[6:, [0, 2]])
    assert np.array_equal(second[:, 1], alone[:, 0])
    with pytest.raises(ValueError, match="row must be"):
        s.reset_row(3, joined, [1])
    with pytest.raises(InvalidRequestError):
        s.reset_row(0, SamplingParams(top_p=2.0), [1])
