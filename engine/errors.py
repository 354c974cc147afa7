"""Exception classes raised by the engine.

Every error the engine raises on bad input derives from :class:`EngineError`, so a service can
catch one class. The subclasses also derive from the matching built-in exception, so code that
catches ``ValueError`` or ``FileNotFoundError`` keeps working.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelLoadError(EngineError, ValueError):
    """A model folder cannot be used: a file is missing or corrupted, or the config is inconsistent."""


class ModelFileNotFoundError(ModelLoadError, FileNotFoundError):
    """The model folder, or a file the model folder must contain, does not exist."""


class UnsupportedModelError(ModelLoadError):
    """The model is valid ONNX but uses a layout or dtype the engine does not handle."""


class InvalidRequestError(EngineError, ValueError):
    """A generate()/stream() argument is out of range or of the wrong type.

    The engine state is untouched when this is raised: the next valid request works.
    """


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested new tokens do not fit in the engine's max_length."""


class ProviderError(EngineError, ValueError):
    """An execution provider name is unknown or the provider is not available in this install."""


class InsufficientMemoryError(EngineError, MemoryError):
    """The requested buffers (KV cache at max_length) do not fit in the memory available now."""
