"""Test helpers: deterministic random-weight models built from a seed (see :mod:`.synthetic`)."""

from engine.testing.synthetic import (
    SyntheticSpec,
    build_model,
    cached_model,
    phi4_mini_spec,
    reference_logits,
)

__all__ = ["SyntheticSpec", "build_model", "cached_model", "phi4_mini_spec", "reference_logits"]
