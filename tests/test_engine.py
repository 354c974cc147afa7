"""End-to-end tests of the engine on the CPU: greedy parity against independent references.

References:
* the fixtures' reference.json (stories260k checked against llama2.c's run.c; the tiny exports
  against onnxruntime-genai and a plain loop), exact token ids and text;
* a plain ``InferenceSession.run`` loop feeding numpy KV back by hand (engine.testing.plain_loop),
  on the project's synthetic models in each layout;
* onnxruntime-genai itself, where installed.
"""

from __future__ import annotations

import pytest

import engine
from engine.config import KVLayout
from engine.testing.plain_loop import PlainLoop
from engine.testing.synthetic import SyntheticSpec, cached_model

from .conftest import load_reference, shared_param

SYNTHETIC = {
    "gqa-fp32": SyntheticSpec(layout="gqa", seed=1),
    "gqa-int4-partial-rotary": SyntheticSpec(
        layout="gqa",
        quant="int4",
        rotary_fraction=0.75,
        hidden=128,
        heads=2,
        kv_heads=1,
        head_size=64,
        seed=2,
    ),
    "concat-fp32": SyntheticSpec(layout="concat", seed=3),
    "concat-fp16": SyntheticSpec(layout="concat", dtype="float16", seed=4),
}
PROMPTS = [[1, 17, 33, 250, 101, 7], [1, 5], list(range(3, 60))]


@pytest.fixture(scope="session")
def synthetic_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return {name: cached_model(spec, root) for name, spec in SYNTHETIC.items()}


@pytest.fixture(scope="session")
def engines(synthetic_dirs):
    return {name: engine.Engine(d, max_length=128) for name, d in synthetic_dirs.items()}


# ------------------------------------------------------------------------------------------
# real fixtures against their reference.json


@pytest.mark.parametrize("fixture", [shared_param(n) for n in ("stories260k", "tiny_llama_fp16", "tiny_gpt2")])
def test_fixture_greedy_ids_match_reference(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    eng = engine.Engine(model_dir)
    for ref in load_reference(model_dir):
        res = eng.generate(ref["prompt_ids"], max_new_tokens=len(ref["greedy_ids"]))
        assert res.token_ids == ref["greedy_ids"]
        assert res.stats.prompt_tokens == len(ref["prompt_ids"])
        assert res.stats.new_tokens == len(ref["greedy_ids"])


def test_fixture_layouts_detected(stories260k, tiny_llama_fp16, tiny_gpt2):
    assert engine.load_model_spec(stories260k).layout is KVLayout.GQA_SHARED
    spec = engine.load_model_spec(tiny_llama_fp16)
    assert spec.layout is KVLayout.CONCAT and spec.kv_dtype.name == "float16" and spec.position_ids is not None
    spec = engine.load_model_spec(tiny_gpt2)
    assert spec.layout is KVLayout.COMBINED and spec.input_ids.dtype.name == "int32"


def test_stories260k_text_prompt_and_continuation(stories260k):
    eng = engine.Engine(stories260k)
    for ref in load_reference(stories260k):
        res = eng.generate(ref["prompt"], max_new_tokens=len(ref["greedy_ids"]))
        assert res.prompt_ids == ref["prompt_ids"]  # BOS added for a text prompt
        assert res.token_ids == ref["greedy_ids"]
        assert res.text == ref["continuation"]
        assert res.finish_reason == "length"


def test_stories260k_stream_joins_to_text(stories260k):
    eng = engine.Engine(stories260k)
    ref = load_reference(stories260k)[0]
    chunks = list(eng.stream(ref["prompt"], max_new_tokens=len(ref["greedy_ids"])))
    assert [c.token_id for c in chunks] == ref["greedy_ids"]
    assert "".join(c.text for c in chunks) == ref["continuation"]
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"


def test_one_shot_generate(stories260k):
    ref = load_reference(stories260k)[2]
    res = engine.generate(stories260k, ref["prompt"], max_new_tokens=10)
    assert res.token_ids == ref["greedy_ids"][:10]


def test_last_token_logits_edit_changes_nothing(stories260k, tiny_llama_fp16):
    for model_dir in (stories260k, tiny_llama_fp16):
        ref = load_reference(model_dir)[0]
        edited = engine.Engine(model_dir, last_token_logits=True)
        plain = engine.Engine(model_dir, last_token_logits=False)
        assert edited.last_token_logits and not plain.last_token_logits
        a = edited.generate(ref["prompt_ids"], max_new_tokens=20).token_ids
        b = plain.generate(ref["prompt_ids"], max_new_tokens=20).token_ids
        assert a == b == ref["greedy_ids"][:20]


# ------------------------------------------------------------------------------------------
# synthetic models against the plain loop


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_synthetic_greedy_matches_plain_loop(name, synthetic_dirs, engines):
    eng = engines[name]
    plain = PlainLoop(synthetic_dirs[name])
    for prompt in PROMPTS:
        want = plain.greedy(prompt, 40).token_ids
        res = eng.generate(prompt, max_new_tokens=40)
        assert res.token_ids == want, name
        assert res.finish_reason == ("eos" if want[-1] in eng.eos_token_ids else "length")


def test_synthetic_layouts(engines):
    assert engines["gqa-fp32"].spec.layout is KVLayout.GQA_SHARED
    assert engines["concat-fp16"].spec.layout is KVLayout.CONCAT
    assert engines["concat-fp16"].spec.kv_dtype.name == "float16"


def test_repeated_and_interleaved_calls_are_identical(engines):
    eng = engines["gqa-fp32"]
    first = eng.generate(PROMPTS[0], max_new_tokens=30)
    other = eng.generate(PROMPTS[2], max_new_tokens=50)
    again = eng.generate(PROMPTS[0], max_new_tokens=30)
    assert first.token_ids == again.token_ids
    assert first.text == again.text
    assert other.token_ids != first.token_ids


def test_kv_buffers_allocated_once(engines):
    eng = engines["gqa-fp32"]
    buffers = [b.ctypes.data for b in eng._state.kv.buffers]
    eng.generate(PROMPTS[1], max_new_tokens=5)
    eng.generate(PROMPTS[2], max_new_tokens=5)
    assert [b.ctypes.data for b in eng._state.kv.buffers] == buffers
    spec = eng.spec
    assert eng.kv_cache_bytes == spec.kv_bytes_per_token * eng.max_length


def test_text_prompt_on_synthetic_tokenizer(engines):
    eng = engines["gqa-fp32"]
    res = eng.generate("Hello there", max_new_tokens=8)
    assert res.prompt_ids[0] == eng.tokenizer.bos_token_id
    assert len(res.token_ids) >= 1
    assert isinstance(res.text, str)


def test_onnxruntime_genai_parity(synthetic_dirs, engines):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (bench extra)")
    for name in ("gqa-fp32", "gqa-int4-partial-rotary", "concat-fp32"):
        model = og.Model(str(synthetic_dirs[name]))
        for prompt in PROMPTS[:2]:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
            gen = og.Generator(model, params)
            gen.append_tokens([prompt])
            while not gen.is_done():
                gen.generate_next_token()
            want = list(gen.get_sequence(0))[len(prompt) :]
            got = engines[name].generate(prompt, max_new_tokens=24).token_ids
            assert got == want, name


def test_longrope_switch_detected_from_graph(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from engine.config import _rope_switch_length

    branch = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["o"])], "b", [], [helper.make_tensor_value_info("o", 1, [1])]
    )
    nodes = [
        helper.make_node("Greater", ["len", "limit"], ["cond"]),
        helper.make_node("If", ["cond"], ["out"], then_branch=branch, else_branch=branch),
    ]
    limit = onnx.numpy_helper.from_array(np.array(4096, dtype=np.int64), "limit")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("len", TensorProto.INT64, [])], [], [limit])
    assert _rope_switch_length(graph) == 4096
    graph.ClearField("node")
    assert _rope_switch_length(graph) is None


def test_longrope_crossing_recomputes_cache(engines, monkeypatch):
    """At the switch length the whole sequence is prefilled again (as onnxruntime-genai does for
    Phi-3/Phi-4 LongRoPE); with one rope table the recomputed cache gives the same tokens."""
    import dataclasses

    eng = engines["gqa-fp32"]
    prompt = PROMPTS[0]
    want = eng.generate(prompt, max_new_tokens=20).token_ids
    calls = []
    original = eng._state.prefill

    def counting(ids):
        calls.append(ids.shape[1])
        return original(ids)

    monkeypatch.setattr(eng, "spec", dataclasses.replace(eng.spec, rope_switch_length=len(prompt) + 6))
    monkeypatch.setattr(eng._state, "prefill", counting)
    got = eng.generate(prompt, max_new_tokens=20).token_ids
    assert calls == [len(prompt), len(prompt) + 7]
    assert got == want
