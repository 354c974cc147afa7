"""ONNX Runtime sessions tuned per execution provider.

The CPU defaults were chosen by measurement (docs/providers.md has the figures and the command):

* intra-op threads: every core the process may use, except for models under 1 MB of weights,
  where the per-op threading overhead costs more than a second core gains;
* spinning on: idle worker threads spin between the small back-to-back ops of a decode step
  instead of sleeping and waking;
* graph optimization level ALL (ORT's layout and fusion passes);
* inter-op threads 1, sequential execution (decoders are a single chain of ops).

On CUDA the CPU EP only runs the few nodes CUDA lacks (shape arithmetic), so one intra-op thread
without spinning is the default there; :func:`cuda_provider_options` holds the CUDA EP options
(engine/cuda/runtime.py uses them, docs/providers.md explains each).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from .errors import ModelLoadError, ProviderError

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
PROVIDER_NAMES = {"cpu": CPU_EP, "cuda": CUDA_EP}

# Below this many bytes of weights one intra-op thread beats two: measured on this project's
# 2-core machines (docs/providers.md), tiny-gpt2 (0.57 MB) decodes 16 % slower on two threads,
# while stories260k (1.4 MB, GroupQueryAttention splits its heads over threads) is 15 % faster.
TINY_MODEL_BYTES = 1024 * 1024

MAX_THREADS = 1024  # intra-op threads an engine may ask for; ORT takes an int32 and each thread costs a stack

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """Short names (``"cpu"``, ``"cuda"``) of the execution providers this onnxruntime build has."""
    have = set(ort.get_available_providers())
    return [short for short, full in PROVIDER_NAMES.items() if full in have]


def resolve_provider(name: str) -> str:
    """Map ``"cpu"``/``"cuda"`` (or the full ORT name) to the ORT provider name, checking it is available."""
    if not isinstance(name, str):
        raise ProviderError(f"provider must be a string ('cpu' or 'cuda'), got {type(name).__name__}")
    key = name.lower()
    full = PROVIDER_NAMES.get(key) or next((f for f in PROVIDER_NAMES.values() if f.lower() == key), None)
    if full is None:
        raise ProviderError(f"unknown provider {name!r}; allowed: {', '.join(PROVIDER_NAMES)}")
    if full not in ort.get_available_providers():
        hint = (
            " (install the 'cuda' extra, onnxruntime-gpu and cupy-cuda13x, in place of the CPU onnxruntime wheel)"
            if full == CUDA_EP
            else ""
        )
        raise ProviderError(
            f"provider {name!r} is not available in this onnxruntime build{hint}; "
            f"available: {', '.join(available_providers())}"
        )
    return full


def physical_cores() -> int:
    """Number of CPU cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def proc_kib_field(path: str, key: str) -> int | None:
    """A ``key: N kB`` field of a /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes;
    None where the file or the field is missing (not Linux)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_threads(weight_bytes: int) -> int:
    """Intra-op thread count for a model with ``weight_bytes`` of weights on this machine."""
    return 1 if weight_bytes < TINY_MODEL_BYTES else physical_cores()


@dataclass(frozen=True)
class SessionConfig:
    """User-facing session knobs; ``None`` means "the measured default"."""

    threads: int | None = None
    spinning: bool | None = None
    graph_optimization: str = "all"
    optimized_model_path: str | None = None  # where ORT writes the optimized graph (a cache for next loads)
    profile: bool = False
    profile_prefix: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.threads is not None and (
            not isinstance(self.threads, int) or isinstance(self.threads, bool) or not 1 <= self.threads <= MAX_THREADS
        ):
            raise ValueError(f"threads must be an int in 1..{MAX_THREADS} or None (the default), got {self.threads!r}")
        if self.spinning is not None and not isinstance(self.spinning, bool):
            raise ValueError(f"spinning must be True, False or None (the default), got {self.spinning!r}")
        if not isinstance(self.graph_optimization, str) or self.graph_optimization not in _OPT_LEVELS:
            raise ValueError(
                f"graph_optimization must be one of {', '.join(_OPT_LEVELS)}, got {self.graph_optimization!r}"
            )
        if self.optimized_model_path is not None:
            if not isinstance(self.optimized_model_path, (str, os.PathLike)):
                raise ValueError(f"optimized_model_path must be a path or None, got {self.optimized_model_path!r}")
            try:
                folder = Path(self.optimized_model_path).expanduser().resolve().parent
            except (RuntimeError, OSError, ValueError) as e:
                raise ValueError(f"optimized_model_path {self.optimized_model_path!r} is not a usable path: {e}") from e
            if not folder.is_dir():
                raise ValueError(
                    f"optimized_model_path {self.optimized_model_path!r}: its folder {folder} does not exist "
                    "(the engine writes the optimized graph there; create the folder first)"
                )


def session_options(
    config: SessionConfig,
    weight_bytes: int,
    genai_options: Mapping[str, Any] | None = None,
    provider: str = CPU_EP,
) -> ort.SessionOptions:
    """Build SessionOptions: the model's genai_config.json session_options, then our defaults, then ``config``.

    ``provider`` (the full ORT name) picks the defaults: on CUDA one intra-op thread, no spinning.
    """
    config.validate()
    so = ort.SessionOptions()
    genai_options = dict(genai_options or {})
    on_cpu = provider == CPU_EP
    default = default_threads(weight_bytes) if on_cpu else 1
    threads = config.threads or genai_options.get("intra_op_num_threads") or default
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = _OPT_LEVELS[config.graph_optimization]
    spinning = on_cpu if config.spinning is None else config.spinning
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    so.log_severity_level = 3
    for key, value in genai_options.items():
        # genai passes ORT config entries ("session.*", "ep.*") through as strings.
        if isinstance(key, str) and key.startswith(("session.", "ep.")) and isinstance(value, str) and value:
            so.add_session_config_entry(key, value)
    if config.optimized_model_path:
        so.optimized_model_filepath = str(Path(config.optimized_model_path).expanduser())
    if config.profile:
        so.enable_profiling = True
        if config.profile_prefix:
            so.profile_file_prefix = config.profile_prefix
    return so


def cuda_provider_options(*, cuda_graph: bool, stream_ptr: int | None = None, device_id: int = 0) -> dict[str, str]:
    """CUDAExecutionProvider options tuned for decoding (ORT reads every value as a string).

    ``stream_ptr``: a ``cudaStream_t`` (as an int) that ORT runs every kernel and copy on, so work
    the engine enqueues on the same stream (mask update, sampling, the ids copy) is ordered with the
    model's kernels without any extra synchronization.
    """
    options = {
        "device_id": str(device_id),
        # ORT's own host<->device copies go on the compute stream: ordered with the kernels
        "do_copy_in_default_stream": "1",
        # cuDNN may take the workspace its fastest algorithm wants (convolutions only; harmless here)
        "cudnn_conv_use_max_workspace": "1",
        # grow the arena by what is asked, not to the next power of two: decode shapes repeat, and
        # doubling would strand GPU memory beside the weights and the KV cache
        "arena_extend_strategy": "kSameAsRequested",
        # fp32 MatMuls in fp32, not TF32: greedy tokens of fp32 models match the CPU (fp16/int4 unaffected)
        "use_tf32": "0",
        # capture the decode step once and replay it (needs fixed shapes and buffer addresses)
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }
    if stream_ptr is not None:
        options["has_user_compute_stream"] = "1"
        options["user_compute_stream"] = str(int(stream_ptr))
    return options


def create_session(
    model: str | bytes,
    provider: str,
    so: ort.SessionOptions,
    provider_options: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> ort.InferenceSession:
    """Create the InferenceSession, turning ORT's load failures into ModelLoadError.

    ``source``: the file the model came from, named in the error when ``model`` is bytes."""
    providers: list[Any] = [(provider, dict(provider_options or {}))]
    if provider != CPU_EP:
        providers.append(CPU_EP)  # fallback for the ops the provider lacks
    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/RuntimeException classes
        where = model if isinstance(model, str) else (source or "the model")
        raise ModelLoadError(f"{where}: onnxruntime could not load it ({type(e).__name__}: {e})") from e
