"""The CUDA execution provider: device-resident buffers, on-device sampling, CUDA graphs.

``Engine(model_dir, provider="cuda")`` builds what this module defines (``create_cuda_runtime``):

* a CUDAExecutionProvider session (options in :func:`engine.providers.cuda_provider_options`) whose
  kernels and copies all run on one CUDA stream that the engine owns, so the engine's own kernels on
  that stream (mask update, sampling, the ids copy) are ordered with the model's without any
  synchronization; ``Run`` is told not to wait for the device (``disable_synchronize_execution_providers``),
  and the one wait of a step is the copy of the chosen ids to the host;
* :class:`DeviceStepState`, the twin of :class:`engine.binding.StepState` with every buffer on the
  device, allocated once as cupy arrays and bound to the IOBinding by pointer: KV (share-buffer models:
  :class:`DeviceKVCache`), input ids, attention mask, position ids, logits;
* :class:`DeviceSampler`, which writes the next ids into the bound device ``input_ids`` buffer (greedy:
  one argmax kernel per step; top-k / top-p / temperature: cupy array ops with a seeded cupy RNG) and
  copies only those ids into a page-locked host buffer; penalties, min-p, logit bias and logprobs fall
  back to the CPU sampler on a host copy of the logits (``DeviceSampler.mode == "host"``, with the
  reason in ``DeviceSampler.fallback_reason``);
* with ``cuda_graph`` (the default for float16 GroupQueryAttention share-buffer models) the decode step's
  bindings never change: a static ``(batch, max_length)`` mask with zeros past the valid length, fixed
  input ids / positions / logits / KV addresses, so ORT captures the step once (``gpu_graph_id`` 1)
  and replays it; the prompt runs outside the graph (``gpu_graph_id`` -1).

The device operations are one interface (:class:`DeviceOps`) with two implementations:
:class:`CupyOps` (CUDA) and :class:`NumpyOps`, the reference, which runs the same state and sampler on
a CPU session over host memory (ORT device ``"cpu"``). The CPU test suite drives the whole device
path through NumpyOps; tests/test_cuda.py runs it on a GPU. cupy is imported only here, and only when
a CUDA engine is built.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from .binding import FastBinding
from .config import KVLayout, ModelSpec
from .errors import InsufficientMemoryError, InvalidRequestError, ModelLoadError, ProviderError
from .kv_cache import GrowingKVCache
from .providers import CUDA_EP, create_session, cuda_provider_options
from .sampling import Sampler, SamplingParams, _RowConfig, argmax

__all__ = [
    "CupyOps",
    "DeviceKVCache",
    "DeviceOps",
    "DeviceRuntime",
    "DeviceSampler",
    "DeviceStepState",
    "NumpyOps",
    "create_cuda_runtime",
    "decode_run_options",
    "gqa_runs_on_cuda",
    "import_cupy",
    "resolve_cuda_graph",
    "sample_rows",
    "sampler_mode",
]

DECODE_GRAPH_ID = "1"  # gpu_graph_id of the captured decode step
SKIP_GRAPH_ID = "-1"  # gpu_graph_id that runs without capture/replay (the prompt)
CUPY_HINT = "pip install cupy-cuda13x (or the project's 'cuda' extra)"


# ------------------------------------------------------------------------------------------------
# pure-Python decisions (tested on any machine)


def import_cupy():
    """The cupy module, with a CUDA device visible; else :class:`ProviderError` saying what to install."""
    try:
        import cupy
    except ImportError as e:
        raise ProviderError(f"provider 'cuda' needs cupy for its device buffers and kernels: {CUPY_HINT}") from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy raises CUDARuntimeError (no driver) or a library load error
        raise ProviderError(f"provider 'cuda': cupy cannot reach a CUDA device ({type(e).__name__}: {e})") from e
    if count < 1:
        raise ProviderError("provider 'cuda': no CUDA device is visible (check CUDA_VISIBLE_DEVICES)")
    return cupy


def gqa_runs_on_cuda(spec: ModelSpec) -> bool:
    """Whether onnxruntime's CUDA GroupQueryAttention kernel takes this model (float16/bfloat16 only;
    a float32 GQA model runs its attention on the CPU EP, with host<->device copies every step)."""
    return spec.layout is KVLayout.GQA_SHARED and spec.kv_dtype == np.dtype(np.float16)


def resolve_cuda_graph(spec: ModelSpec, requested: bool | None) -> bool:
    """Whether the decode step is captured as a CUDA graph: ``None`` means yes for the models that allow it.

    A graph replays fixed shapes at fixed addresses with every node on the GPU (ORT refuses a graph
    with host copies in it): only share-buffer models whose GroupQueryAttention runs on CUDA
    (float16) qualify; the concat layouts grow their KV every step, and an input the engine binds on
    the host (``use_cache_branch``) rules it out too.
    """
    if requested is not None and not isinstance(requested, bool):
        raise InvalidRequestError(f"cuda_graph must be True, False or None (auto), got {requested!r}")
    possible = gqa_runs_on_cuda(spec) and not spec.extra_inputs
    if requested and not possible:
        if spec.extra_inputs:
            why = "it has host-side inputs"
        elif spec.layout is KVLayout.GQA_SHARED:
            why = f"onnxruntime's CUDA GroupQueryAttention takes float16, and its KV is {spec.kv_dtype}"
        else:
            why = f"its KV layout is {spec.layout.value}"
        raise InvalidRequestError(
            f"cuda_graph=True needs a GroupQueryAttention share-buffer model with fixed decode shapes; "
            f"{spec.model_dir.name} cannot ({why}); pass cuda_graph=False or leave it None"
        )
    return possible if requested is None else requested


def decode_run_options(*, graph: bool, asynchronous: bool) -> tuple[ort.RunOptions, ort.RunOptions]:
    """RunOptions of the prompt and of the decode steps.

    ``graph``: the prompt runs outside the graph (gpu_graph_id -1), the decode step is graph 1.
    ``asynchronous``: ``Run`` returns once the work is enqueued (every consumer is on the same stream).
    """
    prefill, decode = ort.RunOptions(), ort.RunOptions()
    if graph:
        prefill.add_run_config_entry("gpu_graph_id", SKIP_GRAPH_ID)
        decode.add_run_config_entry("gpu_graph_id", DECODE_GRAPH_ID)
    if asynchronous:
        for options in (prefill, decode):
            options.add_run_config_entry("disable_synchronize_execution_providers", "1")
    return prefill, decode


GREEDY, DEVICE, HOST = "greedy", "device", "host"


def sampler_mode(params: SamplingParams | Sequence[SamplingParams], vocab_size: int) -> tuple[str, str | None]:
    """Where a request's tokens are chosen: ``("greedy" | "device" | "host", reason for the host fallback)``.

    greedy: one argmax kernel; device: temperature / top-k / top-p with cupy; host: everything else
    (the CPU :class:`~engine.sampling.Sampler` on a host copy of the logits row, every step).
    """
    if not isinstance(params, SamplingParams):
        return HOST, "per-row sampling parameters"
    cfg = _RowConfig.from_params(params, vocab_size)
    needs = [
        name
        for name, on in (
            ("repetition/presence/frequency penalties", cfg.penalties),
            ("logit_bias", cfg.bias_ids is not None),
            ("min_p", cfg.min_p_threshold != -math.inf),
            ("logprobs", cfg.logprobs >= 0),
        )
        if on
    ]
    if needs:
        return HOST, f"{', '.join(needs)}: sampled on the host by the CPU sampler (logits row copied per step)"
    return (GREEDY if cfg.greedy else DEVICE), None


def sample_rows(xp: Any, logits: Any, u: Any, *, temperature: float, top_k: int, top_p: float) -> Any:
    """One token per row drawn from softmax(logits / temperature) cut to top-k, then top-p; array module ``xp``.

    logits: (rows, vocab) float32/float16 (NaN read as -inf); u: (rows, 1) float64 uniforms in [0, 1).
    Returns (rows,) int64. The order of the CPU definition (engine/sampling.py): rank by logit
    descending (ties: lower id first), keep the first ``top_k`` ranks, then the shortest rank prefix
    holding ``top_p`` of their weight; the draw walks the kept tokens in rank order (the CPU sampler
    walks them by id, so one seed gives other tokens on the two paths, from the same distribution).
    Rows with nothing above -inf give token 0. Written with operations numpy and cupy share.
    """
    vocab = logits.shape[1]
    z = logits.astype(xp.float32)
    z = xp.where(xp.isnan(z), xp.float32(-xp.inf), z)
    if temperature != 1.0:
        z = z / xp.float32(temperature)
    order = xp.argsort(-z, axis=1, kind="stable")  # (rows, vocab) ids by rank
    zs = xp.take_along_axis(z, order, axis=1)  # (rows, vocab) descending
    m = zs[:, :1]  # (rows, 1) the best logit
    finite = xp.isfinite(m)
    # z - m, with 0 at the maximum when it is +inf (no inf - inf)
    rel = xp.where(
        finite,
        zs - xp.where(finite, m, xp.float32(0)),
        xp.where(zs == m, xp.float32(0), xp.float32(-xp.inf)),
    )
    w = xp.exp(rel.astype(xp.float64))  # (rows, vocab) unnormalized probabilities by rank
    if 0 < top_k < vocab:
        w[:, top_k:] = 0.0
    if top_p < 1.0:
        c = xp.cumsum(w, axis=1)
        w = xp.where(c - w < top_p * c[:, -1:], w, 0.0)  # rank r stays while the ranks before it hold < top_p
    c = xp.cumsum(w, axis=1)
    rank = xp.minimum((c <= u * c[:, -1:]).sum(axis=1), vocab - 1)  # (rows,) first rank whose sum passes u
    tokens = xp.take_along_axis(order, rank[:, None], axis=1)[:, 0]
    return xp.where(m[:, 0] > -xp.inf, tokens, 0).astype(xp.int64)


# ------------------------------------------------------------------------------------------------
# device operations: one interface, a cupy and a numpy implementation


class DeviceOps(Protocol):
    """What the device step state and sampler need from a device.

    ``device`` is the ORT device name the buffers are bound as; ``xp`` the array module (cupy /
    numpy); ``asynchronous`` whether ``Run`` may return before the device is done (all work shares
    one stream). Kernels are made once per dtype combination and called per step.
    """

    device: str
    xp: Any
    asynchronous: bool
    stream_ptr: int | None

    def scope(self) -> contextlib.AbstractContextManager: ...  # the stream every array op goes on

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any: ...

    def pinned_zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...

    def ptr(self, array: Any) -> int: ...

    def upload(self, dst: Any, src: np.ndarray) -> None: ...  # host -> device, ordered on the stream

    def download(self, dst: np.ndarray, src: Any) -> None: ...  # device -> host, then wait for it

    def download_async(self, dst: np.ndarray, src: Any, slot: int) -> None: ...  # device -> host, marks ``slot``

    def wait(self, slot: int) -> None: ...  # until the work enqueued before ``slot``'s mark is done

    def synchronize(self) -> None: ...

    def wrap(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: object) -> Any: ...

    def step_writer(self, mask_dtype: np.dtype, position_dtype: np.dtype) -> Callable[[Any, Any, int], None]: ...

    def argmax_writer(self, logits_dtype: np.dtype, ids_dtype: np.dtype) -> Callable[[Any, Any], None]: ...

    def uniform(self, seed: int) -> Callable[[tuple[int, ...]], Any]: ...

    def free_bytes(self) -> int | None: ...


class NumpyOps:
    """The reference device: host memory, ORT device ``"cpu"``; defines what each CUDA kernel computes."""

    device = "cpu"
    xp = np
    asynchronous = False
    stream_ptr = None

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def pinned_zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)

    def ptr(self, array: np.ndarray) -> int:
        return int(array.ctypes.data)

    def upload(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src, casting="same_kind")

    def download(self, dst: np.ndarray, src: np.ndarray) -> None:
        np.copyto(dst, src, casting="same_kind")

    def download_async(self, dst: np.ndarray, src: np.ndarray, slot: int) -> None:
        np.copyto(dst, src, casting="same_kind")  # the host is the device: done at once

    def wait(self, slot: int) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wrap(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: object) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype).reshape(shape)

    def step_writer(self, mask_dtype: np.dtype, position_dtype: np.dtype) -> Callable[[Any, Any, int], None]:
        def write(mask: np.ndarray, positions: np.ndarray, position: int) -> None:
            mask[:, position] = 1  # the new token's column becomes valid
            positions[:] = position  # (batch, 1) position of the new token

        return write

    def argmax_writer(self, logits_dtype: np.dtype, ids_dtype: np.dtype) -> Callable[[Any, Any], None]:
        return argmax  # engine.sampling.argmax: first index of the max per row, NaN read as -inf

    def uniform(self, seed: int) -> Callable[[tuple[int, ...]], np.ndarray]:
        return np.random.Generator(np.random.PCG64(seed)).random

    def free_bytes(self) -> int | None:
        return None


# The kernels of CupyOps. float16 logits are read as raw bits (unsigned short) and widened with one
# PTX instruction, so the source needs no CUDA headers.
KERNEL_SOURCE = r"""
#define ARGMAX_THREADS 1024

__device__ __forceinline__ float to_float(const float x) { return x; }

__device__ __forceinline__ float to_float(const unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// out[row * out_stride] = first index of the row's maximum (NaN read as -inf; 0 when all are -inf).
// One block of ARGMAX_THREADS threads per row.
template <typename T, typename I>
__global__ void argmax_rows(const T* __restrict__ logits, const long long vocab, I* __restrict__ out,
                            const long long out_stride) {
    __shared__ float best_v[ARGMAX_THREADS];
    __shared__ long long best_i[ARGMAX_THREADS];
    const float neg_inf = __int_as_float(0xff800000);
    const T* row = logits + (long long)blockIdx.x * vocab;
    float v_best = neg_inf;
    long long i_best = vocab;
    for (long long i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_float(row[i]);
        if (v > v_best) {  // strict: the first index of a tie wins; NaN never does
            v_best = v;
            i_best = i;
        }
    }
    best_v[threadIdx.x] = v_best;
    best_i[threadIdx.x] = i_best;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const long long oi = best_i[threadIdx.x + s];
            if (ov > best_v[threadIdx.x] || (ov == best_v[threadIdx.x] && oi < best_i[threadIdx.x])) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[(long long)blockIdx.x * out_stride] = (I)(best_v[0] > neg_inf ? best_i[0] : 0);
    }
}

// Before a decode step: mask[b, position] = 1 (the new token's column) and positions[b] = position.
template <typename M, typename P>
__global__ void prepare_step(M* __restrict__ mask, const long long mask_stride, P* __restrict__ positions,
                             const long long position, const int batch) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < batch) {
        mask[b * mask_stride + position] = (M)1;
        positions[b] = (P)position;
    }
}
"""
_ARGMAX_THREADS = 1024
_C_TYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.float16): "unsigned short",
    np.dtype(np.int64): "long long",
    np.dtype(np.int32): "int",
}
_FLOATS = ("float", "unsigned short")
_INTS = ("long long", "int")
KERNEL_NAMES = tuple(f"argmax_rows<{t}, {i}>" for t in _FLOATS for i in _INTS) + tuple(
    f"prepare_step<{m}, {p}>" for m in _INTS for p in _INTS
)


class CupyOps:
    """The CUDA device: cupy arrays on one non-blocking stream that ORT also runs on."""

    device = "cuda"
    asynchronous = True

    def __init__(self, cupy: Any) -> None:
        self.xp = cupy
        self._cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.stream_ptr = int(self.stream.ptr)
        self._runtime = cupy.cuda.runtime
        self._module: Any = None  # compiled on first use (cached on disk by cupy)
        self._rng: Any = None
        # one event per slot of the pipelined decode loop: marks a step's ids copy to the host
        self._events = [cupy.cuda.Event(block=False, disable_timing=True, interprocess=False) for _ in range(2)]

    def _kernel(self, name: str):
        if self._module is None:
            self._module = self._cupy.RawModule(
                code=KERNEL_SOURCE, options=("--std=c++17",), name_expressions=list(KERNEL_NAMES)
            )
        return self._module.get_function(name)

    def scope(self) -> contextlib.AbstractContextManager:
        return self.stream

    def zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        with self.stream:
            return self._cupy.zeros(shape, dtype=dtype)

    def pinned_zeros(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        import cupyx

        out = cupyx.empty_pinned(shape, dtype=dtype)
        out[...] = 0
        return out

    def ptr(self, array: Any) -> int:
        return int(array.data.ptr)

    def upload(self, dst: Any, src: np.ndarray) -> None:
        src = np.ascontiguousarray(src, dtype=dst.dtype)
        self._runtime.memcpyAsync(
            dst.data.ptr, src.ctypes.data, src.nbytes, self._runtime.memcpyHostToDevice, self.stream_ptr
        )

    def download(self, dst: np.ndarray, src: Any) -> None:
        self._runtime.memcpyAsync(
            dst.ctypes.data, src.data.ptr, dst.nbytes, self._runtime.memcpyDeviceToHost, self.stream_ptr
        )
        self.stream.synchronize()

    def download_async(self, dst: np.ndarray, src: Any, slot: int) -> None:
        self._runtime.memcpyAsync(
            dst.ctypes.data, src.data.ptr, dst.nbytes, self._runtime.memcpyDeviceToHost, self.stream_ptr
        )
        self._events[slot].record(self.stream)

    def wait(self, slot: int) -> None:
        self._events[slot].synchronize()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def wrap(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype, owner: object) -> Any:
        cp = self._cupy
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        memory = cp.cuda.UnownedMemory(ptr, nbytes, owner)
        return cp.ndarray(shape, dtype=dtype, memptr=cp.cuda.MemoryPointer(memory, 0))

    def step_writer(self, mask_dtype: np.dtype, position_dtype: np.dtype) -> Callable[[Any, Any, int], None]:
        kernel = self._kernel(f"prepare_step<{_C_TYPES[np.dtype(mask_dtype)]}, {_C_TYPES[np.dtype(position_dtype)]}>")
        stream = self.stream

        def write(mask: Any, positions: Any, position: int) -> None:
            batch = mask.shape[0]
            with stream:
                kernel(
                    ((batch + 31) // 32,),
                    (32,),
                    (mask, np.int64(mask.shape[1]), positions, np.int64(position), np.int32(batch)),
                )

        return write

    def argmax_writer(self, logits_dtype: np.dtype, ids_dtype: np.dtype) -> Callable[[Any, Any], None]:
        name = f"argmax_rows<{_C_TYPES[np.dtype(logits_dtype)]}, {_C_TYPES[np.dtype(ids_dtype)]}>"
        kernel = self._kernel(name)
        stream = self.stream
        block = (_ARGMAX_THREADS,)

        def write(logits: Any, out: Any) -> None:
            # logits (rows, vocab) with contiguous rows; out (rows,) any element stride
            rows, vocab = logits.shape
            stride = out.strides[0] // out.itemsize
            with stream:
                kernel((rows,), block, (logits, np.int64(vocab), out, np.int64(stride)))

        return write

    def uniform(self, seed: int) -> Callable[[tuple[int, ...]], Any]:
        cp = self._cupy
        with self.stream:
            if self._rng is None:
                self._rng = cp.random.RandomState(seed)
            else:
                self._rng.seed(seed)
        rng = self._rng

        def draw(shape: tuple[int, ...]) -> Any:
            return rng.random_sample(shape, dtype=cp.float64)

        return draw

    def free_bytes(self) -> int | None:
        free, _total = self._runtime.memGetInfo()
        return int(free)


# ------------------------------------------------------------------------------------------------
# KV cache, step state, sampler


class DeviceKVCache:
    """Share-buffer (GroupQueryAttention) KV on the device: one buffer per layer and K/V, bound by
    pointer as both past input and present output; ORT writes the new rows in place."""

    def __init__(self, spec: ModelSpec, ops: DeviceOps, batch: int, max_length: int) -> None:
        self.names = list(zip(spec.past_names, spec.present_names, strict=True))
        self.shape = spec.kv_shape(batch, max_length)
        self.dtype = spec.kv_dtype
        self.device = ops.device
        # (batch, kv_heads, max_length, head_size) kv_dtype, device: one per layer and K/V
        self.buffers = [ops.zeros(self.shape, self.dtype) for _ in self.names]
        self._ptrs = [ops.ptr(b) for b in self.buffers]
        self.nbytes = len(self.names) * math.prod(self.shape) * self.dtype.itemsize

    def bind(self, bind: FastBinding, outputs_before: int = 0) -> None:
        """Bind every buffer as past and present (done once; the addresses never change)."""
        for (past, present), ptr in zip(self.names, self._ptrs, strict=True):
            bind.bind_input_ptr(past, self.device, self.dtype, self.shape, ptr)
            bind.bind_output_ptr(present, self.device, self.dtype, self.shape, ptr)

    def start(self, bind: FastBinding) -> None:
        """Nothing to reset: the attention mask says which rows are valid."""

    def advance(self, bind: FastBinding) -> None:
        """Nothing to do: the kernel wrote the new rows in place."""


class DeviceStepState:
    """Every buffer of the decode loop on the device, allocated once and bound by pointer.

    The interface of :class:`engine.binding.StepState`: ``prefill``, ``decode_one_token``, ``length``,
    ``next_ids`` (device, where the sampler writes), ``host_ids`` (page-locked host copy the loop
    reads), ``logits_2d``, ``kv_nbytes``. The mask lives on the device with ones on the valid
    positions and zeros past them; before each decode step a kernel sets the new token's column and
    writes its position. ``graph``: the decode step binds the full-width mask and never rebinds
    anything (what CUDA graph replay needs); otherwise it binds the mask view of the current width,
    as the CPU does (GroupQueryAttention's work grows with the mask width). Batch 1 (the Engine's).
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        spec: ModelSpec,
        ops: DeviceOps,
        *,
        batch: int = 1,
        max_length: int,
        last_token_logits: bool,
        graph: bool,
    ) -> None:
        if batch != 1:
            raise ValueError(f"DeviceStepState serves batch 1 (the Engine's), got batch={batch}")
        self.session = session
        self.spec = spec
        self.ops = ops
        self.batch = batch
        self.max_length = max_length
        self.last_token_logits = last_token_logits
        self.graph = graph
        self.length = 0  # tokens in the KV cache after the last run
        self.io = session.io_binding()
        self._prefill_options, self._decode_options = decode_run_options(graph=graph, asynchronous=ops.asynchronous)
        self.bind = FastBinding(session, self.io, self._decode_options)
        # ORT runs on the engine's stream (user_compute_stream) and touches it when its binding and
        # session are destroyed (arena frees of ORT-allocated outputs): each of them keeps the stream
        # alive, as the last attribute set so that its ORT object goes first when it is collected
        for holder in (session, self.io, self.bind):
            holder._engine_stream = getattr(ops, "stream", None)
        self._device = ops.device
        xp = ops.xp

        self._ids_dtype = spec.input_ids.dtype
        self._mask_dtype = spec.attention_mask.dtype if spec.attention_mask is not None else np.dtype(np.int64)
        self._pos_dtype = spec.position_ids.dtype if spec.position_ids is not None else self._ids_dtype
        with ops.scope():
            # (batch, 1) ids dtype, device: the decode step's input; the sampler writes next_ids
            self.input_ids = ops.zeros((batch, 1), self._ids_dtype)
            self.next_ids = self.input_ids.reshape(batch)  # (batch,) view of input_ids
            # (batch, max_length) ids dtype, device: the prompt; its (batch, P) prefix is bound at prefill
            self.prompt_ids = ops.zeros((batch, max_length), self._ids_dtype)
            # (batch, max_length) mask dtype, device: 1 on valid positions, 0 past them
            # (scratch for models without attention_mask)
            self.mask = ops.zeros((batch, max_length), self._mask_dtype)
            # (batch, max_length) position dtype, device: 0..max_length-1; the prefill binds a (batch, P) prefix
            self.prompt_positions = xp.arange(max_length, dtype=self._pos_dtype).reshape(batch, max_length)
            # (batch, 1) position dtype, device: position of the decoded token, written per step
            # (scratch for models without position_ids)
            self.position_ids = ops.zeros((batch, 1), self._pos_dtype)
            # (batch, 1, vocab) logits dtype, device: the last position's logits, written by ORT
            self.logits = ops.zeros((batch, 1, spec.vocab_size), spec.logits.dtype)
            self.logits_2d = self.logits[:, 0, :]  # (batch, vocab) view handed to the sampler
        # (batch,) ids dtype, page-locked host: the chosen ids, the one copy per step
        self.host_ids = ops.pinned_zeros((batch,), self._ids_dtype)

        self._ptr = {
            "ids": ops.ptr(self.input_ids),
            "prompt": ops.ptr(self.prompt_ids),
            "mask": ops.ptr(self.mask),
            "prompt_pos": ops.ptr(self.prompt_positions),
            "pos": ops.ptr(self.position_ids),
            "logits": ops.ptr(self.logits),
        }
        self._write_step = ops.step_writer(self._mask_dtype, self._pos_dtype)
        self._has_mask = spec.attention_mask is not None
        self._bind_mask_view = self._has_mask and not graph
        self._mask_name = spec.attention_mask.name if spec.attention_mask is not None else ""
        self._mask_ptr = self._ptr["mask"]

        # use_cache_branch (1,) bool of merged Optimum decoders, host OrtValues (the If condition lives on the CPU)
        self._cache_branch: dict[bool, Any] = {}
        if any(info.name == "use_cache_branch" for info in spec.extra_inputs):
            self._cache_branch = {
                flag: self.bind.value(ort.OrtValue.ortvalue_from_numpy(np.array([flag], dtype=np.bool_)))
                for flag in (False, True)
            }

        if spec.layout is KVLayout.GQA_SHARED:
            self.kv: DeviceKVCache | GrowingKVCache = DeviceKVCache(spec, ops, batch, max_length)
        else:
            self.kv = GrowingKVCache(spec, batch, device=ops.device)
        self._bind_logits()
        self.kv.bind(self.bind, outputs_before=1)
        ops.synchronize()  # the zero fills are done before ORT's first run
        self._released = False

    def release(self) -> None:
        """Let go of every bound value while the session is still alive: tensors ORT allocated on the
        device (the concat layouts' presents) must go back to its arena before the session that owns
        it is destroyed. Called by ``Engine.close()`` and when the state is collected; the state is
        unusable afterwards (nothing is bound)."""
        if getattr(self, "_released", True):
            return
        self._released = True
        with contextlib.suppress(Exception):  # also runs at interpreter exit, when anything may be gone
            self.ops.synchronize()
        with contextlib.suppress(Exception):
            self.io.clear_binding_inputs()
            self.io.clear_binding_outputs()

    def __del__(self) -> None:
        self.release()

    # ----------------------------------------------------------------------------------------
    @property
    def kv_nbytes(self) -> int:
        """Bytes of KV cache held now (share buffer: the whole preallocated buffer)."""
        if isinstance(self.kv, DeviceKVCache):
            return self.kv.nbytes
        return self.kv.bytes_per_token * self.length

    def _bind_logits(self) -> None:
        logits = self.spec.logits
        shape = (self.batch, 1, self.spec.vocab_size)
        self.bind.bind_output_ptr(logits.name, self._device, logits.dtype, shape, self._ptr["logits"])

    def _bind_decode_inputs(self) -> None:
        """The decode step's bindings; in graph mode they stay as they are for the rest of the request."""
        spec, bind, device, b = self.spec, self.bind, self._device, self.batch
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (b, 1), self._ptr["ids"])
        if spec.position_ids is not None:
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (b, 1), self._ptr["pos"])
        if self._has_mask and self.graph:
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (b, self.max_length), self._mask_ptr)
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[True])

    def prefill(self, prompt_ids: np.ndarray) -> Any:
        """Run the prompt ``(1, P)`` (host ids, copied once); returns the last position's logits ``(1, vocab)``."""
        spec, bind, ops, device = self.spec, self.bind, self.ops, self._device
        n = int(prompt_ids.shape[1])
        with ops.scope():
            ops.upload(self.prompt_ids[:, :n], np.ascontiguousarray(prompt_ids, dtype=self._ids_dtype))
            self.mask[:, :n] = 1
            self.mask[:, n:] = 0
        self.kv.start(bind)
        bind.bind_input_ptr(spec.input_ids.name, device, self._ids_dtype, (1, n), self._ptr["prompt"])
        if self._has_mask:
            bind.bind_input_ptr(self._mask_name, device, self._mask_dtype, (1, n), self._mask_ptr)
        if spec.position_ids is not None:
            bind.bind_input_ptr(spec.position_ids.name, device, self._pos_dtype, (1, n), self._ptr["prompt_pos"])
        if self._cache_branch:
            bind.bind_input("use_cache_branch", self._cache_branch[False])
        if not self.last_token_logits:
            bind.bind_output_device(spec.logits.name, device)  # (1, P, vocab) allocated by ORT for this run only
        bind.run_with(self._prefill_options)
        if not self.last_token_logits:
            full = bind.outputs()[0]
            with ops.scope():
                whole = ops.wrap(full.data_ptr(), tuple(full.shape()), spec.logits.dtype, full)
                self.logits[:, 0, :] = whole[:, -1, :]
            self._bind_logits()
        self.length = n
        self.kv.advance(bind)
        self._bind_decode_inputs()
        return self.logits_2d

    def decode_one_token(self) -> Any:
        """Run the token in ``next_ids`` at position ``length``; returns the new logits ``(batch, vocab)``."""
        length = self.length
        self._write_step(self.mask, self.position_ids, length)
        if self._bind_mask_view:
            self.bind.bind_input_ptr(self._mask_name, self._device, self._mask_dtype, (1, length + 1), self._mask_ptr)
        self.bind.run()
        self.length = length + 1
        self.kv.advance(self.bind)
        return self.logits_2d


class DeviceSampler:
    """Chooses the next ids on the device and copies only them to the host.

    The interface of :class:`engine.sampling.Sampler` as the generation loop uses it: ``reset(params,
    prompt_ids)``, ``sample(logits, out)`` (logits: the device ``(batch, vocab)`` view; out: the
    device ``next_ids``), ``logprobs`` / ``top_ids`` / ``top_logprobs``. After ``sample`` the ids are
    in ``out`` and in the page-locked ``host_ids``. ``mode`` says how the request is sampled:
    ``"greedy"`` (argmax kernel), ``"device"`` (temperature / top-k / top-p as cupy array ops with a
    cupy RNG seeded from ``SamplingParams.seed``) or ``"host"`` (the CPU sampler on a copy of the
    logits; ``fallback_reason`` says why).
    """

    def __init__(
        self,
        ops: DeviceOps,
        *,
        batch: int,
        vocab_size: int,
        logits_dtype: np.dtype,
        host_ids: np.ndarray,
        impl: str = "auto",
    ) -> None:
        self.ops = ops
        self.batch = batch
        self.vocab_size = vocab_size
        self.host_ids = host_ids  # (batch,) ids dtype, page-locked host
        self._host = Sampler(batch, vocab_size, impl=impl)  # the CPU sampler of the host fallback
        # (2, batch) ids dtype, page-locked host: the two slots of the pipelined loop (enqueue / wait)
        self.slots = ops.pinned_zeros((2, batch), host_ids.dtype)
        self._argmax = ops.argmax_writer(logits_dtype, host_ids.dtype)
        self._logits_dtype = np.dtype(logits_dtype)
        self._host_logits: np.ndarray | None = None  # (batch, vocab) page-locked, made on the first host request
        self._draw: Callable[[tuple[int, ...]], Any] | None = None
        self._temperature, self._top_k, self._top_p = 1.0, 0, 1.0
        self.mode = GREEDY
        self.fallback_reason: str | None = None

    @property
    def logprobs(self) -> np.ndarray:
        """(batch,) chosen-token log-probabilities (host mode; logprobs requests always sample there)."""
        return self._host.logprobs

    @property
    def top_ids(self) -> np.ndarray:
        return self._host.top_ids

    @property
    def top_logprobs(self) -> np.ndarray:
        return self._host.top_logprobs

    def reset(self, params: SamplingParams | Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]]) -> None:
        """Start a request (validates like the CPU sampler; raises InvalidRequestError with state untouched)."""
        self._host.reset(params, prompt_ids)
        mode, reason = sampler_mode(params, self.vocab_size)
        if mode == HOST and self._host_logits is None:
            self._host_logits = self.ops.pinned_zeros((self.batch, self.vocab_size), self._logits_dtype)
        if mode == DEVICE:
            assert isinstance(params, SamplingParams)
            cfg = _RowConfig.from_params(params, self.vocab_size)
            self._temperature, self._top_k, self._top_p = cfg.temperature, cfg.top_k, cfg.top_p
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
            self._draw = self.ops.uniform(seed)
        self.mode, self.fallback_reason = mode, reason

    @property
    def on_device(self) -> bool:
        """Whether this request's ids are chosen on the device (greedy or device mode): then
        :meth:`enqueue` / :meth:`wait` can run one step ahead of the host."""
        return self.mode != HOST

    def _choose(self, logits: Any, out: Any) -> None:
        ops = self.ops
        if self.mode == GREEDY:
            self._argmax(logits, out)
        else:
            assert self._draw is not None
            with ops.scope():
                u = self._draw((logits.shape[0], 1))
                out[...] = sample_rows(
                    ops.xp, logits, u, temperature=self._temperature, top_k=self._top_k, top_p=self._top_p
                )

    def enqueue(self, logits: Any, out: Any, slot: int) -> None:
        """Greedy / device mode: enqueue choosing the next ids into ``out`` (device) and their copy into
        ``slots[slot]`` (host) without waiting; :meth:`wait` returns them."""
        if self.mode == HOST:
            raise RuntimeError("enqueue needs the ids chosen on the device (greedy or device mode)")
        self._choose(logits, out)
        self.ops.download_async(self.slots[slot], out, slot)

    def wait(self, slot: int) -> np.ndarray:
        """The ``(batch,)`` host ids :meth:`enqueue` put in ``slot``, once they have arrived."""
        self.ops.wait(slot)
        return self.slots[slot]

    def sample(self, logits: Any, out: Any, rows: int | None = None) -> None:
        """Write the next id of each row into ``out`` (device) and into ``host_ids``; one wait per call."""
        ops = self.ops
        if self.mode != HOST:
            self._choose(logits, out)
        else:
            assert self._host_logits is not None
            ops.download(self._host_logits, logits)
            self._host.sample(self._host_logits, self.host_ids, rows)
            ops.upload(out, self.host_ids)  # ordered before the next step's run on the same stream
            return
        ops.download(self.host_ids, out)


# ------------------------------------------------------------------------------------------------
# building it


@dataclass
class DeviceRuntime:
    """What ``Engine(provider="cuda")`` runs on."""

    session: ort.InferenceSession
    state: DeviceStepState
    sampler: DeviceSampler
    cuda_graph: bool
    ops: DeviceOps


def _cuda_session(model: str | bytes, so: ort.SessionOptions, ops: DeviceOps, graph: bool, requested: bool | None):
    """The CUDA session; an automatic (not requested) CUDA graph that ORT refuses is dropped with a warning."""
    try:
        session = create_session(model, CUDA_EP, so, cuda_provider_options(cuda_graph=graph, stream_ptr=ops.stream_ptr))
    except ModelLoadError as e:
        if not (graph and requested is None):
            raise
        warnings.warn(
            f"CUDA graphs are off for this model: onnxruntime refused to capture it ({e}); decoding without them",
            RuntimeWarning,
            stacklevel=4,
        )
        graph = False
        session = create_session(model, CUDA_EP, so, cuda_provider_options(cuda_graph=False, stream_ptr=ops.stream_ptr))
    if session.get_providers()[0] != CUDA_EP:
        raise ProviderError(
            "onnxruntime could not start the CUDA execution provider (its CUDA or cuDNN libraries did not load) "
            f"and fell back to {session.get_providers()}; check `python -c 'import onnxruntime; "
            "onnxruntime.preload_dlls()'` and the onnxruntime-gpu install"
        )
    return session, graph


def _check_device_memory(spec: ModelSpec, max_length: int, ops: DeviceOps) -> None:
    need = spec.kv_bytes_per_token * max_length if spec.layout is KVLayout.GQA_SHARED else 0
    free = ops.free_bytes()
    if free is not None and need > 0.9 * free:
        raise InsufficientMemoryError(
            f"the KV cache for max_length {max_length} needs {need / 2**30:.2f} GiB of GPU memory "
            f"({spec.kv_bytes_per_token} bytes/token) but only {free / 2**30:.2f} GiB is free after loading "
            "the weights; pass a smaller max_length"
        )


def create_cuda_runtime(
    model: str | bytes,
    spec: ModelSpec,
    so: ort.SessionOptions,
    *,
    max_length: int,
    last_token_logits: bool,
    cuda_graph: bool | None,
    sampler_impl: str = "auto",
) -> DeviceRuntime:
    """Session, device buffers and sampler of a CUDA engine (``model``: path or edited model bytes)."""
    graph = resolve_cuda_graph(spec, cuda_graph)
    if spec.layout is not KVLayout.GQA_SHARED:
        # the growing-KV path (ORT-allocated device presents fed back as past) gave the CPU engine's
        # tokens on an H100, but the process aborted when such an engine was freed (onnxruntime-gpu
        # 1.31). Likely cause: those presents, still bound, were freed after their session (the GQA
        # path binds only its own buffers and never aborted); DeviceStepState.release() now clears the
        # binding first, but that has not run on a GPU: refused until a device check passes
        raise ProviderError(
            f"provider 'cuda' runs GroupQueryAttention share-buffer models only (onnxruntime-genai builder "
            f"layout, -p fp16 or -p int4 -e cuda); this model's KV layout is {spec.layout.value}: freeing such "
            "a CUDA engine aborted the process in a device test, so it is refused; use provider='cpu' for it"
        )
    if not gqa_runs_on_cuda(spec):
        # ORT places such a GroupQueryAttention on the CPU EP behind Memcpy nodes; its present output
        # is then a host copy, not the device buffer bound as past, so the shared KV cache loses the
        # earlier rows (seen on an H100 with onnxruntime-gpu 1.31: wrong tokens from the first decode step)
        raise ProviderError(
            f"provider 'cuda' cannot run this {spec.kv_dtype} GroupQueryAttention share-buffer model: "
            "onnxruntime's CUDA GroupQueryAttention takes float16 only, and on the CPU execution provider the "
            "KV cache can no longer be shared between past and present; export the model in float16 for CUDA "
            "(onnxruntime-genai builder: -p fp16 or -p int4 -e cuda) or use provider='cpu'"
        )
    ops = CupyOps(import_cupy())
    session, graph = _cuda_session(model, so, ops, graph, cuda_graph)
    _check_device_memory(spec, max_length, ops)
    state = DeviceStepState(
        session, spec, ops, batch=1, max_length=max_length, last_token_logits=last_token_logits, graph=graph
    )
    sampler = DeviceSampler(
        ops,
        batch=1,
        vocab_size=spec.vocab_size,
        logits_dtype=spec.logits.dtype,
        host_ids=state.host_ids,
        impl=sampler_impl,
    )
    return DeviceRuntime(session, state, sampler, graph, ops)
