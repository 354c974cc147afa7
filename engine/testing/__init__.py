"""Test helpers: deterministic random-weight models built from a seed (:mod:`.synthetic`) and the
numpy forward pass that the tests compare them against (:mod:`.reference`)."""

from engine.testing.reference import reference_logits
from engine.testing.synthetic import (
    SyntheticSpec,
    build_model,
    cached_model,
    phi4_mini_spec,
)

__all__ = ["SyntheticSpec", "build_model", "cached_model", "phi4_mini_spec", "reference_logits"]
