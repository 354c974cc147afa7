"""Batched decode and continuous batching on the CUDA path: engine/cuda/'s batch state and sampler.

On any machine the device path runs over NumpyOps (host memory, ORT device "cpu"): the same
DeviceStepState rows (per-row mask columns and positions written by the ``prepare_rows`` kernel's
reference, one ORT binding per row count, a CUDA-graph id per row count) and the same DeviceSampler
rows (argmax kernel, per-row top-k/top-p with per-row splitmix64 streams, host rows) that a GPU runs
with CupyOps. Each batch is checked token for token against the CPU engine's batch (an independent
state: left-padded packed masks, engine/binding.py) and against batch-1 runs. The tests marked
``cuda`` run the same on a GPU and skip cleanly without one.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine import decode
from engine.cuda import KERNEL_NAMES, DeviceSampler, DeviceStepState, NumpyOps, sampler_mode, splitmix_draw
from engine.errors import ProviderError
from engine.sampling import SamplingParams, seed_state, splitmix64_next
from engine.testing.synthetic import SyntheticSpec, cached_model
from tests.test_cuda import _CountingRuntime, _cuda_unavailable
from tests.test_decode_alloc import FORBIDDEN as ALLOC_FORBIDDEN

SPECS = {
    "gqa-fp32": SyntheticSpec(layout="gqa", seed=1),
    "gqa-fp16": SyntheticSpec(layout="gqa", dtype="float16", seed=5),
}
PROMPTS = [[1, 17, 33, 250, 101, 7], [1, 5], list(range(3, 60)), [9, 8, 7, 6], [4, 4, 4, 4], [11]]
NEW = [20, 30, 10, 25, 25, 18]
MAX_LENGTH = 128
MAX_BATCH = 4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-batch")
    return {name: cached_model(spec, root) for name, spec in SPECS.items()}


def _device_engine(model_dir, *, graph: bool, max_batch: int = MAX_BATCH, **kw) -> engine.Engine:
    """A CPU Engine whose state and sampler are the device ones over NumpyOps, ``max_batch`` rows."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, max_batch=max_batch, **kw)
    ops = NumpyOps()
    state = DeviceStepState(
        eng.session,
        eng.spec,
        ops,
        batch=max_batch,
        max_length=MAX_LENGTH,
        last_token_logits=eng.last_token_logits,
        graph=graph,
    )
    eng._state = state
    eng._sampler = DeviceSampler(
        ops,
        batch=max_batch,
        vocab_size=eng.spec.vocab_size,
        logits_dtype=eng.spec.logits.dtype,
        host_ids=state.host_ids,
    )
    return eng


def _rows(results) -> list[tuple[list[int], str, str]]:
    return [(r.token_ids, r.finish_reason, r.text) for r in results]


# ------------------------------------------------------------------------------------------------
# batches against the CPU engine and against batch 1


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("last_token_logits", [True, False])
def test_batch_rows_match_cpu_engine_and_batch_one(model_dirs, name, graph, last_token_logits):
    """Rows of different prompt lengths and max_new_tokens, one of them ended by EOS: the device
    batch gives the CPU engine's batch rows, token for token, and each row's batch-1 run."""
    cpu = engine.Engine(model_dirs[name], max_length=MAX_LENGTH, max_batch=MAX_BATCH)
    dev = _device_engine(model_dirs[name], graph=graph, last_token_logits=last_token_logits)
    free = cpu.generate(PROMPTS[0], max_new_tokens=NEW[0]).token_ids
    for eng in (cpu, dev):
        eng.eos_token_ids = frozenset({free[7]})  # row 0 ends at its 8th token
    want = cpu.generate(PROMPTS, max_new_tokens=NEW)  # 6 prompts: a batch of 4, then one of 2
    got = dev.generate(PROMPTS, max_new_tokens=NEW)
    assert _rows(got) == _rows(want)
    assert got[0].finish_reason == "eos" and len(got[0].token_ids) == 8
    alone = [dev.generate(p, max_new_tokens=n) for p, n in zip(PROMPTS, NEW, strict=True)]
    assert _rows(alone) == _rows(want)
    assert dev._state.rows == 1  # the single requests ran on row 0 after the batches


@pytest.mark.parametrize("graph", [False, True])
def test_stream_batch_and_stop_strings_match_cpu(model_dirs, graph):
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH, max_batch=MAX_BATCH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=graph)
    for eng in (cpu, dev):
        eng.eos_token_ids = frozenset()
    text = cpu.generate(PROMPTS[1], max_new_tokens=30).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    want = cpu.generate(PROMPTS[:4], max_new_tokens=30, stop=stop)
    assert any(r.finish_reason == "stop" for r in want)
    assert _rows(dev.generate(PROMPTS[:4], max_new_tokens=30, stop=stop)) == _rows(want)
    with dev.stream_batch(PROMPTS[:4], max_new_tokens=30, stop=stop) as s:
        chunks = list(s)
    for b, r in enumerate(want):
        mine = [c for row, c in chunks if row == b]
        assert [c.token_id for c in mine] == r.token_ids
        assert "".join(c.text for c in mine) == r.text
        assert mine[-1].finish_reason == r.finish_reason


@pytest.mark.parametrize("graph", [False, True])
def test_auto_batch_joins_match_cpu_engine(model_dirs, graph, monkeypatch):
    """Continuous batching on the device state: 8 threads, 24 requests of random lengths on a
    4-row engine; requests join running batches between steps (join_row runs) and every result
    equals the CPU engine's request alone."""
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=graph, auto_batch=True)
    joined: list[int] = []
    join_row = dev._state.join_row
    monkeypatch.setattr(dev._state, "join_row", lambda row, *a: joined.append(row) or join_row(row, *a))
    rng = np.random.default_rng(0)
    reqs = [(rng.integers(3, 300, size=int(rng.integers(1, 12))).tolist(), int(rng.integers(1, 30))) for _ in range(24)]
    want = [cpu.generate(p, max_new_tokens=n).token_ids for p, n in reqs]
    gate = threading.Barrier(8)

    def client(i: int) -> list[list[int]]:
        gate.wait()
        return [dev.generate(*reqs[j][:1], max_new_tokens=reqs[j][1]).token_ids for j in range(i, len(reqs), 8)]

    with ThreadPoolExecutor(8) as pool:
        per_client = list(pool.map(client, range(8)))
    got = [per_client[j % 8][j // 8] for j in range(len(reqs))]
    assert got == want
    assert joined, "no request joined a running batch"


def test_rows_joining_a_running_batch_directly(model_dirs):
    """generate_batch with a join source (what the auto_batch worker passes): a request joins on a
    finished row and one on a new row; each row equals its batch-1 run on the CPU engine."""
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    dev.eos_token_ids = cpu.eos_token_ids = frozenset()
    prep = dev._requests
    first = [prep.one(p, n, None, {}, text=False) for p, n in ((PROMPTS[0], 5), (PROMPTS[3], 40))]
    later = [prep.one(p, n, None, {}, text=False) for p, n in ((PROMPTS[1], 12), (PROMPTS[5], 20))]
    queue = list(later)
    rows_taken: list[int] = []

    def joins(free: list[int], width: int, take: bool) -> list[tuple[int, object]]:
        # the first joiner waits for row 0 to end (5 tokens), the second then takes a new row
        if not queue or (queue[0] is later[0] and 0 not in free) or (queue[0] is later[1] and width < 10):
            return []
        pair = (free[0], queue[0])
        if take:
            queue.pop(0)
            rows_taken.append(free[0])
        return [pair]

    results = {}
    for _, req, _, result in decode.generate_batch(dev._ctx, list(first), joins):
        if result is not None:
            results[id(req)] = result.token_ids
    assert not queue and rows_taken == [0, 2] and dev._state.rows == 3
    for req in first + later:
        want = cpu.generate(req.prompt_ids.tolist(), max_new_tokens=req.max_new_tokens).token_ids
        assert results[id(req)] == want


def test_device_mask_rows_after_a_batch(model_dirs):
    """Each row's mask holds ones on exactly its tokens (no padding), the device lengths count
    them, and a finished row stops growing."""
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    dev.eos_token_ids = frozenset()
    st, sampler = dev._state, dev._sampler
    prompts = [np.array(p, np.int64) for p in PROMPTS[:3]]
    sampler.reset(SamplingParams(), prompts)
    logits = st.prefill_rows(prompts, 20)
    sampler.sample(logits, st.next_ids, 3)
    for step in range(10):
        if step == 4:
            st.finished[1] = 1
        logits = st.decode_rows()
        sampler.sample(logits, st.next_ids, 3)
    lengths = [len(PROMPTS[0]) + 10, len(PROMPTS[1]) + 4, len(PROMPTS[2]) + 10]
    assert st.lengths[:3].tolist() == lengths
    assert st.mask[:3].sum(axis=1).tolist() == lengths
    for b, n in enumerate(lengths):
        assert st.mask[b, :n].all() and not st.mask[b, n:].any()
    assert st.length == len(PROMPTS[2]) + 10  # the CPU state's batch width, which joins are checked against


def test_join_row_refuses_what_the_cpu_state_refuses(model_dirs):
    dev = _device_engine(model_dirs["gqa-fp32"], graph=False)
    st = dev._state
    prompts = [np.array(p, np.int64) for p in PROMPTS[:2]]
    st.prefill_rows(prompts, 10)
    with pytest.raises(ValueError, match="still running"):
        st.join_row(0, np.array([1, 2], np.int64), 5)
    with pytest.raises(ValueError, match="neither a row"):
        st.join_row(3, np.array([1, 2], np.int64), 5)
    st.finished[1] = 1
    with pytest.raises(ValueError, match="does not fit"):
        st.join_row(1, np.arange(1, 9, dtype=np.int64), 5)  # longer than the batch's width (6)
    with pytest.raises(ValueError, match="does not fit"):
        st.join_row(1, np.array([1, 2], np.int64), MAX_LENGTH)
    with pytest.raises(ValueError, match="exceeds max_length"):
        st.prefill_rows(prompts, MAX_LENGTH)
    st.join_row(1, np.array([1, 2], np.int64), 5)  # and the engine still answers
    assert dev.generate(PROMPTS[0], max_new_tokens=3).finish_reason == "length"


def test_batches_need_a_share_buffer_model(tmp_path_factory):
    concat = cached_model(SyntheticSpec(layout="concat", seed=3), tmp_path_factory.mktemp("concat"))
    eng = engine.Engine(concat, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="share-buffer GQA models only"):
        DeviceStepState(
            eng.session, eng.spec, NumpyOps(), batch=2, max_length=MAX_LENGTH, last_token_logits=True, graph=False
        )


# ------------------------------------------------------------------------------------------------
# per-row sampling


def _sampled(kw: list[dict]) -> dict:
    """Per-row keyword lists for Engine.generate from one dict per row."""
    defaults = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": None}
    return {key: [k.get(key, d) for k in kw] for key, d in defaults.items()}


def test_sampled_rows_equal_their_batch_one_runs(model_dirs):
    """Per-row top-k / top-p / temperature and per-row seeds on the device: each row of a mixed
    batch draws exactly what the same request draws alone (its own splitmix64 stream, one draw per
    step), whatever the rows beside it."""
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    dev.eos_token_ids = frozenset()
    kw = [
        {"do_sample": True, "temperature": 0.9, "top_k": 20, "seed": 3},
        {},
        {"do_sample": True, "top_p": 0.8, "seed": 5},
        {"do_sample": True, "temperature": 1.3, "top_p": 0.9, "seed": 11},
    ]
    alone = [dev.generate(PROMPTS[i], max_new_tokens=15, **kw[i]).token_ids for i in range(4)]
    got = dev.generate(PROMPTS[:4], max_new_tokens=15, **_sampled(kw))
    assert dev._sampler.modes == ["device", "greedy", "device", "device"]
    assert [r.token_ids for r in got] == alone
    swapped = dev.generate([PROMPTS[2], PROMPTS[0]], max_new_tokens=15, **_sampled([kw[2], kw[0]]))
    assert [r.token_ids for r in swapped] == [alone[2], alone[0]]
    other = dev.generate(PROMPTS[0], max_new_tokens=15, **{**kw[0], "seed": 4}).token_ids
    assert other != alone[0]


def test_host_rows_match_the_cpu_engine(model_dirs):
    """Rows that need the host sampler (penalties, min-p, logit bias, logprobs) beside greedy rows:
    the batch equals the CPU engine's, logprobs included."""
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH, max_batch=MAX_BATCH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    kw = {
        "repetition_penalty": [1.0, 1.3, 1.0, 1.0],
        "logprobs": [None, None, 2, None],
        "do_sample": [False, False, False, True],
        "min_p": [0.0, 0.0, 0.0, 0.05],
        "seed": [None, None, None, 7],
    }
    want = cpu.generate(PROMPTS[:4], max_new_tokens=20, **kw)
    got = dev.generate(PROMPTS[:4], max_new_tokens=20, **kw)
    assert dev._sampler.modes == ["greedy", "host", "host", "host"]
    assert "penalties" in dev._sampler.fallback_reason
    assert _rows(got) == _rows(want)
    assert got[2].logprobs == want[2].logprobs and got[2].top_logprobs == want[2].top_logprobs


def test_splitmix_draw_is_the_cpu_generator():
    states = [seed_state(7, 0), seed_state(7, 1), seed_state(2**64 - 1, 0)]
    dev = np.array(states, np.uint64)
    active = np.array([True, False, True])
    u = splitmix_draw(np, dev, active)
    assert u.shape == (3, 1)
    assert u[:, 0].tolist() == [splitmix64_next(s)[1] for s in states]
    assert dev.tolist() == [splitmix64_next(states[0])[0], states[1], splitmix64_next(states[2])[0]]


def test_sampler_saves_and_restores_a_row():
    """save_row / restore_row carry a row's device stream (an evicted stream resumes its draws)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(2, 50)).astype(np.float32)
    ops = NumpyOps()
    ids = np.zeros(2, np.int64)
    sampler = DeviceSampler(ops, batch=2, vocab_size=50, logits_dtype=np.dtype(np.float32), host_ids=ids)
    sampler.reset(SamplingParams(do_sample=True, seed=9), [[1], [2]])
    out = np.zeros(2, np.int64)
    sampler.sample(logits, out)
    saved = sampler.save_row(1)
    first = []
    for _ in range(6):
        sampler.sample(logits, out)
        first.append(ids.tolist())
    sampler.restore_row(1, saved)
    again = []
    for _ in range(6):
        sampler.sample(logits, out)
        again.append(ids.tolist())
    assert [a[1] for a in again] == [f[1] for f in first]
    assert len({tuple(f) for f in first}) > 1


def test_sampler_mode_of_a_batch():
    vocab = 320
    greedy, dev, host = SamplingParams(), SamplingParams(do_sample=True, top_k=5), SamplingParams(logprobs=1)
    assert sampler_mode([greedy, greedy], vocab) == ("greedy", None)
    assert sampler_mode([greedy, dev], vocab) == ("device", None)
    mode, reason = sampler_mode([dev, host, greedy], vocab)
    assert mode == "host" and "logprobs" in reason


# ------------------------------------------------------------------------------------------------
# the batched step allocates nothing and copies only the finished flags when they change


# what the single-request step may not call (tests/test_decode_alloc.py), and no rebinding either;
# the ORT run itself is what a step is for
FORBIDDEN = (ALLOC_FORBIDDEN - {"run"}) | {"bind_input", "bind_output"}


def test_batched_device_step_allocates_and_binds_nothing(tmp_path_factory):
    import sys
    import tracemalloc

    vocab = 32000
    model_dir = cached_model(SyntheticSpec(layout="gqa", vocab=vocab, seed=21), tmp_path_factory.mktemp("alloc"))
    dev = _device_engine(model_dir, graph=True)
    st, sampler = dev._state, dev._sampler
    prompts = [np.array(p, np.int64) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]
    sampler.reset([SamplingParams()] * 3, prompts)
    sampler.sample(st.prefill_rows(prompts, 100), st.next_ids, 3)
    uploads = []
    upload = st.ops.upload
    st.ops.upload = lambda dst, src: uploads.append(src.nbytes) or upload(dst, src)

    def steps(n: int) -> None:
        for _ in range(n):
            sampler.sample(st.decode_rows(), st.next_ids, 3)

    steps(2)
    st.finished[1] = 1
    called: set[str] = set()

    def audit(frame, event, arg):
        if event == "c_call":
            called.add(getattr(arg, "__name__", repr(arg)))

    sys.setprofile(audit)
    try:
        steps(20)
    finally:
        sys.setprofile(None)
    assert "append" in called  # the audit sees the step's C calls (here: the counting upload's)
    assert not (called & FORBIDDEN), sorted(called & FORBIDDEN)
    assert uploads == [MAX_BATCH]  # the finished flags, once, when row 1 ended
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        steps(60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < vocab * 4 // 8, f"peak grew by {peak - base} bytes over 60 steps"
    assert st.lengths[:3].tolist() == [len(PROMPTS[0]) + 82, len(PROMPTS[1]) + 2, len(PROMPTS[3]) + 82]


def test_kernel_instantiations_cover_the_batched_step():
    for m in ("long long", "int"):
        for p in ("long long", "int"):
            assert f"prepare_rows<{m}, {p}>" in KERNEL_NAMES


def test_cuda_engine_batches_no_longer_refused_before_the_device(model_dirs, monkeypatch):
    """max_batch > 1 with provider='cuda' gets as far as the device: without cupy it is the
    missing cupy that is reported, not the batch."""
    import sys

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(ProviderError, match="cupy"):
        engine.Engine(model_dirs["gqa-fp16"], provider="cuda", max_batch=8)


# ------------------------------------------------------------------------------------------------
# on a GPU (skipped without one)


GPU_PROMPTS = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((6, 2, 57, 4, 11, 30, 1, 9))]


def _gpu(model_dir, **kw) -> engine.Engine:
    return engine.Engine(model_dir, provider="cuda", max_length=MAX_LENGTH, **kw)


def _skip_without_gpu() -> None:
    reason = _cuda_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_gpu_batch8_rows_equal_batch1_rows(model_dirs, cuda_graph):
    """Batch-8 greedy rows equal their batch-1 runs on the GPU, with a CUDA graph per row count
    (8, then 3, then 8 again: the graph captured first is replayed) and without graphs."""
    _skip_without_gpu()
    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8, cuda_graph=cuda_graph)
    assert gpu.cuda_graph is cuda_graph
    gpu.eos_token_ids = frozenset()
    alone = [gpu.generate(p, max_new_tokens=24).token_ids for p in GPU_PROMPTS]
    rows = [r.token_ids for r in gpu.generate(GPU_PROMPTS, max_new_tokens=24)]
    assert rows == alone
    # a second batch of another row count (another graph), then batch 8 again
    assert [r.token_ids for r in gpu.generate(GPU_PROMPTS[:3], max_new_tokens=24)] == alone[:3]
    assert [r.token_ids for r in gpu.generate(GPU_PROMPTS, max_new_tokens=24)] == alone


@pytest.mark.cuda
def test_gpu_batch8_matches_cpu_fp16_rows(model_dirs):
    """fp16 kernels on the GPU against fp16 on the CPU: the first tokens of each row agree (later
    ones may part at a near-tie, as batch 1 does; tests/test_cuda.py)."""
    _skip_without_gpu()
    cpu = engine.Engine(model_dirs["gqa-fp16"], max_length=MAX_LENGTH, max_batch=8)
    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8)
    want = [r.token_ids[:4] for r in cpu.generate(GPU_PROMPTS, max_new_tokens=8)]
    got = [r.token_ids[:4] for r in gpu.generate(GPU_PROMPTS, max_new_tokens=8)]
    assert got == want


@pytest.mark.cuda
def test_gpu_batched_step_copies_only_the_ids(model_dirs, monkeypatch):
    _skip_without_gpu()
    import cupy

    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8)
    gpu.eos_token_ids = frozenset()
    gpu.generate(GPU_PROMPTS, max_new_tokens=4)  # warm-up: kernels compiled, graph 8 captured
    ops = gpu._sampler.ops
    counting = _CountingRuntime(ops._runtime)
    monkeypatch.setattr(ops, "_runtime", counting)
    gpu.generate(GPU_PROMPTS, max_new_tokens=20)
    rt = cupy.cuda.runtime
    to_host = [size for kind, size in counting.calls if kind == rt.memcpyDeviceToHost]
    itemsize = gpu.spec.input_ids.dtype.itemsize
    assert to_host == [8 * itemsize] * 20  # the 8 rows' ids per step, nothing else


@pytest.mark.cuda
def test_gpu_no_memcpy_nodes_in_batched_steps(model_dirs, tmp_path, monkeypatch):
    _skip_without_gpu()
    from engine.testing.ort_profile import load_runs

    monkeypatch.chdir(tmp_path)  # ORT writes the trace into the working directory
    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8, profile=True, cuda_graph=False, warmup=False)
    gpu.eos_token_ids = frozenset()
    gpu.generate(GPU_PROMPTS, max_new_tokens=12)
    runs = load_runs(gpu.session.end_profiling())
    copies = {i: r.memcpy_ops for i, r in enumerate(runs) if r.memcpy_ops}
    assert not copies, f"Memcpy nodes per run: {copies}"
    assert len(runs) >= 11


@pytest.mark.cuda
def test_gpu_auto_batch_equals_alone(model_dirs):
    _skip_without_gpu()
    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8, auto_batch=True)
    ref = _gpu(model_dirs["gqa-fp16"])
    reqs = [(p, 8 + 3 * i) for i, p in enumerate(GPU_PROMPTS * 2)]
    want = [ref.generate(p, max_new_tokens=n).token_ids for p, n in reqs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: gpu.generate(r[0], max_new_tokens=r[1]).token_ids, reqs))
    assert got == want


@pytest.mark.cuda
def test_gpu_sampled_rows_equal_batch_one(model_dirs):
    _skip_without_gpu()
    gpu = _gpu(model_dirs["gqa-fp16"], max_batch=8)
    gpu.eos_token_ids = frozenset()
    kw = [{"do_sample": True, "top_k": 20, "seed": i} if i % 2 else {} for i in range(8)]
    alone = [gpu.generate(p, max_new_tokens=16, **k).token_ids for p, k in zip(GPU_PROMPTS, kw, strict=True)]
    got = gpu.generate(GPU_PROMPTS, max_new_tokens=16, **_sampled(kw))
    assert [r.token_ids for r in got] == alone


# ------------------------------------------------------------------------------------------------
# the device script's pieces, dry-run on the CPU


@pytest.mark.slow
def test_concat_cycle_check_dry_run(tmp_path, monkeypatch):
    """perf/cuda_concat.py's child cycles on the CPU: every cycle reported, tokens against the CPU
    engine, the JSON written (on a GPU the same script decides whether the refusal can go)."""
    import json

    from perf import cuda_concat

    monkeypatch.setattr(cuda_concat, "MODELS_DIR", tmp_path / "models")
    assert cuda_concat.main(["--provider", "cpu", "--cycles", "3", "--out", str(tmp_path)]) == 0
    (result,) = tmp_path.glob("cuda-concat-cpu-*.json")
    runs = json.loads(result.read_text())["results"]
    assert [(r["cycles_done"], r["finished"], r["returncode"]) for r in runs] == [(3, True, 0)] * 2
    assert all("layout concat" in r["first_line"] for r in runs)
