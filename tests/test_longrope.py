"""LongRoPE (Phi-3/Phi-4 with rope scaling): both sides of the short-to-long switch.

The synthetic builder's ``longrope=N`` graph chooses its cos/sin caches with
``If(Greater(total_sequence_length, N))``, as onnxruntime-genai's builder writes Phi-3 LongRoPE.
Keys already cached were rotated with the short tables, so a request that crosses N must
recompute its cache: transformers does (Phi-3's ``prepare_inputs_for_generation`` drops the cache
at the switch) and so does the engine. The reference here is what that gives: each step a whole-
sequence forward pass with the long tables once the sequence is longer than N, the short ones
before. onnxruntime-genai 0.18 on the CPU does not recompute and leaves that reference right
after the switch (checked below where it is installed).
"""

from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.config import load_model_spec
from engine.testing.reference import _ref_attention, _RefWeights, decoder_forward, greedy_continuation
from engine.testing.synthetic import LONGROPE_FACTOR, SyntheticSpec, cached_model, read_spec

SWITCH = 24
SPEC = SyntheticSpec(layout="gqa", longrope=SWITCH, context_length=128, seed=5)
MAX_LENGTH = 96


def _tables(spec: SyntheticSpec, length: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
    rot = spec.rotary_dim
    freqs = spec.rope_theta ** (-np.arange(rot // 2, dtype=np.float64) * 2.0 / rot) / factor
    angle = np.arange(length, dtype=np.float64)[:, None] * freqs[None, :]
    return np.cos(angle), np.sin(angle)


def reference_logits(folder, ids: np.ndarray) -> np.ndarray:
    """Whole-sequence logits; every position rotated with the long tables when the sequence is
    longer than the switch (transformers' LongRoPE), else with the short ones."""
    spec = read_spec(folder)
    weights = _RefWeights(folder, spec)
    length = ids.shape[1]
    cos, sin = _tables(spec, length, LONGROPE_FACTOR if length > spec.longrope else 1.0)
    return decoder_forward(spec, weights, ids, lambda i, p, h: _ref_attention(spec, weights, p, h, cos, sin))


def reference_greedy(folder, prompt: list[int], n: int) -> list[int]:
    return greedy_continuation(lambda ids: reference_logits(folder, ids), prompt, n)


@pytest.fixture(scope="module")
def folder():
    return cached_model(SPEC)


def _prompt(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, n).tolist()


def test_switch_length_read_from_the_graph(folder):
    assert load_model_spec(folder).rope_switch_length == SWITCH


@pytest.mark.parametrize(
    ("prompt_len", "new"),
    [(10, 12), (10, 30), (SWITCH, 10), (SWITCH + 6, 12)],
    ids=["short-side", "crosses-in-decode", "crosses-at-first-step", "long-side"],
)
def test_greedy_matches_the_recomputing_reference(folder, prompt_len, new):
    prompt = _prompt(prompt_len, prompt_len)
    eng = engine.Engine(folder, max_length=MAX_LENGTH)
    assert eng.generate(prompt, max_new_tokens=new).token_ids == reference_greedy(folder, prompt, new)


def test_a_batch_that_would_cross_runs_row_by_row_and_matches(folder):
    prompts = [_prompt(7, 10), _prompt(8, 14)]
    want = [reference_greedy(folder, p, 20) for p in prompts]
    eng = engine.Engine(folder, max_length=MAX_LENGTH, max_batch=2)
    assert [r.token_ids for r in eng.generate(prompts, max_new_tokens=20)] == want


def test_onnxruntime_genai_cpu_leaves_the_reference_after_the_switch(folder):
    """What docs/providers.md says of onnxruntime-genai 0.18 on the CPU: equal before the switch,
    different after it (it keeps the short-rotated keys). Other versions: only the first half."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime_genai is not installed (the bench extra)")
    prompt = _prompt(10, 10)
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 30, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    theirs = [int(t) for t in generator.get_sequence(0)][len(prompt) :]
    want = reference_greedy(folder, prompt, 30)
    before = SWITCH - len(prompt)  # tokens chosen from sequences of at most SWITCH positions
    assert theirs[: before + 1] == want[: before + 1]
    if og.__version__.startswith("0.18."):
        assert theirs != want
