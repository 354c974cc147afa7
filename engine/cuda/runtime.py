"""Building a CUDA engine: the checks that decide whether a model may run on CUDA, and the runtime.

:func:`create_cuda_runtime` makes what ``Engine(model_dir, provider="cuda")`` runs on: a
CUDAExecutionProvider session (options in :func:`engine.providers.cuda_provider_options`) whose
kernels and copies all run on the stream the engine owns, the device step state and the device
sampler. The decisions before it (cupy present, GroupQueryAttention on CUDA, CUDA graph or not) are
pure Python and tested on any machine. cupy is imported only by :func:`import_cupy`, only when a
CUDA engine is built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from ..config import KVLayout, ModelSpec
from ..errors import InsufficientMemoryError, InvalidRequestError, ModelLoadError, ProviderError
from ..providers import CUDA_EP, create_session, cuda_provider_options
from .ops import CupyOps, DeviceOps
from .sampler import DeviceSampler
from .state import DeviceStepState

__all__ = ["DeviceRuntime", "create_cuda_runtime", "gqa_runs_on_cuda", "import_cupy", "resolve_cuda_graph"]

CUPY_HINT = "pip install cupy-cuda13x (or the project's 'cuda' extra)"
# concat / combined-KV models are refused on CUDA until perf/cuda_concat.py (100 engines created,
# run and freed on a GPU) passes; that check turns this off in its own process to run them
REFUSE_GROWING_KV = True


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


def _check_device_memory(spec: ModelSpec, max_length: int, max_batch: int, ops: DeviceOps) -> None:
    need = spec.kv_bytes_per_token * max_length * max_batch if spec.layout is KVLayout.GQA_SHARED else 0
    free = ops.free_bytes()
    if free is not None and need > 0.9 * free:
        raise InsufficientMemoryError(
            f"the KV cache for max_length {max_length} x max_batch {max_batch} needs {need / 2**30:.2f} GiB of "
            f"GPU memory ({spec.kv_bytes_per_token} bytes/token/row) but only {free / 2**30:.2f} GiB is free after "
            "loading the weights; pass a smaller max_length or max_batch"
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
    max_batch: int = 1,
) -> DeviceRuntime:
    """Session, device buffers and sampler of a CUDA engine (``model``: path or edited model bytes);
    ``max_batch`` rows of every buffer (batches and auto_batch's continuous batching run on them)."""
    graph = resolve_cuda_graph(spec, cuda_graph)
    if spec.layout is not KVLayout.GQA_SHARED and REFUSE_GROWING_KV:
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
    _check_device_memory(spec, max_length, max_batch, ops)
    state = DeviceStepState(
        session, spec, ops, batch=max_batch, max_length=max_length, last_token_logits=last_token_logits, graph=graph
    )
    sampler = DeviceSampler(
        ops,
        batch=max_batch,
        vocab_size=spec.vocab_size,
        logits_dtype=spec.logits.dtype,
        host_ids=state.host_ids,
        impl=sampler_impl,
    )
    return DeviceRuntime(session, state, sampler, graph, ops)
