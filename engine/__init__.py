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
from .generate import Engine, GenerationResult, GenerationStats, StreamChunk, generate
from .providers import available_providers
from .sampling import SamplingParams

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
    "generate",
    "load_model_spec",
]
