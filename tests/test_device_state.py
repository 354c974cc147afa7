"""The CUDA path's logic on any machine: engine/cuda/'s step state and sampler over NumpyOps.

NumpyOps is the reference device (host memory, ORT device "cpu"), so DeviceStepState and
DeviceSampler run on a CPU session exactly as they run on a GPU with CupyOps: the same pointer
bindings, the same on-device mask (zeros past the valid length, one column set per step), the same
static full-width mask of CUDA-graph mode, the same host fallback of the sampler. Each is checked
against the CPU engine. Also here: the pure-Python decisions (provider options, CUDA-graph choice,
sampler modes), the sampled path's array math, and the errors a CPU-only install gives for
``provider="cuda"``. The GPU itself is tested in tests/test_cuda.py.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnxruntime as ort
import pytest

import engine
from engine import cuda
from engine.config import KVLayout
from engine.cuda import DeviceSampler, DeviceStepState, NumpyOps, sample_rows
from engine.errors import InvalidRequestError, ProviderError
from engine.providers import CUDA_EP, SessionConfig, cuda_provider_options, session_options
from engine.sampling import SamplingParams, ref_argmax, ref_top_k_filter, ref_top_p_filter
from engine.testing.ort_profile import load_runs
from engine.testing.synthetic import SyntheticSpec, cached_model

SPECS = {
    "gqa-fp32": SyntheticSpec(layout="gqa", seed=1),
    "gqa-fp16": SyntheticSpec(layout="gqa", dtype="float16", seed=5),
    "concat-fp32": SyntheticSpec(layout="concat", seed=3),
    "concat-fp16": SyntheticSpec(layout="concat", dtype="float16", seed=4),
}
PROMPTS = [[1, 17, 33, 250, 101, 7], [1, 5], list(range(3, 60))]
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    return {name: cached_model(spec, root) for name, spec in SPECS.items()}


def _device_engine(model_dir, *, graph: bool, last_token_logits: bool = True) -> engine.Engine:
    """A CPU Engine whose state and sampler are the device ones over NumpyOps."""
    eng = engine.Engine(model_dir, max_length=MAX_LENGTH, last_token_logits=last_token_logits)
    ops = NumpyOps()
    state = DeviceStepState(
        eng.session, eng.spec, ops, max_length=MAX_LENGTH, last_token_logits=eng.last_token_logits, graph=graph
    )
    eng._state = state
    eng._sampler = DeviceSampler(
        ops, batch=1, vocab_size=eng.spec.vocab_size, logits_dtype=eng.spec.logits.dtype, host_ids=state.host_ids
    )
    return eng


CASES = [
    (name, graph, ltl)
    for name in SPECS
    for graph in ((False, True) if name.startswith("gqa") else (False,))
    for ltl in (True, False)
]


@pytest.mark.parametrize(("name", "graph", "last_token_logits"), CASES)
def test_device_state_greedy_matches_cpu_engine(model_dirs, name, graph, last_token_logits):
    cpu = engine.Engine(model_dirs[name], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs[name], graph=graph, last_token_logits=last_token_logits)
    assert dev._sampler.mode == "greedy"
    # the long prompt first: the next, shorter ones must not see its mask columns (graph mode binds all of them)
    for prompt in (PROMPTS[2], PROMPTS[0], PROMPTS[1]):
        want = cpu.generate(prompt, max_new_tokens=40)
        got = dev.generate(prompt, max_new_tokens=40)
        assert got.token_ids == want.token_ids, (name, graph, prompt)
        assert got.finish_reason == want.finish_reason


@pytest.mark.parametrize("lookahead", [True, False])
def test_lookahead_loop_stops_like_the_cpu_engine(model_dirs, lookahead):
    """The device loop runs one step ahead (Engine._steps_ahead): EOS, max_new_tokens, stop strings
    and streaming end where the CPU engine ends, and the step enqueued past the end does not leak
    into the next request. ``lookahead=False``: the step-synchronous loop, the same results."""
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    dev._lookahead = lookahead
    free = cpu.generate(PROMPTS[0], max_new_tokens=20).token_ids
    eos = free[5]
    for eng in (cpu, dev):
        eng.eos_token_ids = frozenset({eos})
    want = cpu.generate(PROMPTS[0], max_new_tokens=20)
    got = dev.generate(PROMPTS[0], max_new_tokens=20)
    assert got.token_ids == want.token_ids == free[: free.index(eos) + 1]
    assert got.finish_reason == want.finish_reason == "eos"
    # the next request starts clean after the dropped step
    for prompt, n in ((PROMPTS[2], 12), (PROMPTS[1], 1), (PROMPTS[0], 3)):
        a, b = cpu.generate(prompt, max_new_tokens=n), dev.generate(prompt, max_new_tokens=n)
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.stats.new_tokens == len(b.token_ids) == len(a.token_ids)
    # a stop string ends it on the same token, and a stream yields the same tokens and text
    for eng in (cpu, dev):
        eng.eos_token_ids = frozenset()
    text = cpu.generate(PROMPTS[0], max_new_tokens=20).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    a = cpu.generate(PROMPTS[0], max_new_tokens=20, stop=stop)
    b = dev.generate(PROMPTS[0], max_new_tokens=20, stop=stop)
    assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert b.finish_reason == "stop"
    chunks = list(dev.stream(PROMPTS[2], max_new_tokens=15))
    ref = cpu.generate(PROMPTS[2], max_new_tokens=15)
    assert [c.token_id for c in chunks] == ref.token_ids
    assert "".join(c.text for c in chunks) == ref.text
    assert chunks[-1].finish_reason == "length"


def test_sampler_enqueue_needs_device_mode(model_dirs):
    dev = _device_engine(model_dirs["gqa-fp32"], graph=False)
    sampler = dev._sampler
    sampler.reset(SamplingParams(repetition_penalty=1.3), [PROMPTS[0]])
    assert not sampler.on_device
    with pytest.raises(RuntimeError, match="device"):
        sampler.enqueue(dev._state.logits_2d, dev._state.next_ids, 0)


@pytest.mark.parametrize("name", ["concat-fp16", "gqa-fp16"])
def test_release_lets_go_of_bound_values_before_the_session(model_dirs, name):
    """release() (Engine.close, or collection) clears the binding while the session lives: ORT-made
    presents go back to the session's allocator before it is destroyed."""
    dev = _device_engine(model_dirs[name], graph=False)
    dev.generate(PROMPTS[0], max_new_tokens=4)
    state = dev._state
    assert len(state.io.get_outputs()) > 0
    state.release()
    assert len(state.io.get_outputs()) == 0
    state.release()  # twice: nothing
    dev.close()
    with pytest.raises(InvalidRequestError, match="closed"):
        dev.generate(PROMPTS[0], max_new_tokens=2)


@pytest.mark.parametrize("name", ["concat-fp32", "gqa-fp32"])
def test_cpu_state_and_sampler_answer_as_the_device_ones(model_dirs, name):
    """The CPU StepState has release() and the CPU Sampler on_device, so callers need no probes."""
    eng = engine.Engine(model_dirs[name], max_length=MAX_LENGTH)
    eng.generate(PROMPTS[0], max_new_tokens=4)
    assert eng._sampler.on_device is False
    state = eng._state
    assert len(state.io.get_outputs()) > 0
    state.release()
    assert len(state.io.get_outputs()) == 0
    state.release()  # twice: nothing
    eng.close()
    with pytest.raises(InvalidRequestError, match="closed"):
        eng.generate(PROMPTS[0], max_new_tokens=2)


def test_static_mask_zeros_past_the_valid_length(model_dirs):
    eng = _device_engine(model_dirs["gqa-fp32"], graph=True)
    eng.generate(PROMPTS[2], max_new_tokens=20)
    st = eng._state
    assert st.mask[0, : st.length].all() and not st.mask[0, st.length :].any()
    eng.generate(PROMPTS[1], max_new_tokens=3)
    assert st.length == len(PROMPTS[1]) + 2  # the last token is chosen, never run
    assert st.mask[0, : st.length].all() and not st.mask[0, st.length :].any()


def test_device_kv_buffers_allocated_once(model_dirs):
    eng = _device_engine(model_dirs["gqa-fp32"], graph=True)
    st = eng._state
    assert isinstance(st.kv, cuda.DeviceKVCache)
    ptrs = [b.ctypes.data for b in st.kv.buffers] + [st.logits.ctypes.data, st.input_ids.ctypes.data]
    eng.generate(PROMPTS[0], max_new_tokens=5)
    eng.generate(PROMPTS[2], max_new_tokens=5)
    assert [b.ctypes.data for b in st.kv.buffers] + [st.logits.ctypes.data, st.input_ids.ctypes.data] == ptrs
    assert eng.kv_cache_bytes == eng.spec.kv_bytes_per_token * MAX_LENGTH
    assert st.kv.buffers[0].shape == (1, eng.spec.num_kv_heads, MAX_LENGTH, eng.spec.head_size)


def test_concat_kv_bytes_grow_with_the_sequence(model_dirs):
    eng = _device_engine(model_dirs["concat-fp16"], graph=False)
    res = eng.generate(PROMPTS[0], max_new_tokens=6)
    assert eng.spec.layout is KVLayout.CONCAT
    assert res.stats.kv_cache_bytes == eng.spec.kv_bytes_per_token * (len(PROMPTS[0]) + 5)


@pytest.mark.parametrize("offset", [10, 0])
def test_longrope_crossing_reprefills_on_the_device_state(model_dirs, monkeypatch, offset):
    """offset 0: the prompt ends exactly at the switch, so the first decode step already crosses
    (the one-step-ahead loop must not take such a request)."""
    import dataclasses

    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    want = cpu.generate(PROMPTS[0], max_new_tokens=30).token_ids
    dev.spec = dataclasses.replace(dev.spec, rope_switch_length=len(PROMPTS[0]) + offset)
    calls = []
    prefill = dev._state.prefill
    monkeypatch.setattr(dev._state, "prefill", lambda ids: calls.append(ids.shape[1]) or prefill(ids))
    assert dev.generate(PROMPTS[0], max_new_tokens=30).token_ids == want
    # at length == switch the whole sequence so far (cache + the token just chosen) runs again
    assert calls == [len(PROMPTS[0]), len(PROMPTS[0]) + offset + 1]


# ------------------------------------------------------------------------------------------
# the sampler's three modes


def test_sampler_modes():
    vocab = 320
    assert cuda.sampler_mode(SamplingParams(), vocab) == ("greedy", None)
    assert cuda.sampler_mode(SamplingParams(do_sample=True, top_k=1), vocab) == ("greedy", None)
    assert cuda.sampler_mode(SamplingParams(do_sample=True, temperature=0.7, top_k=5, top_p=0.9), vocab)[0] == "device"
    for kwargs, word in (
        ({"repetition_penalty": 1.2}, "penalties"),
        ({"do_sample": True, "min_p": 0.1}, "min_p"),
        ({"logit_bias": {3: 1.0}}, "logit_bias"),
        ({"logprobs": 2}, "logprobs"),
    ):
        mode, reason = cuda.sampler_mode(SamplingParams(**kwargs), vocab)
        assert mode == "host" and word in reason and "host" in reason
    # one per row (a batch): the row that needs the most decides
    assert cuda.sampler_mode([SamplingParams()], vocab)[0] == "greedy"
    assert cuda.sampler_mode([SamplingParams(), SamplingParams(repetition_penalty=1.2)], vocab)[0] == "host"


@pytest.mark.parametrize(
    "sampling",
    [
        {"repetition_penalty": 1.3},
        {"do_sample": True, "temperature": 0.8, "min_p": 0.05, "seed": 7},
        {"do_sample": True, "presence_penalty": 0.5, "logit_bias": {5: 2.0}, "seed": 3, "logprobs": 3},
    ],
)
def test_host_fallback_matches_cpu_sampler(model_dirs, sampling):
    cpu = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    want = cpu.generate(PROMPTS[0], max_new_tokens=30, **sampling)
    got = dev.generate(PROMPTS[0], max_new_tokens=30, **sampling)
    assert dev._sampler.mode == "host"
    assert got.token_ids == want.token_ids
    assert got.logprobs == want.logprobs and got.top_logprobs == want.top_logprobs


def test_device_sampling_is_reproducible_per_seed(model_dirs):
    dev = _device_engine(model_dirs["gqa-fp32"], graph=True)
    kw = {"do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = dev.generate(PROMPTS[0], max_new_tokens=30, seed=11, **kw).token_ids
    assert dev._sampler.mode == "device"
    b = dev.generate(PROMPTS[0], max_new_tokens=30, seed=11, **kw).token_ids
    c = dev.generate(PROMPTS[0], max_new_tokens=30, seed=12, **kw).token_ids
    assert a == b and a != c


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 8, 0.6)]
)
def test_sample_rows_follows_the_filtered_softmax(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(1, 40)).astype(np.float32)
    n = 40_000
    u = rng.random((n, 1))
    tokens = sample_rows(np, np.repeat(logits, n, axis=0), u, temperature=temperature, top_k=top_k, top_p=top_p)
    z = ref_top_p_filter(ref_top_k_filter(logits[0] / np.float32(temperature), top_k), top_p)
    allowed = np.isfinite(z)
    assert allowed[tokens].all(), "a token outside top-k/top-p was drawn"
    p = np.where(allowed, _softmax(np.where(allowed, z, -np.inf).astype(np.float64)), 0.0)
    freq = np.bincount(tokens, minlength=logits.shape[1]) / n
    assert np.abs(freq - p).max() < 0.012


def test_sample_rows_edge_rows():
    nan, inf = np.nan, np.inf
    logits = np.array(
        [
            [-inf, -inf, -inf, -inf],  # nothing possible -> 0
            [nan, 1.0, nan, 0.5],  # NaN read as -inf
            [0.0, inf, 3.0, inf],  # +inf wins; the two +inf share the mass
            [2.0, 2.0, 1.0, 0.0],  # tie at the top: lower id first in rank order
        ],
        dtype=np.float16,
    )
    low = sample_rows(np, logits, np.zeros((4, 1)), temperature=1.0, top_k=0, top_p=1.0)
    assert low.tolist() == [0, 1, 1, 0]
    high = sample_rows(np, logits, np.full((4, 1), 0.999999), temperature=1.0, top_k=2, top_p=1.0)
    assert high.tolist() == [0, 3, 3, 1]
    assert high.dtype == np.int64


def test_numpy_ops_argmax_is_the_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 1000)).astype(np.float16)
    logits[1, :] = -np.inf
    logits[2, 10] = logits[2, 20] = 100.0
    logits[2, 5] = np.nan
    out = np.zeros(3, np.int32)
    NumpyOps().argmax_writer(np.dtype(np.float16), np.dtype(np.int32))(logits, out)
    assert out.tolist() == [ref_argmax(r) for r in logits] == [out[0], 0, 10]


# ------------------------------------------------------------------------------------------
# pure-Python decisions and the errors of a CPU-only install


def test_cpu_step_state_host_ids_is_next_ids(model_dirs):
    eng = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH)
    assert eng._state.host_ids is eng._state.next_ids  # the CPU loop reads the sampler's output in place
    assert eng.cuda_graph is False


def test_cuda_provider_options():
    opts = cuda_provider_options(cuda_graph=True, stream_ptr=0x1234)
    assert opts["device_id"] == "0"
    assert opts["do_copy_in_default_stream"] == "1"
    assert opts["cudnn_conv_use_max_workspace"] == "1"
    assert opts["arena_extend_strategy"] == "kSameAsRequested"
    assert opts["enable_cuda_graph"] == "1"
    assert opts["user_compute_stream"] == str(0x1234) and opts["has_user_compute_stream"] == "1"
    assert all(isinstance(v, str) for v in opts.values())
    plain = cuda_provider_options(cuda_graph=False)
    assert plain["enable_cuda_graph"] == "0" and "user_compute_stream" not in plain


def test_cuda_session_defaults():
    so = session_options(SessionConfig(), 10**9, provider=CUDA_EP)
    assert so.intra_op_num_threads == 1
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    so = session_options(SessionConfig(threads=3, spinning=True), 10**9, provider=CUDA_EP)
    assert so.intra_op_num_threads == 3
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"


def test_decode_run_options():
    prefill, decode = cuda.decode_run_options(graph=True, asynchronous=True)
    assert prefill.get_run_config_entry("gpu_graph_id") == "-1"
    assert decode.get_run_config_entry("gpu_graph_id") == "1"
    for options in (prefill, decode):
        assert options.get_run_config_entry("disable_synchronize_execution_providers") == "1"
    prefill, decode = cuda.decode_run_options(graph=False, asynchronous=False)
    with pytest.raises(RuntimeError):
        decode.get_run_config_entry("gpu_graph_id")


def test_prefill_and_decode_run_with_their_own_run_options(model_dirs):
    """The prompt runs with the prefill RunOptions (gpu_graph_id -1: outside the CUDA graph), the
    decode steps with the decode ones (graph 1). A decode RunOptions with ``terminate`` set fails
    every run it is used for, so the prefill must succeed and the decode step must not."""
    eng = _device_engine(model_dirs["gqa-fp32"], graph=True)
    state = eng._state
    state._decode_options.terminate = True
    state.prefill(np.array([PROMPTS[0]], dtype=np.int64))
    with pytest.raises(Exception, match=r"(?i)terminat"):
        state.decode_one_token()
    state._decode_options.terminate = False
    state.prefill(np.array([PROMPTS[0]], dtype=np.int64))
    state.decode_one_token()


def test_resolve_cuda_graph(model_dirs):
    gqa16 = engine.load_model_spec(model_dirs["gqa-fp16"])
    gqa32 = engine.load_model_spec(model_dirs["gqa-fp32"])
    concat = engine.load_model_spec(model_dirs["concat-fp16"])
    assert cuda.gqa_runs_on_cuda(gqa16) and not cuda.gqa_runs_on_cuda(gqa32)
    assert cuda.resolve_cuda_graph(gqa16, None) is True
    assert cuda.resolve_cuda_graph(gqa16, False) is False
    assert cuda.resolve_cuda_graph(gqa32, None) is False  # its attention runs on the CPU EP: host copies
    assert cuda.resolve_cuda_graph(concat, None) is False
    with pytest.raises(InvalidRequestError, match="its KV layout is concat"):
        cuda.resolve_cuda_graph(concat, True)
    with pytest.raises(InvalidRequestError, match="GroupQueryAttention takes float16"):
        cuda.resolve_cuda_graph(gqa32, True)
    with pytest.raises(InvalidRequestError, match="cuda_graph must be"):
        cuda.resolve_cuda_graph(gqa16, "yes")


@pytest.mark.parametrize(("name", "match"), [("gqa-fp32", "float16 only"), ("concat-fp16", "share-buffer models only")])
def test_models_refused_on_cuda(model_dirs, name, match):
    """Refused before cupy or a session is touched (engine/cuda/runtime.py says what a GPU showed)."""
    spec = engine.Engine(model_dirs[name], max_length=MAX_LENGTH).spec
    with pytest.raises(ProviderError, match=match):
        cuda.create_cuda_runtime(
            str(spec.model_dir / "model.onnx"),
            spec,
            ort.SessionOptions(),
            max_length=MAX_LENGTH,
            last_token_logits=True,
            cuda_graph=None,
        )


def test_cuda_graph_argument_on_cpu(model_dirs):
    eng = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH, cuda_graph=True)  # ignored on the CPU
    assert eng.cuda_graph is False
    with pytest.raises(InvalidRequestError, match="cuda_graph must be"):
        engine.Engine(model_dirs["gqa-fp32"], cuda_graph=1)


def test_cuda_provider_without_onnxruntime_gpu(model_dirs, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderError, match="onnxruntime-gpu and cupy-cuda13x"):
        engine.Engine(model_dirs["gqa-fp32"], provider="cuda")


def test_cuda_provider_without_cupy(model_dirs, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_EP, "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    with pytest.raises(ProviderError, match="cupy-cuda13x"):
        engine.Engine(model_dirs["gqa-fp32"], provider="cuda")


def test_import_cupy_without_a_device(monkeypatch):
    class _Runtime:
        @staticmethod
        def getDeviceCount():  # cupy's name
            raise RuntimeError("cudaErrorInsufficientDriver")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=_Runtime()))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(ProviderError, match=r"cannot reach a CUDA device.*InsufficientDriver"):
        cuda.import_cupy()


def test_kernel_instantiations_cover_every_dtype_pair():
    floats, ints = (np.float32, np.float16), (np.int64, np.int32)
    c = cuda._C_TYPES
    for t in floats:
        for i in ints:
            assert f"argmax_rows<{c[np.dtype(t)]}, {c[np.dtype(i)]}>" in cuda.KERNEL_NAMES
    for m in ints:
        for p in ints:
            assert f"prepare_step<{c[np.dtype(m)]}, {c[np.dtype(p)]}>" in cuda.KERNEL_NAMES
    for name in ("argmax_rows", "prepare_step", "cvt.f32.f16"):
        assert name in cuda.KERNEL_SOURCE


def test_profile_runs_parse_a_cpu_trace(model_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ORT writes the trace into the working directory
    eng = engine.Engine(model_dirs["gqa-fp32"], max_length=MAX_LENGTH, profile=True, warmup=False)
    eng.generate(PROMPTS[0], max_new_tokens=5)
    runs = load_runs(eng.session.end_profiling())
    assert len(runs) == 5  # the prompt and 4 decode steps (the 5th token is chosen, not run)
    assert all(r.nodes and not r.memcpy_ops for r in runs)
    assert "GroupQueryAttention" in runs[1].op_names
    assert runs[0].providers() == {"CPUExecutionProvider"}


def test_cuda_check_first_divergence():
    from perf.cuda_check import first_divergence

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.mark.slow
def test_make_perf_runs_float16_twins_on_cuda(tmp_path, monkeypatch):
    """make perf's CUDA sweep: built-in synthetic models run as their float16 twins (same shapes),
    which provider='cuda' takes; stories260k (float32, no twin) is skipped; a --model folder runs as is."""
    import argparse

    import perf.common
    from perf.common import ModelChoice, cuda_twin, phi4_model

    monkeypatch.setattr(perf.common, "MODELS_DIR", tmp_path)  # build the small models here
    args = argparse.Namespace(layers=1, vocab=512, context=256)
    assert cuda_twin(ModelChoice("stories260k", tmp_path), args) is None
    assert cuda_twin(ModelChoice("mine", tmp_path), args).path == tmp_path
    for model in (ModelChoice("tiny-gqa", tmp_path), phi4_model(1, 512, 256)):
        twin = cuda_twin(model, args)
        assert twin.name == model.name
        spec = engine.Engine(twin.path, max_length=32).spec
        assert spec.layout is KVLayout.GQA_SHARED and cuda.gqa_runs_on_cuda(spec)
