"""Synthetic random-weight models: determinism, graph math against numpy, KV plumbing, genai."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time

import numpy as np
import onnxruntime as ort
import pytest

from engine.testing import reference, synthetic
from engine.testing.reference import reference_logits
from engine.testing.synthetic import (
    SyntheticSpec,
    build_model,
    cached_model,
    phi4_mini_spec,
)

GQA = SyntheticSpec(layout="gqa")
CONCAT = SyntheticSpec(layout="concat")
EOS = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Builds each spec once per module: model_dir(spec) -> folder."""
    root = tmp_path_factory.mktemp("synthetic")
    built: dict[SyntheticSpec, object] = {}

    def get(spec: SyntheticSpec):
        if spec not in built:
            built[spec] = build_model(root / spec.key(), spec)
        return built[spec]

    return get


def _session(folder) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])


def _empty_past(spec: SyntheticSpec, batch: int) -> dict[str, np.ndarray]:
    shape = (batch, spec.kv_heads, 0, spec.head_size)  # (batch, kv_heads, past_len, head_size)
    return {
        f"past_key_values.{i}.{kind}": np.zeros(shape, np.dtype(spec.dtype))
        for i in range(spec.layers)
        for kind in ("key", "value")
    }


def _step(sess, spec: SyntheticSpec, ids: np.ndarray, past: dict[str, np.ndarray]):
    """One non-shared run: ids (batch, s) after past (batch, kv, L, head) -> logits, next past."""
    batch, seq = ids.shape
    start = next(iter(past.values())).shape[2]
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, start + seq), np.int64)}
    if spec.layout == "concat":
        feed["position_ids"] = np.tile(np.arange(start, start + seq, dtype=np.int64), (batch, 1))
    feed.update(past)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed), strict=True))
    new_past = {name: outs[name.replace("past_key_values", "present")] for name in past}
    return outs["logits"], new_past


def _greedy(sess, spec: SyntheticSpec, prompt: list[int], max_length: int) -> list[int]:
    """Plain InferenceSession greedy loop feeding present back as past; stops at EOS like genai."""
    tokens = list(prompt)
    logits, past = _step(sess, spec, np.array([prompt]), _empty_past(spec, 1))
    while len(tokens) < max_length:
        tokens.append(int(logits[0, -1].argmax()))
        if tokens[-1] == EOS or len(tokens) == max_length:
            break
        logits, past = _step(sess, spec, np.array([tokens[-1:]]), past)
    return tokens


def _prompt(spec: SyntheticSpec, batch: int, seq: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, spec.vocab, (batch, seq))


# --------------------------------------------------------------------------- spec and files


def test_spec_key_is_stable_and_covers_fields() -> None:
    assert GQA.key() == SyntheticSpec().key()
    assert len(GQA.key()) == 16
    keys = {GQA.key(), CONCAT.key(), SyntheticSpec(seed=1).key(), SyntheticSpec(rms_eps=1e-6).key()}
    assert len(keys) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "paged"},
        {"quant": "int8"},
        {"dtype": "bfloat16"},
        {"heads": 4, "kv_heads": 3},
        {"vocab": 100},
        {"layout": "concat", "head_size": 10, "rotary_fraction": 0.5},  # rotary_dim 5 is odd
        {"layout": "gqa", "head_size": 8, "hidden": 32},  # GroupQueryAttention needs head_size % 16 == 0
        {"block_size": 24},
    ],
)
def test_spec_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SyntheticSpec(**kwargs)


def test_same_seed_gives_identical_files_and_other_seed_other_weights(tmp_path) -> None:
    a = build_model(tmp_path / "a", GQA)
    b = build_model(tmp_path / "b", GQA)
    c = build_model(tmp_path / "c", dataclasses.replace(GQA, seed=1))
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.onnx").read_bytes() != (c / "model.onnx").read_bytes()
    weights = reference._RefWeights(a, GQA), reference._RefWeights(c, GQA)
    for name in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight"):
        assert weights[0].dense(name).shape == weights[1].dense(name).shape
        assert not np.allclose(weights[0].dense(name), weights[1].dense(name)), name


def test_folder_contents_follow_genai_schema(model_dir) -> None:
    for spec in (GQA, CONCAT):
        folder = model_dir(spec)
        cfg = json.loads((folder / "genai_config.json").read_text())
        decoder = cfg["model"]["decoder"]
        assert cfg["model"]["type"] == "llama"
        assert cfg["model"]["vocab_size"] == spec.vocab
        assert cfg["search"]["max_length"] == spec.context_length
        assert cfg["search"]["past_present_share_buffer"] is (spec.layout == "gqa")
        assert ("position_ids" in decoder["inputs"]) is (spec.layout == "concat")
        assert decoder["outputs"]["present_key_names"] == "present.%d.key"
        sess = _session(folder)
        inputs = {i.name: i for i in sess.get_inputs()}
        assert inputs["past_key_values.1.value"].shape[1:] == [
            spec.kv_heads,
            "past_sequence_length",
            spec.head_size,
        ]
        assert not (folder / "model.onnx.data").exists()
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is True
    assert tok_cfg["bos_token"] == "<s>"


def test_tokenizer_is_byte_level_with_bos(model_dir) -> None:
    from tokenizers import Tokenizer, pre_tokenizers

    assert set(synthetic._bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer.from_file(str(model_dir(GQA) / "tokenizer.json"))
    assert [tok.id_to_token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    text = "The harbor town was quiet. Snow, 42 and \u00e9t\u00e9 \u2603"
    enc = tok.encode(text)
    assert enc.ids[0] == 1
    assert max(enc.ids) < GQA.vocab
    assert len(enc.ids) < len(text.encode()) + 1  # merges shorten English text
    assert tok.decode(enc.ids, skip_special_tokens=True) == text


def test_external_data_matches_inline(tmp_path, model_dir, monkeypatch) -> None:
    monkeypatch.setattr(synthetic, "_EXTERNAL_THRESHOLD", 0)
    spec = dataclasses.replace(GQA, quant="int4")
    folder = build_model(tmp_path / "external", spec)
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    ids = _prompt(spec, 1, 6)
    external, _ = _step(_session(folder), spec, ids, _empty_past(spec, 1))
    inline, _ = _step(_session(model_dir(spec)), spec, ids, _empty_past(spec, 1))
    np.testing.assert_array_equal(external, inline)


# --------------------------------------------------------------------------- graph math


@pytest.mark.parametrize(
    ("spec", "atol"),
    [
        (GQA, 1e-4),
        (CONCAT, 1e-4),
        (SyntheticSpec(layout="gqa", head_size=64, rotary_fraction=0.75, seed=3), 1e-4),
        (SyntheticSpec(layout="concat", rotary_fraction=0.75, kv_heads=1, seed=4), 1e-4),
        (SyntheticSpec(layout="gqa", quant="int4", accuracy_level=0), 1e-4),
        (SyntheticSpec(layout="gqa", quant="int4"), 0.25),  # accuracy_level 4: activations int8
        (SyntheticSpec(layout="concat", quant="int4", hidden=80, block_size=32), 0.25),  # K % block != 0
        (SyntheticSpec(layout="concat", dtype="float16"), 0.05),
        (SyntheticSpec(layout="gqa", dtype="float16", quant="int4"), 0.25),
    ],
    ids=[
        "gqa",
        "concat",
        "gqa-rot0.75",
        "concat-rot0.75-mqa",
        "int4-acc0",
        "gqa-int4",
        "concat-int4-pad",
        "f16",
        "f16-int4",
    ],
)
def test_ort_logits_match_numpy_reference(model_dir, spec: SyntheticSpec, atol: float) -> None:
    folder = model_dir(spec)
    ids = _prompt(spec, 2, 11)
    logits, _ = _step(_session(folder), spec, ids, _empty_past(spec, 2))
    assert logits.dtype == np.dtype(spec.dtype)
    ref = reference_logits(folder, ids)
    assert ref.shape == (2, 11, spec.vocab)
    assert ref.std() > 0.5  # logits are not degenerate
    np.testing.assert_allclose(logits.astype(np.float32), ref, atol=atol, rtol=0)
    assert (logits.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_layouts_compute_the_same_function(model_dir) -> None:
    """gqa and concat with the same seed share every weight name, hence every weight."""
    ids = _prompt(GQA, 1, 9)
    gqa, _ = _step(_session(model_dir(GQA)), GQA, ids, _empty_past(GQA, 1))
    concat, _ = _step(_session(model_dir(CONCAT)), CONCAT, ids, _empty_past(CONCAT, 1))
    np.testing.assert_allclose(gqa, concat, atol=1e-4, rtol=0)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "spec",
    [GQA, CONCAT, SyntheticSpec(layout="concat", dtype="float16"), SyntheticSpec(quant="int4")],
    ids=["gqa", "concat", "concat-f16", "gqa-int4"],
)
def test_incremental_decoding_matches_full_sequence(model_dir, spec: SyntheticSpec, batch: int) -> None:
    sess = _session(model_dir(spec))
    ids = _prompt(spec, batch, 10)
    full, _ = _step(sess, spec, ids, _empty_past(spec, batch))
    # ORT's CPU GroupQueryAttention refuses a multi-token step after a past when batch > 1
    chunk = 1 if spec.layout == "gqa" and batch > 1 else 3
    bounds = [0, 4, 4 + chunk, *range(5 + chunk, 11)]
    parts, past = [], _empty_past(spec, batch)
    for lo, hi in itertools.pairwise(bounds):
        logits, past = _step(sess, spec, ids[:, lo:hi], past)
        parts.append(logits)
    assert past["past_key_values.0.key"].shape == (batch, spec.kv_heads, 10, spec.head_size)
    atol = 2e-2 if spec.dtype == "float16" or spec.quant == "int4" else 1e-4
    np.testing.assert_allclose(np.concatenate(parts, axis=1).astype(np.float32), full.astype(np.float32), atol=atol)


def test_concat_padding_is_masked(model_dir) -> None:
    """Left padding with attention_mask 0 and shifted position_ids leaves the real row's logits unchanged."""
    spec = CONCAT
    sess = _session(model_dir(spec))
    ids = _prompt(spec, 1, 6)
    alone, _ = _step(sess, spec, ids, _empty_past(spec, 1))
    padded = np.concatenate([np.zeros((1, 3), np.int64), ids], axis=1)
    feed = {
        "input_ids": padded,
        "attention_mask": np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]], np.int64),
        "position_ids": np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]], np.int64),
        **_empty_past(spec, 1),
    }
    logits = sess.run(["logits"], feed)[0]
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[:, 3:], alone, atol=1e-4)


@pytest.mark.parametrize(
    ("spec", "mask"),
    [(GQA, "view"), (GQA, "static"), (SyntheticSpec(dtype="float16", quant="int4"), "view")],
    ids=["view", "static", "f16-int4-view"],
)
def test_gqa_share_buffer_matches_non_shared(model_dir, spec: SyntheticSpec, mask: str) -> None:
    """One (1, kv, max_len, head) OrtValue bound as past AND present gives the non-shared tokens."""
    sess = _session(model_dir(spec))
    prompt = [int(t) for t in _prompt(spec, 1, 7)[0]]
    max_len = 32
    expected = _greedy(sess, spec, prompt, max_len)
    dtype = np.dtype(spec.dtype)
    buffers = {
        name: ort.OrtValue.ortvalue_from_numpy(np.zeros((1, spec.kv_heads, max_len, spec.head_size), dtype))
        for name in _empty_past(spec, 1)
    }  # (1, kv_heads, max_length, head_size) per layer and K/V, shared by past and present
    mask_buf = np.zeros((1, max_len), np.int64)  # (1, max_length) preallocated attention mask
    binding = sess.io_binding()
    binding.bind_output("logits")
    for name, buf in buffers.items():
        binding.bind_ortvalue_input(name, buf)
        binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
    tokens = list(prompt)
    step_ids = np.array([prompt], np.int64)
    while len(tokens) < len(expected):
        total = len(tokens)  # tokens in the cache after this step
        mask_buf[0, :total] = 1
        binding.bind_cpu_input("input_ids", step_ids)
        binding.bind_output("logits")  # (1, s, vocab): its shape changes after the prompt
        mask_value = mask_buf if mask == "static" else mask_buf[:, :total]
        binding.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask_value))
        sess.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        tokens.append(int(logits[0, -1].argmax()))
        step_ids = np.array([[tokens[-1]]], np.int64)
    assert tokens == expected
    cached = buffers["past_key_values.1.value"].numpy()  # written in place by every step
    filled = len(tokens) - 1
    assert np.abs(cached[:, :, :filled]).sum(axis=-1).min() > 0
    assert not cached[:, :, filled:].any()


def _genai():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:  # optional dependency (the bench extra)
        pytest.skip(f"onnxruntime_genai is not importable: {exc}")
    return og


@pytest.mark.parametrize("spec", [GQA, CONCAT], ids=["gqa", "concat"])
def test_genai_greedy_matches_plain_loop(model_dir, spec: SyntheticSpec) -> None:
    og = _genai()
    folder = model_dir(spec)
    prompt = [int(t) for t in _prompt(spec, 1, 6, seed=5)[0]]
    max_length = 30
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    genai_tokens = [int(t) for t in generator.get_sequence(0)]
    assert genai_tokens == _greedy(_session(folder), spec, prompt, max_length)
    assert len(genai_tokens) > len(prompt) + 5


def test_genai_loads_the_tokenizer(model_dir) -> None:
    og = _genai()
    from tokenizers import Tokenizer

    folder = model_dir(GQA)
    tok = og.Tokenizer(og.Model(str(folder)))
    text = "The town was quiet, and the boats rocked at the harbor wall."
    ids = [int(t) for t in tok.encode(text)]
    # onnxruntime-genai 0.18 adds no BOS for tokenizer.json models (the same on the tiny-llama fixture)
    assert ids == Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids[1:]
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------- phi4 shape and cache


@pytest.mark.slow
def test_phi4_mini_shape_builds_and_runs(tmp_path) -> None:
    spec = phi4_mini_spec(layers=1, vocab=1024, context_length=256)
    assert (spec.hidden, spec.heads, spec.kv_heads, spec.head_size, spec.rotary_dim) == (3072, 24, 8, 128, 96)
    start = time.perf_counter()
    folder = build_model(tmp_path / "phi4", spec)
    build_s = time.perf_counter() - start
    assert json.loads((folder / "genai_config.json").read_text())["model"]["type"] == "phi3"
    logits, past = _step(_session(folder), spec, np.array([[1, 40, 50, 60]]), _empty_past(spec, 1))
    assert logits.shape == (1, 4, 1024)
    assert np.isfinite(logits).all()
    assert past["past_key_values.0.key"].shape == (1, 8, 4, 128)
    assert build_s < 30, f"building took {build_s:.1f} s"


def test_cached_model_builds_once(tmp_path, monkeypatch) -> None:
    spec = dataclasses.replace(GQA, layers=1)
    first = cached_model(spec, tmp_path)
    assert first == tmp_path / spec.key()
    assert (first / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [spec.key()]  # no temp folder left behind

    def fail(*args: object) -> None:
        raise AssertionError("cached_model rebuilt an existing model")

    monkeypatch.setattr(synthetic, "build_model", fail)
    assert cached_model(spec, tmp_path) == first
    monkeypatch.setenv("ENGINE_MODEL_CACHE", str(tmp_path))
    assert cached_model(spec) == first
