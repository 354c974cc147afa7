"""The decoder graph is parsed once per load; the last-token edit takes that parse from the spec."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

import engine
from engine import config, graph
from engine.config import load_model_spec
from engine.graph import load_for_generation
from engine.testing.synthetic import SyntheticSpec, cached_model

GQA = SyntheticSpec(layout="gqa")


@pytest.fixture
def count_loads(monkeypatch):
    """Counts onnx.load calls made by engine.config and engine.graph."""
    calls: list[str] = []
    real = onnx.load

    def load(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(config.onnx, "load", load)
    assert graph.onnx is config.onnx
    return calls


@pytest.mark.parametrize("last_token_logits", [True, False])
def test_one_parse_per_load_and_the_proto_is_not_kept(count_loads, last_token_logits):
    spec = load_model_spec(cached_model(GQA))
    model, edited = load_for_generation(spec, last_token_logits)
    assert len(count_loads) == 1
    assert edited is last_token_logits
    if edited:
        assert isinstance(model, bytes) and b"engine_last_token_slice" in model
    else:
        assert model == str(spec.model_path)
    assert spec.take_graph() is None  # handed over (or dropped) by load_for_generation


def test_a_taken_graph_is_read_again(count_loads):
    spec = load_model_spec(cached_model(GQA))
    first, _ = load_for_generation(spec, True)
    again, edited = load_for_generation(dataclasses.replace(spec), True)
    assert edited and again == first
    assert len(count_loads) == 2


def test_step_read_bytes_counts_one_embedding_row():
    """GQA layout: the token embedding is the one table only gathered from (the concat layout's
    cos/sin caches are too)."""
    spec = load_model_spec(cached_model(GQA))
    model = onnx.load(str(spec.model_path))
    emb = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
    table = onnx.numpy_helper.to_array(emb)
    row = np.dtype(GQA.dtype).itemsize * GQA.hidden
    assert table.shape == (GQA.vocab, GQA.hidden)
    assert spec.step_read_bytes == spec.weight_bytes - table.nbytes + row


def test_an_engine_load_parses_the_graph_once(count_loads):
    eng = engine.Engine(cached_model(GQA), max_length=64)
    try:
        assert eng.last_token_logits
        assert len(count_loads) == 1
        assert eng.spec.take_graph() is None
    finally:
        eng.close()
