"""Shared pytest fixtures.

Real model fixtures live in ../shared next to the repository (never copied into it). Tests that
need them skip with a stated reason when that folder is absent (a user's fresh clone).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("ENGINE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"


def shared_path(*parts: str) -> Path:
    """Path inside ../shared, or skip the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the real fixtures in ../shared are not beside this checkout")
    return path


def load_reference(model_dir: Path) -> list[dict]:
    """The greedy reference continuations in a fixture's reference.json."""
    with (model_dir / "reference.json").open(encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def stories260k() -> Path:
    """Real tiny Llama (GQA share buffer, sentencepiece) from ../shared/models."""
    return shared_path("models", "stories260k")


@pytest.fixture(scope="session")
def tiny_llama_fp16() -> Path:
    """fp16 concat-KV Llama export with position_ids, HF tokenizer.json."""
    return shared_path("models", "tiny-llama-fp16")


@pytest.fixture(scope="session")
def tiny_gpt2() -> Path:
    """GPT-2 with combined past_%d KV, no tokenizer."""
    return shared_path("models", "tiny-gpt2-fp32")


@pytest.fixture(scope="session")
def phi3_tokenizer_dir() -> Path:
    """Phi-3 family tokenizer.json, tokenizer_config.json and chat template."""
    return shared_path("tokenizers", "phi3")
