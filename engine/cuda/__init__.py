"""The CUDA execution provider: device-resident buffers, on-device sampling, CUDA graphs.

``Engine(model_dir, provider="cuda")`` builds what this package defines, one concern per module
(imports run runtime -> state / sampler -> ops):

* :mod:`.runtime`: whether a model may run on CUDA, and :func:`create_cuda_runtime` (the session on
  the engine's stream, the state, the sampler);
* :mod:`.state`: :class:`DeviceStepState` / :class:`DeviceKVCache`, every buffer on the device,
  bound by pointer, ``max_batch`` rows (batches and auto_batch's joins run on them); a CUDA graph
  of the decode step per row count;
* :mod:`.sampler`: :class:`DeviceSampler`, the next ids of every row chosen on the device with the
  row's own parameters and seed (host fallback for penalties, min-p, logit bias and logprobs);
* :mod:`.ops`: :class:`DeviceOps`, with :class:`CupyOps` (CUDA) and :class:`NumpyOps`, the
  reference that runs the same state and sampler on a CPU session over host memory. The CPU test
  suite drives the whole device path through NumpyOps; tests/test_cuda.py runs it on a GPU.
"""

from .ops import _C_TYPES as _C_TYPES
from .ops import KERNEL_NAMES, KERNEL_SOURCE, CupyOps, DeviceOps, NumpyOps
from .runtime import DeviceRuntime, create_cuda_runtime, gqa_runs_on_cuda, import_cupy, resolve_cuda_graph
from .sampler import DeviceSampler, sample_rows, sampler_mode, splitmix_draw
from .state import DeviceKVCache, DeviceStepState, decode_run_options

__all__ = [
    "KERNEL_NAMES",
    "KERNEL_SOURCE",
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
    "splitmix_draw",
]
