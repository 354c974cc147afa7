"""Hybrid conv-state models (LFM2-style): conv layers carry a fixed-size state, attention layers KV.

Synthetic models of the shape onnxruntime-genai's LFM2 builder writes (``layer_types``,
``past.N.conv`` / ``present.N.conv`` of shape (batch, hidden, kernel - 1), KV only for the
attention layers), in both KV layouts, against a numpy forward pass written here (the conv) on
top of engine/testing/reference.py's pieces (norm, rotary, attention): greedy tokens single and
batched, rows that join a running batch, requests after requests (the states are reset), and
onnxruntime-genai itself where it is installed. Folders that declare what the engine does not
run raise UnsupportedModelError.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine.config import load_model_spec
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.testing.reference import (
    _ref_attention,
    _ref_rotary,
    _RefWeights,
    decoder_forward,
    greedy_continuation,
)
from engine.testing.synthetic import SyntheticSpec, cached_model, read_spec

TYPES = ("conv", "full_attention", "conv", "full_attention")
SPECS = {
    "gqa": SyntheticSpec(layout="gqa", layers=4, layer_types=TYPES, model_type="lfm2", seed=16),
    "concat": SyntheticSpec(layout="concat", layers=4, layer_types=TYPES, model_type="lfm2", seed=16, conv_kernel=4),
}
MAX_LENGTH = 64
NEW_TOKENS = 14


@pytest.fixture(scope="module", params=list(SPECS))
def hybrid(request):
    return cached_model(SPECS[request.param])


# ------------------------------------------------------------------------------------------------
# the numpy reference


def _ref_conv(spec: SyntheticSpec, weights: _RefWeights, p: str, h: np.ndarray) -> np.ndarray:
    """LFM2 short conv over a whole sequence from a zero state: [B, C, X] = in_proj(h);
    y[t] = sum_k w[k] * (B*X)[t - K + 1 + k] (zero before the start); out_proj(C * y)."""
    d, k = spec.hidden, spec.conv_kernel
    bcx = h @ weights.linear(f"{p}.conv.in_proj", d, 3 * d)  # (b, s, 3d)
    b, c, x = bcx[..., :d], bcx[..., d : 2 * d], bcx[..., 2 * d :]
    bx = b * x
    w = weights.dense(f"{p}.conv.conv.weight")[:, 0, :]  # (d, k)
    padded = np.concatenate([np.zeros((bx.shape[0], k - 1, d)), bx], axis=1)  # (b, k - 1 + s, d)
    s = bx.shape[1]
    y = sum(padded[:, j : j + s, :] * w[:, j] for j in range(k))
    return (c * y) @ weights.linear(f"{p}.conv.out_proj", d, d)


def reference_logits(folder, ids: np.ndarray) -> np.ndarray:
    """(batch, seq, vocab) float64 logits of a synthetic hybrid model, no padding."""
    spec = read_spec(folder)
    weights = _RefWeights(folder, spec)
    cos, sin = _ref_rotary(spec, ids.shape[1])

    def mixer(i: int, p: str, h: np.ndarray) -> np.ndarray:
        if spec.layer_type(i) == "conv":
            return _ref_conv(spec, weights, p, h)
        return _ref_attention(spec, weights, p, h, cos, sin)

    return decoder_forward(spec, weights, ids, mixer)


def reference_greedy(folder, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by whole-sequence reference forward passes (no state carried)."""
    return greedy_continuation(lambda ids: reference_logits(folder, ids), prompt, n)


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


# ------------------------------------------------------------------------------------------------
# the graph and the reference agree; the spec


def test_reference_matches_the_graph(hybrid):
    """The numpy reference and an ORT run of the whole graph give the same logits (float32 rounding)."""
    spec = read_spec(hybrid)
    ids = np.array([_prompt(1, 9)])
    session = ort.InferenceSession(str(hybrid / "model.onnx"))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if spec.layout == "concat":
        feeds["position_ids"] = np.arange(ids.shape[1])[None, :]
    for info in session.get_inputs():
        if info.name.endswith(".conv"):
            feeds[info.name] = np.zeros((1, spec.hidden, spec.conv_kernel - 1), np.float32)
        elif info.name.startswith("past_key_values"):
            feeds[info.name] = np.zeros((1, spec.kv_heads, 0, spec.head_size), np.float32)
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, reference_logits(hybrid, ids), rtol=1e-4, atol=1e-4)


def test_spec_has_kv_only_for_attention_layers(hybrid):
    spec = load_model_spec(hybrid)
    syn = read_spec(hybrid)
    assert spec.layer_types == TYPES
    assert spec.past_names == tuple(f"past_key_values.{i}.{kv}" for i in (1, 3) for kv in ("key", "value"))
    assert spec.conv_names == (("past.0.conv", "present.0.conv"), ("past.2.conv", "present.2.conv"))
    assert spec.conv_shape == (syn.hidden, syn.conv_kernel - 1)
    assert spec.num_kv_layers == 2
    assert spec.kv_bytes_per_token == 2 * 2 * syn.kv_heads * syn.head_size * 4


# ------------------------------------------------------------------------------------------------
# generation against the reference


def test_single_greedy_matches_reference(hybrid):
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH)
    for seed, n in ((2, 5), (3, 11), (2, 5)):  # the third repeats the first: states reset per request
        prompt = _prompt(seed, n)
        assert eng.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == reference_greedy(hybrid, prompt, NEW_TOKENS)


def test_state_bytes_are_counted(hybrid):
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH, max_batch=2)
    syn = read_spec(hybrid)
    conv = 2 * 2 * 2 * syn.hidden * (syn.conv_kernel - 1) * 4  # 2 buffers x 2 conv layers x 2 rows
    state = eng._ctx.state
    assert state.conv.nbytes == conv
    assert state.kv_nbytes >= conv


def test_batched_greedy_matches_reference(hybrid):
    prompts = [_prompt(4, 6), _prompt(5, 9), _prompt(6, 3)]
    expected = [reference_greedy(hybrid, p, NEW_TOKENS) for p in prompts]
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH, max_batch=3)
    results = eng.generate(prompts, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == expected
    # another batch on the same rows, in another order: nothing of the first batch's states leaks
    results = eng.generate(prompts[::-1], max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == expected[::-1]
    # and a single request after the batch
    assert eng.generate(prompts[1], max_new_tokens=NEW_TOKENS).token_ids == expected[1]


def test_joined_row_starts_from_a_clear_state():
    """A row that ends and is taken by a new prompt between steps (the batched loop's join) gets
    a zero conv state; the other row keeps its own (share-buffer layout: joins need it)."""
    folder = cached_model(SPECS["gqa"])
    eng = engine.Engine(folder, max_length=MAX_LENGTH, max_batch=2)
    st = eng._ctx.state
    a, b, c = _prompt(7, 5), _prompt(8, 8), _prompt(9, 4)
    want_a, want_b, want_c = (reference_greedy(folder, p, 12) for p in (a, b, c))
    logits = st.prefill_rows([np.array(a), np.array(b)], max_steps=30)
    got: list[list[int]] = [[], []]
    got_c: list[int] = []
    for step in range(12):
        ids = np.argmax(logits[:2], axis=1)
        if step < 4:
            got[0].append(int(ids[0]))
        else:
            got_c.append(int(ids[0]))
        got[1].append(int(ids[1]))
        st.next_ids[:2] = ids
        if step == 3:
            st.finished[0] = 1  # row 0 ends after 4 tokens: masked from this step on
        logits = st.decode_rows()
        if step == 3:
            st.join_row(0, np.array(c), 20)  # c's prompt logits replace row 0's
    assert got[0] == want_a[:4]
    assert got[1] == want_b
    assert got_c == want_c[:8]


def test_streams_and_long_prompts_match_reference(hybrid):
    """A prompt longer than the conv state and a streamed request."""
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH)
    prompt = _prompt(10, 30)
    chunks = list(eng.stream(prompt, max_new_tokens=8))
    assert [c.token_id for c in chunks] == reference_greedy(hybrid, prompt, 8)


def test_matches_onnxruntime_genai(hybrid):
    """onnxruntime-genai runs these folders as LFM2 models (its LFM2Cache): same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime_genai is not installed (the bench extra)")
    prompt = _prompt(11, 7)
    model = og.Model(str(hybrid))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH)
    assert eng.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == theirs


# ------------------------------------------------------------------------------------------------
# what is refused


def _copy(folder, tmp_path, edit) -> object:
    out = tmp_path / "model"
    shutil.copytree(folder, out)
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    edit(cfg["model"]["decoder"])
    path.write_text(json.dumps(cfg))
    return out


def test_undeclared_hybrid_is_an_unsupported_model(tmp_path):
    """No layer_types: the graph lacks past KV for the conv layers and has past.N.conv inputs.
    That is a design the config does not declare, not a corrupted file."""

    def drop(dec):
        del dec["layer_types"]

    folder = _copy(cached_model(SPECS["gqa"]), tmp_path, drop)
    with pytest.raises(UnsupportedModelError, match=r"per-layer state besides KV \(past\.0\.conv"):
        load_model_spec(folder)


def test_unknown_layer_kind_is_unsupported(tmp_path):
    def mamba(dec):
        dec["layer_types"][0] = "mamba"

    folder = _copy(cached_model(SPECS["gqa"]), tmp_path, mamba)
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        load_model_spec(folder)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda dec: dec.update(layer_types=["conv", "full_attention"]), ModelLoadError, "lists 2 layers"),
        (lambda dec: dec.update(layer_types="conv"), ModelLoadError, "must be a list of strings"),
        (lambda dec: dec.update(conv_cache_size=7), ModelLoadError, "conv_cache_size is 7"),
        (lambda dec: dec.update(layer_types=["conv"] * 4), UnsupportedModelError, "no attention layer"),
        (lambda dec: dec["inputs"].update(past_conv_names="conv_in.%d"), ModelLoadError, "no past conv state input"),
    ],
    ids=["count", "type", "width", "no-attention", "names"],
)
def test_inconsistent_hybrid_config(tmp_path, edit, error, match):
    folder = _copy(cached_model(SPECS["gqa"]), tmp_path, edit)
    with pytest.raises(error, match=match):
        load_model_spec(folder)
    # the engine answers the next load normally
    assert load_model_spec(cached_model(SPECS["gqa"])).conv_names


def test_evicted_stream_resumes_with_its_conv_states_recomputed(hybrid):
    """A call from the stream's own thread evicts the suspended stream (another request takes row
    0 and its states); the stream resumes by recomputing its cache from its prompt and tokens."""
    eng = engine.Engine(hybrid, max_length=MAX_LENGTH)
    prompt, other = _prompt(12, 9), _prompt(13, 6)
    stream = iter(eng.stream(prompt, max_new_tokens=NEW_TOKENS))
    first = [next(stream).token_id for _ in range(4)]
    assert eng.generate(other, max_new_tokens=6).token_ids == reference_greedy(hybrid, other, 6)
    rest = [c.token_id for c in stream]
    assert first + rest == reference_greedy(hybrid, prompt, NEW_TOKENS)
