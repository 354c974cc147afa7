"""Bad input gets a clear exception of a documented class, and the engine keeps working after it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import engine
from engine.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelFileNotFoundError,
    ModelLoadError,
    ProviderError,
)
from engine.testing.synthetic import SyntheticSpec, cached_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return cached_model(SyntheticSpec(layout="gqa", seed=11), tmp_path_factory.mktemp("err"))


@pytest.fixture(scope="module")
def eng(model_dir):
    return engine.Engine(model_dir, max_length=64)


def _copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match="does not exist"):
        engine.Engine(tmp_path / "nope")


def test_file_instead_of_folder(model_dir):
    with pytest.raises(ModelFileNotFoundError, match="not a folder"):
        engine.Engine(model_dir / "model.onnx")


def test_empty_folder(tmp_path):
    with pytest.raises(ModelFileNotFoundError, match=r"no genai_config\.json and no ONNX decoder"):
        engine.Engine(tmp_path)


def test_missing_model_file(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    (d / "model.onnx").unlink()
    with pytest.raises(ModelFileNotFoundError, match=r"model\.onnx.*missing"):
        engine.Engine(d)


def test_truncated_model_file(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        engine.Engine(d)


def test_garbage_model_file(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    (d / "model.onnx").write_bytes(b"\x00not an onnx file" * 100)
    with pytest.raises(ModelLoadError, match=r"model\.onnx"):
        engine.Engine(d)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["model"]["decoder"].pop("num_hidden_layers"),
            "missing key 'model.decoder.num_hidden_layers'",
        ),
        (lambda c: c["model"]["decoder"].update(head_size="16"), "head_size' must be int"),
        (lambda c: c["model"]["decoder"].update(num_key_value_heads=3), "num_key_value_heads is 3"),
        (lambda c: c["model"]["decoder"].update(num_hidden_layers=3), "no past KV input named"),
        (lambda c: c["model"]["decoder"].update(num_hidden_layers=7), "num_hidden_layers is 7 but the graph has only"),
        (lambda c: c["model"].update(eos_token_id="</s>"), "eos_token_id' must be an int or a list"),
        (lambda c: c["model"].update(vocab_size=99), "vocab_size is 99"),
        (lambda c: c.pop("model"), "missing key 'model'"),
    ],
)
def test_inconsistent_genai_config(model_dir, tmp_path, edit, message):
    d = _copy(model_dir, tmp_path)
    cfg = json.loads((d / "genai_config.json").read_text())
    edit(cfg)
    (d / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=message) as info:
        engine.Engine(d)
    assert "genai_config.json" in str(info.value) or "model.onnx" in str(info.value)


def test_genai_config_not_json(model_dir, tmp_path):
    d = _copy(model_dir, tmp_path)
    (d / "genai_config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        engine.Engine(d)


def test_unknown_provider(model_dir):
    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        engine.Engine(model_dir, provider="tpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_dir": None}, "model_dir must be a path"),
        ({"model_dir": 123}, "model_dir must be a path"),
        ({"sampler_impl": "fast"}, "sampler_impl must be"),
        ({"spinning": "yes"}, "spinning must be"),
        ({"threads": 0}, "threads must be"),
        ({"max_length": 1.5}, "max_length must be"),
        ({"graph_optimization": "max"}, "graph_optimization must be"),
    ],
)
def test_bad_engine_arguments(model_dir, kwargs, message):
    kwargs = {"model_dir": model_dir, **kwargs}
    with pytest.raises(InvalidRequestError, match=message):
        engine.Engine(**kwargs)


def test_numpy_integers_are_accepted_where_ints_are(model_dir):
    eng = engine.Engine(model_dir, max_length=np.int64(32), max_batch=np.int32(2))
    res = eng.generate(
        np.array([1, 2, 3], np.uint16), np.int64(4), do_sample=True, seed=np.uint64(7), top_k=np.int64(5)
    )
    assert len(res.token_ids) == 4
    assert eng.max_length == 32 and eng.max_batch == 2


def test_max_length_beyond_context(model_dir):
    with pytest.raises(InvalidRequestError, match="exceeds the model's context_length"):
        engine.Engine(model_dir, max_length=10**6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"prompt": list(range(1, 70))}, ContextLengthError, "max_length is 64"),
        (
            {"prompt": [1, 2, 3], "max_new_tokens": 62},
            ContextLengthError,
            "allowed max_new_tokens here: 1..61",
        ),
        ({"prompt": [1, 2], "max_new_tokens": 0}, InvalidRequestError, "max_new_tokens must be >= 1"),
        ({"prompt": [1, 2], "max_new_tokens": -5}, InvalidRequestError, "max_new_tokens must be >= 1"),
        (
            {"prompt": [1, 2], "max_new_tokens": 2.5},
            InvalidRequestError,
            "max_new_tokens must be a positive int",
        ),
        ({"prompt": [1, 100000]}, InvalidRequestError, "token id 100000 is outside the vocabulary"),
        ({"prompt": [1, -3]}, InvalidRequestError, "token id -3 is outside the vocabulary"),
        ({"prompt": [1, 2.0]}, InvalidRequestError, "token ids must be ints"),
        ({"prompt": [1, True]}, InvalidRequestError, "token ids must be ints"),
        ({"prompt": [None]}, InvalidRequestError, "token ids must be ints"),  # found by the fuzz test
        ({"prompt": []}, InvalidRequestError, "prompt has no tokens"),
        ({"prompt": ""}, InvalidRequestError, "empty string"),
        ({"prompt": None}, InvalidRequestError, "prompt must be a str or a list of token ids"),
        ({"prompt": np.zeros((2, 2, 2), dtype=np.int64)}, InvalidRequestError, "1-D integer array"),
        ({"prompt": [1, 2], "temprature": 0.5}, InvalidRequestError, "unknown argument"),
        # found by a list of hostile inputs tried by hand
        ({"prompt": "a\ud800b"}, InvalidRequestError, "not valid Unicode"),
        ({"prompt": np.array([2**63 + 5], np.uint64)}, InvalidRequestError, "token id 9223372036854775813 is outside"),
    ],
)
def test_bad_requests_raise_and_engine_recovers(eng, kwargs, exc, message):
    before = eng.generate([1, 5, 9], max_new_tokens=12).token_ids
    with pytest.raises(exc, match=message):
        eng.generate(**kwargs)
    with pytest.raises(exc, match=message):
        eng.stream(**kwargs)
    assert eng.generate([1, 5, 9], max_new_tokens=12).token_ids == before


def test_interrupted_stream_leaves_engine_usable(eng):
    want = eng.generate([1, 5, 9], max_new_tokens=20).token_ids
    it = eng.stream([1, 7, 7, 7], max_new_tokens=40)
    next(it)
    next(it)
    it.close()
    assert eng.generate([1, 5, 9], max_new_tokens=20).token_ids == want


def test_exception_inside_loop_leaves_engine_usable(eng, monkeypatch):
    want = eng.generate([1, 5, 9], max_new_tokens=20).token_ids
    calls = {"n": 0}
    original = eng._state.decode_one_token

    def failing():
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original()

    monkeypatch.setattr(eng._state, "decode_one_token", failing)
    with pytest.raises(KeyboardInterrupt):
        eng.generate([1, 2, 3, 4], max_new_tokens=30)
    monkeypatch.undo()
    assert eng.generate([1, 5, 9], max_new_tokens=20).token_ids == want


# ------------------------------------------------------------------------------------------------
# corrupted weight files: a folder whose model.onnx keeps its weights in model.onnx.data


@pytest.fixture(scope="module")
def external_dir(model_dir, tmp_path_factory):
    import onnx

    d = tmp_path_factory.mktemp("ext") / "model"
    shutil.copytree(model_dir, d)
    model = onnx.load(str(d / "model.onnx"))
    onnx.save(
        model,
        str(d / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,  # small constants stay inline, as in builder-made folders
    )
    return d


def test_external_data_model_loads(external_dir, eng):
    assert engine.Engine(external_dir, max_length=64).generate([1, 2, 3], max_new_tokens=8).token_ids == (
        eng.generate([1, 2, 3], max_new_tokens=8).token_ids
    )


def test_missing_external_data(external_dir, tmp_path):
    d = _copy(external_dir, tmp_path)
    (d / "model.onnx.data").unlink()
    with pytest.raises(ModelFileNotFoundError, match=r"model\.onnx\.data' is missing"):
        engine.Engine(d)


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.999])
def test_truncated_external_data(external_dir, tmp_path, keep):
    d = _copy(external_dir, tmp_path)
    data = (d / "model.onnx.data").read_bytes()
    (d / "model.onnx.data").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"model\.onnx\.data: truncated"):
        engine.Engine(d)


@pytest.mark.parametrize("seed", range(4))
def test_corrupted_bytes_never_crash(external_dir, model_dir, tmp_path, seed):
    """Random bytes written over either file: a ModelLoadError naming the file, or (when only weight
    values changed) an engine that still generates in-vocabulary ids."""
    rng = np.random.default_rng(seed)
    for name in ("model.onnx", "model.onnx.data"):
        d = _copy(external_dir, tmp_path / f"{name}-{seed}")
        path = d / name
        data = bytearray(path.read_bytes())
        for i in rng.integers(0, len(data), 16):
            data[i] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            eng = engine.Engine(d, max_length=32)
        except ModelLoadError as e:
            assert "model.onnx" in str(e)
            continue
        res = eng.generate([1, 2, 3], max_new_tokens=6)
        assert all(0 <= t < eng.spec.vocab_size for t in res.token_ids)
