"""Speculation on models whose verify passes cannot reproduce one-token steps exactly.

ONNX Runtime's CPU kernels sum in another order for one new token than for several (MLAS's
one-row GEMM in GroupQueryAttention's probabilities x V), up to ~4e-7. A MatMulNBits of
accuracy_level 4 rounds its input to int8 next, which turns that into a whole int8 step for some
element, enough to swap near-tied greedy tokens (on a 4-layer
Phi-4-mini-shaped INT4 model, 5 of 6 grounded requests parted from plain decoding within 64
tokens; at accuracy_level 0 none did). So on such models (``ModelSpec.coarse_activations``)
speculation takes plain steps unless ``speculation_options={"exact": False}``.
"""

from __future__ import annotations

import dataclasses
import platform
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper

import engine
from engine.config import coarse_activations
from engine.speculation import SpeculationConfig
from engine.testing.reference import reference_logits
from engine.testing.synthetic import SyntheticSpec, cached_model, phi4_mini_spec
from tests.test_speculation import _ScriptDrafter

VOCAB = 4096


def _graph(*nodes) -> object:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    return helper.make_graph(list(nodes), "g", [x], [x])


def test_coarse_activations_names_the_reason():
    nbits = [
        helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", accuracy_level=a)
        for a in range(5)
    ]
    assert coarse_activations(_graph(nbits[0], nbits[1])) is None  # fp32 activations
    assert "accuracy_level 4 (int8 activations)" in coarse_activations(_graph(nbits[0], nbits[4]))
    if platform.machine().lower() in ("x86_64", "amd64"):  # MLAS computes levels 2 and 3 in fp32 there
        assert coarse_activations(_graph(nbits[2], nbits[3])) is None
    else:
        assert "accuracy_level 2 (fp16 activations)" in coarse_activations(_graph(nbits[2]))
    dq = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], domain="com.microsoft")
    assert "DynamicQuantizeMatMul" in coarse_activations(_graph(dq))
    assert coarse_activations(_graph(helper.make_node("MatMul", ["x", "w"], ["y"]))) is None


def test_spec_of_built_models(int4_acc4, tmp_path_factory):
    assert "accuracy_level 4" in engine.Engine(int4_acc4, max_length=64).spec.coarse_activations
    fp32 = cached_model(SyntheticSpec(layout="gqa", seed=7), tmp_path_factory.mktemp("fp32"))
    assert engine.Engine(fp32, max_length=64).spec.coarse_activations is None


def _grounded_prompts(plain: engine.Engine, rng: np.random.Generator, n: int) -> list[list[int]]:
    """text + the model's own greedy continuation + text again: a prompt lookup drafts from it."""
    out = []
    for _ in range(n):
        text = rng.integers(3, VOCAB, 20).tolist()
        cont = plain.generate(text, 24).token_ids
        out.append(text + cont + text)
    return out


@pytest.mark.slow
def test_int8_activation_model_takes_plain_steps_and_equals_plain_decoding(int4_acc4):
    plain = engine.Engine(int4_acc4, max_length=256)
    with pytest.warns(RuntimeWarning, match=r"accuracy_level 4.*exact': False"):
        spec = engine.Engine(int4_acc4, max_length=256, speculation="prompt_lookup")
    assert spec.speculation_plain is not None
    plain.eos_token_ids = spec.eos_token_ids = frozenset()
    for prompt in _grounded_prompts(plain, np.random.default_rng(5), 3):
        want = plain.generate(prompt, 48).token_ids
        got = spec.generate(prompt, 48)
        assert got.token_ids == want
        assert got.stats.drafted_tokens == 0
        # a request asking for it on an engine without it: accepted, plain steps too
        again = plain.generate(prompt, 48, speculation="prompt_lookup")
        assert again.token_ids == want and again.stats.drafted_tokens == 0


def _near_argmax(model, prompt: list[int], tokens: list[int]) -> None:
    """Each token is the best logit of the float64 reference forward pass (the int4 weights
    dequantized, no int8 rounding) or within 0.05 of it, and at least 90 % are the best: the
    engine's choice up to its int8 rounding (margins between the two best are ~0.2 typically)."""
    seq = np.array([prompt + tokens])
    logits = reference_logits(model, seq)[0][len(prompt) - 1 : -1]  # (new, vocab): the logits each token came from
    gaps = logits.max(-1) - logits[np.arange(len(tokens)), tokens]
    assert gaps.max() <= 0.05, f"token {int(gaps.argmax())} is {gaps.max():.3f} below the reference's best"
    assert (gaps == 0).mean() >= 0.9


@pytest.mark.slow
def test_opt_in_inexact_speculation_drafts_and_keeps_near_argmax_tokens(int4_acc4):
    """``exact=False`` verifies drafts on the int8-activation model; every token is still the
    model's near-best at its position, as plain decoding's are (same tolerance)."""
    plain = engine.Engine(int4_acc4, max_length=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the caller chose it
        spec = engine.Engine(
            int4_acc4, max_length=256, speculation="prompt_lookup", speculation_options={"exact": False}
        )
    assert spec.speculation_plain is None
    plain.eos_token_ids = spec.eos_token_ids = frozenset()
    rng = np.random.default_rng(3)
    for _ in range(3):
        prompt = rng.integers(3, VOCAB, 24).tolist()
        want = plain.generate(prompt, 48).token_ids
        spec._ctx.drafter = _ScriptDrafter(SpeculationConfig(exact=False), prompt, want)
        got = spec.generate(prompt, 48)
        assert got.stats.accepted_tokens > 10
        _near_argmax(int4_acc4, prompt, want)
        _near_argmax(int4_acc4, prompt, got.token_ids)


def test_exact_option_is_checked(int4_acc4):
    with pytest.raises(engine.InvalidRequestError, match="exact must be True or False"):
        engine.Engine(int4_acc4, max_length=64, speculation="prompt_lookup", speculation_options={"exact": "no"})


def test_accuracy_level_zero_still_drafts(tmp_path_factory):
    model = cached_model(
        dataclasses.replace(phi4_mini_spec(layers=1, vocab=VOCAB), accuracy_level=0), tmp_path_factory.mktemp("acc0")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = engine.Engine(model, max_length=128, speculation="prompt_lookup")
    assert eng.speculation_plain is None and eng._ctx.drafter is not None


@pytest.mark.slow
def test_evicted_stream_on_int8_activation_model_resumes_with_the_same_tokens(int4_acc4):
    """A resumed stream's cache is rebuilt as the run built it: the prompt in one pass, then its
    tokens in one-token steps (one pass over them would round differently and could change the
    tokens that follow)."""
    eng = engine.Engine(int4_acc4, max_length=256)
    eng.eos_token_ids = frozenset()
    rng = np.random.default_rng(21)
    for _ in range(3):
        prompt = rng.integers(3, VOCAB, 16).tolist()
        want = eng.generate(prompt, 64).token_ids
        stream = eng.stream(prompt, max_new_tokens=64)
        head = [next(stream).token_id for _ in range(20)]
        eng.generate(rng.integers(3, VOCAB, 8).tolist(), 4)  # same thread: evicts the stream
        assert head + [c.token_id for c in stream] == want
