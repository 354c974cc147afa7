"""Property: any batch of requests gives every row exactly the tokens of that request made alone.

Hypothesis draws the batch (1 to 6 prompts of 1 to 30 ids), per-row max_new_tokens, and per-row
sampling settings (greedy or seeded top-k/top-p/temperature/penalties, logit bias that can force an
early EOS), on fp32 synthetic models of both KV strategies (share-buffer GQA and growing concat),
with max_batch 4 so that longer lists run in groups.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.testing.synthetic import SyntheticSpec, cached_model

VOCAB = 320


@pytest.fixture(scope="module", params=["gqa", "concat"])
def engines(request, tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout=request.param, seed=81), tmp_path_factory.mktemp("batch-prop"))
    return engine.Engine(model_dir, max_length=64, max_batch=4), engine.Engine(model_dir, max_length=64)


def _row_settings(eos: int):
    greedy = st.just({})
    sampled = st.fixed_dictionaries(
        {
            "do_sample": st.just(True),
            "seed": st.integers(0, 2**32),
            "temperature": st.sampled_from([0.5, 1.0, 1.7]),
            "top_k": st.sampled_from([0, 5, 50]),
            "top_p": st.sampled_from([1.0, 0.9, 0.5]),
            "repetition_penalty": st.sampled_from([1.0, 1.3]),
        }
    )
    early_eos = st.just({"logit_bias": {eos: 30.0}})
    return st.one_of(greedy, sampled, early_eos)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batch_rows_equal_alone(engines, data):
    batch, alone = engines
    eos = next(iter(batch.eos_token_ids))
    n = data.draw(st.integers(1, 6), label="rows")
    prompts = [data.draw(st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=30)) for _ in range(n)]
    room = 64 - max(len(p) for p in prompts)
    new = [data.draw(st.integers(1, min(room, 20))) for _ in range(n)]
    rows = [data.draw(_row_settings(eos)) for _ in range(n)]
    keys = sorted({k for r in rows for k in r})
    defaults = {"do_sample": False, "seed": None, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    defaults.update(repetition_penalty=1.0, logit_bias=None)
    per_row = {k: [r.get(k, defaults[k]) for r in rows] for k in keys}
    results = batch.generate(prompts, max_new_tokens=new, **per_row)
    for p, m, r, res in zip(prompts, new, rows, results, strict=True):
        ref = alone.generate(p, max_new_tokens=m, **r)
        assert res.token_ids == ref.token_ids
        assert res.finish_reason == ref.finish_reason
        assert res.prompt_ids == p and res.stats.new_tokens == len(res.token_ids)
    assert np.all(np.asarray([len(r.token_ids) for r in results]) <= np.asarray(new))
