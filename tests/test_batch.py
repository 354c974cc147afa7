"""Batched generation: one forward pass per step for up to ``max_batch`` prompts.

Every row must give the tokens of the same request made alone: checked against the fixtures'
independent reference.json (prompts of different lengths, so padding is exercised), against a
batch-1 engine on synthetic models of each layout, and for seeded sampling, logprobs, per-row
stopping (EOS, max_new_tokens, stop strings), groups larger than ``max_batch`` and the
row-by-row fallback.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import engine
from engine.decode import can_batch
from engine.testing.synthetic import SyntheticSpec, cached_model

from .conftest import load_reference, shared_param

MAX_LENGTH = 96


# ------------------------------------------------------------------------------------------------
# real fixtures against their reference.json


@pytest.mark.parametrize("fixture", [shared_param(n) for n in ("stories260k", "tiny_llama_fp16", "tiny_gpt2")])
def test_batch_greedy_matches_reference(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    refs = load_reference(model_dir)
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=len(refs))
    n = min(len(r["greedy_ids"]) for r in refs)
    results = eng.generate([r["prompt_ids"] for r in refs], max_new_tokens=n)
    assert len(results) == len(refs)
    for ref, res in zip(refs, results, strict=True):
        assert res.prompt_ids == ref["prompt_ids"]
        assert res.token_ids == ref["greedy_ids"][:n]
        assert res.finish_reason == "length" and res.stats.new_tokens == n
    # reversed order: a row's output does not depend on its place in the batch
    results = eng.generate([r["prompt_ids"] for r in refs[::-1]], max_new_tokens=n)
    assert [r.token_ids for r in results] == [r["greedy_ids"][:n] for r in refs[::-1]]


def test_batch_of_texts_matches_reference_continuations(stories260k):
    refs = load_reference(stories260k)
    eng = engine.Engine(stories260k, max_length=MAX_LENGTH, max_batch=4)
    results = eng.generate([r["prompt"] for r in refs], max_new_tokens=len(refs[0]["greedy_ids"]))
    for ref, res in zip(refs, results, strict=True):
        assert res.token_ids == ref["greedy_ids"]
        assert res.text == ref["continuation"]


# ------------------------------------------------------------------------------------------------
# synthetic models of every layout against a batch-1 engine


LAYOUTS = {
    "gqa-fp32": SyntheticSpec(layout="gqa", seed=31),
    "gqa-int4": SyntheticSpec(layout="gqa", quant="int4", seed=32),
    "concat-fp32": SyntheticSpec(layout="concat", seed=33),
    "concat-fp16": SyntheticSpec(layout="concat", dtype="float16", seed=34),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    """(batch engine with max_batch 4, batch-1 engine, spec) on one synthetic model."""
    spec = LAYOUTS[request.param]
    model_dir = cached_model(spec, tmp_path_factory.getbasetemp() / "batch-models")
    return (
        engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=4),
        engine.Engine(model_dir, max_length=MAX_LENGTH),
        spec,
    )


def _prompts(spec: SyntheticSpec, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, spec.vocab, n).tolist() for n in lengths]


@pytest.mark.parametrize("lengths", [[7, 1, 15, 4], [6, 6, 6, 2], [9, 3, 3, 9]])
def test_greedy_rows_equal_alone(pair, lengths):
    """Different lengths, and runs of equal lengths (prefilled together on GQA caches)."""
    batch, alone, spec = pair
    prompts = _prompts(spec, lengths)
    results = batch.generate(prompts, max_new_tokens=24)
    assert [r.token_ids for r in results] == [alone.generate(p, max_new_tokens=24).token_ids for p in prompts]


def test_seeded_sampling_rows_equal_alone(pair):
    batch, alone, spec = pair
    if spec.quant == "int4":
        pytest.skip(
            "ORT's MatMulNBits rounds differently for 1 and several rows (~1e-7), enough to move a draw that "
            "lands on a boundary: test_int4_batch_logits_equal_alone_to_rounding checks that instead"
        )
    prompts = _prompts(spec, [5, 9, 2], seed=1)
    kw = {"do_sample": True, "temperature": 1.3, "top_p": 0.95}
    seeds = [11, 12, 13]
    results = batch.generate(prompts, max_new_tokens=20, seed=seeds, **kw)
    expected = [
        alone.generate(p, max_new_tokens=20, seed=s, **kw).token_ids for p, s in zip(prompts, seeds, strict=True)
    ]
    assert [r.token_ids for r in results] == expected
    # a shared seed: every row draws what that seed gives alone
    shared = batch.generate(prompts, max_new_tokens=20, seed=7, **kw)
    assert [r.token_ids for r in shared] == [
        alone.generate(p, max_new_tokens=20, seed=7, **kw).token_ids for p in prompts
    ]


def test_per_row_parameters_and_stopping(pair):
    """Per-row max_new_tokens and sampling values; a row forced to EOS stops at once, the others go on."""
    batch, alone, spec = pair
    eos = next(iter(batch.eos_token_ids))
    prompts = _prompts(spec, [6, 3, 11, 8], seed=2)
    new = [5, 17, 1, 12]
    bias = [None, {eos: 1e4}, None, None]  # row 1 emits EOS first
    temps = [1.0, 1.0, 0.7, 1.0]
    results = batch.generate(
        prompts, max_new_tokens=new, logit_bias=bias, temperature=temps, do_sample=[False, False, True, False], seed=3
    )
    for p, n, b, t, s, res in zip(prompts, new, bias, temps, [False, False, True, False], results, strict=True):
        ref = alone.generate(p, max_new_tokens=n, logit_bias=b, temperature=t, do_sample=s, seed=3)
        assert res.token_ids == ref.token_ids
        assert res.finish_reason == ref.finish_reason
        assert res.stats.new_tokens == len(res.token_ids)
    assert results[1].token_ids == [eos] and results[1].finish_reason == "eos"
    assert len(results[0].token_ids) <= 5 and len(results[2].token_ids) == 1
    # a finished row's clock stops when it finishes: fewer tokens, less decode time
    for a in results:
        for b in results:
            if a.stats.new_tokens < b.stats.new_tokens:
                assert a.stats.decode_s <= b.stats.decode_s


def test_logprobs_per_row_equal_alone(pair):
    batch, alone, spec = pair
    prompts = _prompts(spec, [4, 9], seed=4)
    results = batch.generate(prompts, max_new_tokens=6, logprobs=3)
    for p, res in zip(prompts, results, strict=True):
        ref = alone.generate(p, max_new_tokens=6, logprobs=3)
        assert res.token_ids == ref.token_ids
        # padded prompts and several-row kernels may round the last bits differently
        np.testing.assert_allclose(res.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)
        for got, want in zip(res.top_logprobs, ref.top_logprobs, strict=True):
            assert len(got) == len(want) == 3
            np.testing.assert_allclose(sorted(got.values()), sorted(want.values()), rtol=1e-5, atol=1e-5)


def test_int4_batch_logits_equal_alone_to_rounding(tmp_path_factory):
    """The logits of each row of a batch step equal the one-row step's to float rounding."""
    spec = LAYOUTS["gqa-int4"]
    eng = engine.Engine(cached_model(spec, tmp_path_factory.getbasetemp() / "batch-models"), max_length=64, max_batch=3)
    st = eng._state
    prompts = [np.asarray(p, np.int64) for p in _prompts(spec, [5, 9, 2], seed=1)]
    alone = []
    for p in prompts:
        st.prefill(p[None, :])
        st.next_ids[0] = 7
        alone.append(st.decode_one_token()[0].copy())
    st.prefill_rows(prompts, 2)
    st.next_ids[:3] = 7
    rows = st.decode_rows()[:3]
    np.testing.assert_allclose(rows, np.stack(alone), rtol=1e-5, atol=1e-5)
    assert np.array_equal(rows.argmax(axis=1), np.stack(alone).argmax(axis=1))


def test_more_prompts_than_max_batch_and_2d_arrays(pair):
    batch, alone, spec = pair
    prompts = _prompts(spec, [3, 8, 5, 2, 9, 4, 6], seed=5)  # groups of 4 + 3
    results = batch.generate(prompts, max_new_tokens=8)
    assert [r.token_ids for r in results] == [alone.generate(p, max_new_tokens=8).token_ids for p in prompts]
    grid = np.asarray(_prompts(spec, [5, 5, 5], seed=6), dtype=np.int32)  # (3, 5): a 2-D id array is a batch
    results = batch.generate(grid, max_new_tokens=4)
    assert [r.token_ids for r in results] == [alone.generate(row, max_new_tokens=4).token_ids for row in grid]


def test_batch_too_long_for_padding_runs_row_by_row(pair):
    """Longest prompt + largest max_new_tokens beyond max_length: rows run alone, same results."""
    batch, alone, spec = pair
    prompts = _prompts(spec, [80, 4], seed=7)
    new = [4, 80]  # each row fits max_length 96, the padded batch (80 + 80) does not
    reqs = [batch._requests.one(p, n, None, {}, text=False) for p, n in zip(prompts, new, strict=True)]
    assert not can_batch(batch._ctx, reqs)
    results = batch.generate(prompts, max_new_tokens=new)
    assert [r.token_ids for r in results] == [
        alone.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, new, strict=True)
    ]


def test_single_requests_after_a_batch(pair):
    batch, alone, spec = pair
    p = _prompts(spec, [6], seed=8)[0]
    expected = alone.generate(p, max_new_tokens=10).token_ids
    batch.generate(_prompts(spec, [3, 12, 7], seed=9), max_new_tokens=10)
    assert batch.generate(p, max_new_tokens=10).token_ids == expected
    assert [c.token_id for c in batch.stream(p, max_new_tokens=10)] == expected
    assert batch.generate([p], max_new_tokens=10)[0].token_ids == expected  # a batch of one


def test_default_max_new_tokens_is_the_room_of_the_longest_prompt(pair):
    batch, _, spec = pair
    prompts = _prompts(spec, [90, 30], seed=10)
    results = batch.generate(prompts, logit_bias={e: -1e4 for e in batch.eos_token_ids})
    assert [len(r.token_ids) for r in results] == [MAX_LENGTH - 90] * 2


# ------------------------------------------------------------------------------------------------
# stop strings and texts per row


def test_stop_strings_per_row(stories260k):
    refs = load_reference(stories260k)
    batch = engine.Engine(stories260k, max_length=MAX_LENGTH, max_batch=4)
    alone = engine.Engine(stories260k, max_length=MAX_LENGTH)
    prompts = [r["prompt"] for r in refs]
    results = batch.generate(prompts, max_new_tokens=60, stop=["she", "."])
    for p, res in zip(prompts, results, strict=True):
        ref = alone.generate(p, max_new_tokens=60, stop=["she", "."])
        assert (res.text, res.token_ids, res.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)
    assert any(r.finish_reason == "stop" for r in results)


# ------------------------------------------------------------------------------------------------
# errors


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    spec = SyntheticSpec(layout="gqa", seed=35)
    return engine.Engine(
        cached_model(spec, tmp_path_factory.getbasetemp() / "batch-models"), max_length=32, max_batch=3
    )


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e: e.generate([[1, 2], [3]], max_new_tokens=[1, 2, 3]), engine.InvalidRequestError, "3 entries for 2"),
        (lambda e: e.generate([[1, 2], [3]], max_new_tokens=4, seed=[1]), engine.InvalidRequestError, "1 entries"),
        (lambda e: e.generate([[1, 2], []], max_new_tokens=4), engine.InvalidRequestError, "prompt 1 of the batch"),
        (lambda e: e.generate([[1, 2], [1, -5]], max_new_tokens=4), engine.InvalidRequestError, "prompt 1.*outside"),
        (lambda e: e.generate([[1, 2], [1, 2.5]], max_new_tokens=4), engine.InvalidRequestError, "must be ints"),
        (lambda e: e.generate([[1, 2], [1] * 40], max_new_tokens=4), engine.ContextLengthError, "prompt 1"),
        (lambda e: e.generate([[1], [2]], max_new_tokens=[4, 0]), engine.InvalidRequestError, "prompt 1.*>= 1"),
        (lambda e: e.generate([[1], [2]], top_p=[0.5, 7.0]), engine.InvalidRequestError, "prompt 1.*top_p"),
        (lambda e: e.generate([1, 2], max_new_tokens=[1, 2]), engine.InvalidRequestError, "for a batch"),
        (lambda e: e.stream([[1], [2]]), engine.InvalidRequestError, "one prompt"),
        (lambda e: e.generate(np.zeros((2, 0), np.int64)), engine.InvalidRequestError, "no tokens"),
        (lambda e: e.generate(np.zeros((2, 3), np.float32)), engine.InvalidRequestError, "integer"),
        (lambda e: e.generate([[1, 2], None]), engine.InvalidRequestError, "prompt 1 of the batch: prompt must be"),
        (lambda e: e.generate([[1, 2], [[3]]]), engine.InvalidRequestError, "prompt 1 of the batch: token ids"),
        (lambda e: e.generate([5, [3]], max_new_tokens=2), engine.InvalidRequestError, "prompt 0 of the batch"),
    ],
)
def test_bad_batches_raise_and_the_engine_recovers(small, call, error, match):
    expected = small.generate([[5, 6, 7], [8]], max_new_tokens=6)
    with pytest.raises(error, match=match):
        call(small)
    assert [r.token_ids for r in small.generate([[5, 6, 7], [8]], max_new_tokens=6)] == [r.token_ids for r in expected]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True, None])
def test_bad_max_batch(bad, tmp_path_factory):
    model_dir = cached_model(SyntheticSpec(layout="gqa", seed=35), tmp_path_factory.getbasetemp() / "batch-models")
    with pytest.raises(engine.InvalidRequestError, match="max_batch"):
        engine.Engine(model_dir, max_batch=bad, warmup=False)


def test_kv_bytes_are_known_before_allocation(tmp_path_factory, monkeypatch):
    spec = SyntheticSpec(layout="gqa", seed=35)
    model_dir = cached_model(spec, tmp_path_factory.getbasetemp() / "batch-models")
    need = engine.estimate_kv_cache_bytes(model_dir, max_length=64, max_batch=3)
    assert need == 2 * spec.layers * 3 * spec.kv_heads * 64 * spec.head_size * 4  # K and V, fp32
    eng = engine.Engine(model_dir, max_length=64, max_batch=3, warmup=False)
    assert eng.kv_cache_bytes == need
    # a cache that cannot fit fails before anything is allocated, with the figures in the message
    from engine import generation

    monkeypatch.setattr(generation, "_available_memory", lambda: need)
    with pytest.raises(engine.InsufficientMemoryError, match="max_batch 3"):
        engine.Engine(model_dir, max_length=64, max_batch=3)


@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_interrupted_batch_leaves_the_engine_usable(small, monkeypatch, where):
    """KeyboardInterrupt inside a batch's prefill or decode: the lock is released and the next
    batch and single request get their normal outputs."""
    want_batch = [r.token_ids for r in small.generate([[5, 6, 7], [8], [9, 9]], max_new_tokens=12)]
    want_single = small.generate([4, 4, 2], max_new_tokens=12).token_ids
    st = small._state
    name = "prefill_rows" if where == "prefill" else "decode_rows"
    original = getattr(st, name)
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 3 or where == "prefill":
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(st, name, failing)
    with pytest.raises(KeyboardInterrupt):
        small.generate([[1, 2, 3, 4, 5, 6], [7, 7]], max_new_tokens=20)
    monkeypatch.undo()
    assert [r.token_ids for r in small.generate([[5, 6, 7], [8], [9, 9]], max_new_tokens=12)] == want_batch
    assert small.generate([4, 4, 2], max_new_tokens=12).token_ids == want_single


def test_batch_equals_onnxruntime_genai_batch(tmp_path_factory):
    """Against an independent batched reference: onnxruntime-genai with batch_size = 4 on an INT4
    model (where several-row kernels may round differently from one-row ones, both engines see the
    same several-row kernels)."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (bench extra)")
    spec = SyntheticSpec(layout="gqa", quant="int4", hidden=128, heads=8, kv_heads=2, vocab=2048, seed=36)
    model_dir = cached_model(spec, tmp_path_factory.getbasetemp() / "batch-models")
    eng = engine.Engine(model_dir, max_length=64, max_batch=4)
    eng.eos_token_ids = frozenset()  # genai below runs exactly min_length tokens
    ids = np.asarray(_prompts(spec, [12] * 4, seed=11), dtype=np.int64)
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12 + 40, min_length=12 + 40, do_sample=False, batch_size=4)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    want = [[int(t) for t in gen.get_sequence(i)[12:]] for i in range(4)]
    assert [r.token_ids for r in eng.generate(ids, max_new_tokens=40)] == want


def test_a_list_on_a_max_batch_1_engine_runs_prompt_by_prompt(pair):
    _, alone, spec = pair
    prompts = _prompts(spec, [4, 9, 2], seed=12)
    results = alone.generate(prompts, max_new_tokens=[5, 7, 3])
    assert [r.token_ids for r in results] == [
        alone.generate(p, max_new_tokens=n).token_ids for p, n in zip(prompts, [5, 7, 3], strict=True)
    ]
    assert alone._state.packed_mask is None  # no batch buffers on a max_batch=1 engine


def test_growing_cache_without_position_ids_runs_row_by_row(tiny_gpt2, tmp_path):
    """A concat/combined export that derives positions from the past length (no position_ids
    input) would see shifted positions under left padding: such batches run row by row. The model:
    tiny-gpt2 with its position_ids input replaced by Range(past, total) inside the graph (found by
    review: before the guard, its batched rows differed from the rows run alone)."""
    import onnx
    from onnx import TensorProto, helper

    d = tmp_path / "gpt2-no-position-ids"
    shutil.copytree(tiny_gpt2, d)
    model = onnx.load(str(d / "past.onnx"))
    g = model.graph
    g.input.remove(next(i for i in g.input if i.name == "position_ids"))
    one = helper.make_tensor("one", TensorProto.INT64, [], [1])
    nodes = [
        helper.make_node("Constant", [], ["np/one"], value=one),
        helper.make_node("Shape", ["attention_mask"], ["np/mask_shape"]),
        helper.make_node("Gather", ["np/mask_shape", "np/one"], ["np/total"], axis=0),
        helper.make_node("Shape", ["input_ids"], ["np/ids_shape"]),
        helper.make_node("Gather", ["np/ids_shape", "np/one"], ["np/seq"], axis=0),
        helper.make_node("Sub", ["np/total", "np/seq"], ["np/past"]),
        helper.make_node("Range", ["np/past", "np/total", "np/one"], ["np/range"]),
        helper.make_node("Unsqueeze", ["np/range"], ["np/row"], axes=[0]),
        helper.make_node("Expand", ["np/row", "np/ids_shape"], ["position_ids"]),
    ]
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old)
    onnx.save(model, str(d / "past.onnx"))

    batch = engine.Engine(d, max_length=64, max_batch=4)
    alone = engine.Engine(d, max_length=64)
    original = engine.Engine(tiny_gpt2, max_length=64)
    assert batch.spec.position_ids is None
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [20, 21, 22], [30, 31, 32, 33, 34]]
    want = [original.generate(p, max_new_tokens=10).token_ids for p in prompts]
    assert [alone.generate(p, max_new_tokens=10).token_ids for p in prompts] == want  # the edit is faithful
    assert not can_batch(batch._ctx, [batch._requests.one(p, 10, None, {}, text=False) for p in prompts])
    assert [r.token_ids for r in batch.generate(prompts, max_new_tokens=10)] == want


# ------------------------------------------------------------------------------------------------
# stream_batch


def test_stream_batch_equals_generate_per_row(stories260k):
    refs = load_reference(stories260k)
    eng = engine.Engine(stories260k, max_length=MAX_LENGTH, max_batch=4)
    prompts = [r["prompt"] for r in refs]
    kw = {"max_new_tokens": [60, 5, 40, 60], "stop": ["she"], "do_sample": [False, False, True, True], "seed": 3}
    want = eng.generate(prompts, **kw)
    rows: dict[int, list] = {i: [] for i in range(len(prompts))}
    order = []
    stream = eng.stream_batch(prompts, **kw)
    for i, chunk in stream:
        rows[i].append(chunk)
        order.append(i)
    for i, res in enumerate(want):
        chunks = rows[i]
        assert [c.token_id for c in chunks] == res.token_ids
        assert "".join(c.text for c in chunks) == res.text
        assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1].finish_reason == res.finish_reason
    # one forward pass per step: the rows still running appear once per step, in row order
    assert order[:4] == [0, 1, 2, 3]
    assert [r.token_ids for r in stream.results] == [r.token_ids for r in want]


def test_stream_batch_fallback_rows_stream_one_after_another(pair):
    batch, alone, spec = pair
    prompts = _prompts(spec, [80, 4], seed=7)
    new = [4, 80]  # the padded batch does not fit: rows run one by one
    order = [i for i, _ in batch.stream_batch(prompts, max_new_tokens=new)]
    first_eos = [len(alone.generate(p, max_new_tokens=n).token_ids) for p, n in zip(prompts, new, strict=True)]
    assert order == [0] * first_eos[0] + [1] * first_eos[1]


def test_leaving_a_stream_batch_early_frees_the_engine(pair):
    batch, alone, spec = pair
    prompts = _prompts(spec, [5, 8, 3], seed=13)
    it = batch.stream_batch(prompts, max_new_tokens=20)
    for _ in range(4):
        next(it)
    it.close()
    p = prompts[1]
    assert batch.generate(p, max_new_tokens=10).token_ids == alone.generate(p, max_new_tokens=10).token_ids
    with pytest.raises(engine.InvalidRequestError, match="takes a list of prompts"):
        batch.stream_batch([1, 2, 3])


def test_stream_batch_on_a_model_without_tokenizer(tmp_path, tmp_path_factory):
    """Ids only: every chunk's text is empty (found by review: an IndexError before)."""
    src = cached_model(LAYOUTS["gqa-fp32"], tmp_path_factory.getbasetemp() / "batch-models")
    d = tmp_path / "no-tokenizer"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns("tokenizer*"))
    eng = engine.Engine(d, max_length=MAX_LENGTH, max_batch=2)
    assert eng.tokenizer is None
    prompts = [[5, 6, 7], [8, 9]]
    chunks = list(eng.stream_batch(prompts, max_new_tokens=4))
    want = eng.generate(prompts, max_new_tokens=4)
    assert [[c.token_id for i, c in chunks if i == row] for row in (0, 1)] == [r.token_ids for r in want]
    assert all(c.text == "" for _, c in chunks)
