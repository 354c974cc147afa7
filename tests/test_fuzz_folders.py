"""Hostile model folders, generated: mutations of genai_config.json and tokenizer_config.json
(any leaf replaced by any JSON value, deleted, or a key added) and truncated files. Each folder
either loads and answers a greedy request consistently with the untouched model, or raises the
package's own error, within a per-case deadline and never with another exception."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine.errors import EngineError
from engine.testing.synthetic import SyntheticSpec, cached_model

CASE_DEADLINE_S = 20  # a load and a 6-token answer of the tiny model take well under a second
PROMPT = [5, 6, 7]
GREEDY = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}

JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64),
    st.sampled_from([0, 1, -1, 2, 10**7, 2**31, 2**40]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["%d", "p.%d.%d", "%s", "%", "past_key_values.%d.key", "", "abc", "true", "false", "1"]),
    st.lists(st.integers(-3, 300), max_size=4),
    st.just([{"name": 1}]),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return cached_model(SyntheticSpec(layout="gqa", seed=11), tmp_path_factory.mktemp("fuzz-folders"))


@pytest.fixture(scope="module")
def canonical(base) -> list[int]:
    eng = engine.Engine(base, max_length=64)
    try:
        return eng.generate(PROMPT, max_new_tokens=6, **GREEDY).token_ids
    finally:
        eng.close()


def _leaves(obj: object, path: tuple = ()) -> Iterator[tuple]:
    """Paths of every value in a JSON tree (containers included, so whole sections get replaced)."""
    if path:
        yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))


def _mutate(obj: dict, path: tuple, action: str, value: object) -> None:
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(parent[key], dict):
        parent[key]["fuzz_extra_key"] = value
    else:
        parent[key] = value


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def expired(*_: object) -> None:
        raise TimeoutError(f"a fuzz case ran past {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _check_folder(folder: Path, canonical: list[int]) -> None:
    """Loads and answers consistently, or raises an EngineError; nothing else, within the deadline."""
    with _deadline(CASE_DEADLINE_S):
        try:
            eng = engine.Engine(folder, max_length=64)
        except EngineError:
            return
        try:
            try:
                got = eng.generate(PROMPT, max_new_tokens=6, **GREEDY).token_ids
            except EngineError:
                return  # e.g. a context_length too small for this request: refused with a message
            # the same logits: a changed EOS set may end it earlier or later, nothing else differs
            n = min(len(got), len(canonical))
            assert got[:n] == canonical[:n], (got, canonical)
        finally:
            eng.close()


def _copy(base: Path) -> tuple[tempfile.TemporaryDirectory, Path]:
    tmp = tempfile.TemporaryDirectory(prefix="fuzz-folder-")
    folder = Path(tmp.name) / "model"
    shutil.copytree(base, folder)
    return tmp, folder


@st.composite
def json_mutation(draw: st.DrawFn, doc: dict) -> tuple[tuple, str, object]:
    paths = sorted(_leaves(doc), key=repr)
    path = draw(st.sampled_from(paths))
    action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    return path, action, draw(JSON_VALUES)


FUZZ_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.mark.parametrize("name", ["genai_config.json", "tokenizer_config.json"])
@FUZZ_SETTINGS
@given(data=st.data())
def test_mutated_config_loads_or_raises_package_error(base, canonical, name, data):
    doc = json.loads((base / name).read_text())
    mutations = data.draw(st.lists(json_mutation(doc), min_size=1, max_size=3))
    tmp, folder = _copy(base)
    with tmp:
        for path, action, value in mutations:
            try:
                _mutate(doc := json.loads((folder / name).read_text()), path, action, value)
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed or replaced this path
            (folder / name).write_text(json.dumps(doc))
        _check_folder(folder, canonical)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(["genai_config.json", "tokenizer_config.json", "tokenizer.json", "model.onnx"]),
    fraction=st.floats(0.0, 0.999),
)
def test_truncated_file_loads_or_raises_package_error(base, canonical, name, fraction):
    tmp, folder = _copy(base)
    with tmp:
        raw = (folder / name).read_bytes()
        (folder / name).write_bytes(raw[: int(len(raw) * fraction)])
        _check_folder(folder, canonical)
