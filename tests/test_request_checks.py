"""Request checks that once escaped (issue: hostile input): each ends in the package's error before
anything runs, and the engine's next answer is unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.errors import ContextLengthError, InvalidRequestError
from engine.request import MAX_STOP_STRINGS
from engine.testing.synthetic import SyntheticSpec, cached_model


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    d = cached_model(SyntheticSpec(layout="gqa", seed=41), tmp_path_factory.mktemp("checks"))
    return engine.Engine(d, max_length=64)


@pytest.fixture(scope="module")
def want(eng):
    return eng.generate([1, 2, 3], max_new_tokens=8).token_ids


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_new_tokens": np.int8(100)}, ContextLengthError, "exceeds max_length"),
        ({"max_new_tokens": np.uint64(2**63)}, ContextLengthError, "exceeds max_length"),
        ({"max_new_tokens": np.int64(0)}, InvalidRequestError, ">= 1"),
        ({"logit_bias": {3: 1e300}}, InvalidRequestError, "logit_bias"),
        ({"logit_bias": {3: -1e300}}, InvalidRequestError, "logit_bias"),
        ({"stop": ["x"] * (MAX_STOP_STRINGS + 1)}, InvalidRequestError, "stop strings"),
    ],
)
def test_bad_request_is_refused_before_running(eng, want, kwargs, error, match):
    with pytest.raises(error, match=match):
        eng.generate([1, 2, 3], **kwargs)
    assert eng.generate([1, 2, 3], max_new_tokens=8).token_ids == want


def test_token_ids_beyond_int64_are_a_vocabulary_error(eng, want):
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        eng.generate([1, 2**70, 3], max_new_tokens=4)
    assert eng.generate([1, 2, 3], max_new_tokens=8).token_ids == want


def test_a_numpy_max_new_tokens_that_fits_is_taken(eng, want):
    assert eng.generate([1, 2, 3], max_new_tokens=np.int16(8)).token_ids == want


def test_text_whose_ids_leave_the_vocabulary_names_the_tokenizer(eng, monkeypatch):
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [1, eng.spec.vocab_size + 5]

    monkeypatch.setattr(eng._requests, "tokenizer", Tok())
    with pytest.raises(InvalidRequestError, match="tokenizer produced token id"):
        eng.generate("hello", max_new_tokens=4)


@pytest.mark.parametrize("name", ["last_token_logits", "warmup", "profile"])
def test_engine_flags_must_be_bools(eng, name):
    with pytest.raises(InvalidRequestError, match=name):
        engine.Engine(eng.spec.model_dir, max_length=64, **{name: "no"})


def test_a_string_do_sample_in_genai_config_is_refused():
    from engine.sampling import SamplingParams

    with pytest.raises(InvalidRequestError, match="do_sample"):
        SamplingParams.from_search_config({"do_sample": "false"})
    assert SamplingParams.from_search_config({"do_sample": False}).do_sample is False


def test_a_string_do_sample_in_a_model_folder_fails_at_load(eng, tmp_path):
    import json
    import shutil

    from engine.errors import ModelLoadError

    d = tmp_path / "m"
    shutil.copytree(eng.spec.model_dir, d)
    cfg = json.loads((d / "genai_config.json").read_text())
    cfg.setdefault("search", {})["do_sample"] = "false"
    (d / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="do_sample"):
        engine.Engine(d, max_length=64)
