"""Shared pytest fixtures.

Real model fixtures live in ../shared next to the repository (never copied into it). Tests that
need them skip with a stated reason when that folder is absent (a user's fresh clone), and carry
the ``shared`` marker (``-m "not shared"`` deselects them): every test that uses one of
:data:`SHARED_FIXTURES`, through its own fixtures or by name with :func:`shared_param`.

Markers (pyproject.toml): ``slow`` on tests that take about a second or more here (``make
test-fast`` leaves them out), ``cuda`` on the tests that need a GPU (tests/test_cuda.py),
``shared`` as above.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("ENGINE_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MODELS = SHARED / "models"


# the fixtures below that read ../shared
SHARED_FIXTURES = frozenset({"stories260k", "tiny_llama_fp16", "tiny_gpt2", "phi3_tokenizer_dir"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``shared`` every test whose fixtures (transitively) include a ../shared fixture."""
    for item in items:
        if SHARED_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.shared)


def shared_param(name: str) -> object:
    """A parameter naming a fixture that needs ../shared, for a test or fixture that gets it with
    ``request.getfixturevalue`` (invisible to the hook above): marked ``shared``."""
    return pytest.param(name, marks=pytest.mark.shared, id=name)


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


@pytest.fixture(scope="session")
def int4_acc4(tmp_path_factory) -> Path:
    """A 2-layer Phi-4-mini-shaped INT4 model whose MatMulNBits have accuracy_level 4 (int8
    activations: ModelSpec.coarse_activations), vocab 4096, random weights."""
    from engine.testing.synthetic import cached_model, phi4_mini_spec

    return cached_model(phi4_mini_spec(layers=2, vocab=4096), tmp_path_factory.mktemp("int4acc4"))
