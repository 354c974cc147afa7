"""Device operations: the one interface (:class:`DeviceOps`) the device state and sampler run on.

:class:`CupyOps` is the CUDA device: cupy arrays and two small kernels (argmax per row, the decode
step's mask/position update) on one non-blocking stream that ORT also runs on, so the engine's work
is ordered with the model's without any synchronization. :class:`NumpyOps` is the reference: host
memory, ORT device ``"cpu"``; it defines what each kernel computes and lets the CPU test suite drive
the whole device path. cupy is never imported here: :class:`CupyOps` is handed the module.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..sampling import argmax

__all__ = ["KERNEL_NAMES", "KERNEL_SOURCE", "CupyOps", "DeviceOps", "NumpyOps"]


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

    def rows_writer(
        self, mask_dtype: np.dtype, position_dtype: np.dtype
    ) -> Callable[[Any, Any, Any, Any, int], None]: ...  # the batched step's per-row mask/position update

    def argmax_writer(self, logits_dtype: np.dtype, ids_dtype: np.dtype) -> Callable[[Any, Any], None]: ...

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

    def rows_writer(
        self, mask_dtype: np.dtype, position_dtype: np.dtype
    ) -> Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], None]:
        def write(
            mask: np.ndarray, positions: np.ndarray, lengths: np.ndarray, finished: np.ndarray, rows: int
        ) -> None:
            # before a batched step, each of the first ``rows`` rows that has not finished: its new
            # token's column becomes valid, its position is its length, and it holds one more token
            for b in range(rows):  # a loop, as the kernel's threads: no temporary arrays
                if not finished[b]:
                    n = int(lengths[b])
                    mask[b, n] = 1
                    positions[b, 0] = n
                    lengths[b] = n + 1

        return write

    def argmax_writer(self, logits_dtype: np.dtype, ids_dtype: np.dtype) -> Callable[[Any, Any], None]:
        return argmax  # engine.sampling.argmax: first index of the max per row, NaN read as -inf

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

// Before a batched decode step, for each of the first `batch` rows not finished: its new token's
// column becomes valid, its position is its length, and it holds one more token. Rows keep their
// tokens in their leading columns (no padding), so a finished row's mask stays as it was.
template <typename M, typename P>
__global__ void prepare_rows(M* __restrict__ mask, const long long mask_stride, P* __restrict__ positions,
                             long long* __restrict__ lengths, const unsigned char* __restrict__ finished,
                             const int batch) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b < batch && !finished[b]) {
        const long long n = lengths[b];
        mask[b * mask_stride + n] = (M)1;
        positions[b] = (P)n;
        lengths[b] = n + 1;
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
KERNEL_NAMES = (
    tuple(f"argmax_rows<{t}, {i}>" for t in _FLOATS for i in _INTS)
    + tuple(f"prepare_step<{m}, {p}>" for m in _INTS for p in _INTS)
    + tuple(f"prepare_rows<{m}, {p}>" for m in _INTS for p in _INTS)
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

    def rows_writer(self, mask_dtype: np.dtype, position_dtype: np.dtype) -> Callable[[Any, Any, Any, Any, int], None]:
        kernel = self._kernel(f"prepare_rows<{_C_TYPES[np.dtype(mask_dtype)]}, {_C_TYPES[np.dtype(position_dtype)]}>")
        stream = self.stream

        def write(mask: Any, positions: Any, lengths: Any, finished: Any, rows: int) -> None:
            with stream:
                kernel(
                    ((rows + 31) // 32,),
                    (32,),
                    (mask, np.int64(mask.shape[1]), positions, lengths, finished, np.int32(rows)),
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

    def free_bytes(self) -> int | None:
        free, _total = self._runtime.memGetInfo()
        return int(free)
