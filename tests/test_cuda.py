"""``provider="cuda"`` on a GPU: parity with the CPU engine, CUDA graphs, fp16, no host copies.

Every test here needs onnxruntime-gpu (CUDAExecutionProvider), cupy and a visible CUDA device, and
skips with the reason otherwise. The same state and sampler code runs on the CPU through NumpyOps in
tests/test_device_state.py; what only a GPU shows is here: the cupy kernels, ORT's CUDA kernels
(GroupQueryAttention with a share buffer), CUDA-graph capture and replay, and the copies.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine.errors import ProviderError
from engine.sampling import SamplingParams, ref_argmax
from engine.testing.ort_profile import load_runs
from engine.testing.plain_loop import PlainLoop
from engine.testing.synthetic import SyntheticSpec, cached_model


def _cuda_unavailable() -> str | None:
    """Why the CUDA tests cannot run here (None when they can)."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu: the project's 'cuda' extra)"
    try:
        from engine.cuda import import_cupy

        import_cupy()
    except ProviderError as e:
        return str(e)
    return None


REASON = _cuda_unavailable()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

SPECS = {
    "gqa-fp32": SyntheticSpec(layout="gqa", seed=1),
    "gqa-fp16": SyntheticSpec(layout="gqa", dtype="float16", seed=5),
    "concat-fp32": SyntheticSpec(layout="concat", seed=3),
    "concat-fp16": SyntheticSpec(layout="concat", dtype="float16", seed=4),
    "gqa-fp16-int4": SyntheticSpec(layout="gqa", dtype="float16", quant="int4", seed=6),
    "gqa-fp16-vocab32k": SyntheticSpec(layout="gqa", dtype="float16", vocab=32000, seed=21),
}
PROMPTS = [[1, 17, 33, 250, 101, 7], [1, 5], list(range(3, 60))]
MAX_LENGTH = 128
FP16_RTOL, FP16_ATOL = 0.02, 0.05  # fp16 kernels on the GPU vs fp16 on the CPU (to be calibrated on a GPU)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return {name: cached_model(spec, root) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def cupy():
    import cupy

    return cupy


def _cuda(model_dir, **kw) -> engine.Engine:
    return engine.Engine(model_dir, provider="cuda", max_length=MAX_LENGTH, **kw)


# ------------------------------------------------------------------------------------------
# parity


def test_fp32_gqa_share_buffer_is_refused(model_dirs):
    """ORT's CUDA GroupQueryAttention is float16-only: an fp32 one lands on the CPU EP, where the
    shared KV buffer cannot be past and present at once (wrong tokens from the first decode step)."""
    with pytest.raises(ProviderError, match="float16"):
        _cuda(model_dirs["gqa-fp32"])


@pytest.mark.parametrize("name", ["concat-fp32", "concat-fp16"])
def test_concat_layouts_are_refused(model_dirs, name):
    """Their CUDA engines gave the CPU engine's tokens, but freeing one aborted the process (H100,
    onnxruntime-gpu 1.31): refused with a clear error until a device check passes."""
    with pytest.raises(ProviderError, match="share-buffer models only"):
        _cuda(model_dirs[name])


@pytest.mark.parametrize("name", ["gqa-fp16", "gqa-fp16-int4"])
def test_cuda_graph_gives_the_same_tokens(model_dirs, name):
    assert _cuda(model_dirs[name]).cuda_graph  # the default for float16 share-buffer models
    with_graph = _cuda(model_dirs[name], cuda_graph=True)
    without = _cuda(model_dirs[name], cuda_graph=False)
    assert with_graph.cuda_graph and not without.cuda_graph
    # the long prompt first: later, shorter requests must not see its mask columns
    for prompt in (PROMPTS[2], PROMPTS[0], PROMPTS[1], PROMPTS[0]):
        a = with_graph.generate(prompt, max_new_tokens=40).token_ids
        b = without.generate(prompt, max_new_tokens=40).token_ids
        assert a == b, prompt


def test_fp16_gqa_logits_close_to_cpu_plain_loop(model_dirs, cupy):
    """Teacher-forced: the CUDA engine's logits at each step against a plain CPU session.run over
    the whole sequence (independent code); greedy tokens equal for the first steps."""
    model_dir = model_dirs["gqa-fp16"]
    gpu = _cuda(model_dir)
    st, sampler = gpu._state, gpu._sampler
    prompt = PROMPTS[0]
    steps = 12
    sampler.reset(SamplingParams(), [prompt])
    logits = st.prefill(np.asarray([prompt], dtype=np.int64))
    got, tokens = [], []
    for i in range(steps):
        sampler.ops.synchronize()  # the run is asynchronous on the engine's stream
        got.append(cupy.asnumpy(logits[0]).astype(np.float32))
        sampler.sample(logits, st.next_ids)
        tokens.append(int(st.host_ids[0]))
        if i + 1 < steps:
            logits = st.decode_one_token()

    plain = PlainLoop(model_dir)
    seq = prompt + tokens[:-1]
    feed = plain._feed(seq, 0, {n: plain._empty_past(n) for n in plain.past})
    ref = plain.session.run(["logits"], feed)[0][0, len(prompt) - 1 :].astype(np.float32)  # (steps, vocab)
    np.testing.assert_allclose(np.stack(got), ref, rtol=FP16_RTOL, atol=FP16_ATOL)
    assert tokens[:4] == plain.greedy(prompt, 4, stop_at_eos=False).token_ids


# ------------------------------------------------------------------------------------------
# what crosses to the host


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_no_memcpy_nodes_in_decode_steps(model_dirs, cuda_graph, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ORT writes the trace into the working directory
    gpu = _cuda(model_dirs["gqa-fp16"], profile=True, cuda_graph=cuda_graph, warmup=False)
    gpu.eos_token_ids = frozenset()  # exactly 16 tokens
    gpu.generate(PROMPTS[0], max_new_tokens=16)
    runs = load_runs(gpu.session.end_profiling())
    copies = {i: r.memcpy_ops for i, r in enumerate(runs) if r.memcpy_ops}
    assert not copies, f"Memcpy nodes per run: {copies}"
    if not cuda_graph:  # (a graph replay records no node events)
        assert len(runs) == 16  # the prompt and 15 decode steps
        ops = {op for r in runs[1:] for op in r.op_names}
        assert "GroupQueryAttention" in ops
        assert all("CUDAExecutionProvider" in r.providers() for r in runs)


class _CountingRuntime:
    """cupy.cuda.runtime with memcpyAsync calls recorded as (kind, bytes)."""

    def __init__(self, runtime) -> None:
        self._runtime = runtime
        self.calls: list[tuple[int, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._runtime, name)

    def memcpyAsync(self, dst, src, size, kind, stream):  # cupy's name for it
        self.calls.append((kind, size))
        return self._runtime.memcpyAsync(dst, src, size, kind, stream)


@pytest.mark.parametrize("name", ["gqa-fp16-vocab32k"])
def test_per_step_host_copy_is_only_the_ids(model_dirs, name, monkeypatch, cupy):
    gpu = _cuda(model_dirs[name])
    gpu.generate(PROMPTS[0], max_new_tokens=4)  # warm-up (kernels compiled, graph captured)
    ops = gpu._sampler.ops
    counting = _CountingRuntime(ops._runtime)
    monkeypatch.setattr(ops, "_runtime", counting)
    res = gpu.generate(PROMPTS[0], max_new_tokens=20)
    rt = cupy.cuda.runtime
    to_host = [size for kind, size in counting.calls if kind == rt.memcpyDeviceToHost]
    to_device = [size for kind, size in counting.calls if kind == rt.memcpyHostToDevice]
    itemsize = gpu.spec.input_ids.dtype.itemsize
    assert to_host == [itemsize] * len(res.token_ids)  # one ids copy per token, nothing else
    assert to_device == [len(PROMPTS[0]) * itemsize]  # the prompt, once
    assert gpu._sampler.mode == "greedy"


def test_device_buffers_allocated_once(model_dirs):
    gpu = _cuda(model_dirs["gqa-fp16"])
    st = gpu._state
    ptrs = [b.data.ptr for b in st.kv.buffers] + [st.logits.data.ptr, st.input_ids.data.ptr, st.mask.data.ptr]
    gpu.generate(PROMPTS[0], max_new_tokens=5)
    gpu.generate(PROMPTS[2], max_new_tokens=5)
    assert [b.data.ptr for b in st.kv.buffers] + [st.logits.data.ptr, st.input_ids.data.ptr, st.mask.data.ptr] == ptrs
    assert gpu.kv_cache_bytes == gpu.spec.kv_bytes_per_token * MAX_LENGTH
    assert st.kv.buffers[0].dtype == np.float16 and st.logits.dtype == np.float16


# ------------------------------------------------------------------------------------------
# kernels and sampling on the device


@pytest.mark.parametrize("logits_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("ids_dtype", [np.int64, np.int32])
def test_argmax_kernel_matches_reference(cupy, logits_dtype, ids_dtype):
    from engine.cuda import CupyOps

    rng = np.random.default_rng(1)
    host = rng.normal(size=(5, 32064)).astype(logits_dtype)
    host[1, :] = -np.inf  # nothing possible -> 0
    host[2, [7, 9000]] = 50.0  # tie -> lower id
    host[3, 0] = np.nan  # NaN read as -inf
    host[3, 31000] = np.inf
    host[4, -1] = 60.0  # the last id
    ops = CupyOps(cupy)
    out = cupy.full((5, 2), -1, dtype=ids_dtype)  # written through the strided (5,) view out[:, 0]
    ops.argmax_writer(np.dtype(logits_dtype), np.dtype(ids_dtype))(cupy.asarray(host), out[:, 0])
    ops.synchronize()
    assert cupy.asnumpy(out[:, 0]).tolist() == [ref_argmax(r) for r in host]
    assert (cupy.asnumpy(out[:, 1]) == -1).all()


def test_sample_rows_cupy_matches_numpy(cupy):
    from engine.cuda import sample_rows

    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, size=(64, 4000)).astype(np.float16)
    u = rng.random((64, 1))
    kw = {"temperature": 0.9, "top_k": 40, "top_p": 0.9}
    a = sample_rows(np, logits, u, **kw)
    b = cupy.asnumpy(sample_rows(cupy, cupy.asarray(logits), cupy.asarray(u), **kw))
    assert (a != b).sum() <= 1  # float sums may order differently at a boundary


def test_device_sampling_stays_in_top_k_and_repeats_per_seed(model_dirs, cupy):
    gpu = _cuda(model_dirs["gqa-fp16"])
    st, sampler = gpu._state, gpu._sampler
    prompt = PROMPTS[0]
    logits = st.prefill(np.asarray([prompt], dtype=np.int64))
    sampler.ops.synchronize()  # the run is asynchronous on the engine's stream
    top5 = set(np.argsort(-cupy.asnumpy(logits[0]), kind="stable")[:5].tolist())
    draws = []
    for seed in (3, 3, 4):
        sampler.reset(SamplingParams(do_sample=True, temperature=2.0, top_k=5, seed=seed), [prompt])
        assert sampler.mode == "device"
        seq = []
        for _ in range(200):
            sampler.sample(logits, st.next_ids)
            seq.append(int(st.host_ids[0]))
        draws.append(seq)
    assert set(draws[0]) <= top5 and len(set(draws[0])) > 1
    assert draws[0] == draws[1] and draws[0] != draws[2]


def test_host_fallback_on_gpu_matches_cpu(model_dirs):
    # fp16 on both (the CUDA greedy tokens of this model equal the CPU's over 16 steps on an H100);
    # logprobs within fp16 kernel differences
    cpu = engine.Engine(model_dirs["gqa-fp16"], max_length=MAX_LENGTH)
    gpu = _cuda(model_dirs["gqa-fp16"])
    kw = {"repetition_penalty": 1.3, "logprobs": 2}
    got = gpu.generate(PROMPTS[0], max_new_tokens=12, **kw)
    assert gpu._sampler.mode == "host" and "penalties" in gpu._sampler.fallback_reason
    want = cpu.generate(PROMPTS[0], max_new_tokens=12, **kw)
    assert got.token_ids == want.token_ids
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-2)


def test_stream_works_on_gpu(model_dirs):
    gpu = _cuda(model_dirs["gqa-fp16"])
    res = gpu.generate(PROMPTS[0], max_new_tokens=20)
    chunks = list(gpu.stream(PROMPTS[0], max_new_tokens=20))
    assert [c.token_id for c in chunks] == res.token_ids
    assert "".join(c.text for c in chunks) == res.text
