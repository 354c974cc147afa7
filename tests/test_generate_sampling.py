"""Sampling through generate()/stream(): seeds, logprobs, and first-token distributions that agree
with the analytic softmax of the model's own logits (computed by an independent plain session.run)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine.testing.synthetic import SyntheticSpec, cached_model

PROMPT = [1, 44, 90, 17]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", vocab=260, seed=31), tmp_path_factory.mktemp("sampling"))


@pytest.fixture(scope="module")
def eng(model_dir):
    return engine.Engine(model_dir, max_length=64)


@pytest.fixture(scope="module")
def first_logits(model_dir) -> np.ndarray:
    """Last-position logits of PROMPT from a plain session.run (no engine code involved)."""
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([PROMPT], np.int64), "attention_mask": np.ones((1, len(PROMPT)), np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past"):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    return sess.run(["logits"], feed)[0][0, -1].astype(np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _expected(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    p = _softmax(logits / temperature)
    keep = np.ones_like(p, dtype=bool)
    order = np.argsort(-p, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        cum = np.cumsum(p[order])
        cut = int(np.searchsorted(cum, top_p)) + 1
        keep[order[cut:]] = False
    if min_p:
        keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def _chi2_ok(counts: np.ndarray, probs: np.ndarray, n: int) -> bool:
    """Chi-square goodness of fit with cells of expected count < 5 pooled; 0.1% significance."""
    assert counts[probs == 0].sum() == 0, "a token outside the allowed set was drawn"
    exp = probs * n
    big = exp >= 5
    obs_cells = np.append(counts[big], counts[~big].sum())
    exp_cells = np.append(exp[big], exp[~big].sum())
    if exp_cells[-1] < 5:  # fold a tiny pooled cell into the smallest big cell
        i = int(np.argmin(exp_cells[:-1]))
        exp_cells[i] += exp_cells[-1]
        obs_cells[i] += obs_cells[-1]
        exp_cells, obs_cells = exp_cells[:-1], obs_cells[:-1]
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    dof = len(exp_cells) - 1
    # Wilson-Hilferty approximation of the chi-square 99.9% quantile
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 10.8
    return stat < crit


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 0.5},
        {"temperature": 0.6, "top_k": 5},
        {"temperature": 0.5, "top_p": 0.6},
        {"temperature": 0.5, "min_p": 0.2},
    ],
)
def test_first_token_distribution_matches_softmax(eng, first_logits, knobs):
    n = 3000
    counts = np.zeros(eng.spec.vocab_size, dtype=np.int64)
    for seed in range(n):
        res = eng.generate(PROMPT, max_new_tokens=1, do_sample=True, seed=seed, **knobs)
        counts[res.token_ids[0]] += 1
    probs = _expected(first_logits, **knobs)
    assert _chi2_ok(counts, probs, n), (knobs, counts[:20], np.round(probs[:20] * n, 1))
    # the check has power: the same draws are rejected against a 25% hotter distribution
    hotter = _expected(first_logits, **{**knobs, "temperature": knobs["temperature"] * 1.25})
    assert counts[hotter == 0].sum() > 0 or not _chi2_ok(counts, hotter, n)


def test_same_seed_same_tokens_and_stream_agrees(eng):
    kw = {"do_sample": True, "temperature": 1.3, "top_p": 0.95, "seed": 1234}
    a = eng.generate(PROMPT, max_new_tokens=30, **kw)
    b = eng.generate(PROMPT, max_new_tokens=30, **kw)
    c = [ch.token_id for ch in eng.stream(PROMPT, max_new_tokens=30, **kw)]
    assert a.token_ids == b.token_ids == c
    d = eng.generate(PROMPT, max_new_tokens=30, **{**kw, "seed": 4321})
    assert d.token_ids != a.token_ids


def test_numpy_and_cython_samplers_agree_in_the_engine(model_dir):
    kw = {"do_sample": True, "temperature": 0.9, "top_k": 20, "repetition_penalty": 1.2, "seed": 7}
    a = engine.Engine(model_dir, max_length=64, sampler_impl="cython").generate(PROMPT, max_new_tokens=25, **kw)
    b = engine.Engine(model_dir, max_length=64, sampler_impl="numpy").generate(PROMPT, max_new_tokens=25, **kw)
    assert a.token_ids == b.token_ids


def test_logprobs_match_log_softmax(eng, first_logits):
    res = eng.generate(PROMPT, max_new_tokens=3, logprobs=5)
    want = np.log(_softmax(first_logits))
    assert res.logprobs is not None and len(res.logprobs) == 3
    assert res.logprobs[0] == pytest.approx(want[res.token_ids[0]], abs=1e-4)
    top = res.top_logprobs[0]
    assert list(top) == list(np.argsort(-want, kind="stable")[:5])
    assert res.token_ids[0] == int(np.argmax(first_logits))  # greedy by default


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_bad_sampling_values_name_the_parameter(eng, kwargs, name):
    with pytest.raises(engine.InvalidRequestError, match=name):
        eng.generate(PROMPT, max_new_tokens=2, do_sample=True, **kwargs)
    assert eng.generate(PROMPT, max_new_tokens=2).token_ids  # still works
