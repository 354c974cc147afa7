"""Sliding-window layers: window-sized KV buffers where the graph's attention op takes them.

onnxruntime-genai's builder marks a sliding layer's GroupQueryAttention with
``local_window_size = W`` and, since it sizes those layers' caches to the window,
``sliding_window_cache = 1`` (the kernel then addresses the buffer relative to the cache and
evicts the oldest positions itself). The engine allocates ``min(max_length, W + 16)`` positions
for exactly those layers (onnxruntime-genai's CPU sizing) and ``max_length`` for the others. A
graph without the attribute takes only full-length buffers (onnxruntime's GQA refuses a shorter
one: "total_sequence_length must ... be no greater than past_sequence_length for a static
cache"), so there every layer keeps ``max_length``.

Checked against a numpy forward pass with the window (a query attends to its last W keys,
itself included, as onnxruntime's kernel does) over sequences much longer than the buffer:
single, batched, a row joining a running batch, and onnxruntime-genai where it is installed.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest

import engine
from engine.config import WINDOW_CACHE_SLACK, load_model_spec
from engine.kv_cache import kv_cache_bytes_needed
from engine.testing.reference import _ref_rope, _ref_rotary, _RefWeights, decoder_forward, greedy_continuation
from engine.testing.synthetic import SyntheticSpec, cached_model, read_spec

W = 8
TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
WINDOWED = SyntheticSpec(layers=4, layer_types=TYPES, sliding_window=W, window_cache=True, seed=21)
PLAIN = SyntheticSpec(layers=4, layer_types=TYPES, sliding_window=W, window_cache=False, seed=21)
MAX_LENGTH = 96
NEW_TOKENS = 40  # with 20-token prompts: 60 positions, more than twice the window buffer (24)


# ------------------------------------------------------------------------------------------------
# the numpy reference


def _attention(spec, weights, p, h, cos, sin, window: int | None) -> np.ndarray:
    b, s, _ = h.shape
    d = spec.head_size

    def heads(name: str, n: int) -> np.ndarray:
        return (
            (h @ weights.linear(f"{p}.self_attn.{name}", spec.hidden, n * d)).reshape(b, s, n, d).transpose(0, 2, 1, 3)
        )

    group = spec.heads // spec.kv_heads
    q = _ref_rope(heads("q_proj", spec.heads), cos, sin)
    k = np.repeat(_ref_rope(heads("k_proj", spec.kv_heads), cos, sin), group, axis=1)
    v = np.repeat(heads("v_proj", spec.kv_heads), group, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    i, j = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= i - j < window  # the last `window` keys, the query's own included
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, s, spec.heads * d)
    return ctx @ weights.linear(f"{p}.self_attn.o_proj", spec.heads * d, spec.hidden)


def reference_logits(folder, ids: np.ndarray) -> np.ndarray:
    """(batch, seq, vocab) float64 logits; sliding layers attend to their last W keys."""
    spec = read_spec(folder)
    weights = _RefWeights(folder, spec)
    cos, sin = _ref_rotary(spec, ids.shape[1])

    def mixer(i: int, p: str, h: np.ndarray) -> np.ndarray:
        window = spec.sliding_window if spec.layer_type(i) == "sliding_attention" else None
        return _attention(spec, weights, p, h, cos, sin, window)

    return decoder_forward(spec, weights, ids, mixer)


def reference_greedy(folder, prompt: list[int], n: int) -> list[int]:
    return greedy_continuation(lambda ids: reference_logits(folder, ids), prompt, n)


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


@pytest.fixture(scope="module")
def windowed():
    return cached_model(WINDOWED)


@pytest.fixture(scope="module")
def expected(windowed):
    """Prompts of 20, 7 and 13 tokens and their reference continuations (the same weights in
    both folders: only the attribute differs)."""
    prompts = [_prompt(1, 20), _prompt(2, 7), _prompt(3, 13)]
    return prompts, [reference_greedy(windowed, p, NEW_TOKENS) for p in prompts]


# ------------------------------------------------------------------------------------------------
# buffers


def test_window_sized_buffers_for_sliding_layers_only(windowed):
    spec = load_model_spec(windowed)
    c = W + WINDOW_CACHE_SLACK
    assert dict(spec.window_caches) == {f"past_key_values.{i}.{kv}": W for i in (0, 2) for kv in ("key", "value")}
    eng = engine.Engine(windowed, max_length=MAX_LENGTH, max_batch=2)
    kv = eng._ctx.state.kv
    lengths = {past: buf.shape[2] for (past, _), buf in zip(kv.names, kv.buffers, strict=True)}
    assert lengths == {
        f"past_key_values.{i}.{kv}": c if i in (0, 2) else MAX_LENGTH for i in range(4) for kv in ("key", "value")
    }
    per_position = 2 * WINDOWED.kv_heads * WINDOWED.head_size * 4  # one row, K and V, float32
    assert kv.nbytes == per_position * 2 * (2 * c + 2 * MAX_LENGTH)  # 2 rows, 2 sliding + 2 full layers
    assert kv_cache_bytes_needed(spec, MAX_LENGTH, batch=2) == kv.nbytes
    # a max_length below window + slack: the window buffers are max_length long
    assert spec.kv_length("past_key_values.0.key", 16) == 16


def test_graph_without_the_window_cache_attribute_keeps_full_buffers():
    spec = load_model_spec(cached_model(PLAIN))
    assert not spec.window_caches
    assert spec.kv_length("past_key_values.0.key", 4096) == 4096


# ------------------------------------------------------------------------------------------------
# tokens against the reference


def test_reference_matches_the_graph(windowed):
    import onnxruntime as ort

    ids = np.array([_prompt(4, 30)])
    session = ort.InferenceSession(str(windowed / "model.onnx"))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for info in session.get_inputs():
        if info.name.startswith("past_key_values"):
            feeds[info.name] = np.zeros((1, WINDOWED.kv_heads, 64, WINDOWED.head_size), np.float32)
    logits = session.run(["logits"], feeds)[0]
    np.testing.assert_allclose(logits, reference_logits(windowed, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", [WINDOWED, PLAIN], ids=["window-buffers", "full-buffers"])
def test_single_greedy_matches_reference(spec, expected):
    prompts, want = expected
    eng = engine.Engine(cached_model(spec), max_length=MAX_LENGTH)
    for prompt, tokens in zip(prompts, want, strict=True):
        assert eng.generate(prompt, max_new_tokens=NEW_TOKENS).token_ids == tokens


def test_batched_greedy_matches_reference(windowed, expected):
    prompts, want = expected
    eng = engine.Engine(windowed, max_length=MAX_LENGTH, max_batch=3)
    assert [r.token_ids for r in eng.generate(prompts, max_new_tokens=NEW_TOKENS)] == want
    assert [r.token_ids for r in eng.generate(prompts[::-1], max_new_tokens=NEW_TOKENS)] == want[::-1]


def test_joined_row_matches_reference(windowed, expected):
    """A row that ends and is taken by a new prompt after the other row has passed the buffer."""
    prompts, want = expected
    eng = engine.Engine(windowed, max_length=MAX_LENGTH, max_batch=2)
    st = eng._ctx.state
    a, b, c = prompts
    logits = st.prefill_rows([np.array(a), np.array(b)], max_steps=NEW_TOKENS + 20)
    rows: list[list[int]] = [[], [], []]  # a, b, then c on row 0
    for step in range(30):
        ids = np.argmax(logits[:2], axis=1)
        rows[0 if step < 12 else 2].append(int(ids[0]))
        rows[1].append(int(ids[1]))
        st.next_ids[:2] = ids
        if step == 11:
            st.finished[0] = 1
        logits = st.decode_rows()
        if step == 11:
            st.join_row(0, np.array(c), 30)
    assert rows[0] == want[0][:12]
    assert rows[1] == want[1][:30]
    assert rows[2] == want[2][:18]


def test_matches_onnxruntime_genai(windowed, expected):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime_genai is not installed (the bench extra)")
    prompts, want = expected
    model = og.Model(str(windowed))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompts[0]) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompts[0])
    while not generator.is_done():
        generator.generate_next_token()
    assert [int(t) for t in generator.get_sequence(0)][len(prompts[0]) :] == want[0]


# ------------------------------------------------------------------------------------------------
# genai_config's sliding_window against the graph


def _with_window(tmp_path, window: dict | None):
    out = tmp_path / "model"
    shutil.copytree(cached_model(WINDOWED), out)
    path = out / "genai_config.json"
    cfg = json.loads(path.read_text())
    if window is None:
        del cfg["model"]["decoder"]["sliding_window"]
    else:
        cfg["model"]["decoder"]["sliding_window"] = window
    path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    ("window", "match"),
    [
        ({"window_size": W, "layers": []}, "its layer list is empty"),
        ({"window_size": W, "layers": [0, 1, 2]}, r"lists layers \[0, 1, 2\], the graph windows layers \[0, 2\]"),
        ({"window_size": 16, "layers": [0, 2]}, r"window_size is 16, the graph's local_window_size \[8\]"),
    ],
    ids=["empty-layers", "other-layers", "other-size"],
)
def test_disagreeing_declaration_warns_once_and_the_graph_wins(tmp_path, window, match):
    folder = _with_window(tmp_path, window)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = load_model_spec(folder)
    ours = [w for w in caught if "sliding_window" in str(w.message)]
    assert len(ours) == 1
    assert "uses the graph's local_window_size" in str(ours[0].message)
    assert re.search(match, str(ours[0].message))
    assert set(spec.window_caches) == {f"past_key_values.{i}.{kv}" for i in (0, 2) for kv in ("key", "value")}


@pytest.mark.parametrize("window", [None, {"window_size": W, "layers": [0, 2]}], ids=["undeclared", "agreeing"])
def test_agreeing_or_absent_declaration_is_silent(tmp_path, window):
    folder = _with_window(tmp_path, window)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = load_model_spec(folder)
    assert len(spec.window_caches) == 4
