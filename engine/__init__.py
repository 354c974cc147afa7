"""engine: a low-level LLM inference engine on ONNX Runtime.

>>> import engine
>>> eng = engine.Engine("path/to/model_dir", provider="cpu", max_length=2048)
>>> res = eng.generate("Once upon a time", max_new_tokens=64)
>>> res.text, res.token_ids, res.finish_reason
"""

from .config import KVLayout, ModelSpec, load_model_spec
from .errors import (
    ContextLengthError,
    EngineError,
    InsufficientMemoryError,
    InvalidRequestError,
    ModelFileNotFoundError,
    ModelLoadError,
    ProviderError,
    UnsupportedModelError,
)
from .providers import available_providers

# The generation API is imported on first use, so that ``import engine.testing.synthetic`` or
# ``import engine.config`` does not load tokenizers, the sampler and its compiled kernels.
_LAZY = {
    "Engine": "generation",
    "GenerationResult": "generation",
    "GenerationStats": "generation",
    "StreamChunk": "generation",
    "generate": "generation",
    "estimate_kv_cache_bytes": "generation",
    "SamplingParams": "sampling",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "ContextLengthError",
    "Engine",
    "EngineError",
    "GenerationResult",
    "GenerationStats",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "KVLayout",
    "ModelFileNotFoundError",
    "ModelLoadError",
    "ModelSpec",
    "ProviderError",
    "SamplingParams",
    "StreamChunk",
    "UnsupportedModelError",
    "__version__",
    "available_providers",
    "estimate_kv_cache_bytes",
    "generate",
    "load_model_spec",
]
